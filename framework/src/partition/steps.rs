//! The live side of a partition's steps (see [`crate::step`]): an input record, or a
//! wall-clock tick that the worker decides on and records in the open transaction's
//! incremental record, so that a replay fires it at the same place with the same time.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::{Live, LiveExit, PartitionWorker, TICK_SOURCE};
use crate::config::ErrorPolicy;
use crate::error::Error;
use crate::processor::{dead_letter_record, Output, OutputRecord, Processor, RawRecord};
use crate::proto::WallClockTick;
use crate::step::{process_step, tick_step, Position, StepError};
use crate::RecordError;

impl<P: Processor> PartitionWorker<P> {
    /// Processes one input record, and the timers it makes due. The caller adds the time it
    /// took to the recovery cost (per burst of records: reading the clock costs).
    pub(super) fn process_one(
        &self,
        live: &mut Live<P::State>,
        input: usize,
        raw: &RawRecord,
        out: &mut Output,
    ) -> Result<(), LiveExit> {
        let mut dead_letters = Vec::new();
        let mut on_failure = self.on_failure(Some(raw), &mut dead_letters);
        let (processor, state) = (&*self.processor, &mut live.state);
        let stepped = process_step(processor, state, &live.stores, raw, out, &mut on_failure);
        drop(on_failure);
        live.unsent.append(&mut dead_letters);
        self.step_done(stepped)?;
        let outputs = out.take();
        self.metrics.output_records(outputs.len() as u64);
        for record in &outputs {
            live.digest.update(record);
        }
        if let Some(streaming) = &mut live.streaming {
            streaming.record_processed(&outputs);
        }
        live.unsent.extend(outputs);
        live.set_next(input, raw.offset + 1);
        live.records_since_base += 1;
        self.metrics.records_processed(1);
        self.partition_metrics.record_processed();
        Ok(())
    }

    /// Calls [`Processor::on_wall_clock`] now (in the open transaction), and the timers it
    /// makes due, and records the tick for the transaction's incremental record.
    pub(super) fn tick(&self, live: &mut Live<P::State>, out: &mut Output) -> Result<(), LiveExit> {
        let started = Instant::now();
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let at = Position {
            topic: &self.topic,
            partition: self.partition,
            offset: live.next_offset,
        };
        let mut dead_letters = Vec::new();
        let mut on_failure = self.on_failure(None, &mut dead_letters);
        let (processor, state) = (&*self.processor, &mut live.state);
        let stepped = tick_step(
            processor,
            state,
            &live.stores,
            (&at, time_ms),
            out,
            &mut on_failure,
        );
        drop(on_failure);
        live.unsent.append(&mut dead_letters);
        live.recovery_cost.replay += started.elapsed();
        self.step_done(stepped)?;
        tracing::debug!(next_offset = live.next_offset, time_ms, "wall-clock tick");
        self.metrics.wall_clock_tick();
        let outputs = out.take();
        self.metrics.output_records(outputs.len() as u64);
        for record in &outputs {
            live.digest.update(record);
        }
        if let Some(streaming) = &mut live.streaming {
            streaming.tick_fired(&outputs);
        }
        live.unsent.extend(outputs);
        live.ticks.push(WallClockTick {
            next_input_offset: live.next_offset,
            time_ms,
        });
        if let Some(waiting) = &mut live.interleave {
            waiting.record_step(TICK_SOURCE);
        }
        live.ticks_since_base += 1;
        Ok(())
    }

    /// What the error policy makes of a failed call: `Fail` stops the partition; `Skip` logs
    /// and counts it; `DeadLetter` also adds a dead letter to `dead_letters` (not to the
    /// output digest: a replay skips the failure again).
    fn on_failure<'a>(
        &'a self,
        raw: Option<&'a RawRecord>,
        dead_letters: &'a mut Vec<OutputRecord>,
    ) -> impl FnMut(RecordError, &mut Output) -> Result<(), RecordError> + 'a {
        move |error: RecordError, _: &mut Output| {
            self.metrics.record_error();
            match &self.config.error_policy {
                ErrorPolicy::Skip => {
                    match raw {
                        Some(_) => {
                            tracing::warn!(offset = error.offset(), kind = error.kind(), error = %error, "skipping a record")
                        }
                        None => {
                            tracing::warn!(offset = error.offset(), kind = error.kind(), error = %error, "skipping a failed wall-clock tick")
                        }
                    }
                    self.metrics.records_skipped();
                }
                ErrorPolicy::DeadLetter { topic } => {
                    match raw {
                        Some(_) => {
                            tracing::warn!(offset = error.offset(), kind = error.kind(), error = %error, dead_letter_topic = %topic, "dead-lettering a record")
                        }
                        None => {
                            tracing::warn!(offset = error.offset(), kind = error.kind(), error = %error, dead_letter_topic = %topic, "dead-lettering a failed wall-clock tick")
                        }
                    }
                    dead_letters.push(dead_letter_record(topic, raw, &error));
                    self.metrics.records_dead_lettered();
                }
                _ => return Err(error),
            }
            Ok(())
        }
    }

    /// Turns a step's failure into how the live loop ends.
    fn step_done(&self, stepped: Result<u64, StepError>) -> Result<(), LiveExit> {
        if let Some(reason) = self.local.take_failure() {
            return Err(LiveExit::Failed(self.local_failure("processing", reason)));
        }
        match stepped {
            Ok(fired) => {
                self.metrics.timers_fired(fired);
                Ok(())
            }
            Err(StepError::Failed(error)) => Err(LiveExit::Failed(Error::Record(error))),
            Err(StepError::Store(error)) => Err(LiveExit::Failed(
                self.local_failure("processing", error.to_string()),
            )),
        }
    }
}

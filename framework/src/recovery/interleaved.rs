//! Step 6 of a co-partitioned unit: the replay follows the interleaving its transactions
//! recorded (which input's record came next, where the ticks fired) instead of choosing an
//! order again, reading the unit's input partitions side by side.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use rdkafka::message::Message;

use super::history::History;
use super::{raw_record, replay_record, replay_tick, RecoveryTarget, Replayed};
use crate::error::Error;
use crate::partition::TICK_SOURCE;
use crate::processor::{Processor, RawRecord};
use crate::proto::WallClockTick;
use crate::snapshot::store::{Flow, PartitionReader};
use crate::snapshot::SnapshotError;
use crate::state::StoreSet;

/// Replays each input's `[from, to)` in `ranges` in the recorded order into `state`.
/// `None`: interrupted by the stop flag.
pub(super) fn replay<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    (state, stores): (&mut P::State, &StoreSet),
    ranges: &[(i64, i64)],
    history: &History,
    since_base: Replayed,
) -> Result<Option<Replayed>, Error> {
    let mut order = Order::new(history, target.inputs.len());
    let mut replayed = since_base;
    order.drive(processor, target, (state, stores), &mut replayed)?;
    if order.done() {
        return Ok(Some(replayed));
    }
    let parts: Vec<(&str, i32, i64)> = target
        .inputs
        .iter()
        .zip(ranges)
        .map(|(topic, (from, _))| (&**topic, target.partition, *from))
        .collect();
    let mut interrupted = false;
    reader.read_many(&parts, |input, message| {
        if message.offset() >= ranges[input].1 {
            return Ok(Flow::Continue); // past what this input had processed
        }
        if target.stop.load(Ordering::Acquire) {
            interrupted = true;
            return Ok(Flow::Stop);
        }
        order.waiting[input].push_back(raw_record(&target.inputs[input], message));
        order.drive(processor, target, (state, stores), &mut replayed)?;
        Ok(if order.done() {
            Flow::Stop
        } else {
            Flow::Continue
        })
    })?;
    Ok((!interrupted).then_some(replayed))
}

/// Where the replay is in the recorded interleaving.
struct Order<'h> {
    /// (source, count) pairs.
    runs: &'h [u32],
    /// Steps of the current run already replayed.
    done_in_run: u32,
    ticks: std::slice::Iter<'h, WallClockTick>,
    /// Records read per input, not replayed yet.
    waiting: Vec<VecDeque<RawRecord>>,
}

impl<'h> Order<'h> {
    fn new(history: &'h History, inputs: usize) -> Self {
        Order {
            runs: &history.interleaving,
            done_in_run: 0,
            ticks: history.ticks.iter(),
            waiting: (0..inputs).map(|_| VecDeque::new()).collect(),
        }
    }

    fn done(&self) -> bool {
        self.runs.len() < 2
    }

    /// Replays steps in order while the next one can go: a tick, or a record already read.
    fn drive<P: Processor>(
        &mut self,
        processor: &P,
        target: &RecoveryTarget<'_>,
        (state, stores): (&mut P::State, &StoreSet),
        replayed: &mut Replayed,
    ) -> Result<(), Error> {
        while let [source, count, ..] = *self.runs {
            if self.done_in_run >= count {
                self.runs = &self.runs[2..];
                self.done_in_run = 0;
                continue;
            }
            if source == TICK_SOURCE {
                let tick = self.ticks.next().ok_or_else(|| missing(target, "a tick"))?;
                replay_tick(processor, target, (&mut *state, stores), tick, replayed)?;
            } else {
                let queue = self
                    .waiting
                    .get_mut(source as usize)
                    .ok_or_else(|| missing(target, "an input"))?;
                let Some(record) = queue.pop_front() else {
                    return Ok(()); // read more first
                };
                replay_record(processor, target, (&mut *state, stores), &record, replayed)?;
            }
            self.done_in_run += 1;
        }
        Ok(())
    }
}

/// The recorded interleaving names a step the history does not hold.
fn missing(target: &RecoveryTarget<'_>, what: &str) -> Error {
    Error::PartitionSnapshot {
        topic: target.snapshot_topic.to_owned(),
        partition: target.partition,
        source: SnapshotError::Corrupt {
            snapshot_id: String::new(),
            chunk: None,
            what: format!("the recorded interleaving names {what} its history does not hold"),
        },
    }
}

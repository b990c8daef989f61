//! One step of a partition: an input record or a wall-clock tick, then the timers it made
//! due (DESIGN §8).
//!
//! The live loop, recovery's replay and the test driver all go through [`process_step`] and
//! [`tick_step`], so a replay meets the same calls in the same order as the first run: the
//! record (which first moves the stream time of the state's [`Timers`](crate::Timers)) or the
//! tick, then every due timer in (time, key) order. Each call is its own unit for the error
//! policy: a failed one's store writes are rolled back and its outputs discarded.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::processor::{panic_message, process_raw, RawRecord};
use crate::state::{advance_stream_time, take_due, StoreError, StoreSet, Timer};
use crate::{Output, ProcessError, Processor, RecordError};

/// Why a step stopped.
#[derive(Debug)]
pub(crate) enum StepError {
    /// A call failed and the error policy stops the partition.
    Failed(RecordError),
    /// The partition's local store failed.
    Store(StoreError),
}

/// What to do with a failed call: `Err` stops the partition (`ErrorPolicy::Fail`); `Ok` goes
/// on, after recording the failure (and adding a dead letter to the output, if wanted).
pub(crate) type OnFailure<'a> = dyn FnMut(RecordError, &mut Output) -> Result<(), RecordError> + 'a;

/// Processes `raw`, then fires the timers that are due. Returns the number of timers fired.
pub(crate) fn process_step<P: Processor>(
    processor: &P,
    state: &mut P::State,
    stores: &StoreSet,
    raw: &RawRecord,
    out: &mut Output,
    on_failure: &mut OnFailure<'_>,
) -> Result<u64, StepError> {
    stores.begin_record();
    if let Some(timestamp) = raw.timestamp {
        advance_stream_time(stores, timestamp).map_err(StepError::Store)?;
    }
    if let Err(error) = stores.build(|| process_raw(processor, state, raw, out)) {
        // Its writes go with it, the stream time it advanced included.
        stores.rollback_record();
        on_failure(error, out).map_err(StepError::Failed)?;
        return Ok(0);
    }
    let at = Position {
        topic: &raw.topic,
        partition: raw.partition,
        offset: raw.offset,
    };
    fire_due_timers(processor, state, stores, &at, out, on_failure)
}

/// Where a step happens, to name it in errors: the partition, and the offset of the record
/// (for a tick, the partition's next input offset).
pub(crate) struct Position<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

/// Calls [`Processor::on_wall_clock`] with `time_ms` (a tick at `at`), then fires the timers
/// it made due. Returns the number of timers fired.
pub(crate) fn tick_step<P: Processor>(
    processor: &P,
    state: &mut P::State,
    stores: &StoreSet,
    (at, time_ms): (&Position<'_>, i64),
    out: &mut Output,
    on_failure: &mut OnFailure<'_>,
) -> Result<u64, StepError> {
    stores.begin_record();
    let called = stores.build(|| {
        guarded(out, time_ms, |out| {
            processor.on_wall_clock(state, time_ms, out)
        })
    });
    if let Err(source) = called {
        stores.rollback_record();
        let error = RecordError::WallClock {
            topic: at.topic.to_owned(),
            partition: at.partition,
            offset: at.offset,
            time: time_ms,
            source,
        };
        on_failure(error, out).map_err(StepError::Failed)?;
        return Ok(0);
    }
    fire_due_timers(processor, state, stores, at, out, on_failure)
}

/// Fires every due timer, each in a savepoint of its own. A timer that `on_timer` schedules
/// again at or before the stream time fires again right after, but only once per step: a
/// second time is reported as a failure (it would fire forever).
fn fire_due_timers<P: Processor>(
    processor: &P,
    state: &mut P::State,
    stores: &StoreSet,
    at: &Position<'_>,
    out: &mut Output,
    on_failure: &mut OnFailure<'_>,
) -> Result<u64, StepError> {
    let mut fired = 0u64;
    let mut seen: HashSet<Timer> = HashSet::new();
    loop {
        stores.begin_record();
        let Some(due) = take_due(stores).map_err(StepError::Store)? else {
            return Ok(fired);
        };
        let result = if seen.insert(due.timer.clone()) {
            stores.build(|| on_timer(processor, state, &due.timer, at, out))
        } else {
            Err(timer_error(
                at,
                &due.timer,
                "on_timer scheduled this timer again at or before the stream time, so it \
                 would fire forever; schedule it later than Timers::stream_time()"
                    .into(),
            ))
        };
        match result {
            Ok(()) => fired += 1,
            Err(error) => {
                stores.rollback_record();
                due.discard().map_err(StepError::Store)?;
                on_failure(error, out).map_err(StepError::Failed)?;
            }
        }
    }
}

/// Calls [`Processor::on_timer`] (see [`guarded`]).
fn on_timer<P: Processor>(
    processor: &P,
    state: &mut P::State,
    timer: &Timer,
    at: &Position<'_>,
    out: &mut Output,
) -> Result<(), RecordError> {
    guarded(out, timer.time, |out| processor.on_timer(state, timer, out))
        .map_err(|source| timer_error(at, timer, source))
}

/// Runs a processor callback inside `catch_unwind`. On success the outputs it emitted without
/// a timestamp get `time`; on failure (an error, or a panic as its message) they are removed.
fn guarded(
    out: &mut Output,
    time: i64,
    call: impl FnOnce(&mut Output) -> Result<(), ProcessError>,
) -> Result<(), ProcessError> {
    let emitted_before = out.len();
    let source = match catch_unwind(AssertUnwindSafe(|| call(out))) {
        Ok(Ok(())) => {
            for r in out.tail_mut(emitted_before) {
                r.timestamp.get_or_insert(time);
            }
            return Ok(());
        }
        Ok(Err(source)) => source,
        Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())).into(),
    };
    out.truncate(emitted_before);
    Err(source)
}

fn timer_error(at: &Position<'_>, timer: &Timer, source: ProcessError) -> RecordError {
    RecordError::Timer {
        topic: at.topic.to_owned(),
        partition: at.partition,
        offset: at.offset,
        time: timer.time,
        key: timer.key.clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use crate::testing::{RawInput, TestDriver, TestError};
    use crate::{ErrorPolicy, Json, ProcessError, Record, Timers, Utf8};

    use super::*;

    #[derive(Default, Serialize, Deserialize)]
    struct Cards {
        /// Last activity per card (ms of record time).
        last: BTreeMap<String, i64>,
        timers: Timers,
    }

    /// Expires a card `idle_ms` of stream time after its last record; its value is the
    /// amount, and an amount of 666 makes `on_timer` of that card fail.
    struct Expiry {
        idle_ms: i64,
    }

    impl Processor for Expiry {
        type State = Cards;
        type Key = Utf8;
        type Value = Json<i64>;
        fn process(
            &self,
            cards: &mut Cards,
            tx: &Record<'_, String, i64>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            let at = tx.timestamp().unwrap_or_default();
            if let Some(before) = cards.last.insert(tx.key().clone(), at) {
                cards.timers.cancel(before + self.idle_ms, tx.key())?;
            }
            let key = if *tx.value() == 666 {
                format!("{}!", tx.key())
            } else {
                tx.key().clone()
            };
            cards.timers.schedule(at + self.idle_ms, key)?;
            out.send_json("seen", tx.key(), tx.value())?;
            Ok(())
        }
        fn on_timer(
            &self,
            cards: &mut Cards,
            timer: &Timer,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            out.send_json("expired", &timer.key, &timer.time)?;
            if timer.key.ends_with('!') {
                cards.timers.schedule(timer.time + 1_000, "trace")?;
                return Err("card refused to expire".into());
            }
            cards.last.remove(&timer.key);
            Ok(())
        }
    }

    fn pipe_at(driver: &mut TestDriver<Expiry>, at: i64, card: &str, amount: i64) {
        driver
            .pipe_raw(
                RawInput::new("tx")
                    .timestamp(at)
                    .key(card)
                    .value(amount.to_string()),
            )
            .unwrap();
    }

    fn expired(driver: &TestDriver<Expiry>) -> Vec<(String, i64)> {
        driver.read_json("expired").unwrap()
    }

    #[test]
    fn timers_fire_after_the_record_that_passes_them_in_time_then_key_order() {
        let mut driver = TestDriver::new(Expiry { idle_ms: 100 });
        pipe_at(&mut driver, 1_000, "b", 1);
        pipe_at(&mut driver, 1_000, "a", 1);
        pipe_at(&mut driver, 1_050, "c", 1);
        pipe_at(&mut driver, 1_020, "b", 2); // late: stream time stays at 1050
        assert!(expired(&driver).is_empty());
        pipe_at(&mut driver, 1_100, "d", 1); // passes a's timer (b moved to 1120)
        assert_eq!(expired(&driver), [("a".to_string(), 1_100)]);
        driver.full_snapshot().unwrap();
        pipe_at(&mut driver, 5_000, "e", 1);
        assert_eq!(
            expired(&driver)[1..],
            [
                ("b".to_string(), 1_120),
                ("c".to_string(), 1_150),
                ("d".to_string(), 1_200)
            ]
        );
        let outputs = driver.outputs();
        let last = &outputs[outputs.len() - 1];
        assert_eq!(last.timestamp, Some(1_200), "stamped with the timer's time");
        assert_eq!(outputs[outputs.len() - 4].topic, "seen", "after the record");
        let cards = driver.state("tx", 0).unwrap();
        assert_eq!(cards.last.keys().collect::<Vec<_>>(), ["e"]);
        assert_eq!(cards.timers.stream_time().unwrap(), Some(5_000));
        assert_eq!(cards.timers.len().unwrap(), 1);
        // The replay since the full snapshot fires the same three timers.
        assert_eq!(driver.verify_determinism().unwrap(), 1);
    }

    #[test]
    fn a_failed_timer_is_rolled_back_and_dropped_under_skip_and_dead_letter() {
        for policy in [
            ErrorPolicy::Skip,
            ErrorPolicy::DeadLetter {
                topic: "dlq".into(),
            },
        ] {
            let mut driver = TestDriver::new(Expiry { idle_ms: 10 }).with_error_policy(policy);
            pipe_at(&mut driver, 100, "x", 666);
            pipe_at(&mut driver, 200, "y", 1);
            pipe_at(&mut driver, 300, "z", 1);
            // x!'s output was discarded with it; y's went out.
            assert_eq!(expired(&driver), [("y".to_string(), 210)]);
            assert_eq!(driver.errors().len(), 1);
            let error = &driver.errors()[0];
            assert_eq!(error.kind(), "timer");
            assert_eq!(error.offset(), 1, "due after the record at offset 1");
            assert!(error.to_string().contains("card refused to expire"));
            let cards = driver.state("tx", 0).unwrap();
            assert!(
                !cards.timers.is_scheduled(1_110, "trace").unwrap(),
                "its store writes rolled back"
            );
            assert!(
                !cards.timers.is_scheduled(110, "x!").unwrap(),
                "and dropped"
            );
            let dead: Vec<_> = driver.outputs_to("dlq").collect();
            if let Some(dead) = dead.first() {
                assert_eq!(dead.key.as_deref(), Some(&b"x!"[..]));
                assert_eq!(dead.timestamp, Some(110));
            }
            driver.verify_determinism().unwrap();
        }
    }

    #[test]
    fn a_failed_timer_stops_the_partition_under_fail() {
        let mut driver = TestDriver::new(Expiry { idle_ms: 10 });
        pipe_at(&mut driver, 100, "x", 666);
        let failed = driver.pipe_raw(RawInput::new("tx").timestamp(200).key("y").value("1"));
        match failed {
            Err(TestError::Record(error)) => assert_eq!(error.kind(), "timer"),
            other => panic!("expected the timer's failure, got {other:?}"),
        }
    }

    /// Schedules a timer at the record's time for its key, and on firing schedules the same
    /// timer again: it would fire forever.
    struct Forever;
    impl Processor for Forever {
        type State = Cards;
        type Key = Utf8;
        type Value = Utf8;
        fn process(
            &self,
            cards: &mut Cards,
            r: &Record<'_, String, String>,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            cards.timers.schedule(r.timestamp().unwrap_or(0), r.key())?;
            Ok(())
        }
        fn on_timer(
            &self,
            cards: &mut Cards,
            timer: &Timer,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            cards.timers.schedule(timer.time, &timer.key)?;
            Ok(())
        }
    }

    #[test]
    fn a_timer_that_reschedules_itself_at_the_stream_time_is_reported_not_looped_on() {
        let mut driver = TestDriver::new(Forever).with_error_policy(ErrorPolicy::Skip);
        driver
            .pipe("t", &"k".to_string(), &"v".to_string())
            .unwrap();
        assert_eq!(driver.errors().len(), 1);
        assert!(driver.errors()[0].to_string().contains("fire forever"));
    }

    /// Schedules timers but does not implement `on_timer`.
    struct Forgetful;
    impl Processor for Forgetful {
        type State = Cards;
        type Key = Utf8;
        type Value = Utf8;
        fn process(
            &self,
            cards: &mut Cards,
            r: &Record<'_, String, String>,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            cards.timers.schedule(r.timestamp().unwrap_or(0), r.key())?;
            Ok(())
        }
    }

    #[test]
    fn the_default_on_timer_refuses_loudly() {
        let mut driver = TestDriver::new(Forgetful);
        driver.advance_time(Duration::from_millis(1));
        let error = driver
            .pipe("t", &"k".to_string(), &"v".to_string())
            .unwrap_err();
        assert!(error
            .to_string()
            .contains("does not implement Processor::on_timer"));
    }

    #[derive(Default, Serialize, Deserialize)]
    struct Window {
        /// Records since the last tick, and ticks so far.
        count: u64,
        ticks: u64,
        timers: Timers,
    }

    /// Every 10 s of wall-clock time reports the records since the last report; the value
    /// `"fail"` makes the next tick fail; a tick also schedules a timer at the stream time,
    /// which fires right after it. With `use_clock`, the report (a bug) reads the clock
    /// instead of `now_ms`.
    struct Reporter {
        use_clock: bool,
    }

    impl Processor for Reporter {
        type State = Window;
        type Key = Utf8;
        type Value = Utf8;
        fn process(
            &self,
            w: &mut Window,
            r: &Record<'_, String, String>,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            w.count += if r.value() == "fail" { 1_000 } else { 1 };
            Ok(())
        }
        fn wall_clock_interval(&self) -> Option<Duration> {
            Some(Duration::from_secs(10))
        }
        fn on_wall_clock(
            &self,
            w: &mut Window,
            now_ms: i64,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            w.ticks += 1;
            if let Some(now) = w.timers.stream_time()? {
                w.timers.schedule(now, format!("tick-{}", w.ticks))?;
            }
            if w.count >= 1_000 {
                return Err("a tick refused".into());
            }
            let at = if self.use_clock {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_micros() as i64
            } else {
                now_ms
            };
            out.send_json("reports", &at.to_string(), &w.count)?;
            w.count = 0;
            Ok(())
        }
        fn on_timer(
            &self,
            _: &mut Window,
            t: &Timer,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            out.send_json("after-tick", &t.key, &t.time)?;
            Ok(())
        }
    }

    fn pipe(driver: &mut TestDriver<Reporter>, value: &str) {
        driver
            .pipe("in", &"k".to_string(), &value.to_string())
            .unwrap();
    }

    #[test]
    fn wall_clock_ticks_replay_where_and_when_they_fired() {
        let mut driver = TestDriver::new(Reporter { use_clock: false });
        pipe(&mut driver, "a");
        pipe(&mut driver, "b");
        driver.advance_wall_clock(Duration::from_secs(25)).unwrap();
        pipe(&mut driver, "c");
        driver.full_snapshot().unwrap();
        driver.advance_wall_clock(Duration::from_secs(5)).unwrap();
        pipe(&mut driver, "d");
        driver.advance_wall_clock(Duration::from_secs(10)).unwrap();
        let reports: Vec<(String, u64)> = driver.read_json("reports").unwrap();
        let start = crate::testing::DEFAULT_START_TIME_MS;
        let times: Vec<i64> = reports.iter().map(|r| r.0.parse().unwrap()).collect();
        assert_eq!(
            times,
            [
                start + 10_000,
                start + 20_000,
                start + 30_000,
                start + 40_000
            ]
        );
        assert_eq!(
            reports.iter().map(|r| r.1).collect::<Vec<_>>(),
            [2, 0, 1, 1]
        );
        let report = driver.outputs_to("reports").next().unwrap();
        assert_eq!(
            report.timestamp,
            Some(start + 10_000),
            "stamped with now_ms"
        );
        // Each tick's timer (at the stream time) fired right after it.
        assert_eq!(driver.outputs_to("after-tick").count(), 4);
        assert_eq!(driver.wall_clock(), start + 40_000);
        // Since the snapshot: two ticks and a record, replayed in that order.
        assert_eq!(driver.verify_determinism().unwrap(), 3);
    }

    #[test]
    fn a_tick_that_reads_the_clock_instead_of_now_is_caught_on_replay() {
        let mut driver = TestDriver::new(Reporter { use_clock: true });
        pipe(&mut driver, "a");
        driver.advance_wall_clock(Duration::from_secs(10)).unwrap();
        let error = driver.verify_determinism().unwrap_err();
        assert!(
            matches!(error, TestError::NotDeterministic { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_failed_tick_is_rolled_back_under_skip_and_stops_the_partition_under_fail() {
        let mut driver = TestDriver::new(Reporter { use_clock: false }).with_error_policy(
            ErrorPolicy::DeadLetter {
                topic: "dlq".into(),
            },
        );
        pipe(&mut driver, "fail");
        driver.advance_wall_clock(Duration::from_secs(10)).unwrap();
        assert_eq!(driver.errors()[0].kind(), "wall-clock");
        let window = driver.state("in", 0).unwrap();
        assert_eq!(
            window.ticks, 1,
            "plain fields are not rolled back (see Processor::process)"
        );
        assert!(
            window.timers.is_empty().unwrap(),
            "its timer was rolled back"
        );
        let dead = driver.outputs_to("dlq").next().unwrap();
        assert_eq!(
            dead.timestamp,
            Some(crate::testing::DEFAULT_START_TIME_MS + 10_000)
        );
        driver.verify_determinism().unwrap();

        let mut driver = TestDriver::new(Reporter { use_clock: false });
        pipe(&mut driver, "fail");
        let error = driver
            .advance_wall_clock(Duration::from_secs(10))
            .unwrap_err();
        assert!(error.to_string().contains("a tick refused"), "{error}");
    }
}

//! [`Timers`]: stream-time timers kept in a store of the state (DESIGN §8).
//!
//! A timer is an entry of its own store, keyed so that the store's key order is the firing
//! order, (time, key); one more entry holds the partition's stream time. Being store entries,
//! timers are rolled back with a failed record, snapshotted, restored, resumed warm and
//! fingerprinted at O(1) per change like any other entry, and replay fires them identically:
//! when and in which order they fire depends only on the records.
//!
//! ```text
//! stream time := 0x00                              -> time:i64be
//! timer       := 0x01 (time as u64 ^ 1<<63):be64 key -> ""
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::backend::META_STORE;
use super::store::{lock, Core, Descriptor, StoreSet};
use super::StoreError;

const STREAM_TIME: [u8; 1] = [0x00];
const TIMER: u8 = 0x01;
/// The first key after every timer.
const END_OF_TIMERS: [u8; 1] = [0x02];

/// A timer that fired: the stream time it was scheduled at and the key it was scheduled for.
/// [`Timers::owns`] tells which of the state's `Timers` it came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timer {
    /// The stream time (ms, as record timestamps) the timer was scheduled at.
    pub time: i64,
    /// The key it was scheduled for.
    pub key: String,
    /// The id of the store of the `Timers` it came from.
    store: u32,
}

/// Stream-time timers of a processor, held in its `State` like a [`Store`](crate::Store).
///
/// A timer scheduled at time `t` for a key fires once the partition's *stream time* (the
/// highest record timestamp it has processed) reaches `t`: right after the record that
/// moved stream time there, the runtime calls
/// [`Processor::on_timer`](crate::Processor::on_timer) for every due timer in (time, key)
/// order, each with access to the state and the output like a record. Timers are part of the
/// state (kept in the partition's local store, in its full snapshots, in its fingerprint), and
/// when they fire depends only on the input records, so a replay after a crash fires them
/// exactly as before. A key has at most one timer per time: scheduling it again is a no-op.
///
/// A failed `process` call leaves no trace here either: the timers it scheduled or cancelled
/// and the stream time it advanced are rolled back with it.
///
/// ```
/// use exactly::testing::TestDriver;
/// use exactly::{Json, Output, ProcessError, Processor, Record, Timer, Timers, Utf8};
/// use serde::{Deserialize, Serialize};
/// use std::time::Duration;
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Seen {
///     last: std::collections::BTreeMap<String, i64>,
///     timers: Timers,
/// }
///
/// /// Says "idle" for a card that has no transaction for a minute (of record time).
/// struct IdleCards;
/// impl Processor for IdleCards {
///     type State = Seen;
///     type Key = Utf8;
///     type Value = Json<u64>;
///     fn process(&self, seen: &mut Seen, tx: &Record<'_, String, u64>,
///                _: &mut Output) -> Result<(), ProcessError> {
///         let at = tx.timestamp().unwrap_or(0);
///         if let Some(before) = seen.last.insert(tx.key().clone(), at) {
///             seen.timers.cancel(before + 60_000, tx.key())?;
///         }
///         seen.timers.schedule(at + 60_000, tx.key())?;
///         Ok(())
///     }
///     fn on_timer(&self, seen: &mut Seen, timer: &Timer,
///                 out: &mut Output) -> Result<(), ProcessError> {
///         seen.last.remove(&timer.key);
///         out.send_json("idle", &timer.key, &timer.time)?;
///         Ok(())
///     }
/// }
///
/// let mut driver = TestDriver::new(IdleCards);
/// driver.pipe("tx", &"ada".to_string(), &5).unwrap();
/// driver.advance_time(Duration::from_secs(30));
/// driver.pipe("tx", &"bob".to_string(), &7).unwrap();
/// driver.advance_time(Duration::from_secs(45)); // stream time passes ada's timer
/// driver.pipe("tx", &"bob".to_string(), &1).unwrap();
/// let idle: Vec<(String, i64)> = driver.read_json("idle").unwrap();
/// assert_eq!(idle.len(), 1);
/// assert_eq!(idle[0].0, "ada");
/// driver.verify_determinism().unwrap(); // replay fires it identically
/// ```
pub struct Timers {
    core: Arc<Mutex<Core>>,
}

impl Timers {
    /// Schedules a timer for `key` at stream time `time_ms`. A timer at or before the current
    /// stream time fires right after the current record (or timer) is done.
    pub fn schedule(&mut self, time_ms: i64, key: impl AsRef<str>) -> Result<(), StoreError> {
        let entry = timer_key(time_ms, key.as_ref());
        let mut core = lock(&self.core);
        if let Some(floor) = &mut core.timer_floor {
            if entry < *floor {
                floor.clone_from(&entry);
            }
        }
        core.write(entry, Some(Vec::new()))
    }

    /// Cancels the timer for `key` at `time_ms`; `true` if there was one.
    pub fn cancel(&mut self, time_ms: i64, key: impl AsRef<str>) -> Result<bool, StoreError> {
        let entry = timer_key(time_ms, key.as_ref());
        let mut core = lock(&self.core);
        let existed = core.lookup(&entry)?.is_some();
        if existed {
            core.write(entry, None)?;
        }
        Ok(existed)
    }

    /// Whether a timer for `key` at `time_ms` is scheduled.
    pub fn is_scheduled(&self, time_ms: i64, key: impl AsRef<str>) -> Result<bool, StoreError> {
        Ok(lock(&self.core)
            .lookup(&timer_key(time_ms, key.as_ref()))?
            .is_some())
    }

    /// The partition's stream time: the highest record timestamp processed so far (`None`
    /// before the first record with a timestamp).
    pub fn stream_time(&self) -> Result<Option<i64>, StoreError> {
        stream_time(&lock(&self.core))
    }

    /// The earliest scheduled timer.
    pub fn next(&self) -> Result<Option<Timer>, StoreError> {
        let core = lock(&self.core);
        Ok(core
            .first(&[TIMER], &END_OF_TIMERS)?
            .and_then(|(k, _)| parse_timer(core.id, &k)))
    }

    /// Whether `timer` was scheduled with these `Timers` (a state may hold several, e.g. its
    /// own and a [`window`](crate::window) helper's).
    pub fn owns(&self, timer: &Timer) -> bool {
        lock(&self.core).id == timer.store
    }

    /// Number of scheduled timers.
    pub fn len(&self) -> Result<u64, StoreError> {
        let core = lock(&self.core);
        let clock = u64::from(core.lookup(&STREAM_TIME)?.is_some());
        Ok(core.count - clock)
    }

    /// Whether no timer is scheduled.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

impl Default for Timers {
    /// No timers, no stream time: in the partition's local database when the runtime builds
    /// the state, else in memory.
    fn default() -> Self {
        Timers {
            core: StoreSet::current_or_memory().attach(None, true),
        }
    }
}

impl fmt::Debug for Timers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = lock(&self.core);
        f.debug_struct("Timers")
            .field("stream_time", &stream_time(&core).ok().flatten())
            .field("entries", &core.count)
            .finish()
    }
}

impl Serialize for Timers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let core = lock(&self.core);
        Descriptor {
            store: core.id,
            entries: core.count,
            fingerprint: core.fingerprint,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Timers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let descriptor = Descriptor::deserialize(deserializer)?;
        if descriptor.store == META_STORE {
            return Err(serde::de::Error::custom("store id out of range"));
        }
        Ok(Timers {
            core: StoreSet::current_or_memory().attach(Some(descriptor), true),
        })
    }
}

/// The store key of a timer: (time, key) order is key order.
fn timer_key(time_ms: i64, key: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(9 + key.len());
    entry.push(TIMER);
    entry.extend_from_slice(&((time_ms as u64) ^ (1 << 63)).to_be_bytes());
    entry.extend_from_slice(key.as_bytes());
    entry
}

fn parse_timer(store: u32, entry: &[u8]) -> Option<Timer> {
    let (&tag, rest) = entry.split_first()?;
    if tag != TIMER || rest.len() < 8 {
        return None;
    }
    let (time, key) = rest.split_at(8);
    let time = (u64::from_be_bytes(time.try_into().ok()?) ^ (1 << 63)) as i64;
    let key = String::from_utf8(key.to_vec()).ok()?;
    Some(Timer { time, key, store })
}

fn stream_time(core: &Core) -> Result<Option<i64>, StoreError> {
    Ok(core
        .lookup(&STREAM_TIME)?
        .and_then(|v| v.try_into().ok().map(i64::from_be_bytes)))
}

/// Moves the stream time of every [`Timers`] in `set` up to `timestamp`; `true` if it moved.
pub(crate) fn advance_stream_time(set: &StoreSet, timestamp: i64) -> Result<bool, StoreError> {
    let mut advanced = false;
    for core in set.timer_cores() {
        let mut core = lock(&core);
        if stream_time(&core)?.is_some_and(|now| now >= timestamp) {
            continue;
        }
        core.write(STREAM_TIME.to_vec(), Some(timestamp.to_be_bytes().to_vec()))?;
        advanced = true;
    }
    Ok(advanced)
}

/// A timer taken from its store to fire.
pub(crate) struct Due {
    core: Arc<Mutex<Core>>,
    pub(crate) timer: Timer,
}

impl Due {
    /// Removes the timer again (after a failed `on_timer` rolled its removal back): a failed
    /// timer does not fire again.
    pub(crate) fn discard(&self) -> Result<(), StoreError> {
        let entry = timer_key(self.timer.time, &self.timer.key);
        lock(&self.core).write(entry, None)
    }
}

/// Removes and returns the first due timer of `set` (at or before its store's stream time) in
/// (time, key, store) order, or `None` when no timer is due.
pub(crate) fn take_due(set: &StoreSet) -> Result<Option<Due>, StoreError> {
    let mut first: Option<(Timer, Arc<Mutex<Core>>)> = None;
    for core in set.timer_cores() {
        let due = first_due(&mut lock(&core))?;
        if let Some(timer) = due {
            if first.as_ref().is_none_or(|(best, _)| timer < *best) {
                first = Some((timer, core));
            }
        }
    }
    let Some((timer, core)) = first else {
        return Ok(None);
    };
    let entry = timer_key(timer.time, &timer.key);
    lock(&core).write(entry, None)?;
    Ok(Some(Due { core, timer }))
}

/// The first timer of `core` due at its stream time. The floor spares a seek per record: no
/// live timer lies below it, so while its time is past the stream time nothing is due.
fn first_due(core: &mut Core) -> Result<Option<Timer>, StoreError> {
    let Some(now) = stream_time(core)? else {
        return Ok(None);
    };
    let floor = core.timer_floor.clone().unwrap_or_default();
    if parse_timer(core.id, &floor).is_some_and(|t| t.time > now) {
        return Ok(None);
    }
    let from = if floor.is_empty() { vec![TIMER] } else { floor };
    let found = core.first(&from, &END_OF_TIMERS)?;
    let next = match &found {
        Some((k, _)) => k.clone(),
        None => timer_key(i64::MAX, ""),
    };
    core.timer_floor = Some(next);
    Ok(found
        .and_then(|(k, _)| parse_timer(core.id, &k))
        .filter(|t| t.time <= now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due_all(set: &StoreSet) -> Vec<(i64, String)> {
        let mut fired = Vec::new();
        while let Some(due) = take_due(set).unwrap() {
            fired.push((due.timer.time, due.timer.key));
        }
        fired
    }

    #[test]
    fn timer_keys_sort_by_time_then_key_and_parse_back() {
        let times = [i64::MIN, -5, 0, 7, i64::MAX];
        let keys: Vec<Vec<u8>> = times.iter().map(|t| timer_key(*t, "k")).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(timer_key(3, "a") < timer_key(3, "b"));
        assert!(timer_key(3, "zzz") < timer_key(4, ""));
        assert_eq!(
            parse_timer(3, &timer_key(-5, "ada")),
            Some(Timer {
                time: -5,
                key: "ada".into(),
                store: 3
            })
        );
    }

    #[test]
    fn due_timers_come_in_time_then_key_order_once_stream_time_reaches_them() {
        let set = StoreSet::in_memory();
        let mut timers: Timers = set.build(Timers::default);
        for (t, k) in [(30, "b"), (10, "z"), (30, "a"), (50, "c")] {
            timers.schedule(t, k).unwrap();
        }
        assert!(due_all(&set).is_empty(), "no stream time yet");
        assert!(advance_stream_time(&set, 29).unwrap());
        assert_eq!(due_all(&set), [(10, "z".to_string())]);
        assert!(
            !advance_stream_time(&set, 20).unwrap(),
            "stream time never goes back"
        );
        assert!(advance_stream_time(&set, 30).unwrap());
        assert_eq!(due_all(&set), [(30, "a".into()), (30, "b".into())]);
        // Scheduled below the floor the last search left: still found.
        timers.schedule(5, "late").unwrap();
        assert_eq!(due_all(&set), [(5, "late".to_string())]);
        assert_eq!(timers.len().unwrap(), 1);
        assert_eq!(timers.stream_time().unwrap(), Some(30));
        assert_eq!(timers.next().unwrap().map(|t| t.time), Some(50));
    }

    #[test]
    fn cancelled_and_rolled_back_timers_do_not_fire_and_committed_ones_do() {
        let set = StoreSet::in_memory();
        let mut timers: Timers = set.build(Timers::default);
        timers.schedule(10, "a").unwrap();
        timers.schedule(20, "b").unwrap();
        set.commit(Vec::new()).unwrap();
        assert!(timers.cancel(10, "a").unwrap());
        assert!(!timers.cancel(10, "a").unwrap());
        set.begin_record();
        timers.schedule(15, "x").unwrap();
        advance_stream_time(&set, 100).unwrap();
        set.rollback_record();
        assert_eq!(
            timers.stream_time().unwrap(),
            None,
            "rolled back with the record"
        );
        advance_stream_time(&set, 100).unwrap();
        assert_eq!(due_all(&set), [(20, "b".to_string())]);
        assert!(timers.is_empty().unwrap());
    }

    #[test]
    fn a_discarded_timer_stays_removed_after_its_rollback() {
        let set = StoreSet::in_memory();
        let mut timers: Timers = set.build(Timers::default);
        timers.schedule(1, "a").unwrap();
        timers.schedule(2, "b").unwrap();
        advance_stream_time(&set, 5).unwrap();
        set.begin_record();
        let due = take_due(&set).unwrap().unwrap();
        set.rollback_record(); // its on_timer failed
        due.discard().unwrap();
        assert_eq!(due_all(&set), [(2, "b".to_string())]);
    }

    #[test]
    fn timers_round_trip_through_their_descriptor() {
        let set = StoreSet::in_memory();
        let mut timers: Timers = set.build(Timers::default);
        timers.schedule(7, "a").unwrap();
        advance_stream_time(&set, 3).unwrap();
        set.commit(Vec::new()).unwrap();
        let bytes = rmp_serde::to_vec_named(&timers).unwrap();
        let again = StoreSet::new(set.backend().clone());
        let restored: Timers = again.build(|| rmp_serde::from_slice(&bytes).unwrap());
        assert_eq!(restored.stream_time().unwrap(), Some(3));
        assert!(restored.is_scheduled(7, "a").unwrap());
        advance_stream_time(&again, 7).unwrap();
        assert_eq!(due_all(&again), [(7, "a".to_string())]);
    }
}

//! Windowed aggregations over record time: tumbling, hopping and session windows with a grace
//! period, each window's aggregate handed to the processor once when it closes.
//!
//! Built only from the state's pieces: a window's aggregate is an entry of a
//! [`Store`], and its end is a stream-time timer of [`Timers`]. So windows are
//! snapshotted, restored and replayed exactly like the rest of the state, and whether a record
//! is late, or when a window closes, depends on record timestamps only: never on the clock,
//! never on how fast records arrived.
//!
//! A window `[start, end)` closes when the partition's stream time (the highest record
//! timestamp processed) reaches `end + grace`. A record that arrives for a window already
//! closed is *late*: [`WindowError::Late`] says so, and the processor decides — return it
//! (`?`) to hand the record to the [`ErrorPolicy`](crate::ErrorPolicy), or send it to a side
//! output and go on.
//!
//! ```
//! use exactly::testing::{RawInput, TestDriver};
//! use exactly::window::{TimeWindows, WindowedAggregates};
//! use exactly::{Json, Output, ProcessError, Processor, Record, Timer, Utf8};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Spend {
//!     per_minute: WindowedAggregates<Json<i64>>,
//! }
//!
//! /// The amount spent per card and minute, once the minute is over (plus 10 s for stragglers).
//! struct PerMinute;
//! impl PerMinute {
//!     fn windows() -> TimeWindows {
//!         TimeWindows::tumbling(Duration::from_secs(60)).grace(Duration::from_secs(10))
//!     }
//! }
//! impl Processor for PerMinute {
//!     type State = Spend;
//!     type Key = Utf8;
//!     type Value = Json<i64>;
//!     fn process(&self, s: &mut Spend, tx: &Record<'_, String, i64>,
//!                _: &mut Output) -> Result<(), ProcessError> {
//!         let at = tx.timestamp().unwrap_or_default();
//!         s.per_minute.add(&Self::windows(), tx.key(), at, |sum| sum.unwrap_or(0) + tx.value())?;
//!         Ok(())
//!     }
//!     fn on_timer(&self, s: &mut Spend, timer: &Timer,
//!                 out: &mut Output) -> Result<(), ProcessError> {
//!         if let Some(closed) = s.per_minute.on_timer(timer)? {
//!             out.send_json("spend", &closed.key, &(closed.window.start, closed.value))?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let mut driver = TestDriver::new(PerMinute);
//! let tx = |at: i64, cents: i64| RawInput::new("tx").timestamp(at).key("ada").value(cents.to_string());
//! driver.pipe_raw(tx(5_000, 300)).unwrap();
//! driver.pipe_raw(tx(61_000, 100)).unwrap();  // the next minute; the first is in its grace
//! driver.pipe_raw(tx(59_000, 200)).unwrap();  // late but within the grace: counted
//! driver.pipe_raw(tx(75_000, 1)).unwrap();    // stream time passes 60 s + 10 s: it closes
//! let spend: Vec<(String, (i64, i64))> = driver.read_json("spend").unwrap();
//! assert_eq!(spend, [("ada".to_string(), (0, 500))]);
//! driver.verify_determinism().unwrap();
//! ```

use std::ops::Bound;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Encode, EncodeError, Format};
use crate::{Store, StoreError, Timer, Timers};

/// A time window `[start, end)` of record timestamps (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Window {
    /// First timestamp in the window.
    pub start: i64,
    /// First timestamp after it.
    pub end: i64,
}

/// Why a record could not be added to its windows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// Every window the record belongs to had closed: stream time had passed its end plus the
    /// grace period.
    #[error("late record for {key:?} at {timestamp}: stream time {stream_time} is past the end of its window(s) plus the grace period ({grace_ms} ms); a longer grace keeps windows open longer")]
    Late {
        /// The record's key.
        key: String,
        /// The record's timestamp.
        timestamp: i64,
        /// The partition's stream time.
        stream_time: i64,
        /// The grace period.
        grace_ms: i64,
    },
    /// The store behind the windows failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A window that closed, with its final aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed<T> {
    /// The key aggregated.
    pub key: String,
    /// The window.
    pub window: Window,
    /// The aggregate of every record of the key in the window.
    pub value: T,
}

/// Fixed-size windows by record time: tumbling (`advance == size`) or hopping (overlapping,
/// a new one every `advance`), aligned to the epoch, with a grace period for late records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindows {
    size: i64,
    advance: i64,
    grace: i64,
}

impl TimeWindows {
    /// Back-to-back windows of `size` (at least 1 ms).
    pub fn tumbling(size: Duration) -> Self {
        let size = millis(size).max(1);
        TimeWindows {
            size,
            advance: size,
            grace: 0,
        }
    }

    /// Windows of `size` starting every `advance` (between 1 ms and `size`), so that each
    /// record belongs to `size / advance` of them.
    pub fn hopping(size: Duration, advance: Duration) -> Self {
        let size = millis(size).max(1);
        TimeWindows {
            size,
            advance: millis(advance).clamp(1, size),
            grace: 0,
        }
    }

    /// Keeps each window open for `grace` after its end (default 0).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = millis(grace);
        self
    }

    /// The windows `timestamp` belongs to, earliest first.
    ///
    /// ```
    /// # use exactly::window::{TimeWindows, Window};
    /// # use std::time::Duration;
    /// let w = TimeWindows::hopping(Duration::from_millis(10), Duration::from_millis(5));
    /// assert_eq!(w.containing(12), [Window { start: 5, end: 15 }, Window { start: 10, end: 20 }]);
    /// ```
    pub fn containing(&self, timestamp: i64) -> Vec<Window> {
        let last_start = timestamp - timestamp.rem_euclid(self.advance);
        let mut windows = Vec::new();
        let mut start = last_start;
        while start > timestamp.saturating_sub(self.size) {
            windows.push(Window {
                start,
                end: start.saturating_add(self.size),
            });
            match start.checked_sub(self.advance) {
                Some(earlier) => start = earlier,
                None => break,
            }
        }
        windows.reverse();
        windows
    }
}

/// Session windows: a key's records closer than `gap` to each other (in record time) form one
/// session `[first, last + 1)`; a session closes `gap` plus the grace period after its last
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionWindows {
    gap: i64,
    grace: i64,
}

impl SessionWindows {
    /// Sessions that end after `gap` (at least 1 ms) without a record of their key.
    pub fn with_gap(gap: Duration) -> Self {
        SessionWindows {
            gap: millis(gap).max(1),
            grace: 0,
        }
    }

    /// Keeps each session open for `grace` after its gap (default 0).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = millis(grace);
        self
    }
}

/// Per key and window, an aggregate `A` (stored through its [`Format`]) of the records in
/// the window, each handed out once, by [`on_timer`](Self::on_timer), when its window closes.
/// Held in the processor's `State`; works with [`TimeWindows`] (see the [module](self)
/// example) and [`SessionWindows`].
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct WindowedAggregates<A: Format> {
    open: Store<WindowKey, A>,
    timers: Timers,
}

impl<A: Format> Default for WindowedAggregates<A> {
    fn default() -> Self {
        WindowedAggregates {
            open: Store::default(),
            timers: Timers::default(),
        }
    }
}

impl<A: Format> WindowedAggregates<A> {
    /// Folds a record of `key` at `timestamp` into each of its [`TimeWindows`] still open:
    /// `fold` gets the window's aggregate so far (`None` for a new window) and returns the
    /// new one. Returns how many windows it went into; [`WindowError::Late`] when they had
    /// all closed.
    pub fn add(
        &mut self,
        windows: &TimeWindows,
        key: &str,
        timestamp: i64,
        mut fold: impl FnMut(Option<A::Item>) -> A::Item,
    ) -> Result<usize, WindowError> {
        let now = self.timers.stream_time()?.unwrap_or(i64::MIN);
        let mut added = 0;
        for window in windows.containing(timestamp) {
            let closes = window.end.saturating_add(windows.grace);
            if now >= closes {
                continue;
            }
            let id = (key.to_owned(), window);
            let value = fold(self.open.get(&id)?);
            self.open.put(&id, &value)?;
            self.timers.schedule(closes, timer_key(key, window))?;
            added += 1;
        }
        if added == 0 {
            return Err(late(key, timestamp, now, windows.grace));
        }
        Ok(added)
    }

    /// Adds a record of `key` at `timestamp` to its session: a new one, or the session(s) it
    /// falls within `gap` of, merged into one (their aggregates combined with `merge`, in
    /// time order). `fold` then adds the record to the session's aggregate. Returns the
    /// session's window; [`WindowError::Late`] when the record's own session would already
    /// have closed.
    pub fn add_to_session(
        &mut self,
        sessions: &SessionWindows,
        key: &str,
        timestamp: i64,
        mut merge: impl FnMut(A::Item, A::Item) -> A::Item,
        fold: impl FnOnce(Option<A::Item>) -> A::Item,
    ) -> Result<Window, WindowError> {
        let now = self.timers.stream_time()?.unwrap_or(i64::MIN);
        let mut window = Window {
            start: timestamp,
            end: timestamp.saturating_add(1),
        };
        let mut merged: Option<A::Item> = None;
        for ((_, session), value) in self.sessions_of(key)? {
            // Within the gap of the record: [start - gap, end - 1 + gap].
            let near = session.start.saturating_sub(sessions.gap) <= timestamp
                && timestamp < session.end.saturating_add(sessions.gap);
            if !near {
                continue;
            }
            self.open.delete(&(key.to_owned(), session))?;
            self.timers
                .cancel(session_closes(sessions, session), timer_key(key, session))?;
            window.start = window.start.min(session.start);
            window.end = window.end.max(session.end);
            merged = Some(match merged {
                Some(before) => merge(before, value),
                None => value,
            });
        }
        let closes = session_closes(sessions, window);
        if merged.is_none() && now >= closes {
            return Err(late(key, timestamp, now, sessions.grace));
        }
        let value = fold(merged);
        self.open.put(&(key.to_owned(), window), &value)?;
        self.timers.schedule(closes, timer_key(key, window))?;
        Ok(window)
    }

    /// The aggregate of `key` in `window` so far, if the window is open.
    pub fn get(&self, key: &str, window: Window) -> Result<Option<A::Item>, StoreError> {
        self.open.get(&(key.to_owned(), window))
    }

    /// Hands a timer of the processor's [`Processor::on_timer`](crate::Processor::on_timer)
    /// to the windows: if it is one of theirs, the window it closes is removed and returned
    /// with its aggregate; other timers give `None`.
    pub fn on_timer(&mut self, timer: &Timer) -> Result<Option<Closed<A::Item>>, StoreError> {
        if !self.timers.owns(timer) {
            return Ok(None);
        }
        let Some((key, window)) = parse_timer_key(&timer.key) else {
            return Ok(None);
        };
        let id = (key, window);
        let Some(value) = self.open.get(&id)? else {
            return Ok(None);
        };
        self.open.delete(&id)?;
        Ok(Some(Closed {
            key: id.0,
            window,
            value,
        }))
    }

    /// Number of open windows (of all keys).
    pub fn open_windows(&self) -> u64 {
        self.open.len()
    }

    /// The open sessions of `key`, earliest first.
    fn sessions_of(&self, key: &str) -> Result<crate::Entries<WindowKey, A>, StoreError> {
        let lowest = Window {
            start: i64::MIN,
            end: i64::MIN,
        };
        let highest = Window {
            start: i64::MAX,
            end: i64::MAX,
        };
        self.open.range((
            Bound::Included((key.to_owned(), lowest)),
            Bound::Included((key.to_owned(), highest)),
        ))
    }
}

fn session_closes(sessions: &SessionWindows, window: Window) -> i64 {
    // The last record is at end - 1.
    (window.end - 1)
        .saturating_add(sessions.gap)
        .saturating_add(sessions.grace)
}

fn late(key: &str, timestamp: i64, stream_time: i64, grace_ms: i64) -> WindowError {
    WindowError::Late {
        key: key.to_owned(),
        timestamp,
        stream_time,
        grace_ms,
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Order-preserving bits of a timestamp (big-endian bytes sort as the times do).
pub(crate) fn flip(t: i64) -> u64 {
    (t as u64) ^ (1 << 63)
}

pub(crate) fn unflip(bits: u64) -> i64 {
    (bits ^ (1 << 63)) as i64
}

/// A window's timer key: its start and end (hex, order-preserving), then the record key.
fn timer_key(key: &str, window: Window) -> String {
    format!("{:016x}{:016x}{key}", flip(window.start), flip(window.end))
}

fn parse_timer_key(text: &str) -> Option<(String, Window)> {
    let start = u64::from_str_radix(text.get(..16)?, 16).ok()?;
    let end = u64::from_str_radix(text.get(16..32)?, 16).ok()?;
    let window = Window {
        start: unflip(start),
        end: unflip(end),
    };
    Some((text.get(32..)?.to_owned(), window))
}

/// The store key of a window's aggregate: the record key (length-prefixed), then start and
/// end, so that one key's windows are one contiguous range in time order.
struct WindowKey;

impl Encode for WindowKey {
    type Item = (String, Window);
    fn encode((key, window): &Self::Item) -> Result<Option<Vec<u8>>, EncodeError> {
        let mut bytes = Vec::with_capacity(4 + key.len() + 16);
        let len =
            u32::try_from(key.len()).map_err(|_| EncodeError::custom("window key too long"))?;
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&flip(window.start).to_be_bytes());
        bytes.extend_from_slice(&flip(window.end).to_be_bytes());
        Ok(Some(bytes))
    }
}

impl Format for WindowKey {
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError> {
        let bad = || DecodeError::custom("not a window key");
        let bytes = bytes.ok_or_else(bad)?;
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_be_bytes(*len) as usize;
        let key = rest.get(..len).ok_or_else(bad)?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| bad())?;
        let rest = &rest[len..];
        let (start, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let end: [u8; 8] = rest.try_into().map_err(|_| bad())?;
        let window = Window {
            start: unflip(u64::from_be_bytes(*start)),
            end: unflip(u64::from_be_bytes(end)),
        };
        Ok((key, window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{RawInput, TestDriver};
    use crate::{ErrorPolicy, Json, Output, ProcessError, Processor, Record, Utf8};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn w(start: i64, end: i64) -> Window {
        Window { start, end }
    }

    #[test]
    fn windows_containing_a_timestamp() {
        let tumbling = TimeWindows::tumbling(ms(10));
        assert_eq!(tumbling.containing(0), [w(0, 10)]);
        assert_eq!(tumbling.containing(19), [w(10, 20)]);
        assert_eq!(tumbling.containing(-1), [w(-10, 0)]);
        let hopping = TimeWindows::hopping(ms(10), ms(4));
        assert_eq!(hopping.containing(9), [w(0, 10), w(4, 14), w(8, 18)]);
        assert_eq!(hopping.containing(12), [w(4, 14), w(8, 18), w(12, 22)]);
        // An advance longer than the size is clamped to it: tumbling.
        assert_eq!(
            TimeWindows::hopping(ms(5), ms(50)).containing(7),
            [w(5, 10)]
        );
    }

    #[test]
    fn window_keys_round_trip_and_keep_one_keys_windows_together_in_time_order() {
        let keys = [
            ("a".to_string(), w(-5, 5)),
            ("a".to_string(), w(0, 10)),
            ("a".to_string(), w(0, 11)),
            ("ab".to_string(), w(-100, 0)),
        ];
        let encoded: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| WindowKey::encode(k).unwrap().unwrap())
            .collect();
        assert!(encoded.windows(2).all(|p| p[0] < p[1]));
        for (k, e) in keys.iter().zip(&encoded) {
            assert_eq!(&WindowKey::decode(Some(e)).unwrap(), k);
        }
        assert_eq!(
            parse_timer_key(&timer_key("x:y", w(-3, 7))),
            Some(("x:y".to_string(), w(-3, 7)))
        );
    }

    #[derive(Default, Serialize, Deserialize)]
    struct Sums {
        hopping: WindowedAggregates<Json<i64>>,
        sessions: WindowedAggregates<Json<i64>>,
        own: Timers,
    }

    /// Sums per key over hopping windows (10 ms every 5, grace 2) and sessions (gap 5, grace
    /// 10);
    /// late records go to "late"; its own timer (value 0) must not confuse the windows.
    struct Summer;

    impl Processor for Summer {
        type State = Sums;
        type Key = Utf8;
        type Value = Json<i64>;
        fn process(
            &self,
            s: &mut Sums,
            r: &Record<'_, String, i64>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            let at = r.timestamp().unwrap_or_default();
            if *r.value() == 0 {
                s.own.schedule(at, "mine")?;
                return Ok(());
            }
            let hops = TimeWindows::hopping(ms(10), ms(5)).grace(ms(2));
            match s
                .hopping
                .add(&hops, r.key(), at, |sum| sum.unwrap_or(0) + r.value())
            {
                Err(WindowError::Late { .. }) => out.send_json("late", r.key(), &at)?,
                other => {
                    other?;
                }
            }
            let sessions = SessionWindows::with_gap(ms(5)).grace(ms(10));
            s.sessions.add_to_session(
                &sessions,
                r.key(),
                at,
                |a, b| a + b,
                |sum| sum.unwrap_or(0) + r.value(),
            )?;
            Ok(())
        }
        fn on_timer(&self, s: &mut Sums, t: &Timer, out: &mut Output) -> Result<(), ProcessError> {
            if let Some(c) = s.hopping.on_timer(t)? {
                out.send_json("hopping", &c.key, &(c.window.start, c.window.end, c.value))?;
            } else if let Some(c) = s.sessions.on_timer(t)? {
                out.send_json("sessions", &c.key, &(c.window.start, c.window.end, c.value))?;
            } else if s.own.owns(t) {
                out.send_json("own", &t.key, &t.time)?;
            }
            Ok(())
        }
    }

    fn pipe(driver: &mut TestDriver<Summer>, at: i64, key: &str, value: i64) {
        driver
            .pipe_raw(
                RawInput::new("in")
                    .timestamp(at)
                    .key(key)
                    .value(value.to_string()),
            )
            .unwrap();
    }

    type Closed3 = Vec<(String, (i64, i64, i64))>;

    #[test]
    fn hopping_windows_close_once_after_their_grace_and_late_records_are_reported() {
        let mut driver = TestDriver::new(Summer);
        pipe(&mut driver, 1, "a", 1); // [-5,5) [0,10)
        pipe(&mut driver, 6, "a", 2); // [0,10) [5,15)
        pipe(&mut driver, 6, "a", 0); // its own timer at 6
        driver.full_snapshot().unwrap();
        pipe(&mut driver, 12, "b", 4); // closes [-5,5) (at 7) and [0,10) (at 12)
        pipe(&mut driver, 3, "a", 8); // late for both of its windows
        pipe(&mut driver, 40, "b", 16); // closes the rest
        let hopping: Closed3 = driver.read_json("hopping").unwrap();
        assert_eq!(
            hopping,
            [
                ("a".to_string(), (-5, 5, 1)),
                ("a".to_string(), (0, 10, 3)),
                ("a".to_string(), (5, 15, 2)),
                ("b".to_string(), (5, 15, 4)),
                ("b".to_string(), (10, 20, 4)),
            ]
        );
        assert_eq!(
            driver.read_json::<String, i64>("late").unwrap(),
            [("a".into(), 3)]
        );
        assert_eq!(
            driver.read_json::<String, i64>("own").unwrap(),
            [("mine".into(), 6)]
        );
        assert_eq!(driver.state("in", 0).unwrap().hopping.open_windows(), 2);
        driver.verify_determinism().unwrap();
    }

    #[test]
    fn sessions_merge_records_within_the_gap_and_close_after_it() {
        let mut driver = TestDriver::new(Summer).with_error_policy(ErrorPolicy::Skip);
        pipe(&mut driver, 10, "a", 1);
        pipe(&mut driver, 18, "a", 2); // a session of its own: 18 - 10 >= gap
        pipe(&mut driver, 14, "a", 4); // closer than the gap to both: merges them
        pipe(&mut driver, 40, "b", 8); // closes a's session (at 18 + 5 + 10)
        let sessions: Closed3 = driver.read_json("sessions").unwrap();
        assert_eq!(sessions, [("a".to_string(), (10, 19, 7))]);
        // A record whose own session would have closed already (at 1 + 5 + 10) is late.
        pipe(&mut driver, 1, "c", 16);
        assert!(driver.errors()[0].to_string().contains("late record"));
        driver.verify_determinism().unwrap();
    }
}

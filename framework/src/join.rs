//! Joins of co-partitioned inputs ([`AppConfig::co_partitioned`](crate::AppConfig::co_partitioned)):
//! a [`Table`] input materialized into the state (stream–table join), and a [`WindowJoin`]
//! pairing the records of two streams whose timestamps lie within a window (stream–stream
//! join).
//!
//! Built only from a [`Store`] and [`Timers`], so they replay exactly: which records met
//! depends on the order the unit's records reached the processor, which each transaction
//! records and recovery replays (DESIGN §8), and on record timestamps.
//!
//! ```
//! use exactly::join::{JoinWindow, WindowJoin};
//! use exactly::testing::{RawInput, TestDriver};
//! use exactly::{Output, ProcessError, Processor, Raw, Record, Timer, Utf8};
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Pending {
//!     clicks_to_orders: WindowJoin<Utf8, Utf8>,
//! }
//!
//! /// An order placed within a minute of a click on the same product (either one first).
//! struct Attribution;
//! impl Processor for Attribution {
//!     type State = Pending;
//!     type Key = Utf8;
//!     type Value = Raw;
//!     fn process(&self, s: &mut Pending, r: &Record<'_, String, Option<Vec<u8>>>,
//!                out: &mut Output) -> Result<(), ProcessError> {
//!         let window = JoinWindow::within(Duration::from_secs(60));
//!         let at = r.timestamp().unwrap_or_default();
//!         let value = r.decode_value::<Utf8>()?;
//!         let join = &mut s.clicks_to_orders;
//!         if r.topic() == "clicks" {
//!             for (_, order) in join.left(&window, r.key(), at, &value)? {
//!                 out.send_json("attributed", r.key(), &(&value, order))?;
//!             }
//!         } else {
//!             for (_, click) in join.right(&window, r.key(), at, &value)? {
//!                 out.send_json("attributed", r.key(), &(click, &value))?;
//!             }
//!         }
//!         Ok(())
//!     }
//!     fn on_timer(&self, s: &mut Pending, timer: &Timer, _: &mut Output)
//!                 -> Result<(), ProcessError> {
//!         s.clicks_to_orders.on_timer(timer)?; // forgets records past their window
//!         Ok(())
//!     }
//! }
//!
//! let mut driver = TestDriver::new(Attribution).co_partitioned(["clicks", "orders"]);
//! let at = |topic: &str, ms: i64, v: &str| RawInput::new(topic).key("shoe").timestamp(ms).value(v);
//! driver.pipe_raw(at("clicks", 1_000, "c1")).unwrap();
//! driver.pipe_raw(at("orders", 30_000, "o1")).unwrap();  // within a minute of c1
//! driver.pipe_raw(at("orders", 200_000, "o2")).unwrap(); // too late for c1 (now forgotten)
//! let pairs: Vec<(String, (String, String))> = driver.read_json("attributed").unwrap();
//! assert_eq!(pairs, [("shoe".to_string(), ("c1".to_string(), "o1".to_string()))]);
//! driver.verify_determinism().unwrap();
//! // A click more than a minute older than the stream time can meet nothing: late.
//! let late = driver.pipe_raw(at("clicks", 5_000, "c0")).unwrap_err();
//! assert!(late.to_string().contains("late record"));
//! ```

use std::ops::Bound;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Encode, EncodeError, Format, Utf8};
use crate::window::{flip, millis, unflip, WindowError};
use crate::{Store, StoreError, Timer, Timers};

/// A table input materialized into the state: the latest value of each key (a record without
/// a value, a tombstone, deletes the key). Update it with the table input's records, read it
/// when the stream's records arrive: a stream–table join. Held in the processor's `State`.
///
/// ```
/// use exactly::join::Table;
/// use exactly::Utf8;
/// let mut limits: Table<Utf8> = Table::default();
/// limits.update("ada", Some(&"100".to_string())).unwrap();
/// assert_eq!(limits.get("ada").unwrap(), Some("100".to_string()));
/// limits.update("ada", None).unwrap(); // a tombstone
/// assert_eq!(limits.get("ada").unwrap(), None);
/// ```
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Table<V: Format> {
    rows: Store<Utf8, V>,
}

impl<V: Format> Default for Table<V> {
    fn default() -> Self {
        Table {
            rows: Store::default(),
        }
    }
}

impl<V: Format> Table<V> {
    /// The table's record for `key`: its new value, or `None` (a tombstone) to delete it.
    pub fn update(&mut self, key: &str, value: Option<&V::Item>) -> Result<(), StoreError> {
        let key = key.to_owned();
        match value {
            Some(value) => self.rows.put(&key, value),
            None => self.rows.delete(&key).map(|_| ()),
        }
    }

    /// The latest value of `key`.
    pub fn get(&self, key: &str) -> Result<Option<V::Item>, StoreError> {
        self.rows.get(&key.to_owned())
    }

    /// Number of keys.
    pub fn len(&self) -> u64 {
        self.rows.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// How far apart two records' timestamps may be to join, and how long after that a record is
/// still accepted (grace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinWindow {
    within: i64,
    grace: i64,
}

impl JoinWindow {
    /// Records at most `within` apart (either one first).
    pub fn within(within: Duration) -> Self {
        JoinWindow {
            within: millis(within),
            grace: 0,
        }
    }

    /// Keeps records buffered `grace` longer, for late partners (default 0).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = millis(grace);
        self
    }

    /// When a record at `timestamp` can no longer meet a partner.
    fn expires(&self, timestamp: i64) -> i64 {
        timestamp
            .saturating_add(self.within)
            .saturating_add(self.grace)
    }
}

/// A stream–stream join: the records of two inputs (left `L`, right `R`) with the same key
/// and timestamps within a [`JoinWindow`] are paired, each pair once, whichever arrives
/// second. Each record waits in a store of the state until no partner can come any more
/// (stream time past its timestamp + window + grace): hand the processor's timers to
/// [`on_timer`](Self::on_timer). See the [module](self) example.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct WindowJoin<L: Format, R: Format> {
    left: Store<JoinKey, L>,
    right: Store<JoinKey, R>,
    expiry: Timers,
    /// Tells apart records with the same key and timestamp.
    next_id: u64,
}

impl<L: Format, R: Format> Default for WindowJoin<L, R> {
    fn default() -> Self {
        WindowJoin {
            left: Store::default(),
            right: Store::default(),
            expiry: Timers::default(),
            next_id: 0,
        }
    }
}

/// The timestamp and value of a buffered record that a new one met.
pub type Partner<T> = (i64, T);

impl<L: Format, R: Format> WindowJoin<L, R> {
    /// A left record: buffered for later right ones; returns the buffered right records it
    /// meets, in timestamp order. [`WindowError::Late`] when it is too late for any partner.
    pub fn left(
        &mut self,
        window: &JoinWindow,
        key: &str,
        timestamp: i64,
        value: &L::Item,
    ) -> Result<Vec<Partner<R::Item>>, WindowError> {
        self.check_late(window, key, timestamp)?;
        let id = self.buffer_id();
        self.left.put(&(key.to_owned(), timestamp, id), value)?;
        self.expiry.schedule(
            window.expires(timestamp),
            expiry_key('l', key, timestamp, id),
        )?;
        Ok(partners(&self.right, window, key, timestamp)?)
    }

    /// A right record: the mirror of [`left`](Self::left).
    pub fn right(
        &mut self,
        window: &JoinWindow,
        key: &str,
        timestamp: i64,
        value: &R::Item,
    ) -> Result<Vec<Partner<L::Item>>, WindowError> {
        self.check_late(window, key, timestamp)?;
        let id = self.buffer_id();
        self.right.put(&(key.to_owned(), timestamp, id), value)?;
        self.expiry.schedule(
            window.expires(timestamp),
            expiry_key('r', key, timestamp, id),
        )?;
        Ok(partners(&self.left, window, key, timestamp)?)
    }

    /// Hands a timer of [`Processor::on_timer`](crate::Processor::on_timer) to the join: if
    /// it is one of its own, the buffered record it stands for is forgotten (`true`).
    pub fn on_timer(&mut self, timer: &Timer) -> Result<bool, StoreError> {
        if !self.expiry.owns(timer) {
            return Ok(false);
        }
        if let Some((side, key)) = parse_expiry_key(&timer.key) {
            match side {
                'l' => self.left.delete(&key)?,
                _ => self.right.delete(&key)?,
            };
        }
        Ok(true)
    }

    /// Records buffered on each side.
    pub fn buffered(&self) -> (u64, u64) {
        (self.left.len(), self.right.len())
    }

    fn buffer_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn check_late(
        &self,
        window: &JoinWindow,
        key: &str,
        timestamp: i64,
    ) -> Result<(), WindowError> {
        let now = self.expiry.stream_time()?.unwrap_or(i64::MIN);
        if window.expires(timestamp) <= now {
            return Err(WindowError::Late {
                key: key.to_owned(),
                timestamp,
                stream_time: now,
                grace_ms: window.grace,
            });
        }
        Ok(())
    }
}

/// The buffered records of `key` within the window of `timestamp`, in timestamp order.
fn partners<T: Format>(
    side: &Store<JoinKey, T>,
    window: &JoinWindow,
    key: &str,
    timestamp: i64,
) -> Result<Vec<Partner<T::Item>>, StoreError> {
    let from = (key.to_owned(), timestamp.saturating_sub(window.within), 0);
    let to = (
        key.to_owned(),
        timestamp.saturating_add(window.within),
        u64::MAX,
    );
    let found = side.range((Bound::Included(from), Bound::Included(to)))?;
    Ok(found.into_iter().map(|((_, at, _), v)| (at, v)).collect())
}

/// A buffered record's timer key: side, timestamp and id (hex), then the record key.
fn expiry_key(side: char, key: &str, timestamp: i64, id: u64) -> String {
    format!("{side}{:016x}{id:016x}{key}", flip(timestamp))
}

fn parse_expiry_key(text: &str) -> Option<(char, (String, i64, u64))> {
    let side = text.chars().next()?;
    let timestamp = unflip(u64::from_str_radix(text.get(1..17)?, 16).ok()?);
    let id = u64::from_str_radix(text.get(17..33)?, 16).ok()?;
    Some((side, (text.get(33..)?.to_owned(), timestamp, id)))
}

/// A buffered record's store key: the record key (length-prefixed), its timestamp, an id; so
/// that one key's records are one contiguous range in timestamp order.
struct JoinKey;

impl Encode for JoinKey {
    type Item = (String, i64, u64);
    fn encode((key, timestamp, id): &Self::Item) -> Result<Option<Vec<u8>>, EncodeError> {
        let len = u32::try_from(key.len()).map_err(|_| EncodeError::custom("join key too long"))?;
        let mut bytes = Vec::with_capacity(4 + key.len() + 16);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&flip(*timestamp).to_be_bytes());
        bytes.extend_from_slice(&id.to_be_bytes());
        Ok(Some(bytes))
    }
}

impl Format for JoinKey {
    fn decode(bytes: Option<&[u8]>) -> Result<Self::Item, DecodeError> {
        let bad = || DecodeError::custom("not a join key");
        let bytes = bytes.ok_or_else(bad)?;
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_be_bytes(*len) as usize;
        let key =
            String::from_utf8(rest.get(..len).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
        let rest = &rest[len..];
        let (timestamp, rest) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let id: [u8; 8] = rest.try_into().map_err(|_| bad())?;
        Ok((
            key,
            unflip(u64::from_be_bytes(*timestamp)),
            u64::from_be_bytes(id),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_keys_round_trip_in_key_then_time_order() {
        let keys = [
            ("a".to_string(), -5, 9),
            ("a".to_string(), 3, 1),
            ("a".to_string(), 3, 2),
            ("ab".to_string(), -100, 0),
        ];
        let encoded: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| JoinKey::encode(k).unwrap().unwrap())
            .collect();
        assert!(encoded.windows(2).all(|p| p[0] < p[1]));
        for (k, e) in keys.iter().zip(&encoded) {
            assert_eq!(&JoinKey::decode(Some(e)).unwrap(), k);
        }
        assert_eq!(
            parse_expiry_key(&expiry_key('r', "k:1", -7, 42)),
            Some(('r', ("k:1".to_string(), -7, 42)))
        );
    }

    #[test]
    fn records_meet_the_partners_within_the_window() {
        let window = JoinWindow::within(Duration::from_millis(10));
        let mut join: WindowJoin<Utf8, Utf8> = WindowJoin::default();
        assert!(join
            .left(&window, "k", 100, &"l1".into())
            .unwrap()
            .is_empty());
        assert!(join
            .left(&window, "other", 100, &"x".into())
            .unwrap()
            .is_empty());
        let met = join.right(&window, "k", 105, &"r1".into()).unwrap();
        assert_eq!(met, [(100, "l1".to_string())]);
        let met = join.left(&window, "k", 120, &"l2".into()).unwrap();
        assert!(met.is_empty(), "r1 at 105 is more than 10 ms before 120");
        assert_eq!(join.buffered(), (3, 1));
    }
}

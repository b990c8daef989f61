//! The processor API: what a user implements ([`Processor`]), what it reads ([`Record`]) and
//! what it writes ([`Output`], [`OutputRecord`]).

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{json_key, to_json, BoxError, DecodeError, Encode, EncodeError, Format};

/// The error a [`Processor`] returns for a record it cannot handle.
///
/// Any error type converts into it with `?` or `.into()`; what happens next is decided by the
/// configured [`ErrorPolicy`](crate::ErrorPolicy).
pub type ProcessError = Box<dyn std::error::Error + Send + Sync>;

/// The decoded key type of a processor.
pub type KeyOf<P> = <<P as Processor>::Key as Encode>::Item;
/// The decoded value type of a processor.
pub type ValueOf<P> = <<P as Processor>::Value as Encode>::Item;

/// A stream processor: a function from (state, input record) to (new state, output records).
///
/// The runtime keeps one `State` per assigned input partition, calls [`process`](Self::process)
/// for every record of that partition in offset order, and commits the outputs, the consumed
/// offsets and a snapshot of the state in one Kafka transaction: each input record affects
/// state and outputs exactly once.
///
/// # Determinism
///
/// After a crash the state is rebuilt from the last full snapshot by *replaying* the input
/// records since then through `process`, and the result is checked against a fingerprint
/// recorded before the crash. So `process` must depend only on `state`, `record` and `self`'s
/// immutable configuration: use [`Record::timestamp`] instead of the wall clock, no random
/// numbers, and no iteration over a `HashMap` to decide what to output (its order differs from
/// process to process; use a `BTreeMap` or sort). A violation is reported as an error instead
/// of silently producing different results; [`testing::TestDriver::verify_determinism`]
/// checks it in a unit test.
///
/// [`testing::TestDriver::verify_determinism`]: crate::testing::TestDriver::verify_determinism
///
/// # Example
///
/// ```
/// use std::collections::HashMap;
/// use exactly::{Json, Output, Processor, ProcessError, Record, Utf8};
///
/// /// Counts records per key and emits the running count.
/// struct Counter;
///
/// impl Processor for Counter {
///     type State = HashMap<String, u64>;
///     type Key = Utf8;
///     type Value = Json<serde_json::Value>;
///
///     fn process(
///         &self,
///         counts: &mut Self::State,
///         record: &Record<'_, String, serde_json::Value>,
///         out: &mut Output,
///     ) -> Result<(), ProcessError> {
///         let count = counts.entry(record.key().clone()).or_default();
///         *count += 1;
///         out.send_json("counts", record.key(), count)?;
///         Ok(())
///     }
/// }
///
/// // Run in-process, as the runtime would run it on one input partition:
/// let mut driver = exactly::testing::TestDriver::new(Counter);
/// for key in ["a", "b", "a"] {
///     driver.pipe("events", &key.to_string(), &serde_json::json!({"n": 1})).unwrap();
/// }
/// let counts: Vec<(String, u64)> = driver.read_json("counts").unwrap();
/// assert_eq!(counts, [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
/// assert_eq!(driver.state("events", 0).unwrap()["a"], 2);
/// ```
pub trait Processor: Send + Sync + 'static {
    /// Per-partition state. Serialized into full snapshots (MessagePack via rmp-serde) and
    /// fingerprinted with every transaction while that is cheap, else with every full snapshot
    /// (see [`AppConfig::state_fingerprint`](crate::AppConfig::state_fingerprint)); starts as
    /// `Default::default()`.
    type State: Serialize + DeserializeOwned + Default + Send + 'static;
    /// Format of the input keys.
    type Key: Format;
    /// Format of the input values.
    type Value: Format;

    /// Handles one input record: update `state`, emit outputs to `out`.
    ///
    /// Returning an error (or panicking) hands the record to the configured
    /// [`ErrorPolicy`](crate::ErrorPolicy); the outputs this call emitted are discarded in
    /// either case. Writes to a [`Store`](crate::Store) in `state` are undone with them;
    /// other changes already made to `state` are *not*, so validate before you mutate.
    ///
    /// ```
    /// use exactly::testing::TestDriver;
    /// use exactly::{ErrorPolicy, Json, Output, ProcessError, Processor, Record, Utf8};
    ///
    /// /// Sums amounts per partition; refuses negative ones.
    /// struct Sum;
    /// impl Processor for Sum {
    ///     type State = i64;
    ///     type Key = Utf8;
    ///     type Value = Json<i64>;
    ///     fn process(&self, sum: &mut i64, record: &Record<'_, String, i64>,
    ///                out: &mut Output) -> Result<(), ProcessError> {
    ///         out.send_json("seen", record.key(), record.value())?;
    ///         if *record.value() < 0 {
    ///             return Err(format!("negative amount {}", record.value()).into());
    ///         }
    ///         *sum += record.value(); // only after validating
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let mut driver = TestDriver::new(Sum).with_error_policy(ErrorPolicy::Skip);
    /// driver.pipe("amounts", &"a".to_string(), &5).unwrap();
    /// driver.pipe("amounts", &"a".to_string(), &-3).unwrap(); // skipped
    /// assert_eq!(driver.state("amounts", 0), Some(&5));
    /// // The failed call's output was discarded with it.
    /// assert_eq!(driver.read_json::<String, i64>("seen").unwrap(), [("a".into(), 5)]);
    /// assert_eq!(driver.errors()[0].kind(), "processor");
    /// ```
    fn process(
        &self,
        state: &mut Self::State,
        record: &Record<'_, KeyOf<Self>, ValueOf<Self>>,
        out: &mut Output,
    ) -> Result<(), ProcessError>;

    /// Handles a [`Timer`](crate::Timer) of the state's [`Timers`](crate::Timers) that fell
    /// due: the partition's stream time reached it. Called right after the record that moved
    /// stream time there, once per due timer in (time, key) order, with the state and an
    /// output like [`process`](Self::process); outputs without a timestamp get the timer's
    /// time. An error or panic goes to the [`ErrorPolicy`](crate::ErrorPolicy) like a
    /// record's (kind `"timer"`): under `Skip`/`DeadLetter` the call's store writes are rolled
    /// back and the timer is dropped.
    ///
    /// The default refuses: a processor that schedules timers must implement it.
    fn on_timer(
        &self,
        state: &mut Self::State,
        timer: &crate::Timer,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let _ = (state, out);
        Err(format!(
            "timer {timer:?} fell due, but {} does not implement Processor::on_timer",
            std::any::type_name::<Self>()
        )
        .into())
    }

    /// How often the runtime calls [`on_wall_clock`](Self::on_wall_clock) on each partition,
    /// whether or not input arrives. `None`, the default: never.
    fn wall_clock_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// Periodic work by the wall clock (a *punctuation*), for what must happen while no input
    /// arrives: `now_ms` is the wall-clock time (ms since the Unix epoch) the runtime decided to
    /// fire at, every [`wall_clock_interval`](Self::wall_clock_interval). Use `now_ms`, never
    /// the clock itself.
    ///
    /// Replay-safe by logging: the runtime records each call (after which input record, with
    /// which `now_ms`) in the transaction that carries its effects, and a replay after a crash
    /// makes the same call at the same place with the same time. A call whose transaction did
    /// not commit never happened, and is decided anew. Outputs without a timestamp get
    /// `now_ms`; failures follow the [`ErrorPolicy`](crate::ErrorPolicy) (kind `"wall-clock"`).
    fn on_wall_clock(
        &self,
        state: &mut Self::State,
        now_ms: i64,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let _ = (state, now_ms, out);
        Ok(())
    }

    /// The version of this processor's code, recorded with every committed transaction.
    ///
    /// Recovery after a crash replays the input since the last full snapshot and checks that
    /// the replay rebuilds the recorded state fingerprint and output digest. New code that
    /// changes what `process` does (other outputs, another state type) cannot pass those
    /// checks, and with the same version a failed check is fatal: it cannot be told from a
    /// non-deterministic processor. Return a new number with every deploy that changes
    /// `process` or the state type: when the recorded version differs, the replay runs with
    /// the new code, differing checks are logged (`processor version changed`), and the new
    /// version is recorded from then on. Restarts after a graceful shutdown replay nothing
    /// and need no bump for a compatible state change (a field added with
    /// `#[serde(default)]`, a field removed, an alias). Default: 0.
    ///
    /// ```
    /// # use exactly::{Output, ProcessError, Processor, Record, Utf8};
    /// struct Alerts;
    /// impl Processor for Alerts {
    ///     type State = u64;
    ///     type Key = Utf8;
    ///     type Value = Utf8;
    ///     fn process(&self, seen: &mut u64, _: &Record<'_, String, String>,
    ///                _: &mut Output) -> Result<(), ProcessError> {
    ///         *seen += 1;
    ///         Ok(())
    ///     }
    ///     /// 2: alert texts reworded.
    ///     fn version(&self) -> u32 {
    ///         2
    ///     }
    /// }
    /// ```
    fn version(&self) -> u32 {
        0
    }

    /// Builds the state from a full snapshot that `State`'s own `Deserialize` cannot read: one
    /// written by an older version of this processor (`from_version`, its
    /// [`Processor::version`]) before the state type changed incompatibly (a field added
    /// without `#[serde(default)]`, a field whose type changed). Read it as the old type with
    /// [`OldState::decode`] and convert it. `Ok(None)`, the default, migrates nothing:
    /// recovery fails with an error naming the state type and the field it could not read.
    ///
    /// ```
    /// # use exactly::{BoxError, OldState, Output, ProcessError, Processor, Record, Utf8};
    /// # use serde::{Deserialize, Serialize};
    /// /// Version 1's state.
    /// #[derive(Deserialize)]
    /// struct Totals { cents: u64 }
    /// /// Version 2's: amounts in a currency.
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct Amounts { cents: u64, currency: String }
    ///
    /// struct Payments;
    /// impl Processor for Payments {
    ///     type State = Amounts;
    ///     type Key = Utf8;
    ///     type Value = Utf8;
    ///     fn process(&self, _: &mut Amounts, _: &Record<'_, String, String>,
    ///                _: &mut Output) -> Result<(), ProcessError> {
    ///         Ok(())
    ///     }
    ///     fn version(&self) -> u32 {
    ///         2
    ///     }
    ///     fn migrate_state(&self, from_version: u32, old: &OldState<'_>)
    ///                      -> Result<Option<Amounts>, BoxError> {
    ///         if from_version >= 2 {
    ///             return Ok(None);
    ///         }
    ///         let Totals { cents } = old.decode()?;
    ///         Ok(Some(Amounts { cents, currency: "EUR".into() }))
    ///     }
    /// }
    /// ```
    fn migrate_state(
        &self,
        from_version: u32,
        old: &OldState<'_>,
    ) -> Result<Option<Self::State>, BoxError> {
        let _ = (from_version, old);
        Ok(None)
    }
}

/// A state read from a full snapshot by the running processor.
pub(crate) enum StateRead<S> {
    /// Read as `State` directly.
    Read(S),
    /// Converted by [`Processor::migrate_state`].
    Migrated(S),
}

/// Why a full snapshot's state could not become the running processor's state.
pub(crate) enum StateReadError {
    /// It does not read as `State`, and `migrate_state` did not convert it.
    Unreadable(crate::snapshot::SnapshotError),
    /// `migrate_state` failed.
    Migration(BoxError),
}

/// Reads the encoded state `bytes` (written by processor version `from_version`) as
/// `P::State`, or, when that fails, as `processor.migrate_state` converts it.
pub(crate) fn read_state<P: Processor>(
    processor: &P,
    from_version: u32,
    bytes: &[u8],
) -> Result<StateRead<P::State>, StateReadError> {
    let unreadable = match crate::snapshot::decode_state(bytes) {
        Ok(state) => return Ok(StateRead::Read(state)),
        Err(error) => error,
    };
    match processor.migrate_state(from_version, &OldState { bytes }) {
        Ok(Some(state)) => Ok(StateRead::Migrated(state)),
        Ok(None) => Err(StateReadError::Unreadable(unreadable)),
        Err(error) => Err(StateReadError::Migration(error)),
    }
}

/// A state from a full snapshot, as written by an older version of the processor; see
/// [`Processor::migrate_state`].
pub struct OldState<'a> {
    bytes: &'a [u8],
}

impl OldState<'_> {
    /// Reads the state as `T`, the old state type (or any type that reads it, e.g.
    /// `serde_json::Value`).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, BoxError> {
        Ok(crate::snapshot::decode_state(self.bytes)?)
    }

    /// The encoded state (MessagePack, structs as maps with field names).
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }
}

/// One input record, with its key and value decoded by the processor's formats.
pub struct Record<'a, K, V> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: K,
    value: V,
    raw_key: Option<&'a [u8]>,
    raw_value: Option<&'a [u8]>,
    headers: &'a [(String, Option<Vec<u8>>)],
}

impl<'a, K, V> Record<'a, K, V> {
    /// The input topic.
    pub fn topic(&self) -> &'a str {
        self.topic
    }
    /// The input partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }
    /// The record's offset in its partition. Offsets increase but are not contiguous
    /// (transaction markers occupy offsets too).
    pub fn offset(&self) -> i64 {
        self.offset
    }
    /// The record's timestamp in milliseconds since the Unix epoch, if it has one. Use this, not
    /// the wall clock, for anything time-based: it is the same when the record is replayed.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }
    /// The decoded key.
    pub fn key(&self) -> &K {
        &self.key
    }
    /// The decoded value.
    pub fn value(&self) -> &V {
        &self.value
    }
    /// The key bytes as received (`None` = absent).
    pub fn raw_key(&self) -> Option<&'a [u8]> {
        self.raw_key
    }
    /// The value bytes as received (`None` = absent).
    pub fn raw_value(&self) -> Option<&'a [u8]> {
        self.raw_value
    }
    /// The value decoded with format `F` instead of the processor's own: for inputs whose
    /// values differ (co-partitioned inputs, see
    /// [`AppConfig::co_partitioned`](crate::AppConfig::co_partitioned)), with `Value = Raw`
    /// and a format per [`topic`](Self::topic).
    pub fn decode_value<F: Format>(&self) -> Result<F::Item, DecodeError> {
        F::decode(self.raw_value)
    }
    /// The key decoded with format `F` instead of the processor's own (see
    /// [`decode_value`](Self::decode_value)).
    pub fn decode_key<F: Format>(&self) -> Result<F::Item, DecodeError> {
        F::decode(self.raw_key)
    }
    /// All headers in order: `(name, value)`; a header may have no value.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref()))
    }
    /// The value of the last header named `name` (`None` if there is none or it has no value).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for Record<'_, K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .field("key", &self.key)
            .field("value", &self.value)
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// A record to write to an output topic; built with [`OutputRecord::new`] and the
/// builder-style setters.
///
/// ```
/// use exactly::OutputRecord;
///
/// let r = OutputRecord::new("alerts")
///     .key("account-7")
///     .value(r#"{"level":"high"}"#)
///     .header("source", "fraud-check")
///     .timestamp(1_700_000_000_000)
///     .partition(3);
/// assert_eq!(r.topic, "alerts");
/// assert_eq!(r.key.as_deref(), Some(&b"account-7"[..]));
/// assert_eq!(r.partition, Some(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutputRecord {
    /// Destination topic.
    pub topic: String,
    /// Destination partition; `None` = chosen by the producer's partitioner from the key.
    pub partition: Option<i32>,
    /// Key bytes; `None` = no key.
    pub key: Option<Vec<u8>>,
    /// Value bytes; `None` = no value (a tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Timestamp in ms since the Unix epoch. `None` = the timestamp of the input record being
    /// processed (filled in by the framework, so outputs stay deterministic on replay).
    pub timestamp: Option<i64>,
}

impl OutputRecord {
    /// A record for `topic` with no key, no value, no headers.
    pub fn new(topic: impl Into<String>) -> Self {
        OutputRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: None,
            headers: Vec::new(),
            timestamp: None,
        }
    }
    /// Sets the key bytes.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Sets the value bytes.
    pub fn value(mut self, value: impl Into<Vec<u8>>) -> Self {
        self.value = Some(value.into());
        self
    }
    /// Appends a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Sets the timestamp (ms since the Unix epoch).
    pub fn timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
    }
    /// Sends to a fixed partition instead of the partitioner's choice.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// A record whose key and value are encoded with the formats `KF` and `VF`.
    pub fn encoded<KF: Encode, VF: Encode>(
        topic: impl Into<String>,
        key: &KF::Item,
        value: &VF::Item,
    ) -> Result<Self, EncodeError> {
        let mut r = OutputRecord::new(topic);
        r.key = KF::encode(key)?;
        r.value = VF::encode(value)?;
        Ok(r)
    }
}

/// Collects the records a [`Processor`] emits for one input record.
///
/// They are written to Kafka in the same transaction that consumes the input record, in the
/// order they were sent.
#[derive(Debug, Default)]
pub struct Output {
    records: Vec<OutputRecord>,
}

impl Output {
    /// An empty output buffer (useful to call [`Processor::process`] directly in a test).
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits a record.
    pub fn send(&mut self, record: OutputRecord) {
        self.records.push(record);
    }

    /// Emits a record whose value is JSON-encoded, and whose key is too unless it is text: a
    /// text key is written as its UTF-8 bytes (`acct-1`, not `"acct-1"`), as other Kafka
    /// clients write keys and as the default partitioner should hash them.
    ///
    /// ```
    /// # use exactly::Output;
    /// let mut out = Output::new();
    /// out.send_json("totals", "acct-1", &42u64).unwrap();
    /// assert_eq!(out.records()[0].key.as_deref(), Some(&b"acct-1"[..]));
    /// assert_eq!(out.records()[0].value.as_deref(), Some(&b"42"[..]));
    /// out.send_json("totals", &(7, "eu"), &1u64).unwrap();
    /// assert_eq!(out.records()[1].key.as_deref(), Some(&br#"[7,"eu"]"#[..]));
    /// ```
    pub fn send_json<K, V>(
        &mut self,
        topic: impl Into<String>,
        key: &K,
        value: &V,
    ) -> Result<(), EncodeError>
    where
        K: Serialize + ?Sized,
        V: Serialize + ?Sized,
    {
        let mut r = OutputRecord::new(topic);
        r.key = Some(json_key(key)?);
        r.value = Some(to_json(value)?);
        self.records.push(r);
        Ok(())
    }

    /// Emits a record whose key and value are encoded with the formats `KF` and `VF` (only
    /// their [`Encode`] half: `Json<&T>` encodes a borrowed value).
    ///
    /// ```
    /// # use exactly::{Json, Output, Utf8};
    /// let mut out = Output::new();
    /// out.send_as::<Utf8, Json<Vec<u8>>>("t", &"k".to_string(), &vec![1, 2]).unwrap();
    /// let name = "ada".to_string();
    /// out.send_as::<Utf8, Json<&String>>("t", &"k".to_string(), &&name).unwrap();
    /// assert_eq!(out.records()[1].value.as_deref(), Some(&br#""ada""#[..]));
    /// assert_eq!(out.records()[0].value.as_deref(), Some(&b"[1,2]"[..]));
    /// ```
    pub fn send_as<KF: Encode, VF: Encode>(
        &mut self,
        topic: impl Into<String>,
        key: &KF::Item,
        value: &VF::Item,
    ) -> Result<(), EncodeError> {
        self.records
            .push(OutputRecord::encoded::<KF, VF>(topic, key, value)?);
        Ok(())
    }

    /// The records emitted so far, in order.
    pub fn records(&self) -> &[OutputRecord] {
        &self.records
    }

    /// Number of records emitted so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True if nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Removes and returns every record.
    pub(crate) fn take(&mut self) -> Vec<OutputRecord> {
        std::mem::take(&mut self.records)
    }

    /// Drops the records emitted after the first `len`.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.records.truncate(len);
    }

    /// Mutable view of the records emitted after the first `from`.
    pub(crate) fn tail_mut(&mut self, from: usize) -> &mut [OutputRecord] {
        &mut self.records[from..]
    }
}

/// An input record as fetched, before decoding: the seam between the runtime (and the test
/// driver) and [`process_raw`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// Which part of a record failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPart {
    /// The key.
    Key,
    /// The value.
    Value,
}

impl fmt::Display for RecordPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordPart::Key => "key",
            RecordPart::Value => "value",
        })
    }
}

/// A record could not be processed: it did not decode, or the processor returned an error or
/// panicked. Always names the record (topic, partition, offset).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The key or value did not decode with the processor's [`Format`].
    #[error("cannot decode the {part} of record {topic}/{partition} at offset {offset}: {source}")]
    Decode {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// Key or value.
        part: RecordPart,
        /// What the format reported.
        #[source]
        source: DecodeError,
    },
    /// [`Processor::process`] returned an error.
    #[error("processor failed on record {topic}/{partition} at offset {offset}: {source}")]
    Processor {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// The processor's error.
        #[source]
        source: ProcessError,
    },
    /// [`Processor::process`] panicked.
    #[error("processor panicked on record {topic}/{partition} at offset {offset}: {message}")]
    Panic {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// The panic message.
        message: String,
    },
    /// [`Processor::on_timer`] failed (returned an error or panicked).
    #[error("processor failed on timer {key:?} at {time} of {topic}/{partition} (due after the record at offset {offset}): {source}")]
    Timer {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset of the record after which the timer fell due.
        offset: i64,
        /// The timer's time.
        time: i64,
        /// The timer's key.
        key: String,
        /// The processor's error (or panic message).
        #[source]
        source: ProcessError,
    },
    /// [`Processor::on_wall_clock`] failed (returned an error or panicked).
    #[error("processor failed on the wall-clock tick at {time} of {topic}/{partition} (before the record at offset {offset}): {source}")]
    WallClock {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The partition's next input offset when the tick fired.
        offset: i64,
        /// The tick's time (ms since the Unix epoch).
        time: i64,
        /// The processor's error (or panic message).
        #[source]
        source: ProcessError,
    },
}

impl RecordError {
    /// Input topic of the failed record.
    pub fn topic(&self) -> &str {
        match self {
            RecordError::Decode { topic, .. }
            | RecordError::Processor { topic, .. }
            | RecordError::Panic { topic, .. }
            | RecordError::Timer { topic, .. }
            | RecordError::WallClock { topic, .. } => topic,
        }
    }
    /// Input partition of the failed record.
    pub fn partition(&self) -> i32 {
        match self {
            RecordError::Decode { partition, .. }
            | RecordError::Processor { partition, .. }
            | RecordError::Panic { partition, .. }
            | RecordError::Timer { partition, .. }
            | RecordError::WallClock { partition, .. } => *partition,
        }
    }
    /// Offset of the failed record.
    pub fn offset(&self) -> i64 {
        match self {
            RecordError::Decode { offset, .. }
            | RecordError::Processor { offset, .. }
            | RecordError::Panic { offset, .. }
            | RecordError::Timer { offset, .. }
            | RecordError::WallClock { offset, .. } => *offset,
        }
    }
    /// Short machine-readable kind: `"decode-key"`, `"decode-value"`, `"processor"`,
    /// `"panic"`, `"timer"` or `"wall-clock"` (also the `exactly.error.kind` header of
    /// dead-lettered records).
    pub fn kind(&self) -> &'static str {
        match self {
            RecordError::Decode {
                part: RecordPart::Key,
                ..
            } => "decode-key",
            RecordError::Decode {
                part: RecordPart::Value,
                ..
            } => "decode-value",
            RecordError::Processor { .. } => "processor",
            RecordError::Panic { .. } => "panic",
            RecordError::Timer { .. } => "timer",
            RecordError::WallClock { .. } => "wall-clock",
        }
    }
}

/// Decodes `raw` with the processor's formats and calls [`Processor::process`] inside
/// `catch_unwind`.
///
/// On success, outputs without a timestamp get the input record's timestamp. On any failure
/// the outputs this record emitted are removed from `out` (those of earlier records stay);
/// state mutations the processor made before failing stay (documented on
/// [`Processor::process`]).
pub(crate) fn process_raw<P: Processor>(
    processor: &P,
    state: &mut P::State,
    raw: &RawRecord,
    out: &mut Output,
) -> Result<(), RecordError> {
    let decode_error = |part, source| RecordError::Decode {
        topic: raw.topic.to_string(),
        partition: raw.partition,
        offset: raw.offset,
        part,
        source,
    };
    let key = P::Key::decode(raw.key.as_deref()).map_err(|e| decode_error(RecordPart::Key, e))?;
    let value =
        P::Value::decode(raw.value.as_deref()).map_err(|e| decode_error(RecordPart::Value, e))?;
    let record = Record {
        topic: &raw.topic,
        partition: raw.partition,
        offset: raw.offset,
        timestamp: raw.timestamp,
        key,
        value,
        raw_key: raw.key.as_deref(),
        raw_value: raw.value.as_deref(),
        headers: &raw.headers,
    };
    let emitted_before = out.len();
    // AssertUnwindSafe: after a panic the state may be half-updated; the error policy decides
    // what happens to it (Fail stops the partition, whose state is then rebuilt from Kafka).
    let result = catch_unwind(AssertUnwindSafe(|| processor.process(state, &record, out)));
    let failure = match result {
        Ok(Ok(())) => {
            if let Some(ts) = raw.timestamp {
                for r in out.tail_mut(emitted_before) {
                    r.timestamp.get_or_insert(ts);
                }
            }
            return Ok(());
        }
        Ok(Err(source)) => RecordError::Processor {
            topic: raw.topic.to_string(),
            partition: raw.partition,
            offset: raw.offset,
            source,
        },
        Err(payload) => RecordError::Panic {
            topic: raw.topic.to_string(),
            partition: raw.partition,
            offset: raw.offset,
            message: panic_message(payload.as_ref()),
        },
    };
    out.truncate(emitted_before);
    Err(failure)
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}

/// Header names of a dead-lettered record (see [`ErrorPolicy::DeadLetter`](crate::ErrorPolicy)).
pub mod dead_letter_headers {
    /// [`RecordError::kind`](crate::RecordError::kind) of the failure.
    pub const ERROR_KIND: &str = "exactly.error.kind";
    /// The failure's message (UTF-8).
    pub const ERROR_MESSAGE: &str = "exactly.error.message";
    /// Input topic of the failed record.
    pub const SOURCE_TOPIC: &str = "exactly.source.topic";
    /// Input partition of the failed record (decimal).
    pub const SOURCE_PARTITION: &str = "exactly.source.partition";
    /// Offset of the failed record (decimal); for a failed timer, of the record after which
    /// it fell due.
    pub const SOURCE_OFFSET: &str = "exactly.source.offset";
    /// For a failed timer (kind `"timer"`; the dead letter's key is the timer's key) or
    /// wall-clock tick (kind `"wall-clock"`; no key): its time (decimal ms).
    pub const TIMER_TIME: &str = "exactly.timer.time";
}

/// The record written to the dead-letter topic for a failed input record: the original key,
/// value, timestamp and headers (headers without a value are kept with an empty value),
/// followed by the `exactly.*` headers of [`dead_letter_headers`]. For a failed timer: the
/// timer's key and time, no value; for a failed wall-clock tick: its time only.
pub(crate) fn dead_letter_record(
    dead_letter_topic: &str,
    raw: Option<&RawRecord>,
    error: &RecordError,
) -> OutputRecord {
    use dead_letter_headers as h;
    let mut r = OutputRecord::new(dead_letter_topic);
    match error {
        // Not the record's fault: the timer's key, no value, the timer's time.
        RecordError::Timer { time, key, .. } => {
            r.key = Some(key.clone().into_bytes());
            r.timestamp = Some(*time);
            r.headers
                .push((h::TIMER_TIME.to_owned(), time.to_string().into_bytes()));
        }
        RecordError::WallClock { time, .. } => {
            r.timestamp = Some(*time);
            r.headers
                .push((h::TIMER_TIME.to_owned(), time.to_string().into_bytes()));
        }
        _ => {
            if let Some(raw) = raw {
                r.key = raw.key.clone();
                r.value = raw.value.clone();
                r.timestamp = raw.timestamp;
                r.headers = raw
                    .headers
                    .iter()
                    .map(|(n, v)| (n.clone(), v.clone().unwrap_or_default()))
                    .collect();
            }
        }
    }
    r.headers.extend(source_headers(error));
    r
}

/// The `exactly.*` headers naming a failure and where it happened.
fn source_headers(error: &RecordError) -> [(String, Vec<u8>); 5] {
    use dead_letter_headers as h;
    [
        (h::ERROR_KIND.to_owned(), error.kind().as_bytes().to_vec()),
        (h::ERROR_MESSAGE.to_owned(), error.to_string().into_bytes()),
        (
            h::SOURCE_TOPIC.to_owned(),
            error.topic().as_bytes().to_vec(),
        ),
        (
            h::SOURCE_PARTITION.to_owned(),
            error.partition().to_string().into_bytes(),
        ),
        (
            h::SOURCE_OFFSET.to_owned(),
            error.offset().to_string().into_bytes(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Json, Utf8};

    struct Summer;
    impl Processor for Summer {
        type State = i64;
        type Key = Utf8;
        type Value = Json<i64>;
        fn process(
            &self,
            state: &mut i64,
            record: &Record<'_, String, i64>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            out.send_json("sums", record.key(), &(*state + record.value()))?;
            if *record.value() < 0 {
                return Err(format!("negative amount {}", record.value()).into());
            }
            if *record.value() == 666 {
                panic!("the number of the beast");
            }
            *state += record.value();
            Ok(())
        }
    }

    fn raw(offset: i64, key: Option<&str>, value: Option<&str>) -> RawRecord {
        RawRecord {
            topic: Arc::from("in"),
            partition: 2,
            offset,
            timestamp: Some(1000 + offset),
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()),
            headers: vec![("h".into(), Some(b"1".to_vec())), ("h".into(), None)],
        }
    }

    #[test]
    fn processes_and_stamps_input_timestamp() {
        let mut state = 0;
        let mut out = Output::new();
        process_raw(&Summer, &mut state, &raw(5, Some("a"), Some("7")), &mut out).unwrap();
        assert_eq!(state, 7);
        assert_eq!(out.records()[0].timestamp, Some(1005));
        assert_eq!(out.records()[0].value.as_deref(), Some(&b"7"[..]));
    }

    #[test]
    fn decode_error_names_record_and_part() {
        let mut state = 0;
        let mut out = Output::new();
        let err = process_raw(&Summer, &mut state, &raw(9, None, Some("1")), &mut out).unwrap_err();
        assert!(matches!(
            err,
            RecordError::Decode {
                part: RecordPart::Key,
                ..
            }
        ));
        let err =
            process_raw(&Summer, &mut state, &raw(9, Some("a"), Some("x")), &mut out).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("value of record in/2 at offset 9"), "{msg}");
        assert_eq!((err.topic(), err.partition(), err.offset()), ("in", 2, 9));
        assert_eq!(err.kind(), "decode-value");
        assert!(out.is_empty());
    }

    #[test]
    fn processor_error_discards_only_this_records_outputs() {
        let mut state = 0;
        let mut out = Output::new();
        process_raw(&Summer, &mut state, &raw(1, Some("a"), Some("1")), &mut out).unwrap();
        let err = process_raw(
            &Summer,
            &mut state,
            &raw(2, Some("a"), Some("-1")),
            &mut out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("negative amount -1"), "{err}");
        assert_eq!(err.kind(), "processor");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn panic_is_caught_and_reported() {
        let mut state = 0;
        let mut out = Output::new();
        let err = process_raw(
            &Summer,
            &mut state,
            &raw(3, Some("a"), Some("666")),
            &mut out,
        )
        .unwrap_err();
        match &err {
            RecordError::Panic {
                message, offset, ..
            } => {
                assert_eq!(message, "the number of the beast");
                assert_eq!(*offset, 3);
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
        assert!(out.is_empty());
    }

    #[test]
    fn record_header_accessors() {
        let r = raw(0, Some("k"), Some("1"));
        let rec = Record {
            topic: &r.topic,
            partition: 0,
            offset: 0,
            timestamp: None,
            key: (),
            value: (),
            raw_key: r.key.as_deref(),
            raw_value: None,
            headers: &r.headers,
        };
        assert_eq!(rec.headers().len(), 2);
        // The last header wins, and it has no value.
        assert_eq!(rec.header("h"), None);
        assert_eq!(rec.headers().next(), Some(("h", Some(&b"1"[..]))));
        assert_eq!(rec.raw_key(), Some(&b"k"[..]));
    }

    #[test]
    fn dead_letter_record_carries_original_and_error() {
        let r = raw(4, Some("a"), Some("x"));
        let mut out = Output::new();
        let err = process_raw(&Summer, &mut 0, &r, &mut out).unwrap_err();
        let dl = dead_letter_record("dlq", Some(&r), &err);
        assert_eq!(dl.topic, "dlq");
        assert_eq!(dl.value.as_deref(), Some(&b"x"[..]));
        assert_eq!(dl.timestamp, Some(1004));
        let header = |name: &str| {
            dl.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(
            header(dead_letter_headers::ERROR_KIND).unwrap(),
            "decode-value"
        );
        assert_eq!(header(dead_letter_headers::SOURCE_OFFSET).unwrap(), "4");
        assert_eq!(header(dead_letter_headers::SOURCE_PARTITION).unwrap(), "2");
        assert_eq!(header(dead_letter_headers::SOURCE_TOPIC).unwrap(), "in");
        assert!(header(dead_letter_headers::ERROR_MESSAGE)
            .unwrap()
            .contains("offset 4"));
    }
}

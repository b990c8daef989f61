//! Unit-test a [`Processor`] in-process, without a broker: like Kafka Streams'
//! `TopologyTestDriver`.
//!
//! [`TestDriver`] feeds records to a processor exactly as the runtime does (decoding with the
//! processor's formats, one state per input partition, the same error policies, outputs
//! stamped with the input timestamp), collects the outputs, exposes the state, and checks the
//! two properties recovery relies on:
//!
//! - [`check_snapshot_roundtrip`](TestDriver::check_snapshot_roundtrip): the state survives
//!   being written to a full snapshot (MessagePack, chunks, checksums) and read back;
//! - [`verify_determinism`](TestDriver::verify_determinism): replaying the records since the
//!   last full snapshot rebuilds the same state and the same outputs.
//!
//! ```
//! use std::collections::HashMap;
//! use exactly::testing::TestDriver;
//! use exactly::{Json, Output, ProcessError, Processor, Record, Utf8};
//!
//! struct Counter;
//! impl Processor for Counter {
//!     type State = HashMap<String, u64>;
//!     type Key = Utf8;
//!     type Value = Json<serde_json::Value>;
//!     fn process(
//!         &self,
//!         counts: &mut Self::State,
//!         record: &Record<'_, String, serde_json::Value>,
//!         out: &mut Output,
//!     ) -> Result<(), ProcessError> {
//!         let n = counts.entry(record.key().clone()).or_default();
//!         *n += 1;
//!         out.send_json("counts", record.key(), n)?;
//!         Ok(())
//!     }
//! }
//!
//! let mut driver = TestDriver::new(Counter);
//! for key in ["a", "b", "a"] {
//!     driver.pipe("events", &key.to_string(), &serde_json::json!({"n": 1})).unwrap();
//! }
//! let counts: Vec<(String, u64)> = driver.read_json("counts").unwrap();
//! assert_eq!(counts, [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
//! assert_eq!(driver.state("events", 0).unwrap()["a"], 2);
//! driver.verify_determinism().unwrap();
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode_json_key, to_json, DecodeError, Encode, EncodeError, Format, Json};
use crate::config::ErrorPolicy;
pub use crate::partitioner::default_partition;
use crate::processor::{
    dead_letter_record, read_state, KeyOf, Output, OutputRecord, Processor, RawRecord, RecordError,
    StateRead, StateReadError, ValueOf,
};
use crate::proto::{FullSnapshotChunk, FullSnapshotRef};
use crate::snapshot::{
    assemble_chunks, fingerprint, full_snapshot_ref, split_into_chunks, OutputDigest, SnapshotError,
};
use crate::state::{decode_image, encode_image, Image, StoreSet};
use crate::step::{process_step, tick_step, OnFailure, Position, StepError};

/// A key-value pair decoded with the formats `KF` and `VF`.
pub type Decoded<KF, VF> = (<KF as Encode>::Item, <VF as Encode>::Item);

/// The timestamp (ms) of the driver's clock when it starts: 2023-11-14T22:13:20Z.
pub const DEFAULT_START_TIME_MS: i64 = 1_700_000_000_000;

/// An input record for [`TestDriver::pipe_raw`], built like an
/// [`OutputRecord`].
///
/// ```
/// use exactly::testing::RawInput;
/// let input = RawInput::new("payments")
///     .partition(2)
///     .key("acct-1")
///     .value(r#"{"cents":100}"#)
///     .header("trace", "abc")
///     .timestamp(1_700_000_000_123);
/// # let _ = input;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawInput {
    /// Input topic.
    pub topic: String,
    /// Input partition (default 0).
    pub partition: i32,
    /// Offset; `None` = the next offset of the partition (offsets start at 0).
    pub offset: Option<i64>,
    /// Timestamp in ms; `None` = the driver's clock ([`TestDriver::advance_time`]).
    pub timestamp: Option<i64>,
    /// Key bytes (`None` = no key).
    pub key: Option<Vec<u8>>,
    /// Value bytes (`None` = no value).
    pub value: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl RawInput {
    /// A record for partition 0 of `topic` with no key, no value, no headers.
    pub fn new(topic: impl Into<String>) -> Self {
        RawInput {
            topic: topic.into(),
            partition: 0,
            offset: None,
            timestamp: None,
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }
    /// Sets the partition.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = partition;
        self
    }
    /// Sets an explicit offset (must be above the partition's previous one; gaps are allowed,
    /// as transaction markers leave them in real topics).
    pub fn offset(mut self, offset: i64) -> Self {
        self.offset = Some(offset);
        self
    }
    /// Sets the timestamp (ms since the Unix epoch).
    pub fn timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp = Some(timestamp_ms);
        self
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
        self.headers.push((name.into(), Some(value.into())));
        self
    }
}

/// What went wrong in a [`TestDriver`] call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestError {
    /// The test's own input could not be encoded.
    #[error("cannot encode the input record: {0}")]
    Encode(#[from] EncodeError),
    /// A record failed under [`ErrorPolicy::Fail`]: the partition stops, as in the runtime.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A record was sent to a partition stopped by an earlier failure under
    /// [`ErrorPolicy::Fail`].
    #[error("partition {topic}/{partition} stopped at offset {offset} after a failed record (ErrorPolicy::Fail); nothing after it is processed")]
    PartitionFailed {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset of the record that failed.
        offset: i64,
    },
    /// An explicit offset did not increase.
    #[error("offset {offset} for {topic}/{partition} is below the next offset {next}; offsets must increase")]
    OffsetNotIncreasing {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The offset given.
        offset: i64,
        /// The lowest offset allowed.
        next: i64,
    },
    /// Writing or reading a full snapshot failed.
    #[error("snapshot of {topic}/{partition}: {source}")]
    Snapshot {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// What failed.
        #[source]
        source: SnapshotError,
    },
    /// [`Processor::migrate_state`] failed in [`TestDriver::upgrade`].
    #[error("migrating the state of {topic}/{partition} from processor version {from_version} to {to_version} failed: {source}")]
    Migration {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Version of the driver's processor.
        from_version: u32,
        /// Version of the new processor.
        to_version: u32,
        /// What `migrate_state` returned.
        #[source]
        source: crate::BoxError,
    },
    /// The state read back from a full snapshot differs from the state that was written.
    #[error("the state of {topic}/{partition} changes when written to a full snapshot and read back (fingerprint {written:#018x} -> {restored:#018x}): fields skipped by serde (#[serde(skip)]) or lossy Serialize/Deserialize impls; after a crash recovery would restore a different state")]
    SnapshotNotFaithful {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Fingerprint of the live state.
        written: u64,
        /// Fingerprint of the state read back.
        restored: u64,
    },
    /// Replaying the records since the last full snapshot gave a different result.
    #[error("processor is not deterministic: replaying {replayed} record(s) of {topic}/{partition} from offset {from_offset} gave {what}; process() must depend only on the state and the record (use record.timestamp(), not the wall clock; no random numbers; don't let HashMap iteration order decide outputs)")]
    NotDeterministic {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Offset the replay started from (the last full snapshot, or the first record).
        from_offset: i64,
        /// Records replayed.
        replayed: usize,
        /// What differed.
        what: String,
    },
}

/// Where a partition's recovery would start: the empty state at an offset, or a full snapshot.
enum Base {
    Empty {
        offset: Option<i64>,
    },
    Full {
        reference: FullSnapshotRef,
        chunks: Vec<FullSnapshotChunk>,
    },
}

/// What recovery replays: an input record, or a wall-clock tick at its recorded time.
enum Step {
    Record(RawRecord),
    Tick { time_ms: i64, next_offset: i64 },
}

struct PartitionState<S> {
    state: S,
    /// The stores `state` holds, in memory.
    stores: StoreSet,
    next_offset: i64,
    /// The next offsets of a co-partitioned unit's other inputs.
    other_offsets: BTreeMap<Arc<str>, i64>,
    failed_at: Option<i64>,
    base: Base,
    /// Records and wall-clock ticks since `base`, as recovery would replay them.
    since_base: Vec<Step>,
    /// Digest of the outputs since `base`.
    digest: OutputDigest,
    snapshots: u64,
}

/// Runs a [`Processor`] on records in-process. See the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use exactly::testing::{RawInput, TestDriver, TestError};
/// use exactly::{
///     dead_letter_headers, ErrorPolicy, Json, Output, ProcessError, Processor, Record, Utf8,
/// };
///
/// /// The largest amount so far, with a time: the record's, or (a bug) the wall clock's.
/// struct Max { use_clock: bool }
///
/// impl Processor for Max {
///     type State = u64;
///     type Key = Utf8;
///     type Value = Json<u64>;
///     fn process(&self, max: &mut u64, record: &Record<'_, String, u64>,
///                out: &mut Output) -> Result<(), ProcessError> {
///         *max = (*max).max(*record.value());
///         let at = if self.use_clock {
///             let now = std::time::SystemTime::now();
///             now.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64
///         } else {
///             record.timestamp().unwrap_or_default()
///         };
///         out.send_json("max", record.key(), &(*max, at))?;
///         Ok(())
///     }
/// }
///
/// let mut driver = TestDriver::new(Max { use_clock: false })
///     .with_error_policy(ErrorPolicy::DeadLetter { topic: "amounts.dlq".into() });
/// driver.pipe("amounts", &"a".to_string(), &7).unwrap();
/// // A value that is not JSON goes to the dead-letter topic, the error in its headers.
/// driver.pipe_raw(RawInput::new("amounts").key("a").value("seven")).unwrap();
/// let dead = driver.outputs_to("amounts.dlq").next().unwrap();
/// assert_eq!(dead.value.as_deref(), Some(&b"seven"[..]));
/// assert!(dead.headers.iter().any(|(name, value)| {
///     name == dead_letter_headers::ERROR_KIND && value == b"decode-value"
/// }));
/// assert_eq!(driver.errors().len(), 1);
///
/// // Recovery replays the records since the last full snapshot, and so does this check.
/// driver.full_snapshot().unwrap();
/// driver.advance_time(Duration::from_secs(1));
/// driver.pipe("amounts", &"b".to_string(), &3).unwrap();
/// assert_eq!(driver.verify_determinism().unwrap(), 1);
/// assert_eq!(driver.read_json::<String, (u64, i64)>("max").unwrap().len(), 2);
///
/// // Reading the clock gives other outputs on replay: caught.
/// let mut clocked = TestDriver::new(Max { use_clock: true });
/// clocked.pipe("amounts", &"a".to_string(), &7).unwrap();
/// let err = clocked.verify_determinism().unwrap_err();
/// assert!(matches!(err, TestError::NotDeterministic { .. }), "{err}");
/// ```
pub struct TestDriver<P: Processor> {
    processor: P,
    error_policy: ErrorPolicy,
    /// Co-partitioned input topics (see [`TestDriver::co_partitioned`]), the first first.
    co_partitioned: Vec<String>,
    max_chunk_bytes: usize,
    time_ms: i64,
    partitions: BTreeMap<(Arc<str>, i32), PartitionState<P::State>>,
    outputs: Vec<OutputRecord>,
    errors: Vec<RecordError>,
    /// Wall-clock ms of the last processed record: the replay must run at a later wall-clock
    /// time so that a processor reading the clock is caught.
    last_wall_ms: u128,
    /// The driver's wall clock (ms), which [`Processor::on_wall_clock`] ticks follow.
    wall_clock_ms: i64,
    /// When the next tick is due by [`Processor::wall_clock_interval`].
    next_tick_ms: Option<i64>,
}

/// The encoded state `data` (written by processor version `from_version`) as `processor`'s
/// state, read or migrated the way recovery does.
fn state_as_recovery_reads<P: Processor>(
    processor: &P,
    topic: &str,
    partition: i32,
    from_version: u32,
    data: &[u8],
) -> Result<P::State, TestError> {
    match read_state(processor, from_version, data) {
        Ok(StateRead::Read(state) | StateRead::Migrated(state)) => Ok(state),
        Err(StateReadError::Unreadable(source)) => Err(TestError::Snapshot {
            topic: topic.to_owned(),
            partition,
            source,
        }),
        Err(StateReadError::Migration(source)) => Err(TestError::Migration {
            topic: topic.to_owned(),
            partition,
            from_version,
            to_version: processor.version(),
            source,
        }),
    }
}

/// A full snapshot's data (`encoding`, `data`) restored as `processor`'s state into a fresh
/// in-memory set of stores, the way recovery does.
fn restore_as_recovery_does<P: Processor>(
    processor: &P,
    topic: &str,
    partition: i32,
    from_version: u32,
    encoding: &str,
    data: &[u8],
) -> Result<(P::State, StoreSet), TestError> {
    let snapshot_error = |source| TestError::Snapshot {
        topic: topic.to_owned(),
        partition,
        source,
    };
    let stores = StoreSet::in_memory();
    let (bytes, imported) = decode_image(encoding, data, &stores).map_err(snapshot_error)?;
    let state = stores
        .build(|| state_as_recovery_reads(processor, topic, partition, from_version, bytes))?;
    imported
        .check(&stores)
        .map_err(|e| snapshot_error(e.into()))?;
    Ok((state, stores))
}

/// The encoding of a full snapshot's chunks.
fn encoding_of(chunks: &[FullSnapshotChunk]) -> &str {
    chunks.first().map_or("", |c| c.encoding.as_str())
}

fn wall_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl<P: Processor> TestDriver<P> {
    /// A driver with [`ErrorPolicy::Fail`], 512 KiB snapshot chunks and the clock at
    /// [`DEFAULT_START_TIME_MS`].
    pub fn new(processor: P) -> Self {
        TestDriver {
            processor,
            error_policy: ErrorPolicy::Fail,
            max_chunk_bytes: 512 * 1024,
            time_ms: DEFAULT_START_TIME_MS,
            partitions: BTreeMap::new(),
            outputs: Vec::new(),
            errors: Vec::new(),
            last_wall_ms: 0,
            wall_clock_ms: DEFAULT_START_TIME_MS,
            co_partitioned: Vec::new(),
            next_tick_ms: None,
        }
    }

    /// Uses `policy` for records that fail (as [`AppConfig::error_policy`](crate::AppConfig::error_policy)).
    pub fn with_error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.error_policy = policy;
        self
    }

    /// Splits full snapshots into chunks of at most `bytes` (to exercise multi-chunk snapshots
    /// with small states).
    pub fn with_max_chunk_bytes(mut self, bytes: usize) -> Self {
        self.max_chunk_bytes = bytes.max(1);
        self
    }

    /// The processor under test.
    pub fn processor(&self) -> &P {
        &self.processor
    }

    /// The driver's clock (ms): the timestamp of records piped without one.
    pub fn time(&self) -> i64 {
        self.time_ms
    }

    /// Sets the driver's clock (ms since the Unix epoch).
    pub fn set_time(&mut self, time_ms: i64) {
        self.time_ms = time_ms;
    }

    /// Moves the driver's clock forward.
    pub fn advance_time(&mut self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.time_ms = self.time_ms.saturating_add(ms);
    }

    /// The driver's wall clock (ms), which [`advance_wall_clock`](Self::advance_wall_clock)
    /// moves; separate from [`time`](Self::time), the records' clock.
    pub fn wall_clock(&self) -> i64 {
        self.wall_clock_ms
    }

    /// Moves the wall clock forward and, for every [`Processor::wall_clock_interval`] that
    /// elapses, calls [`Processor::on_wall_clock`] on every partition that has seen a record,
    /// as the runtime would while no input arrives (the first tick comes one interval after
    /// the driver's start). [`verify_determinism`](Self::verify_determinism) replays the
    /// ticks where they happened, with their times, as recovery does.
    ///
    /// Errors: like [`pipe_raw`](Self::pipe_raw), for a tick that fails under
    /// [`ErrorPolicy::Fail`].
    ///
    /// ```
    /// use exactly::testing::TestDriver;
    /// use exactly::{Output, ProcessError, Processor, Record, Utf8};
    /// use std::time::Duration;
    ///
    /// /// Reports how many records arrived, every minute of wall-clock time.
    /// struct Report;
    /// impl Processor for Report {
    ///     type State = u64;
    ///     type Key = Utf8;
    ///     type Value = Utf8;
    ///     fn process(&self, n: &mut u64, _: &Record<'_, String, String>,
    ///                _: &mut Output) -> Result<(), ProcessError> {
    ///         *n += 1;
    ///         Ok(())
    ///     }
    ///     fn wall_clock_interval(&self) -> Option<Duration> {
    ///         Some(Duration::from_secs(60))
    ///     }
    ///     fn on_wall_clock(&self, n: &mut u64, now_ms: i64,
    ///                      out: &mut Output) -> Result<(), ProcessError> {
    ///         out.send_json("reports", &now_ms.to_string(), n)?;
    ///         *n = 0;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let mut driver = TestDriver::new(Report);
    /// driver.pipe("in", &"a".to_string(), &"x".to_string()).unwrap();
    /// driver.advance_wall_clock(Duration::from_secs(150)).unwrap(); // two ticks
    /// let reports: Vec<(String, u64)> = driver.read_json("reports").unwrap();
    /// assert_eq!(reports.iter().map(|r| r.1).collect::<Vec<_>>(), [1, 0]);
    /// driver.verify_determinism().unwrap();
    /// ```
    pub fn advance_wall_clock(&mut self, by: Duration) -> Result<(), TestError> {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let until = self.wall_clock_ms.saturating_add(ms);
        let every = self
            .processor
            .wall_clock_interval()
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1));
        if let Some(every) = every {
            let mut next = self
                .next_tick_ms
                .unwrap_or_else(|| DEFAULT_START_TIME_MS.saturating_add(every));
            while next <= until {
                self.wall_clock_ms = next;
                self.tick_all(next)?;
                next = next.saturating_add(every);
            }
            self.next_tick_ms = Some(next);
        }
        self.wall_clock_ms = until;
        Ok(())
    }

    /// One wall-clock tick at `time_ms` on every partition that has not failed.
    fn tick_all(&mut self, time_ms: i64) -> Result<(), TestError> {
        for ((topic, partition), entry) in &mut self.partitions {
            if entry.failed_at.is_some() {
                continue;
            }
            let mut out = Output::new();
            let mut errors = Vec::new();
            let at = Position {
                topic,
                partition: *partition,
                offset: entry.next_offset,
            };
            let result = process_tick(
                &self.processor,
                &self.error_policy,
                (&mut entry.state, &entry.stores),
                (&at, time_ms),
                &mut out,
                &mut errors,
            );
            self.errors.extend(errors);
            if let Err(error) = result {
                entry.failed_at = Some(entry.next_offset);
                return Err(TestError::Record(error));
            }
            let produced = out.take();
            for r in &produced {
                entry.digest.update(r);
            }
            entry.since_base.push(Step::Tick {
                time_ms,
                next_offset: entry.next_offset,
            });
            self.outputs.extend(produced);
        }
        Ok(())
    }

    /// Pipes a record to partition 0 of `topic`, encoding key and value with the processor's
    /// own formats.
    pub fn pipe(
        &mut self,
        topic: &str,
        key: &KeyOf<P>,
        value: &ValueOf<P>,
    ) -> Result<(), TestError> {
        self.pipe_to(topic, 0, key, value)
    }

    /// Like [`pipe`](Self::pipe), to a given partition.
    pub fn pipe_to(
        &mut self,
        topic: &str,
        partition: i32,
        key: &KeyOf<P>,
        value: &ValueOf<P>,
    ) -> Result<(), TestError> {
        let mut input = RawInput::new(topic).partition(partition);
        input.key = P::Key::encode(key)?;
        input.value = P::Value::encode(value)?;
        self.pipe_raw(input)
    }

    /// Like [`pipe`](Self::pipe), to the partition of `topic` (of `partitions`) that Kafka's
    /// default partitioner (the Java client's murmur2) picks for the encoded key; keyless
    /// records go to partition 0. See [`default_partition`].
    ///
    /// ```
    /// # use exactly::testing::{default_partition, TestDriver};
    /// # use exactly::{Output, ProcessError, Processor, Record, Utf8};
    /// # struct Count;
    /// # impl Processor for Count {
    /// #     type State = u64; type Key = Utf8; type Value = Utf8;
    /// #     fn process(&self, n: &mut u64, _: &Record<'_, String, String>, _: &mut Output)
    /// #         -> Result<(), ProcessError> { *n += 1; Ok(()) }
    /// # }
    /// let mut driver = TestDriver::new(Count);
    /// driver.pipe_by_key("cards", 8, &"ada".to_string(), &"tx".to_string()).unwrap();
    /// assert_eq!(default_partition(b"ada", 8), 5);
    /// assert_eq!(driver.state("cards", 5), Some(&1));
    /// ```
    pub fn pipe_by_key(
        &mut self,
        topic: &str,
        partitions: i32,
        key: &KeyOf<P>,
        value: &ValueOf<P>,
    ) -> Result<(), TestError> {
        let partition =
            P::Key::encode(key)?.map_or(0, |bytes| default_partition(&bytes, partitions));
        self.pipe_to(topic, partition, key, value)
    }

    /// Pipes a record with a JSON-encoded key and value to partition 0 of `topic`.
    pub fn pipe_json<K, V>(&mut self, topic: &str, key: &K, value: &V) -> Result<(), TestError>
    where
        K: Serialize + ?Sized,
        V: Serialize + ?Sized,
    {
        let mut input = RawInput::new(topic);
        input.key = Some(to_json(key)?);
        input.value = Some(to_json(value)?);
        self.pipe_raw(input)
    }

    /// Pipes a record given as bytes (any key/value, headers, partition, offset, timestamp).
    ///
    /// Errors: under [`ErrorPolicy::Fail`] a record that fails returns
    /// [`TestError::Record`] and stops its partition; under `Skip`/`DeadLetter` it returns
    /// `Ok` and the error is listed in [`errors`](Self::errors).
    pub fn pipe_raw(&mut self, input: RawInput) -> Result<(), TestError> {
        let topic: Arc<str> = Arc::from(input.topic.as_str());
        let partition = input.partition;
        let unit = self.unit_topic(&topic);
        let entry = self
            .partitions
            .entry((unit.clone(), partition))
            .or_insert_with(|| {
                let stores = StoreSet::in_memory();
                PartitionState {
                    state: stores.build(P::State::default),
                    stores,
                    next_offset: 0,
                    other_offsets: BTreeMap::new(),
                    failed_at: None,
                    base: Base::Empty { offset: None },
                    since_base: Vec::new(),
                    digest: OutputDigest::new(0),
                    snapshots: 0,
                }
            });
        if let Some(offset) = entry.failed_at {
            return Err(TestError::PartitionFailed {
                topic: input.topic,
                partition,
                offset,
            });
        }
        let next = match topic == unit {
            true => entry.next_offset,
            false => entry.other_offsets.get(&topic).copied().unwrap_or(0),
        };
        let offset = input.offset.unwrap_or(next);
        if offset < next {
            return Err(TestError::OffsetNotIncreasing {
                topic: input.topic,
                partition,
                offset,
                next,
            });
        }
        let raw = RawRecord {
            topic: Arc::clone(&topic),
            partition,
            offset,
            timestamp: Some(input.timestamp.unwrap_or(self.time_ms)),
            key: input.key,
            value: input.value,
            headers: input.headers,
        };
        if let Base::Empty {
            offset: base @ None,
        } = &mut entry.base
        {
            *base = Some(offset);
        }
        let mut out = Output::new();
        let mut errors = Vec::new();
        let result = process_record(
            &self.processor,
            &self.error_policy,
            (&mut entry.state, &entry.stores),
            &raw,
            &mut out,
            &mut errors,
        );
        self.last_wall_ms = wall_ms();
        self.errors.extend(errors);
        if let Err(error) = result {
            entry.failed_at = Some(offset);
            return Err(TestError::Record(error));
        }
        let produced = out.take();
        for r in &produced {
            entry.digest.update(r);
        }
        if topic == unit {
            entry.next_offset = offset.saturating_add(1);
        } else {
            entry.other_offsets.insert(topic, offset.saturating_add(1));
        }
        entry.since_base.push(Step::Record(raw));
        self.outputs.extend(produced);
        Ok(())
    }

    /// Every output record not yet taken, in the order produced (dead letters included).
    pub fn outputs(&self) -> &[OutputRecord] {
        &self.outputs
    }

    /// Removes and returns the outputs so far.
    pub fn take_outputs(&mut self) -> Vec<OutputRecord> {
        std::mem::take(&mut self.outputs)
    }

    /// The outputs (not yet taken) to `topic`.
    pub fn outputs_to<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a OutputRecord> + 'a {
        self.outputs.iter().filter(move |r| r.topic == topic)
    }

    /// The outputs (not yet taken) to `topic`, keys and values decoded as JSON.
    pub fn read_json<K, V>(&self, topic: &str) -> Result<Vec<(K, V)>, DecodeError>
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        // Keys as Output::send_json writes them: text as is, anything else as JSON.
        self.outputs_to(topic)
            .map(|r| {
                Ok((
                    decode_json_key(r.key.as_deref())?,
                    Json::<V>::decode(r.value.as_deref())?,
                ))
            })
            .collect()
    }

    /// The outputs (not yet taken) to `topic`, decoded with the formats `KF` and `VF`.
    pub fn read_as<KF: Format, VF: Format>(
        &self,
        topic: &str,
    ) -> Result<Vec<Decoded<KF, VF>>, DecodeError> {
        self.outputs_to(topic)
            .map(|r| {
                Ok((
                    KF::decode(r.key.as_deref())?,
                    VF::decode(r.value.as_deref())?,
                ))
            })
            .collect()
    }

    /// The errors of records skipped or dead-lettered so far (under `Fail` the error is
    /// returned by the `pipe*` call instead).
    pub fn errors(&self) -> &[RecordError] {
        &self.errors
    }

    /// The state of an input partition (`None` if no record reached it).
    pub fn state(&self, topic: &str, partition: i32) -> Option<&P::State> {
        self.partitions
            .get(&(self.unit_topic(topic), partition))
            .map(|p| &p.state)
    }

    /// Treats `topics` as co-partitioned inputs, as
    /// [`AppConfig::co_partitioned`](crate::AppConfig::co_partitioned) does: partition p of
    /// all of them is one unit with one state (named by the first topic), and the records
    /// reach the processor in the order they are piped, which
    /// [`verify_determinism`](Self::verify_determinism) replays (as recovery replays the
    /// recorded interleaving).
    ///
    /// ```
    /// use exactly::testing::{RawInput, TestDriver};
    /// use exactly::{Output, ProcessError, Processor, Raw, Record, Store, Utf8};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct Limits {
    ///     per_card: Store<Utf8, Utf8>,
    /// }
    ///
    /// /// Joins each transaction with its card's latest limit (a stream-table join).
    /// struct Enrich;
    /// impl Processor for Enrich {
    ///     type State = Limits;
    ///     type Key = Utf8;
    ///     type Value = Raw;
    ///     fn process(&self, s: &mut Limits, r: &Record<'_, String, Option<Vec<u8>>>,
    ///                out: &mut Output) -> Result<(), ProcessError> {
    ///         let value = r.decode_value::<Utf8>()?;
    ///         match r.topic() {
    ///             "limits" => s.per_card.put(r.key(), &value)?,
    ///             _ => {
    ///                 let limit = s.per_card.get(r.key())?.unwrap_or_else(|| "none".into());
    ///                 out.send_json("enriched", r.key(), &(value, limit))?;
    ///             }
    ///         }
    ///         Ok(())
    ///     }
    /// }
    ///
    /// let mut driver = TestDriver::new(Enrich).co_partitioned(["tx", "limits"]);
    /// driver.pipe_raw(RawInput::new("tx").key("ada").value("5")).unwrap();
    /// driver.pipe_raw(RawInput::new("limits").key("ada").value("100")).unwrap();
    /// driver.pipe_raw(RawInput::new("tx").key("ada").value("7")).unwrap();
    /// let enriched: Vec<(String, (String, String))> = driver.read_json("enriched").unwrap();
    /// assert_eq!(enriched[0].1, ("5".to_string(), "none".to_string()));
    /// assert_eq!(enriched[1].1, ("7".to_string(), "100".to_string()));
    /// driver.verify_determinism().unwrap();
    /// ```
    pub fn co_partitioned<I, T>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.co_partitioned = topics.into_iter().map(Into::into).collect();
        self
    }

    /// The topic naming `topic`'s unit: the first co-partitioned input, or itself.
    fn unit_topic(&self, topic: &str) -> Arc<str> {
        match self.co_partitioned.iter().any(|t| t == topic) {
            true => Arc::from(self.co_partitioned[0].as_str()),
            false => Arc::from(topic),
        }
    }

    /// The input partitions seen so far.
    pub fn partitions(&self) -> impl Iterator<Item = (&str, i32)> + '_ {
        self.partitions.keys().map(|(t, p)| (&**t, *p))
    }

    /// Takes a full snapshot of every partition now, as the runtime does periodically: later
    /// [`verify_determinism`](Self::verify_determinism) calls replay from here.
    pub fn full_snapshot(&mut self) -> Result<(), TestError> {
        let version = self.processor.version();
        for ((topic, partition), p) in &mut self.partitions {
            let snapshot_error = |source| TestError::Snapshot {
                topic: topic.to_string(),
                partition: *partition,
                source,
            };
            let Image { encoding, data } =
                encode_image(&p.state, &p.stores).map_err(snapshot_error)?;
            p.snapshots += 1;
            let id = format!("test.{topic}.{partition}#{}", p.snapshots);
            let chunks =
                split_into_chunks(&id, p.next_offset, &data, self.max_chunk_bytes, encoding);
            let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            let reference = full_snapshot_ref(&id, p.next_offset, &data, count, 0, version);
            p.base = Base::Full { reference, chunks };
            p.since_base.clear();
            p.digest = OutputDigest::new(0);
        }
        Ok(())
    }

    /// Deploys `processor` — a new version, possibly with another `State` type — over this
    /// driver's partitions, as a restart after a graceful shutdown does: each partition's
    /// state is written to a full snapshot and read back as the new `State`, or converted by
    /// its [`Processor::migrate_state`], exactly as recovery does. The new driver goes on at
    /// the same offsets with the same clock and settings; its outputs start empty. An error
    /// is what the restart would fail with.
    ///
    /// ```
    /// # use exactly::testing::TestDriver;
    /// # use exactly::{Output, ProcessError, Processor, Record, Utf8};
    /// # use serde::{Deserialize, Serialize};
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct V1 { seen: u64 }
    /// #[derive(Default, Serialize, Deserialize)]
    /// struct V2 { seen: u64, #[serde(default)] bytes: u64 }
    /// # struct Old; struct New;
    /// # impl Processor for Old {
    /// #     type State = V1; type Key = Utf8; type Value = Utf8;
    /// #     fn process(&self, s: &mut V1, _: &Record<'_, String, String>, _: &mut Output)
    /// #         -> Result<(), ProcessError> { s.seen += 1; Ok(()) }
    /// # }
    /// # impl Processor for New {
    /// #     type State = V2; type Key = Utf8; type Value = Utf8;
    /// #     fn process(&self, s: &mut V2, r: &Record<'_, String, String>, _: &mut Output)
    /// #         -> Result<(), ProcessError> { s.seen += 1; s.bytes += r.value().len() as u64; Ok(()) }
    /// # }
    /// let mut v1 = TestDriver::new(Old);
    /// v1.pipe("in", &"k".to_string(), &"abc".to_string()).unwrap();
    /// let mut v2 = v1.upgrade(New).unwrap();
    /// v2.pipe("in", &"k".to_string(), &"de".to_string()).unwrap();
    /// let state = v2.state("in", 0).unwrap();
    /// assert_eq!((state.seen, state.bytes), (2, 2));
    /// ```
    pub fn upgrade<Q: Processor>(&self, processor: Q) -> Result<TestDriver<Q>, TestError> {
        let from_version = self.processor.version();
        let mut partitions = BTreeMap::new();
        for ((topic, partition), p) in &self.partitions {
            let snapshot_error = |source| TestError::Snapshot {
                topic: topic.to_string(),
                partition: *partition,
                source,
            };
            let Image { encoding, data } =
                encode_image(&p.state, &p.stores).map_err(snapshot_error)?;
            let (state, stores) = restore_as_recovery_does(
                &processor,
                topic,
                *partition,
                from_version,
                encoding,
                &data,
            )?;
            let id = format!("upgrade.{topic}.{partition}");
            let chunks =
                split_into_chunks(&id, p.next_offset, &data, self.max_chunk_bytes, encoding);
            let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            let reference = full_snapshot_ref(&id, p.next_offset, &data, count, 0, from_version);
            let upgraded = PartitionState {
                state,
                stores,
                next_offset: p.next_offset,
                other_offsets: p.other_offsets.clone(),
                failed_at: p.failed_at,
                base: Base::Full { reference, chunks },
                since_base: Vec::new(),
                digest: OutputDigest::new(0),
                snapshots: p.snapshots,
            };
            partitions.insert((Arc::clone(topic), *partition), upgraded);
        }
        Ok(TestDriver {
            processor,
            error_policy: self.error_policy.clone(),
            max_chunk_bytes: self.max_chunk_bytes,
            time_ms: self.time_ms,
            partitions,
            outputs: Vec::new(),
            errors: Vec::new(),
            last_wall_ms: self.last_wall_ms,
            wall_clock_ms: self.wall_clock_ms,
            co_partitioned: self.co_partitioned.clone(),
            next_tick_ms: None,
        })
    }

    /// Writes every partition's state to a full snapshot (the runtime's encoding, chunking and
    /// checksums), reads it back and checks the restored state fingerprints the same.
    pub fn check_snapshot_roundtrip(&self) -> Result<(), TestError> {
        let version = self.processor.version();
        for ((topic, partition), p) in &self.partitions {
            let snapshot_error = |source| TestError::Snapshot {
                topic: topic.to_string(),
                partition: *partition,
                source,
            };
            let Image { encoding, data } =
                encode_image(&p.state, &p.stores).map_err(snapshot_error)?;
            let id = format!("roundtrip.{topic}.{partition}");
            let chunks =
                split_into_chunks(&id, p.next_offset, &data, self.max_chunk_bytes, encoding);
            let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
            let reference = full_snapshot_ref(&id, p.next_offset, &data, count, 0, version);
            let assembled = assemble_chunks(&reference, chunks).map_err(snapshot_error)?;
            let stores = StoreSet::in_memory();
            let (bytes, imported) =
                decode_image(encoding, &assembled, &stores).map_err(snapshot_error)?;
            let restored: P::State = stores
                .build(|| crate::snapshot::decode_state(bytes))
                .map_err(snapshot_error)?;
            imported
                .check(&stores)
                .map_err(|e| snapshot_error(e.into()))?;
            let (written, restored) = (fingerprint(&p.state), fingerprint(&restored));
            if written != restored {
                return Err(TestError::SnapshotNotFaithful {
                    topic: topic.to_string(),
                    partition: *partition,
                    written,
                    restored,
                });
            }
        }
        Ok(())
    }

    /// Checks what recovery relies on, for every partition: the state round-trips through a
    /// full snapshot ([`check_snapshot_roundtrip`](Self::check_snapshot_roundtrip)), and
    /// replaying the records since the last [`full_snapshot`](Self::full_snapshot) (or since
    /// the first record) on the restored state gives the same state fingerprint and the same
    /// outputs. Returns the number of records replayed.
    ///
    /// Partitions stopped by a failure under [`ErrorPolicy::Fail`] are left out: the runtime
    /// discards their state.
    ///
    /// A processor that reads the wall clock (at millisecond or finer resolution), draws random
    /// numbers or lets `HashMap` iteration order decide its outputs is reported as
    /// [`TestError::NotDeterministic`] (the latter two with high probability, given enough
    /// records).
    pub fn verify_determinism(&self) -> Result<usize, TestError> {
        self.check_snapshot_roundtrip()?;
        // Let the wall clock move past the last live record so a clock-reading processor sees
        // a different time on replay (bounded: a millisecond or two).
        while wall_ms() <= self.last_wall_ms {
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut replayed_total = 0;
        for ((topic, partition), p) in &self.partitions {
            if p.failed_at.is_some() {
                // Stopped by ErrorPolicy::Fail: the runtime discards such a state (a failing
                // record may have half-updated it) and rebuilds it from Kafka.
                continue;
            }
            let not_deterministic = |what: String| TestError::NotDeterministic {
                topic: topic.to_string(),
                partition: *partition,
                from_offset: match &p.base {
                    Base::Empty { offset } => offset.unwrap_or(0),
                    Base::Full { reference, .. } => reference.input_offset,
                },
                replayed: p.since_base.len(),
                what,
            };
            let (mut state, stores): (P::State, StoreSet) = match &p.base {
                Base::Empty { .. } => {
                    let stores = StoreSet::in_memory();
                    (stores.build(P::State::default), stores)
                }
                Base::Full { reference, chunks } => {
                    let snapshot_error = |source| TestError::Snapshot {
                        topic: topic.to_string(),
                        partition: *partition,
                        source,
                    };
                    let data =
                        assemble_chunks(reference, chunks.clone()).map_err(snapshot_error)?;
                    // An upgraded driver's base may hold an older version's state.
                    restore_as_recovery_does(
                        &self.processor,
                        topic,
                        *partition,
                        reference.processor_version,
                        encoding_of(chunks),
                        &data,
                    )?
                }
            };
            let mut digest = OutputDigest::new(0);
            let mut outputs = 0usize;
            for step in &p.since_base {
                let mut out = Output::new();
                let (result, at) = match step {
                    Step::Record(raw) => (
                        process_record(
                            &self.processor,
                            &self.error_policy,
                            (&mut state, &stores),
                            raw,
                            &mut out,
                            &mut Vec::new(),
                        ),
                        format!("the record at offset {}", raw.offset),
                    ),
                    Step::Tick {
                        time_ms,
                        next_offset,
                    } => (
                        process_tick(
                            &self.processor,
                            &self.error_policy,
                            (&mut state, &stores),
                            (
                                &Position {
                                    topic,
                                    partition: *partition,
                                    offset: *next_offset,
                                },
                                *time_ms,
                            ),
                            &mut out,
                            &mut Vec::new(),
                        ),
                        format!("the wall-clock tick at {time_ms}"),
                    ),
                };
                if let Err(error) = result {
                    return Err(not_deterministic(format!(
                        "a failure at or after {at} that succeeded live: {error}"
                    )));
                }
                let produced = out.take();
                outputs += produced.len();
                for r in &produced {
                    digest.update(r);
                }
            }
            if digest != p.digest {
                return Err(not_deterministic(format!(
                    "different output records ({outputs} record(s) on replay; digest {:#018x} live, {:#018x} on replay)",
                    p.digest.value(),
                    digest.value()
                )));
            }
            let (live, replay) = (fingerprint(&p.state), fingerprint(&state));
            if live != replay {
                return Err(not_deterministic(format!(
                    "a different state (fingerprint {live:#018x} live, {replay:#018x} on replay)"
                )));
            }
            replayed_total += p.since_base.len();
        }
        Ok(replayed_total)
    }
}

/// Processes one record and the timers it makes due as the runtime does, one transaction per
/// record: a failed call's store writes are rolled back; under `Skip`/`DeadLetter` its error
/// goes to `errors` (and a dead letter to `out`), under `Fail` it is returned.
fn process_record<P: Processor>(
    processor: &P,
    policy: &ErrorPolicy,
    (state, stores): (&mut P::State, &StoreSet),
    raw: &RawRecord,
    out: &mut Output,
    errors: &mut Vec<RecordError>,
) -> Result<(), RecordError> {
    let stepped = driver_step(policy, Some(raw), out, errors, |out, on_failure| {
        process_step(processor, state, stores, raw, out, on_failure)
    });
    finish_step(stores, stepped, |error| RecordError::Processor {
        topic: raw.topic.to_string(),
        partition: raw.partition,
        offset: raw.offset,
        source: Box::new(error),
    })
}

/// Calls [`Processor::on_wall_clock`] with `time_ms` as the runtime does on a partition (`at`
/// its next offset), and the timers it makes due, like [`process_record`].
fn process_tick<P: Processor>(
    processor: &P,
    policy: &ErrorPolicy,
    (state, stores): (&mut P::State, &StoreSet),
    (at, time_ms): (&Position<'_>, i64),
    out: &mut Output,
    errors: &mut Vec<RecordError>,
) -> Result<(), RecordError> {
    let stepped = driver_step(policy, None, out, errors, |out, on_failure| {
        tick_step(processor, state, stores, (at, time_ms), out, on_failure)
    });
    finish_step(stores, stepped, |error| RecordError::WallClock {
        topic: at.topic.to_owned(),
        partition: at.partition,
        offset: at.offset,
        time: time_ms,
        source: Box::new(error),
    })
}

/// Runs `step` with the driver's error policy: under `Skip`/`DeadLetter` a failed call's
/// error goes to `errors` (and a dead letter of `raw`, if any, to `out`), under `Fail` the step
/// stops with it.
fn driver_step(
    policy: &ErrorPolicy,
    raw: Option<&RawRecord>,
    out: &mut Output,
    errors: &mut Vec<RecordError>,
    step: impl FnOnce(&mut Output, &mut OnFailure<'_>) -> Result<u64, StepError>,
) -> Result<u64, StepError> {
    let mut on_failure = |error: RecordError, out: &mut Output| {
        match policy {
            ErrorPolicy::Fail => return Err(error),
            ErrorPolicy::Skip => {}
            ErrorPolicy::DeadLetter { topic } => out.send(dead_letter_record(topic, raw, &error)),
        }
        errors.push(error);
        Ok(())
    };
    step(out, &mut on_failure)
}

/// Commits the step's store writes (one transaction per step) and reports its failure. The
/// driver's stores are in memory, whose reads and writes do not fail; `store_failed` names
/// one anyway.
fn finish_step(
    stores: &StoreSet,
    stepped: Result<u64, StepError>,
    store_failed: impl FnOnce(crate::state::StoreError) -> RecordError,
) -> Result<(), RecordError> {
    let _ = stores.commit(Vec::new());
    match stepped {
        Ok(_) => Ok(()),
        Err(StepError::Failed(error)) => Err(error),
        Err(StepError::Store(error)) => Err(store_failed(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Raw, Utf8};
    use crate::processor::{dead_letter_headers, ProcessError, Record, RecordPart};
    use serde::Deserialize;
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Payment {
        cents: i64,
    }

    /// Version 1 counts records; version 2's state adds a field without a default and can
    /// migrate version 1's (or refuse to, or fail).
    mod upgrade {
        use super::*;
        use crate::codec::BoxError;
        use crate::processor::OldState;

        #[derive(Default, Serialize, Deserialize)]
        pub struct V1 {
            pub seen: u64,
        }
        #[derive(Default, Serialize, Deserialize)]
        pub struct V2 {
            pub seen: u64,
            pub generation: u64,
        }
        pub struct Old;
        impl Processor for Old {
            type State = V1;
            type Key = Utf8;
            type Value = Utf8;
            fn process(
                &self,
                s: &mut V1,
                _: &Record<'_, String, String>,
                _: &mut Output,
            ) -> Result<(), ProcessError> {
                s.seen += 1;
                Ok(())
            }
        }
        pub enum Migration {
            None,
            Convert,
            Fail,
        }
        pub struct New(pub Migration);
        impl Processor for New {
            type State = V2;
            type Key = Utf8;
            type Value = Utf8;
            fn process(
                &self,
                s: &mut V2,
                _: &Record<'_, String, String>,
                _: &mut Output,
            ) -> Result<(), ProcessError> {
                s.seen += 1;
                Ok(())
            }
            fn version(&self) -> u32 {
                2
            }
            fn migrate_state(
                &self,
                _from_version: u32,
                old: &OldState<'_>,
            ) -> Result<Option<V2>, BoxError> {
                match self.0 {
                    Migration::None => Ok(None),
                    Migration::Convert => {
                        let V1 { seen } = old.decode()?;
                        Ok(Some(V2 {
                            seen,
                            generation: 2,
                        }))
                    }
                    Migration::Fail => Err("no way back".into()),
                }
            }
        }
    }

    #[test]
    fn upgrade_reads_migrates_or_refuses_the_old_state() {
        use upgrade::{Migration, New, Old};
        let mut v1 = TestDriver::new(Old);
        for _ in 0..3 {
            v1.pipe("in", &"k".to_string(), &"x".to_string()).unwrap();
        }
        let err = v1.upgrade(New(Migration::None)).err().unwrap().to_string();
        assert!(err.contains("missing field `generation`"), "{err}");
        assert!(err.contains("upgrade::V2"), "{err}");
        let err = v1.upgrade(New(Migration::Fail)).err().unwrap().to_string();
        assert!(
            err.contains("from processor version 0 to 2 failed: no way back"),
            "{err}"
        );
        let mut v2 = v1.upgrade(New(Migration::Convert)).unwrap();
        v2.pipe("in", &"k".to_string(), &"x".to_string()).unwrap();
        let state = v2.state("in", 0).unwrap();
        assert_eq!((state.seen, state.generation), (4, 2));
        v2.verify_determinism().unwrap();
    }

    /// Per-account balance; rejects negative payments, panics on a magic amount.
    struct Ledger;
    impl Processor for Ledger {
        type State = HashMap<String, i64>;
        type Key = Utf8;
        type Value = Json<Payment>;
        fn process(
            &self,
            balances: &mut Self::State,
            record: &Record<'_, String, Payment>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            let cents = record.value().cents;
            if cents < 0 {
                return Err(format!("negative payment {cents}").into());
            }
            if cents == 13 {
                panic!("unlucky amount");
            }
            let balance = balances.entry(record.key().clone()).or_default();
            *balance += cents;
            out.send_json("balances", record.key(), balance)?;
            Ok(())
        }
    }

    fn pay(driver: &mut TestDriver<Ledger>, account: &str, cents: i64) -> Result<(), TestError> {
        driver.pipe("payments", &account.to_string(), &Payment { cents })
    }

    #[test]
    fn deterministic_processor_passes_and_state_is_visible() {
        let mut d = TestDriver::new(Ledger);
        for (i, account) in ["a", "b", "a", "c", "a"].iter().enumerate() {
            pay(&mut d, account, i as i64 * 10 + 1).unwrap();
        }
        let balances: Vec<(String, i64)> = d.read_json("balances").unwrap();
        assert_eq!(balances.last(), Some(&("a".to_string(), 1 + 21 + 41)));
        assert_eq!(d.state("payments", 0).unwrap()["a"], 63);
        assert!(d.state("payments", 1).is_none());
        assert_eq!(d.verify_determinism().unwrap(), 5);

        // After a full snapshot (multi-chunk), only the records since then are replayed.
        let mut d = d.with_max_chunk_bytes(3);
        d.full_snapshot().unwrap();
        pay(&mut d, "b", 5).unwrap();
        pay(&mut d, "d", 6).unwrap();
        assert_eq!(d.verify_determinism().unwrap(), 2);
        assert_eq!(d.take_outputs().len(), 7);
        assert!(d.outputs().is_empty());
    }

    #[test]
    fn outputs_get_input_timestamps_and_partitions_are_separate() {
        let mut d = TestDriver::new(Ledger);
        d.set_time(1_000);
        pay(&mut d, "a", 1).unwrap();
        d.advance_time(Duration::from_secs(2));
        d.pipe_to("payments", 3, &"a".to_string(), &Payment { cents: 2 })
            .unwrap();
        d.pipe_raw(
            RawInput::new("payments")
                .partition(3)
                .offset(10)
                .timestamp(7)
                .key("a")
                .value(r#"{"cents":4}"#),
        )
        .unwrap();
        let ts: Vec<Option<i64>> = d.outputs().iter().map(|r| r.timestamp).collect();
        assert_eq!(ts, [Some(1_000), Some(3_000), Some(7)]);
        assert_eq!(d.state("payments", 0).unwrap()["a"], 1);
        assert_eq!(d.state("payments", 3).unwrap()["a"], 6);
        assert_eq!(d.partitions().count(), 2);
        let err = d
            .pipe_raw(
                RawInput::new("payments")
                    .partition(3)
                    .offset(10)
                    .key("a")
                    .value("{}"),
            )
            .unwrap_err();
        assert!(
            matches!(err, TestError::OffsetNotIncreasing { next: 11, .. }),
            "{err}"
        );
        d.verify_determinism().unwrap();
    }

    #[test]
    fn decode_error_names_the_record_and_stops_the_partition() {
        let mut d = TestDriver::new(Ledger);
        pay(&mut d, "a", 1).unwrap();
        let err = d
            .pipe_raw(RawInput::new("payments").key("a").value("not json"))
            .unwrap_err();
        match &err {
            TestError::Record(RecordError::Decode {
                topic,
                partition,
                offset,
                part,
                ..
            }) => {
                assert_eq!((topic.as_str(), *partition, *offset), ("payments", 0, 1));
                assert_eq!(*part, RecordPart::Value);
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert!(err.to_string().contains("payments/0 at offset 1"), "{err}");
        let err = pay(&mut d, "a", 1).unwrap_err();
        assert!(
            matches!(err, TestError::PartitionFailed { offset: 1, .. }),
            "{err}"
        );
        // Other partitions go on.
        d.pipe_to("payments", 1, &"a".to_string(), &Payment { cents: 1 })
            .unwrap();
    }

    #[test]
    fn processor_error_and_panic_are_reported() {
        let mut d = TestDriver::new(Ledger);
        let err = pay(&mut d, "a", -5).unwrap_err();
        assert!(err.to_string().contains("negative payment -5"), "{err}");
        let mut d = TestDriver::new(Ledger);
        let err = pay(&mut d, "a", 13).unwrap_err();
        match err {
            TestError::Record(RecordError::Panic {
                message, offset, ..
            }) => {
                assert_eq!(message, "unlucky amount");
                assert_eq!(offset, 0);
            }
            other => panic!("expected a panic error, got {other:?}"),
        }
        assert!(d.outputs().is_empty());
    }

    /// Changes its state, then fails on odd values.
    struct MutateThenFail;
    impl Processor for MutateThenFail {
        type State = u64;
        type Key = Raw;
        type Value = Json<u64>;
        fn process(
            &self,
            sum: &mut u64,
            record: &Record<'_, Option<Vec<u8>>, u64>,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            *sum += record.value();
            if record.value() % 2 == 1 {
                return Err("odd".into());
            }
            Ok(())
        }
    }

    #[test]
    fn failed_partition_is_left_out_of_the_determinism_check() {
        let mut d = TestDriver::new(MutateThenFail);
        d.pipe_to("t", 0, &None, &2).unwrap();
        d.pipe_to("t", 0, &None, &3).unwrap_err();
        d.pipe_to("t", 1, &None, &4).unwrap();
        // Partition 0's state holds the failed record's change; only partition 1 is replayed.
        assert_eq!(d.state("t", 0), Some(&5));
        assert_eq!(d.verify_determinism().unwrap(), 1);
        // Under Skip the change stays, live and on replay alike.
        let mut d = TestDriver::new(MutateThenFail).with_error_policy(ErrorPolicy::Skip);
        d.pipe_to("t", 0, &None, &2).unwrap();
        d.pipe_to("t", 0, &None, &3).unwrap();
        assert_eq!(d.state("t", 0), Some(&5));
        assert_eq!(d.verify_determinism().unwrap(), 2);
    }

    #[test]
    fn skip_and_dead_letter_policies() {
        let mut d = TestDriver::new(Ledger).with_error_policy(ErrorPolicy::Skip);
        pay(&mut d, "a", 1).unwrap();
        pay(&mut d, "a", -1).unwrap();
        pay(&mut d, "a", 13).unwrap();
        pay(&mut d, "a", 2).unwrap();
        assert_eq!(d.errors().len(), 2);
        assert_eq!(d.state("payments", 0).unwrap()["a"], 3);
        assert_eq!(d.outputs().len(), 2);
        assert_eq!(d.verify_determinism().unwrap(), 4);

        let mut d = TestDriver::new(Ledger).with_error_policy(ErrorPolicy::DeadLetter {
            topic: "dlq".into(),
        });
        pay(&mut d, "a", 1).unwrap();
        d.pipe_raw(
            RawInput::new("payments")
                .key("b")
                .value("{")
                .header("trace", "t1"),
        )
        .unwrap();
        let dead: Vec<&OutputRecord> = d.outputs_to("dlq").collect();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].value.as_deref(), Some(&b"{"[..]));
        assert!(dead[0].headers.contains(&("trace".into(), b"t1".to_vec())));
        assert!(dead[0].headers.contains(&(
            dead_letter_headers::ERROR_KIND.into(),
            b"decode-value".to_vec()
        )));
        assert_eq!(d.verify_determinism().unwrap(), 2);
    }

    /// Uses the wall clock: the classic determinism bug.
    struct WallClock;
    impl Processor for WallClock {
        type State = u128;
        type Key = Raw;
        type Value = Raw;
        fn process(
            &self,
            last_seen: &mut u128,
            _record: &Record<'_, Option<Vec<u8>>, Option<Vec<u8>>>,
            _out: &mut Output,
        ) -> Result<(), ProcessError> {
            *last_seen = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
            Ok(())
        }
    }

    #[test]
    fn wall_clock_processor_is_detected() {
        let mut d = TestDriver::new(WallClock);
        d.pipe_raw(RawInput::new("t").value("x")).unwrap();
        let err = d.verify_determinism().unwrap_err();
        match &err {
            TestError::NotDeterministic { what, replayed, .. } => {
                assert!(what.contains("different state"), "{what}");
                assert_eq!(*replayed, 1);
            }
            other => panic!("expected NotDeterministic, got {other:?}"),
        }
        assert!(err.to_string().contains("not the wall clock"), "{err}");
    }

    /// Emits a different value every time it runs (a counter outside the state stands in for a
    /// random number generator).
    struct Random(AtomicU64);
    impl Processor for Random {
        type State = ();
        type Key = Raw;
        type Value = Raw;
        fn process(
            &self,
            _: &mut (),
            _record: &Record<'_, Option<Vec<u8>>, Option<Vec<u8>>>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            let n = self.0.fetch_add(1, Ordering::Relaxed);
            out.send(OutputRecord::new("out").value(n.to_le_bytes().to_vec()));
            Ok(())
        }
    }

    #[test]
    fn non_deterministic_outputs_are_detected() {
        let mut d = TestDriver::new(Random(AtomicU64::new(0)));
        d.pipe_raw(RawInput::new("t").value("x")).unwrap();
        d.pipe_raw(RawInput::new("t").value("y")).unwrap();
        let err = d.verify_determinism().unwrap_err();
        assert!(
            matches!(&err, TestError::NotDeterministic { what, .. } if what.contains("different output records")),
            "{err}"
        );
    }

    /// Emits one record per key of a HashMap, in iteration order.
    struct HashOrder;
    impl Processor for HashOrder {
        type State = HashMap<u64, u64>;
        type Key = Raw;
        type Value = Raw;
        fn process(
            &self,
            state: &mut Self::State,
            record: &Record<'_, Option<Vec<u8>>, Option<Vec<u8>>>,
            out: &mut Output,
        ) -> Result<(), ProcessError> {
            state.insert(record.offset() as u64, 1);
            if record.offset() == 63 {
                for k in state.keys() {
                    out.send(OutputRecord::new("out").value(k.to_le_bytes().to_vec()));
                }
            }
            Ok(())
        }
    }

    #[test]
    fn hashmap_iteration_order_in_outputs_is_detected() {
        let mut d = TestDriver::new(HashOrder);
        for _ in 0..64 {
            d.pipe_raw(RawInput::new("t")).unwrap();
        }
        let err = d.verify_determinism().unwrap_err();
        assert!(matches!(err, TestError::NotDeterministic { .. }), "{err}");
    }

    /// Its state loses a field in a snapshot.
    #[derive(Default, Serialize, Deserialize)]
    struct Lossy {
        kept: u64,
        #[serde(skip_deserializing)]
        lost: u64,
    }
    struct LossyProcessor;
    impl Processor for LossyProcessor {
        type State = Lossy;
        type Key = Raw;
        type Value = Raw;
        fn process(
            &self,
            s: &mut Lossy,
            _: &Record<'_, Option<Vec<u8>>, Option<Vec<u8>>>,
            _: &mut Output,
        ) -> Result<(), ProcessError> {
            s.kept += 1;
            s.lost += 1;
            Ok(())
        }
    }

    #[test]
    fn lossy_snapshot_is_detected() {
        let mut d = TestDriver::new(LossyProcessor);
        d.pipe_raw(RawInput::new("t")).unwrap();
        let err = d.check_snapshot_roundtrip().unwrap_err();
        assert!(
            matches!(err, TestError::SnapshotNotFaithful { .. }),
            "{err}"
        );
        assert!(matches!(
            d.verify_determinism().unwrap_err(),
            TestError::SnapshotNotFaithful { .. }
        ));
    }

    #[test]
    fn typed_readers_and_json_input() {
        struct Echo;
        impl Processor for Echo {
            type State = BTreeMap<String, u32>;
            type Key = Json<String>;
            type Value = Json<u32>;
            fn process(
                &self,
                s: &mut Self::State,
                r: &Record<'_, String, u32>,
                out: &mut Output,
            ) -> Result<(), ProcessError> {
                s.insert(r.key().clone(), *r.value());
                out.send_as::<Utf8, Json<u32>>("echo", r.key(), r.value())?;
                Ok(())
            }
        }
        let mut d = TestDriver::new(Echo);
        d.pipe_json("in", "k", &7u32).unwrap();
        let echoed = d.read_as::<Utf8, Json<u32>>("echo").unwrap();
        assert_eq!(echoed, [("k".to_string(), 7)]);
        // A text key reads as text, as Output::send_json writes it.
        assert_eq!(
            d.read_json::<String, u32>("echo").unwrap(),
            [("k".to_string(), 7)]
        );
        assert!(
            d.read_json::<u32, u32>("echo").is_err(),
            "key is not a number"
        );
        assert!(d.read_json::<String, u32>("nothing").unwrap().is_empty());
        d.verify_determinism().unwrap();
    }
}

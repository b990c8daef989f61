//! Exactly-once checker: reads a topic from its beginning to its end with
//! `isolation.level=read_committed` and compares what it finds with the ids a test expects.
//!
//! It reports
//! - **duplicates**: an id seen more than once (with every position it was seen at),
//! - **missing**: an expected id never seen,
//! - **unexpected**: an id seen that was not expected,
//! - **order violations**: within one key, a sequence number lower than the one before it in
//!   partition order.
//!
//! "The end" is each partition's end offset as a read_committed consumer sees it when the check
//! starts (`fetch_watermarks` high watermark: the last stable offset), and the check reads until its position reaches that offset, so a
//! slow broker cannot make records look missing. Records at or past that end (produced or
//! committed after the check started) are not part of the check.
//!
//! The comparison itself is [`EosChecker`], usable without a broker.
//!
//! ```no_run
//! # async fn demo(bootstrap: &str) -> Result<(), exactly_tests::eos::EosError> {
//! use exactly_tests::eos::{check_topic, payload_as_id};
//!
//! let expected = (0..1000).map(|i| format!("order-{i}"));
//! let report = check_topic(bootstrap, "orders-out", expected, payload_as_id).await?;
//! assert!(report.is_clean(), "{report}");
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// How long the check waits for the topic to appear in metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What the test's extractor finds in one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The record's identity: each expected id must be seen exactly once.
    pub id: String,
    /// The ordering key (often the Kafka key); order is checked per key.
    pub key: Option<String>,
    /// Sequence number within the key; must not decrease in partition order.
    pub seq: Option<u64>,
}

impl Observed {
    /// An observation with an id only (no order check).
    pub fn id(id: impl Into<String>) -> Self {
        Observed {
            id: id.into(),
            key: None,
            seq: None,
        }
    }
}

/// Where a record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Partition of the record.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}@{}", self.partition, self.offset)
    }
}

/// An id seen more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Duplicate {
    /// The id.
    pub id: String,
    /// Every position it was read at, in read order.
    pub positions: Vec<Position>,
}

/// An id that was read but not expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unexpected {
    /// The id.
    pub id: String,
    /// Where it was first read.
    pub position: Position,
}

/// A record whose sequence number is lower than the previous one of the same key in the same
/// partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderViolation {
    /// The key.
    pub key: String,
    /// The id of the out-of-order record.
    pub id: String,
    /// Its sequence number.
    pub seq: u64,
    /// Its position.
    pub position: Position,
    /// The sequence number of the key's previous record.
    pub previous_seq: u64,
    /// The position of the key's previous record.
    pub previous_position: Position,
}

/// The result of an exactly-once check. [`EosReport::is_clean`] says whether it passed; the
/// `Display` form is meant for assertion messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EosReport {
    /// The topic checked (empty when built from an [`EosChecker`] without one).
    pub topic: String,
    /// Records read (delivered by the read_committed consumer).
    pub records_read: u64,
    /// Records the extractor skipped (returned `None` for).
    pub records_ignored: u64,
    /// Number of distinct expected ids.
    pub expected_count: usize,
    /// Number of distinct ids read.
    pub distinct_seen: usize,
    /// Number of ids read more than once.
    pub duplicate_count: usize,
    /// Deliveries beyond the first, summed over all duplicated ids.
    pub extra_deliveries: u64,
    /// The first duplicated ids, ordered by first position.
    pub duplicates: Vec<Duplicate>,
    /// Number of expected ids never read.
    pub missing_count: usize,
    /// The first missing ids, sorted.
    pub missing: Vec<String>,
    /// Number of distinct ids read but not expected.
    pub unexpected_count: usize,
    /// The first unexpected ids, ordered by position.
    pub unexpected: Vec<Unexpected>,
    /// Number of order violations.
    pub order_violation_count: usize,
    /// The first order violations, ordered by position.
    pub order_violations: Vec<OrderViolation>,
}

impl EosReport {
    /// True when every expected id was read exactly once, nothing else was read, and every
    /// key's sequence numbers were in order.
    pub fn is_clean(&self) -> bool {
        self.duplicate_count == 0
            && self.missing_count == 0
            && self.unexpected_count == 0
            && self.order_violation_count == 0
    }
}

impl fmt::Display for EosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let topic = if self.topic.is_empty() {
            String::new()
        } else {
            format!(" of topic {}", self.topic)
        };
        let verdict = if self.is_clean() { "CLEAN" } else { "VIOLATED" };
        writeln!(f, "exactly-once check{topic}: {verdict}")?;
        write!(
            f,
            "  read {} records ({} ignored); expected {} ids, saw {} distinct",
            self.records_read, self.records_ignored, self.expected_count, self.distinct_seen
        )?;
        if self.duplicate_count > 0 {
            write!(
                f,
                "\n  duplicates: {} ids ({} extra deliveries); first:",
                self.duplicate_count, self.extra_deliveries
            )?;
            for d in &self.duplicates {
                let at: Vec<String> = d.positions.iter().map(Position::to_string).collect();
                write!(f, "\n    {:?} at {}", d.id, at.join(", "))?;
            }
        }
        if self.missing_count > 0 {
            write!(
                f,
                "\n  missing: {} ids; first: {:?}",
                self.missing_count, self.missing
            )?;
        }
        if self.unexpected_count > 0 {
            write!(f, "\n  unexpected: {} ids; first:", self.unexpected_count)?;
            for u in &self.unexpected {
                write!(f, "\n    {:?} at {}", u.id, u.position)?;
            }
        }
        if self.order_violation_count > 0 {
            write!(
                f,
                "\n  order violations: {}; first:",
                self.order_violation_count
            )?;
            for v in &self.order_violations {
                write!(
                    f,
                    "\n    key {:?}: {:?} seq {} at {} after seq {} at {}",
                    v.key, v.id, v.seq, v.position, v.previous_seq, v.previous_position
                )?;
            }
        }
        Ok(())
    }
}

/// The comparison logic: feed it records in partition order, then [`EosChecker::finish`].
#[derive(Debug, Clone)]
pub struct EosChecker {
    expected: HashSet<String>,
    seen: HashMap<String, Vec<Position>>,
    /// Last (seq, position) per (partition, key): order is only defined within a partition.
    last_seq: HashMap<(i32, String), (u64, Position)>,
    order_violations: Vec<OrderViolation>,
    records_read: u64,
    records_ignored: u64,
}

impl EosChecker {
    /// A checker expecting each of `expected` exactly once (repeats in `expected` count once).
    pub fn new<I, S>(expected: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        EosChecker {
            expected: expected.into_iter().map(Into::into).collect(),
            seen: HashMap::new(),
            last_seq: HashMap::new(),
            order_violations: Vec::new(),
            records_read: 0,
            records_ignored: 0,
        }
    }

    /// Records one observation. Calls for one partition must come in offset order.
    pub fn observe(&mut self, position: Position, observed: Observed) {
        self.records_read += 1;
        if let (Some(key), Some(seq)) = (observed.key, observed.seq) {
            let slot = (position.partition, key);
            if let Some(&(previous_seq, previous_position)) = self.last_seq.get(&slot) {
                if seq < previous_seq {
                    self.order_violations.push(OrderViolation {
                        key: slot.1.clone(),
                        id: observed.id.clone(),
                        seq,
                        position,
                        previous_seq,
                        previous_position,
                    });
                }
            }
            self.last_seq.insert(slot, (seq, position));
        }
        self.seen.entry(observed.id).or_default().push(position);
    }

    /// Counts a record the extractor chose to skip.
    pub fn ignore(&mut self) {
        self.records_read += 1;
        self.records_ignored += 1;
    }

    /// Builds the report, listing at most `max_listed` entries per category.
    pub fn finish(self, topic: &str, max_listed: usize) -> EosReport {
        let mut duplicates: Vec<Duplicate> = self
            .seen
            .iter()
            .filter(|(_, positions)| positions.len() > 1)
            .map(|(id, positions)| Duplicate {
                id: id.clone(),
                positions: positions.clone(),
            })
            .collect();
        let duplicate_count = duplicates.len();
        let extra_deliveries = duplicates
            .iter()
            .map(|d| d.positions.len() as u64 - 1)
            .sum();
        duplicates.sort_by_key(|d| d.positions[0]);
        duplicates.truncate(max_listed);

        let mut missing: Vec<String> = self
            .expected
            .iter()
            .filter(|id| !self.seen.contains_key(*id))
            .cloned()
            .collect();
        let missing_count = missing.len();
        missing.sort();
        missing.truncate(max_listed);

        let mut unexpected: Vec<Unexpected> = self
            .seen
            .iter()
            .filter(|(id, _)| !self.expected.contains(*id))
            .map(|(id, positions)| Unexpected {
                id: id.clone(),
                position: positions[0],
            })
            .collect();
        let unexpected_count = unexpected.len();
        unexpected.sort_by_key(|u| u.position);
        unexpected.truncate(max_listed);

        let mut order_violations = self.order_violations;
        let order_violation_count = order_violations.len();
        order_violations.sort_by_key(|v| v.position);
        order_violations.truncate(max_listed);

        EosReport {
            topic: topic.to_owned(),
            records_read: self.records_read,
            records_ignored: self.records_ignored,
            expected_count: self.expected.len(),
            distinct_seen: self.seen.len(),
            duplicate_count,
            extra_deliveries,
            duplicates,
            missing_count,
            missing,
            unexpected_count,
            unexpected,
            order_violation_count,
            order_violations,
        }
    }
}

/// Errors of [`check_topic`]. Each names the topic and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum EosError {
    /// A Kafka client call failed.
    #[error("exactly-once check: {context}: {source}")]
    Kafka {
        /// What was being done, with the topic and bootstrap servers.
        context: String,
        /// The underlying error.
        #[source]
        source: KafkaError,
    },
    /// The topic does not exist (or has no partitions).
    #[error("exactly-once check: topic {topic} has no partitions on {bootstrap}")]
    UnknownTopic {
        /// The topic.
        topic: String,
        /// The bootstrap servers.
        bootstrap: String,
    },
    /// The extractor rejected a record.
    #[error("exactly-once check of topic {topic}: cannot read the record at {position}: {reason}")]
    Extract {
        /// The topic.
        topic: String,
        /// Where the record is.
        position: Position,
        /// The extractor's message.
        reason: String,
    },
    /// The end of the topic was not reached in time.
    #[error(
        "exactly-once check of topic {topic}: did not reach the end within {timeout:?}; {progress}"
    )]
    Timeout {
        /// The topic.
        topic: String,
        /// The time allowed.
        timeout: Duration,
        /// Per-partition position versus end offset.
        progress: String,
    },
    /// The blocking reader task failed (panicked or was cancelled).
    #[error("exactly-once check of topic {topic}: reader task failed: {reason}")]
    Task {
        /// The topic.
        topic: String,
        /// The join error.
        reason: String,
    },
}

/// Options for [`check_topic_with`].
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Deadline for the whole check (metadata, end offsets and reading). Default 60 s.
    pub timeout: Duration,
    /// How many entries per category the report lists. Default 20.
    pub max_listed: usize,
    /// Extra librdkafka consumer settings (e.g. `security.protocol` for a real cluster).
    pub consumer_config: Vec<(String, String)>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            timeout: Duration::from_secs(60),
            max_listed: 20,
            consumer_config: Vec::new(),
        }
    }
}

/// An extractor that uses the payload (UTF-8) as the id and the key (UTF-8) as the key, with
/// no sequence numbers. Records with no payload are an error.
pub fn payload_as_id(message: &BorrowedMessage<'_>) -> Result<Option<Observed>, String> {
    let id = match message.payload_view::<str>() {
        Some(Ok(id)) => id.to_owned(),
        Some(Err(e)) => return Err(format!("payload is not UTF-8: {e}")),
        None => return Err("record has no payload".into()),
    };
    let key = match message.key_view::<str>() {
        Some(Ok(key)) => Some(key.to_owned()),
        Some(Err(e)) => return Err(format!("key is not UTF-8: {e}")),
        None => None,
    };
    Ok(Some(Observed { id, key, seq: None }))
}

/// Reads `topic` to its end with read_committed and checks it against `expected` (default
/// [`CheckOptions`]). The extractor returns `Ok(None)` to skip a record, `Err` to abort the
/// check (malformed data).
pub async fn check_topic<I, S, F>(
    bootstrap: &str,
    topic: &str,
    expected: I,
    extractor: F,
) -> Result<EosReport, EosError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
    F: Fn(&BorrowedMessage<'_>) -> Result<Option<Observed>, String> + Send + 'static,
{
    check_topic_with(
        bootstrap,
        topic,
        expected,
        extractor,
        &CheckOptions::default(),
    )
    .await
}

/// [`check_topic`] with options. The consumer runs on a blocking thread, off the reactor.
pub async fn check_topic_with<I, S, F>(
    bootstrap: &str,
    topic: &str,
    expected: I,
    extractor: F,
    options: &CheckOptions,
) -> Result<EosReport, EosError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
    F: Fn(&BorrowedMessage<'_>) -> Result<Option<Observed>, String> + Send + 'static,
{
    let checker = EosChecker::new(expected);
    let bootstrap = bootstrap.to_owned();
    let topic_owned = topic.to_owned();
    let options = options.clone();
    tokio::task::spawn_blocking(move || {
        check_topic_blocking(&bootstrap, &topic_owned, checker, extractor, &options)
    })
    .await
    .map_err(|e| EosError::Task {
        topic: topic.to_owned(),
        reason: e.to_string(),
    })?
}

/// The blocking body of [`check_topic_with`], for callers on their own thread.
pub fn check_topic_blocking<F>(
    bootstrap: &str,
    topic: &str,
    mut checker: EosChecker,
    extractor: F,
    options: &CheckOptions,
) -> Result<EosReport, EosError>
where
    F: Fn(&BorrowedMessage<'_>) -> Result<Option<Observed>, String>,
{
    let deadline = Instant::now() + options.timeout;
    let kafka = |context: &str| {
        let context = format!("{context} (topic {topic} via {bootstrap})");
        move |source| EosError::Kafka { context, source }
    };

    static GROUP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let group = format!(
        "exactly-eos-check-{}-{}",
        std::process::id(),
        GROUP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        // Only used for the consumer's identity: partitions are assigned, never subscribed,
        // and nothing is committed.
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    for (key, value) in &options.consumer_config {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().map_err(kafka("creating the consumer"))?;

    // A topic that was just created may take a moment to appear; one that does not exist
    // should fail fast, not after the whole timeout.
    let metadata_deadline = deadline.min(Instant::now() + METADATA_TIMEOUT);
    let partitions = retry_until(metadata_deadline, || {
        let metadata = consumer.fetch_metadata(Some(topic), remaining(metadata_deadline))?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<i32>>())
            .unwrap_or_default())
    })
    .map_err(kafka("reading the topic's metadata"))?;
    if partitions.is_empty() {
        return Err(EosError::UnknownTopic {
            topic: topic.to_owned(),
            bootstrap: bootstrap.to_owned(),
        });
    }

    // The end offsets are fixed now: what a read_committed consumer may see at this moment.
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (low, high) = retry_until(deadline, || {
            consumer.fetch_watermarks(topic, partition, remaining(deadline))
        })
        .map_err(kafka(&format!(
            "reading end offsets of partition {partition}"
        )))?;
        ends.insert(partition, high);
        if high > low {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .map_err(kafka("building the assignment"))?;
        }
    }
    let mut pending: HashMap<i32, i64> = assignment
        .elements()
        .iter()
        .map(|e| (e.partition(), ends[&e.partition()]))
        .collect();
    consumer
        .assign(&assignment)
        .map_err(kafka("assigning the partitions"))?;

    while !pending.is_empty() {
        if Instant::now() >= deadline {
            let mut progress: Vec<String> = pending
                .iter()
                .map(|(partition, end)| {
                    format!(
                        "partition {partition} at {} of end {end}",
                        position_of(&consumer, topic, *partition)
                            .map_or_else(|| "?".to_owned(), |p| p.to_string())
                    )
                })
                .collect();
            progress.sort();
            return Err(EosError::Timeout {
                topic: topic.to_owned(),
                timeout: options.timeout,
                progress: progress.join(", "),
            });
        }
        match consumer.poll(remaining(deadline).min(Duration::from_millis(200))) {
            Some(Ok(message)) => {
                let position = Position {
                    partition: message.partition(),
                    offset: message.offset(),
                };
                // Records at or past the end fixed at the start are not part of this check
                // (a producer may still be writing): skip them.
                let end = ends.get(&position.partition).copied().unwrap_or(0);
                if position.offset >= end {
                    pending.remove(&position.partition);
                    continue;
                }
                match extractor(&message) {
                    Ok(Some(observed)) => checker.observe(position, observed),
                    Ok(None) => checker.ignore(),
                    Err(reason) => {
                        return Err(EosError::Extract {
                            topic: topic.to_owned(),
                            position,
                            reason,
                        })
                    }
                }
                if position.offset + 1 >= end {
                    pending.remove(&position.partition);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                // The fetcher reached the partition's last stable offset, which only grows:
                // it is at or past the end fixed at the start. (Positions need not move past
                // a trailing control marker, so they alone may never confirm the end.)
                pending.remove(&partition);
            }
            None => {
                // Positions move past control markers and aborted records without a message,
                // so the end is confirmed through positions, not through the last message.
                pending.retain(|partition, end| {
                    position_of(&consumer, topic, *partition).is_none_or(|p| p < *end)
                });
            }
            Some(Err(error)) => {
                tracing::warn!(%topic, %error, "consumer error during exactly-once check");
            }
        }
    }
    Ok(checker.finish(topic, options.max_listed))
}

/// The consumer's position (next offset to read) in `partition`, if it has one.
fn position_of(consumer: &BaseConsumer, topic: &str, partition: i32) -> Option<i64> {
    let positions = consumer.position().ok()?;
    match positions.find_partition(topic, partition)?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Retries `attempt` until it succeeds with a non-empty answer or the deadline passes; brokers
/// answer "leader not available" for a moment after a topic is created.
fn retry_until<T: RetryableAnswer>(
    deadline: Instant,
    mut attempt: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    loop {
        let result = attempt();
        let done = match &result {
            Ok(answer) => answer.is_complete(),
            Err(_) => false,
        };
        if done || Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(100).min(remaining(deadline)));
    }
}

/// Whether an answer is final or worth asking again for.
trait RetryableAnswer {
    fn is_complete(&self) -> bool;
}

impl RetryableAnswer for Vec<i32> {
    fn is_complete(&self) -> bool {
        !self.is_empty()
    }
}

impl RetryableAnswer for (i64, i64) {
    fn is_complete(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    fn keyed(id: &str, key: &str, seq: u64) -> Observed {
        Observed {
            id: id.into(),
            key: Some(key.into()),
            seq: Some(seq),
        }
    }

    #[test]
    fn exactly_once_is_clean() {
        let mut checker = EosChecker::new(["a", "b", "c"]);
        checker.observe(at(0, 0), Observed::id("a"));
        checker.observe(at(0, 2), Observed::id("b"));
        checker.observe(at(1, 0), Observed::id("c"));
        let report = checker.finish("t", 10);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.records_read, 3);
        assert_eq!(report.distinct_seen, 3);
        assert!(report.to_string().contains("CLEAN"));
    }

    #[test]
    fn duplicates_are_reported_with_every_position() {
        let mut checker = EosChecker::new(["a", "b"]);
        checker.observe(at(0, 0), Observed::id("a"));
        checker.observe(at(0, 1), Observed::id("b"));
        checker.observe(at(0, 5), Observed::id("a"));
        checker.observe(at(1, 3), Observed::id("a"));
        let report = checker.finish("t", 10);
        assert!(!report.is_clean());
        assert_eq!(report.duplicate_count, 1);
        assert_eq!(report.extra_deliveries, 2);
        assert_eq!(
            report.duplicates,
            vec![Duplicate {
                id: "a".into(),
                positions: vec![at(0, 0), at(0, 5), at(1, 3)]
            }]
        );
        assert_eq!(report.missing_count, 0);
        assert!(report.to_string().contains("p0@5"), "{report}");
    }

    #[test]
    fn missing_and_unexpected_are_reported() {
        let mut checker = EosChecker::new(["a", "b", "c", "a"]);
        checker.observe(at(0, 0), Observed::id("a"));
        checker.observe(at(0, 7), Observed::id("zombie"));
        let report = checker.finish("t", 10);
        assert_eq!(
            report.expected_count, 3,
            "repeats in the expected set count once"
        );
        assert_eq!(report.missing_count, 2);
        assert_eq!(report.missing, vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(report.unexpected_count, 1);
        assert_eq!(report.unexpected[0].position, at(0, 7));
        let text = report.to_string();
        assert!(
            text.contains("VIOLATED") && text.contains("zombie"),
            "{text}"
        );
    }

    #[test]
    fn lists_are_capped_but_counts_are_complete() {
        let expected: Vec<String> = (0..100).map(|i| format!("id-{i:03}")).collect();
        let checker = EosChecker::new(expected);
        let report = checker.finish("t", 5);
        assert_eq!(report.missing_count, 100);
        assert_eq!(report.missing.len(), 5);
        assert_eq!(report.missing[0], "id-000");
    }

    #[test]
    fn decreasing_sequence_within_a_key_is_an_order_violation() {
        let mut checker = EosChecker::new(["k1-1", "k1-2", "k1-3", "k2-1"]);
        checker.observe(at(0, 0), keyed("k1-1", "k1", 1));
        checker.observe(at(0, 1), keyed("k1-3", "k1", 3));
        checker.observe(at(0, 2), keyed("k2-1", "k2", 1));
        checker.observe(at(0, 3), keyed("k1-2", "k1", 2));
        let report = checker.finish("t", 10);
        assert_eq!(report.order_violation_count, 1);
        let v = &report.order_violations[0];
        assert_eq!((v.key.as_str(), v.seq, v.previous_seq), ("k1", 2, 3));
        assert_eq!((v.position, v.previous_position), (at(0, 3), at(0, 1)));
        assert_eq!(report.duplicate_count + report.missing_count, 0);
        assert!(!report.is_clean());
    }

    #[test]
    fn order_is_per_partition_and_gaps_or_equal_seqs_are_fine() {
        let mut checker = EosChecker::new(["a", "b", "c", "d"]);
        // The same key in two partitions has no defined order between them.
        checker.observe(at(0, 0), keyed("a", "k", 5));
        checker.observe(at(1, 0), keyed("b", "k", 1));
        // Gaps and repeats of a sequence number are not order violations.
        checker.observe(at(1, 4), keyed("c", "k", 1));
        checker.observe(at(1, 9), keyed("d", "k", 7));
        let report = checker.finish("t", 10);
        assert!(report.is_clean(), "{report}");
    }

    #[test]
    fn ignored_records_count_as_read_only() {
        let mut checker = EosChecker::new(["a"]);
        checker.ignore();
        checker.observe(at(0, 1), Observed::id("a"));
        let report = checker.finish("t", 10);
        assert!(report.is_clean());
        assert_eq!((report.records_read, report.records_ignored), (2, 1));
    }
}

//! The crate's top-level error.

use crate::config::ConfigError;
use crate::processor::RecordError;
use crate::snapshot::SnapshotError;

/// Everything that can stop an `exactly` application.
///
/// Each variant carries the context needed to act on it (topic, partition, offset, snapshot,
/// setting).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A record failed under [`ErrorPolicy::Fail`](crate::ErrorPolicy::Fail).
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    // ---- Kafka-facing runtime (helper-4) ----
    /// A Kafka client call failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What the runtime was doing.
        context: String,
        /// The client's error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// An input topic does not exist (or a snapshot topic did not appear after creation).
    #[error(
        "topic {topic:?} does not exist; create it first (exactly creates only snapshot topics)"
    )]
    TopicNotFound {
        /// The topic.
        topic: String,
    },
    /// The snapshot topic exists with a different partition count than its input topic.
    #[error("snapshot topic {snapshot_topic:?} has {actual} partitions but input topic {input_topic:?} has {expected}; partition p of the snapshot topic must hold input partition p: delete the snapshot topic (losing state) or configure another snapshot_topic_pattern")]
    SnapshotTopicPartitions {
        /// The snapshot topic.
        snapshot_topic: String,
        /// Its input topic.
        input_topic: String,
        /// The input topic's partition count.
        expected: usize,
        /// The snapshot topic's partition count.
        actual: usize,
    },
    /// A snapshot read from a snapshot partition is corrupt or unreadable (never loaded).
    #[error("snapshot partition {topic}/{partition}: {source}")]
    PartitionSnapshot {
        /// The snapshot topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// The snapshot partition's log start is past zero and no incremental snapshot record is
    /// left: the state cannot be recovered (retention deleted it).
    #[error("snapshot partition {topic}/{partition} starts at offset {log_start_offset} and holds no incremental snapshot record: its state was deleted by retention; refusing to start from an empty state")]
    SnapshotTruncated {
        /// The snapshot topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Its log start offset.
        log_start_offset: i64,
    },
    /// An incremental snapshot record describes another input partition than the one its
    /// snapshot partition belongs to.
    #[error("snapshot record {topic}/{partition}@{offset} describes input {found_topic}/{found_partition}: is the snapshot topic shared between apps?")]
    SnapshotMismatch {
        /// The snapshot topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// The input topic it names.
        found_topic: String,
        /// The input partition it names.
        found_partition: i32,
    },
    /// Recovery needs input records that retention already deleted.
    #[error("retention gap on {topic}/{partition}: recovery must replay from offset {needed_offset} but the log starts at {log_start_offset}; the state cannot be rebuilt (write full snapshots more often than retention deletes input)")]
    RetentionGap {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// First offset the replay needs (offsetSTART).
        needed_offset: i64,
        /// The partition's log start offset.
        log_start_offset: i64,
    },
    /// Replaying committed input produced a different state or different outputs than the
    /// first time: the processor is not deterministic.
    #[error("non-deterministic processor on {topic}/{partition}: replaying offsets [{from_offset}, {to_offset}) gave {what} {actual:#018x}, the committed snapshot recorded {expected:#018x}; process() must depend only on the state and the record (no wall clock, randomness or HashMap iteration order)")]
    NonDeterministic {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Start of the replayed range (offsetSTART).
        from_offset: i64,
        /// End of the replayed range (offsetEND, exclusive).
        to_offset: i64,
        /// "state fingerprint" or "output digest".
        what: &'static str,
        /// Value recorded when the records were first processed.
        expected: u64,
        /// Value after the replay.
        actual: u64,
    },
    /// Replaying committed input met a different number of records than were processed the
    /// first time: the input changed underneath (compaction, deleted records, a broker that
    /// lost data). Continuing would silently diverge from the committed outputs.
    #[error("replaying {topic}/{partition} offsets [{from_offset}, {to_offset}) met {replayed} records, but {recorded} were processed there before: the input changed since (a compacted input topic, deleted records or data loss on the broker); the state cannot be rebuilt from it")]
    ReplayMismatch {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Start of the replayed range (offsetSTART).
        from_offset: i64,
        /// End of the replayed range (offsetEND, exclusive).
        to_offset: i64,
        /// Records met by the replay.
        replayed: u64,
        /// Records the snapshot record says were processed in that range.
        recorded: u64,
    },
    /// An offset the runtime must read was deleted (offset out of range).
    #[error("offset {offset} of {topic}/{partition} is out of range (deleted by retention?)")]
    OffsetOutOfRange {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// The offset.
        offset: i64,
    },
    /// Reading a partition made no progress.
    #[error("reading {topic}/{partition} made no progress at offset {offset} for {waited:?} (broker unreachable?)")]
    ReadStalled {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Next offset to read.
        offset: i64,
        /// How long the reader waited.
        waited: std::time::Duration,
    },
    /// librdkafka refused an output record locally (e.g. larger than `message.max.bytes`).
    #[error("cannot produce to {topic:?} (producer {transactional_id}): {source}")]
    Produce {
        /// Output topic.
        topic: String,
        /// The partition worker's transactional id.
        transactional_id: String,
        /// The client's error.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
    },
    /// An OS resource (a thread) could not be created.
    #[error("{context}: {source}")]
    Io {
        /// What the runtime was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The runtime's consumer thread ended without reporting a result (it panicked).
    #[error("the exactly runtime thread stopped unexpectedly")]
    RuntimeStopped,
}

impl Error {
    /// True for failures of the broker or the network that may pass (a stalled read, a client
    /// error), as opposed to what the data or the processor decide (non-determinism, a
    /// retention gap, a corrupt snapshot, a bad record): those would fail the same way again.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Error::Kafka { .. } | Error::ReadStalled { .. })
    }

    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

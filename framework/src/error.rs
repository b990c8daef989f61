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
    #[error("snapshot topic {snapshot_topic:?} has {actual} partitions but input topic {input_topic:?} has {expected}; partition p of the snapshot topic holds the state of input partition p, so the two must have the same count. If partitions were added to the input topic, the keys moved between partitions and the state cannot follow them: restore the input's partition count, or migrate to a new app id deliberately. If the snapshot topic was created by hand, recreate it with {expected} partitions before the app's first start")]
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
    /// Co-partitioned input topics (see `AppConfig::co_partitioned`) with different partition
    /// counts.
    #[error("the co-partitioned input topics do not have the same number of partitions ({counts}): partition p of every input must hold the same keys. Give them the same partition count (and the same key partitioning), or turn co-partitioning off (AppConfig::co_partitioned / EXACTLY_CO_PARTITIONED)")]
    NotCoPartitioned {
        /// `topic: partitions` of every input, comma-separated.
        counts: String,
    },
    /// A snapshot topic's configuration would lose or refuse snapshot records.
    #[error("snapshot topic {topic:?} has {setting}={value}: {fix}")]
    SnapshotTopicConfig {
        /// The snapshot topic.
        topic: String,
        /// The topic config.
        setting: String,
        /// Its value.
        value: String,
        /// Why that cannot work and what to change.
        fix: String,
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
    /// The partition's local state store (its RocksDB under the state dir) failed.
    #[error("local state of {topic}/{partition}: {source}")]
    LocalState {
        /// The input topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What failed.
        #[source]
        source: crate::state::StoreError,
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
    /// The app's input topics of a co-partitioned unit are not those its snapshots were
    /// written with (an input added, removed or reordered, or co-partitioning switched).
    #[error("the snapshots of {snapshot_topic}/{partition} were written for inputs {recorded:?}, but the app now reads {configured:?} as one unit: a unit's inputs (and their order) cannot change under its state. Restore the previous input list, or start the new one under a new app id")]
    InputsChanged {
        /// The snapshot topic.
        snapshot_topic: String,
        /// The partition.
        partition: i32,
        /// The inputs the snapshots were written for (one: not co-partitioned).
        recorded: Vec<String>,
        /// The inputs the app reads now.
        configured: Vec<String>,
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
    #[error("replaying {topic}/{partition} offsets [{from_offset}, {to_offset}) gave {what} {actual:#018x}, but the same code (processor version {version}) recorded {expected:#018x}: either a non-deterministic processor (process() must depend only on the state and the record: no wall clock, randomness or HashMap iteration order), or new code deployed without a new Processor::version; if the change is intended, return a new number from Processor::version and restart")]
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
        /// `Processor::version` recorded, and running.
        version: u32,
    },
    /// [`Processor::migrate_state`](crate::Processor::migrate_state) failed to convert the
    /// state of an older full snapshot.
    #[error("migrating the state of {topic}/{partition} from processor version {from_version} to {to_version} failed: {source}")]
    StateMigration {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// Version that wrote the snapshot.
        from_version: u32,
        /// Running version.
        to_version: u32,
        /// What `migrate_state` returned.
        #[source]
        source: crate::BoxError,
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
    /// Input that this app had not processed yet was deleted under it (retention or
    /// DeleteRecords overtook a lagging partition).
    #[error("unprocessed input of {topic}/{partition} was deleted: this app's next record is at offset {position} but the log now starts at {log_start_offset}, so records [{position}, {log_start_offset}) were never processed; raise the topic's retention (retention.ms / retention.bytes) above the app's worst lag, or reset the app deliberately")]
    InputDeleted {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The next offset the app needed.
        position: i64,
        /// The partition's log start offset now.
        log_start_offset: i64,
    },
    /// The input ends before what this app already processed: the topic was deleted and
    /// recreated, or truncated (unclean leader election).
    #[error("input {topic}/{partition} ends at offset {log_end_offset}, but this app already processed it up to offset {needed_offset}: the topic was deleted and recreated or lost data (or its leader restarted and nothing was written to it for 30 s since, which leaves its high watermark behind); refusing to continue from a different log (reset the app deliberately if the topic was recreated on purpose)")]
    InputTruncated {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The offset the app's snapshot says comes next.
        needed_offset: i64,
        /// The partition's high watermark.
        log_end_offset: i64,
    },
    /// A recovery's reads of the snapshot partition no longer hold: another instance wrote to
    /// it meanwhile (this one was paused past its session timeout and lost the partition) or
    /// trimmed what it was reading. Retried: the next attempt reads the partition afresh.
    #[error("snapshot partition {topic}/{partition} changed while this instance recovered from it ({what}); another instance has probably taken the partition over: recovery starts over")]
    SnapshotChangedDuringRecovery {
        /// The snapshot topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// What changed.
        what: String,
    },
    /// The group has committed offsets for a partition whose snapshot topic holds nothing:
    /// starting from an empty state would reprocess input whose outputs already went out.
    #[error("group {group} has committed offset {committed_offset} for {topic}/{partition}, but snapshot partition {snapshot_topic}/{partition} holds no snapshot record: the app's state is missing (snapshot topic deleted or recreated?); starting from scratch would reprocess input and duplicate outputs downstream. To start over deliberately, delete the group's offsets (kafka-consumer-groups.sh --delete-offsets --group {group} --topic {topic}) and the snapshot topic; to keep state, restore the snapshot topic")]
    OffsetsWithoutSnapshots {
        /// The consumer group (the app id).
        group: String,
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The group's committed offset.
        committed_offset: i64,
        /// The snapshot topic that should hold the state.
        snapshot_topic: String,
    },
    /// A partition's transactions kept aborting without a single commit in between.
    #[error("{topic}/{partition} aborted {aborts} transactions in a row without committing one (producer {transactional_id}); the first failure was: {first_error}")]
    AbortBudgetExhausted {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The partition's transactional id.
        transactional_id: String,
        /// Aborts in a row.
        aborts: u32,
        /// The error that caused the first of them.
        first_error: String,
    },
    /// A partition worker panicked (in the processor, a format, or the framework).
    #[error("the worker of {topic}/{partition} panicked: {message}")]
    WorkerPanicked {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
        /// The panic message.
        message: String,
    },
    /// A partition worker's thread ended without reporting how.
    #[error("the worker of {topic}/{partition} ended without reporting an outcome")]
    WorkerLost {
        /// Input topic.
        topic: String,
        /// Input partition.
        partition: i32,
    },
    /// The group consumer hit an error it cannot recover from (authorization, a fenced static
    /// member, a fatal client error).
    #[error("the group consumer of {group} cannot go on: {source}; {fix}")]
    ConsumerFailed {
        /// The consumer group (the app id).
        group: String,
        /// The error librdkafka reported.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
        /// What to check.
        fix: String,
    },
    /// The cluster refused the connection: authentication, TLS, or a protocol mismatch.
    #[error("cannot connect to Kafka at {brokers}: {what} ({detail}); {fix}")]
    Connection {
        /// The bootstrap servers.
        brokers: String,
        /// What went wrong.
        what: String,
        /// librdkafka's description.
        detail: String,
        /// The settings to check.
        fix: String,
    },
    /// The app's principal lacks an ACL for what it was doing.
    #[error("not authorized: {context}: {source}; grant the app's principal that ACL (the README's Security section lists every ACL an app needs)")]
    NotAuthorized {
        /// What the app was doing, naming the resource (topic, group, transactional id).
        context: String,
        /// The broker's answer.
        #[source]
        source: Box<rdkafka::error::KafkaError>,
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
        matches!(
            self,
            Error::Kafka { .. }
                | Error::ReadStalled { .. }
                | Error::SnapshotChangedDuringRecovery { .. }
        )
    }

    /// A failed Kafka call; an authorization failure becomes [`Error::NotAuthorized`] (not
    /// transient: retrying cannot grant an ACL).
    pub(crate) fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        let context = context.into();
        if crate::security::authorization_code(&source).is_some() {
            return Error::NotAuthorized {
                context,
                source: Box::new(source),
            };
        }
        Error::Kafka {
            context,
            source: Box::new(source),
        }
    }
}

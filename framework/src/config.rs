//! Application configuration: a builder with sensible defaults, environment overrides and a
//! passthrough of every librdkafka property to the Kafka clients.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

/// What to do with an input record that fails to decode, or for which the processor returns an
/// error or panics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Stop the partition with an error naming topic, partition and offset; nothing past the
    /// record is committed. The default: bad input needs a human.
    #[default]
    Fail,
    /// Log the error, count it in [`MetricsSnapshot::records_skipped`](crate::MetricsSnapshot),
    /// and go on with the next record.
    Skip,
    /// Write the record (original key, value, headers, timestamp) plus `exactly.*` error headers
    /// to `topic`, inside the same transaction, and go on.
    DeadLetter {
        /// The dead-letter topic.
        topic: String,
    },
}

/// Where a partition without any snapshot starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The oldest retained record (default).
    #[default]
    Earliest,
    /// Only records produced after the partition was first assigned.
    Latest,
}

/// How instances of an app share partitions (the consumer group protocol).
///
/// Both are incremental: a rebalance revokes only the partitions that change owner. They
/// differ in what the partitions that stay go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupProtocol {
    /// KIP-848's consumer group protocol (`group.protocol=consumer`; Kafka 4.0 and later;
    /// default). The broker assigns partitions and each member reconciles on its own: the
    /// partitions that stay never notice a rebalance (measured by `rebalance-check`: no
    /// aborted transaction, no recovery). Session timeout and heartbeat interval are the
    /// broker's (`group.consumer.session.timeout.ms`, 45 s by default, which is how long a
    /// crashed instance's partitions wait for a new owner; lower it on the cluster, down to
    /// `group.consumer.min.session.timeout.ms`, for faster failover).
    #[default]
    Consumer,
    /// The classic protocol with the `cooperative-sticky` assignor: for brokers before 4.0,
    /// and when failover speed matters more than rebalance cost, since its session timeout is
    /// the client's (`session.timeout.ms`, 10 s by default here). Its weakness: every
    /// rebalance bumps the group generation, and the transactions that were sending offsets
    /// at that moment, on partitions that stay, are rejected (`ILLEGAL_GENERATION`), aborted
    /// and recovered.
    CooperativeSticky,
}

/// An invalid configuration, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting has a value that cannot work.
    #[error("invalid setting {setting} = {value:?}: {fix}")]
    Invalid {
        /// The setting (builder method or property name).
        setting: String,
        /// Its value.
        value: String,
        /// Why it cannot work and what to do.
        fix: String,
    },
    /// A librdkafka property that the framework manages itself was set through the passthrough.
    #[error("librdkafka property {property}={value:?} cannot be set: {fix}")]
    ManagedProperty {
        /// The property.
        property: String,
        /// The value given.
        value: String,
        /// Why the framework manages it and what to do instead.
        fix: String,
    },
    /// An `EXACTLY_*` environment variable could not be parsed.
    #[error("environment variable {name}={value:?} is invalid: {fix}")]
    Env {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// What was expected.
        fix: String,
    },
}

fn invalid(setting: &str, value: impl ToString, fix: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        value: value.to_string(),
        fix: fix.into(),
    }
}

/// Configuration of an exactly-once application.
///
/// ```
/// use std::time::Duration;
/// use exactly::{AppConfig, ErrorPolicy};
///
/// let config = AppConfig::new("payments-ledger", "broker-1:9092,broker-2:9092")
///     .input_topic("payments")
///     .commit_interval(Duration::from_millis(200))
///     .full_snapshot_every_records(50_000)
///     .error_policy(ErrorPolicy::DeadLetter { topic: "payments.dlq".into() })
///     // Any librdkafka property goes to every client (consumer, producers, admin):
///     .kafka("security.protocol", "SASL_PLAINTEXT")
///     .kafka("sasl.mechanisms", "PLAIN")
///     .kafka("sasl.username", "ledger")
///     .kafka("sasl.password", "secret");
/// config.validate().unwrap();
/// assert_eq!(config.snapshot_topic("payments"), "payments-ledger.payments.snapshots");
/// assert_eq!(config.transactional_id("payments", 3), "payments-ledger.payments.3");
/// // Safe to log: secrets are redacted.
/// let logged = format!("{config:?}");
/// assert!(logged.contains(r#""sasl.password": "<redacted>""#), "{logged}");
/// ```
///
/// [`validate`](Self::validate) (which [`App::new`](crate::App::new) calls) needs no broker, and
/// every error it returns says what to change:
///
/// ```
/// use std::time::Duration;
/// use exactly::{AppConfig, ConfigError};
///
/// // App ids become part of transactional ids and topic names: no '.' in them.
/// let err = AppConfig::new("payments.ledger", "localhost:9092")
///     .input_topic("payments")
///     .validate()
///     .unwrap_err();
/// assert!(matches!(&err, ConfigError::Invalid { setting, .. } if setting == "app id"));
///
/// // An open transaction must be committed well before the coordinator times it out.
/// let err = AppConfig::new("ledger", "localhost:9092")
///     .input_topic("payments")
///     .commit_interval(Duration::from_secs(40))
///     .validate()
///     .unwrap_err();
/// assert!(err.to_string().contains("at most half of transaction_timeout"), "{err}");
///
/// // Properties the framework owns are refused, naming what to use instead.
/// let err = AppConfig::new("ledger", "localhost:9092")
///     .input_topic("payments")
///     .kafka("transaction.timeout.ms", "30000")
///     .validate()
///     .unwrap_err();
/// assert!(matches!(err, ConfigError::ManagedProperty { .. }));
/// assert!(err.to_string().contains("AppConfig::transaction_timeout"), "{err}");
/// ```
///
/// # Environment overrides
///
/// [`from_env`](Self::from_env) applies these variables over what the builder set:
///
/// | variable | setting |
/// |---|---|
/// | `EXACTLY_APP_ID` | app id |
/// | `EXACTLY_BROKERS` (or `EXACTLY_BOOTSTRAP_SERVERS`) | bootstrap servers |
/// | `EXACTLY_INPUT_TOPICS` | comma-separated input topics |
/// | `EXACTLY_COMMIT_INTERVAL_MS` | [`commit_interval`](Self::commit_interval) |
/// | `EXACTLY_COMMIT_WHEN_IDLE_MS` | [`commit_when_idle`](Self::commit_when_idle) |
/// | `EXACTLY_GROUP_OFFSETS_INTERVAL_MS` | [`group_offsets_interval`](Self::group_offsets_interval) (0: every transaction) |
/// | `EXACTLY_MAX_BATCH_RECORDS` | [`max_batch_records`](Self::max_batch_records) |
/// | `EXACTLY_FULL_SNAPSHOT_EVERY_RECORDS` | [`full_snapshot_every_records`](Self::full_snapshot_every_records) |
/// | `EXACTLY_FULL_SNAPSHOT_INTERVAL_MS` | [`full_snapshot_interval`](Self::full_snapshot_interval) |
/// | `EXACTLY_MAX_RECOVERY_TIME_MS` | [`max_recovery_time`](Self::max_recovery_time) (0: no bound) |
/// | `EXACTLY_STUCK_INPUT_AFTER_MS` | [`stuck_input_after`](Self::stuck_input_after) (0: off) |
/// | `EXACTLY_METRICS_ADDR` | [`metrics_addr`](Self::metrics_addr), e.g. `0.0.0.0:9464` (empty: off) |
/// | `EXACTLY_FULL_SNAPSHOTS` | [`full_snapshots`](Self::full_snapshots) (`true`/`false`) |
/// | `EXACTLY_STATE_FINGERPRINT` | [`state_fingerprint`](Self::state_fingerprint) (`true`/`false`) |
/// | `EXACTLY_SNAPSHOT_TOPIC_PATTERN` | [`snapshot_topic_pattern`](Self::snapshot_topic_pattern) |
/// | `EXACTLY_SNAPSHOT_TRIMMING` | [`snapshot_trimming`](Self::snapshot_trimming) (`true`/`false`) |
/// | `EXACTLY_STATE_DIR` | [`state_dir`](Self::state_dir) |
/// | `EXACTLY_MAX_CHUNK_BYTES` | [`max_chunk_bytes`](Self::max_chunk_bytes) |
/// | `EXACTLY_ERROR_POLICY` | `fail`, `skip` or `dead-letter:<topic>` |
/// | `EXACTLY_AUTO_OFFSET_RESET` | `earliest` or `latest` |
/// | `EXACTLY_TRANSACTION_TIMEOUT_MS` | [`transaction_timeout`](Self::transaction_timeout) |
/// | `EXACTLY_MAX_BUFFERED_BYTES` | [`max_buffered_bytes`](Self::max_buffered_bytes) |
/// | `EXACTLY_MAX_CONSECUTIVE_ABORTS` | [`max_consecutive_aborts`](Self::max_consecutive_aborts) |
/// | `EXACTLY_GROUP_PROTOCOL` | [`group_protocol`](Self::group_protocol): `consumer` or `cooperative-sticky` |
/// | `EXACTLY_CO_PARTITIONED` | [`co_partitioned`](Self::co_partitioned): `true` or `false` |
/// | `EXACTLY_MAX_INPUT_IDLE_MS` | [`max_input_idle`](Self::max_input_idle) |
/// | `EXACTLY_INSTANCE_ID` | [`instance_id`](Self::instance_id) (empty: none) |
/// | `EXACTLY_KAFKA_<NAME>` | librdkafka property for every client: `<NAME>` lower-cased, `_` → `.` (`EXACTLY_KAFKA_SASL_MECHANISMS=PLAIN` sets `sasl.mechanisms`) |
/// | `EXACTLY_CONSUMER_KAFKA_<NAME>`, `EXACTLY_PRODUCER_KAFKA_<NAME>` | the same for the consumer / the producers only |
///
/// Unknown `EXACTLY_*` variables are logged (with the closest known name) and ignored; a value
/// that does not parse is an error naming the variable:
///
/// ```
/// use exactly::{AppConfig, ConfigError};
///
/// # // Start from a clean slate: the environment that runs the test may set EXACTLY_* itself.
/// # for (name, _) in std::env::vars_os() {
/// #     if name.to_string_lossy().starts_with("EXACTLY_") {
/// #         std::env::remove_var(name);
/// #     }
/// # }
/// // Set by the deployment, e.g. in a Kubernetes manifest:
/// std::env::set_var("EXACTLY_INPUT_TOPICS", "payments,refunds");
/// std::env::set_var("EXACTLY_ERROR_POLICY", "dead-letter:payments");
/// std::env::set_var("EXACTLY_KAFKA_SASL_PASSWORD", "hunter2");
///
/// let config = AppConfig::new("ledger", "localhost:9092").from_env().unwrap();
/// // The overrides took effect: the dead-letter topic is one of the input topics now.
/// let err = config.validate().unwrap_err();
/// assert!(err.to_string().contains("the dead-letter topic is an input topic"), "{err}");
/// assert!(!format!("{config:?}").contains("hunter2"));
///
/// std::env::set_var("EXACTLY_COMMIT_INTERVAL_MS", "soon");
/// let err = AppConfig::new("ledger", "localhost:9092").from_env().unwrap_err();
/// assert!(matches!(&err, ConfigError::Env { name, .. } if name == "EXACTLY_COMMIT_INTERVAL_MS"));
/// ```
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub(crate) app_id: String,
    pub(crate) bootstrap_servers: String,
    pub(crate) input_topics: Vec<String>,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_when_idle: Duration,
    pub(crate) group_offsets_interval: Duration,
    pub(crate) max_batch_records: usize,
    pub(crate) full_snapshot_every_records: u64,
    pub(crate) full_snapshot_interval: Duration,
    pub(crate) max_recovery_time: Option<Duration>,
    pub(crate) stuck_input_after: Duration,
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    pub(crate) full_snapshots: bool,
    pub(crate) state_fingerprint: bool,
    pub(crate) snapshot_topic_pattern: String,
    pub(crate) snapshot_trimming: bool,
    pub(crate) state_dir: std::path::PathBuf,
    pub(crate) max_chunk_bytes: usize,
    pub(crate) error_policy: ErrorPolicy,
    pub(crate) auto_offset_reset: StartFrom,
    pub(crate) transaction_timeout: Duration,
    pub(crate) group_protocol: GroupProtocol,
    pub(crate) co_partitioned: bool,
    pub(crate) max_input_idle: Duration,
    pub(crate) instance_id: Option<String>,
    pub(crate) max_consecutive_aborts: u32,
    pub(crate) max_buffered_bytes: usize,
    /// Passthrough for every client, then per client (the per-client value wins).
    pub(crate) kafka: Properties,
    pub(crate) consumer_kafka: Properties,
    pub(crate) producer_kafka: Properties,
}

/// librdkafka properties passed through, whose `Debug` hides secrets: an `AppConfig` printed in a
/// log line or an error must not show a password or key material.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct Properties(BTreeMap<String, String>);

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let shown: &dyn fmt::Debug = if is_secret(name) {
                    &"<redacted>"
                } else {
                    value
                };
                (name, shown)
            }))
            .finish()
    }
}

/// Whether a librdkafka property holds a secret: passwords, client secrets, private keys (PEM),
/// and the OAUTHBEARER config string (which may embed credentials).
pub(crate) fn is_secret(property: &str) -> bool {
    let p = property.to_ascii_lowercase();
    p.contains("password")
        || p.contains("secret")
        || p.contains("pem")
        || p == "sasl.oauthbearer.config"
}

/// Default of [`AppConfig::snapshot_topic_pattern`].
pub const DEFAULT_SNAPSHOT_TOPIC_PATTERN: &str = "{app}.{topic}.snapshots";

/// Bytes a snapshot chunk's envelope (ids, offsets, checksums, record overhead) may add on top
/// of its data; keeps chunks below `message.max.bytes`.
const CHUNK_ENVELOPE_ALLOWANCE: usize = 4096;

/// `session.timeout.ms` of the classic protocol unless set: a crashed instance's partitions move
/// on after this long (librdkafka's own default is 45 s; brokers accept 6 s and more by default).
const DEFAULT_SESSION_TIMEOUT_MS: u64 = 10_000;
/// `heartbeat.interval.ms` of the classic protocol unless set (well below a third of the session
/// timeout).
const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1_000;
/// The broker's default `group.consumer.session.timeout.ms` (KIP-848).
const KIP848_DEFAULT_SESSION_TIMEOUT_MS: u64 = 45_000;

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

impl AppConfig {
    /// A configuration for application `app_id` (also the consumer group id and the prefix of
    /// transactional ids and snapshot topics) connecting to `bootstrap_servers`
    /// (comma-separated `host:port`).
    pub fn new(app_id: impl Into<String>, bootstrap_servers: impl Into<String>) -> Self {
        AppConfig {
            app_id: app_id.into(),
            bootstrap_servers: bootstrap_servers.into(),
            input_topics: Vec::new(),
            commit_interval: Duration::from_millis(100),
            commit_when_idle: Duration::from_millis(20),
            group_offsets_interval: Duration::from_secs(1),
            max_batch_records: 10_000,
            full_snapshot_every_records: 100_000,
            full_snapshot_interval: Duration::from_secs(60),
            max_recovery_time: None,
            stuck_input_after: Duration::from_secs(300),
            metrics_addr: None,
            full_snapshots: true,
            state_fingerprint: true,
            snapshot_topic_pattern: DEFAULT_SNAPSHOT_TOPIC_PATTERN.to_owned(),
            snapshot_trimming: true,
            state_dir: std::env::temp_dir().join("exactly-state"),
            max_chunk_bytes: 512 * 1024,
            error_policy: ErrorPolicy::Fail,
            auto_offset_reset: StartFrom::Earliest,
            transaction_timeout: Duration::from_secs(60),
            group_protocol: GroupProtocol::default(),
            co_partitioned: false,
            max_input_idle: Duration::ZERO,
            instance_id: None,
            max_consecutive_aborts: 10,
            max_buffered_bytes: 16 * 1024 * 1024,
            kafka: Properties::default(),
            consumer_kafka: Properties::default(),
            producer_kafka: Properties::default(),
        }
    }

    /// The input topics whose partition p forms one unit of work with `topic`'s partition p:
    /// every input when co-partitioned (the first one naming the unit), else `topic` alone.
    pub(crate) fn unit_inputs(&self, topic: &str) -> Vec<String> {
        if self.co_partitioned {
            self.input_topics.clone()
        } else {
            vec![topic.to_owned()]
        }
    }

    /// Adds an input topic.
    pub fn input_topic(mut self, topic: impl Into<String>) -> Self {
        self.input_topics.push(topic.into());
        self
    }

    /// Adds several input topics.
    pub fn input_topics<I, S>(mut self, topics: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.input_topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Longest time a transaction stays open collecting records (default 100 ms). Lower =
    /// lower end-to-end latency, more transactions.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// A transaction also commits before [`commit_interval`](Self::commit_interval) once it
    /// has been open this long and no more input of its partition is waiting (default 20 ms).
    /// At low input rates the end-to-end latency is then about the commit's own, not the
    /// interval's; under load the input keeps coming and batches still fill up to
    /// `commit_interval`. Idle commits cost more transactions at low rates (in the bench's
    /// chain at 1 000 commands/s, 2.5 times as many; the median end-to-end latency fell by
    /// 40 %). Set it to `commit_interval` (or more) to always wait the full interval, e.g.
    /// with many partitions at low rates, where every transaction costs the brokers.
    pub fn commit_when_idle(mut self, after: Duration) -> Self {
        self.commit_when_idle = after;
        self
    }

    /// How often a partition's transaction also commits the consumer group's offsets
    /// (default 1 s; zero: every transaction).
    ///
    /// The snapshot topic, not the group, says where a partition resumes, so the group's
    /// offsets only serve lag tools (`exactly inspect` reads the snapshots). Sent with every
    /// transaction they cost two more requests to the brokers (AddOffsetsToTxn,
    /// TxnOffsetCommit) and a marker on the group's `__consumer_offsets` partition, which
    /// every partition of the app shares: in the bench's chain at 1 000 commands/s, sending
    /// them with every transaction doubled the median commit and end-to-end latency. A
    /// transaction sends them once this long has passed since the last did, a partition that
    /// goes quiet sends them in a small transaction of their own after one
    /// [`commit_interval`](Self::commit_interval), and the last transaction before a partition
    /// is released always does (a recovered partition, whose last owner may have died before
    /// it sent them, counts as not having sent them): the group's offsets trail the processed
    /// input by at most about this long.
    pub fn group_offsets_interval(mut self, interval: Duration) -> Self {
        self.group_offsets_interval = interval;
        self
    }

    /// Most input records per transaction (default 10 000).
    pub fn max_batch_records(mut self, records: usize) -> Self {
        self.max_batch_records = records;
        self
    }

    /// Write a full snapshot after this many records since the last one (default 100 000;
    /// 0 = never by count). Bounds how many records recovery replays.
    pub fn full_snapshot_every_records(mut self, records: u64) -> Self {
        self.full_snapshot_every_records = records;
        self
    }

    /// Write a full snapshot at least this often while records arrive (default 60 s;
    /// `Duration::ZERO` = never by time).
    pub fn full_snapshot_interval(mut self, interval: Duration) -> Self {
        self.full_snapshot_interval = interval;
        self
    }

    /// Bounds how long recovering a partition takes (default: no bound). Recovery loads the
    /// latest full snapshot and replays the input since; the runtime measures what processing
    /// those records cost (and what the last full snapshot cost to write, for loading it) and
    /// writes a full snapshot as soon as that estimate reaches half the bound, on top of the
    /// [`full_snapshot_every_records`](Self::full_snapshot_every_records) and
    /// [`full_snapshot_interval`](Self::full_snapshot_interval) triggers. The other half is left
    /// for fencing, finding the latest record, fetching and the estimate's error.
    pub fn max_recovery_time(mut self, bound: Duration) -> Self {
        self.max_recovery_time = Some(bound);
        self
    }

    /// How long an input partition's last stable offset may stand below its high watermark
    /// before it counts as stuck (default 5 minutes; `Duration::ZERO` turns the watch off).
    /// A read_committed consumer sees nothing past an open transaction: a producer upstream
    /// that left one open (a "hanging transaction") stops the partition without an error. A
    /// stuck partition is logged with the stuck offset and the `kafka-transactions.sh` commands
    /// that resolve it, and counted in
    /// [`MetricsSnapshot::stuck_input_partitions`](crate::MetricsSnapshot::stuck_input_partitions).
    /// Keep it above the longest transaction your producers legitimately hold open.
    pub fn stuck_input_after(mut self, after: Duration) -> Self {
        self.stuck_input_after = after;
        self
    }

    /// Serve Prometheus metrics at `http://<addr>/metrics` while the app runs (default: off).
    /// Port 0 picks a free port; [`App::metrics_addr`](crate::App::metrics_addr) tells which.
    /// The series: per input partition lag (records), records processed (a counter: `rate()`
    /// gives records/s), assignment, recovery state and progress (chunks or offsets done of
    /// total, snapshot bytes loaded, estimated seconds left) and last full snapshot size; the
    /// transaction commit latency and full snapshot duration histograms; aborts by cause; and
    /// every counter of [`MetricsSnapshot`](crate::MetricsSnapshot).
    ///
    /// ```
    /// let config = exactly::AppConfig::new("ledger", "localhost:9092")
    ///     .input_topic("payments")
    ///     .metrics_addr("0.0.0.0:9464".parse().unwrap());
    /// # config.validate().unwrap();
    /// ```
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Whether to write full snapshots at all (default true). With `false`, recovery replays
    /// every input record from where the partition started.
    pub fn full_snapshots(mut self, enabled: bool) -> Self {
        self.full_snapshots = enabled;
        self
    }

    /// Whether to fingerprint the state and check it after recovery (default true). The check
    /// catches non-deterministic processors. A fingerprint walks the whole state: it is taken
    /// with every transaction while it takes at most a tenth of the
    /// [`commit_interval`](Self::commit_interval), else only with full snapshots (logged once;
    /// recovery then checks record counts and output digests).
    pub fn state_fingerprint(mut self, enabled: bool) -> Self {
        self.state_fingerprint = enabled;
        self
    }

    /// Name of the snapshot topic of each input topic; `{app}` and `{topic}` are replaced
    /// (default `"{app}.{topic}.snapshots"`). Must contain `{topic}`.
    pub fn snapshot_topic_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.snapshot_topic_pattern = pattern.into();
        self
    }

    /// Whether to delete what lies below each committed full snapshot on the snapshot topic
    /// (default true): older snapshots, the incremental records that point at them, chunks of
    /// attempts cut short. Recovery never reads them; without trimming a snapshot topic grows by
    /// a full snapshot per [`full_snapshot_interval`](Self::full_snapshot_interval), forever.
    /// Needs DELETE on the snapshot topics (`DeleteRecords`); a failed trim is logged and the
    /// next full snapshot trims again. Turn it off to keep the history, e.g. for debugging.
    pub fn snapshot_trimming(mut self, enabled: bool) -> Self {
        self.snapshot_trimming = enabled;
        self
    }

    /// Where partitions keep their [`Store`](crate::Store)s: RocksDB databases in
    /// `<state_dir>/<app id>/<topic>-<partition>` (default `<temp dir>/exactly-state`, like
    /// Kafka Streams' `state.dir`). Local state is a cache of what Kafka holds: after a crash
    /// or restart on the same machine a partition resumes from it and replays only the input
    /// since its last commit; without it (a new machine, a wiped disk) the partition restores
    /// its stores from their full snapshot on Kafka. Give each instance on one machine its
    /// own directory. Apps whose state holds no `Store` never create it.
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// Largest piece of serialized state per snapshot record (default 512 KiB). Must stay below
    /// the broker's and the producer's `message.max.bytes` with some margin.
    pub fn max_chunk_bytes(mut self, bytes: usize) -> Self {
        self.max_chunk_bytes = bytes;
        self
    }

    /// What to do with records that fail (default [`ErrorPolicy::Fail`]).
    pub fn error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.error_policy = policy;
        self
    }

    /// Where a partition without any snapshot starts (default [`StartFrom::Earliest`]).
    pub fn auto_offset_reset(mut self, start: StartFrom) -> Self {
        self.auto_offset_reset = start;
        self
    }

    /// `transaction.timeout.ms` of the producers (default 60 s): a transaction of a crashed
    /// instance is aborted by the broker after this long. `message.timeout.ms` is derived below
    /// it (90 %) unless set through [`kafka`](Self::kafka).
    pub fn transaction_timeout(mut self, timeout: Duration) -> Self {
        self.transaction_timeout = timeout;
        self
    }

    /// How many transactions of one partition may abort in a row, without a commit in
    /// between, before the partition fails with the first of their errors (default 10; with
    /// the backoff between attempts, about half a minute). An abort that keeps coming back (a
    /// record larger than the output topic allows, a compacted output topic refusing a null
    /// key, a missing ACL) is not a passing fault.
    pub fn max_consecutive_aborts(mut self, aborts: u32) -> Self {
        self.max_consecutive_aborts = aborts;
        self
    }

    /// Bytes of fetched records the runtime buffers for one partition — queued for its worker
    /// and held while the worker is busy — before it pauses fetching that partition (default
    /// 16 MiB; at most 2 048 queued and 16 384 held records either way). Bounds memory per
    /// partition beyond what librdkafka itself prefetches; a record larger than the bound
    /// still passes, one at a time. The peak is in
    /// [`MetricsSnapshot::max_buffered_bytes`](crate::MetricsSnapshot::max_buffered_bytes).
    pub fn max_buffered_bytes(mut self, bytes: usize) -> Self {
        self.max_buffered_bytes = bytes;
        self
    }

    /// Whether the input topics are *co-partitioned* (default `false`): then partition p of
    /// every input topic forms one unit of work, with one state, one transactional producer
    /// and one snapshot partition (all named after the first input topic), and the processor
    /// sees the records of all of them, in timestamp order when every input has some
    /// ([`Record::topic`](crate::Record::topic) tells which). The inputs must have the same
    /// number of partitions and be partitioned by the same key (checked, the first at start-up);
    /// the consumer then uses the range assignor, which gives partition p of every input to
    /// one instance. Otherwise every input partition is a unit of its own.
    pub fn co_partitioned(mut self, co_partitioned: bool) -> Self {
        self.co_partitioned = co_partitioned;
        self
    }

    /// In a co-partitioned unit, how long a record waits for every other input to have a
    /// record too, so that it goes in timestamp order with theirs (default 0: a record whose
    /// other inputs have nothing waiting goes at once, like Kafka Streams' `max.task.idle.ms`
    /// of 0). Longer waits order records of inputs that lag behind each other better, at the
    /// cost of that much latency while an input is idle. Whatever order results is recorded
    /// with the transaction and replayed exactly.
    pub fn max_input_idle(mut self, wait: Duration) -> Self {
        self.max_input_idle = wait;
        self
    }

    /// How instances share partitions (default [`GroupProtocol::Consumer`], Kafka 4.0+).
    pub fn group_protocol(mut self, protocol: GroupProtocol) -> Self {
        self.group_protocol = protocol;
        self
    }

    /// Makes this instance a static member of the group (`group.instance.id`, KIP-345): an id
    /// that stays the same across restarts of *this* instance and that no other instance uses,
    /// such as a StatefulSet pod name (`EXACTLY_INSTANCE_ID=$(HOSTNAME)`). Unset by default.
    ///
    /// What it changes when the instance restarts:
    ///
    /// | | [`GroupProtocol::CooperativeSticky`] | [`GroupProtocol::Consumer`] |
    /// |---|---|---|
    /// | restart after `kill -9` | takes its partitions back at once (no session timeout, no rebalance) | waits, rejoining, until the broker's session timeout releases the id (45 s by default) |
    /// | restart after a clean stop | its partitions moved to the others and come back | its partitions wait for it, for up to the session timeout, and do not move |
    /// | stop for good (scale in) | partitions move at once | partitions wait the session timeout before they move |
    ///
    /// So a `kill -9` + restart resumes in seconds with the classic protocol and an instance
    /// id. Two running instances with the same id are an error: with the classic protocol the
    /// older one stops (`FENCED_INSTANCE_ID`), with the consumer protocol the newer one stops
    /// after waiting one session timeout (`UNRELEASED_INSTANCE_ID`).
    ///
    /// ```
    /// use exactly::{AppConfig, GroupProtocol};
    ///
    /// let config = AppConfig::new("ledger", "localhost:9092")
    ///     .input_topic("payments")
    ///     .group_protocol(GroupProtocol::CooperativeSticky)
    ///     .instance_id("ledger-0");
    /// config.validate().unwrap();
    /// ```
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Sets a librdkafka property on every client: consumer, producers and admin client
    /// (`security.protocol`, `sasl.*`, `ssl.*`, `socket.timeout.ms`, ...). See librdkafka's
    /// CONFIGURATION.md. Wins over the framework's defaults.
    pub fn kafka(mut self, property: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.insert(property.into(), value.into());
        self
    }

    /// Sets a librdkafka property on the consumer only (wins over [`kafka`](Self::kafka)).
    pub fn consumer_kafka(mut self, property: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_kafka.insert(property.into(), value.into());
        self
    }

    /// Sets a librdkafka property on the transactional producers only (wins over
    /// [`kafka`](Self::kafka)).
    pub fn producer_kafka(mut self, property: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_kafka.insert(property.into(), value.into());
        self
    }

    /// Applies the `EXACTLY_*` environment variables (see the table above) over this
    /// configuration.
    pub fn from_env(self) -> Result<Self, ConfigError> {
        self.apply_env(std::env::vars_os().filter_map(|(k, v)| {
            // Non-UTF-8 variables cannot be ours; skip them rather than fail on foreign ones.
            Some((k.into_string().ok()?, v.into_string().ok()?))
        }))
    }

    /// [`from_env`](Self::from_env) over an explicit list of variables (testable without
    /// touching the process environment).
    pub(crate) fn apply_env<I>(mut self, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        for (name, value) in vars {
            let Some(setting) = name.strip_prefix("EXACTLY_") else {
                continue;
            };
            let env_err = |fix: &str| ConfigError::Env {
                name: name.clone(),
                value: value.clone(),
                fix: fix.to_owned(),
            };
            let ms = || {
                value
                    .trim()
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| env_err("expected a whole number of milliseconds"))
            };
            let number = || {
                value
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| env_err("expected a non-negative whole number"))
            };
            let flag = || match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(env_err("expected true or false")),
            };
            if let Some(property) = setting.strip_prefix("KAFKA_") {
                self.kafka.insert(env_property(property), value.clone());
                continue;
            }
            if let Some(property) = setting.strip_prefix("CONSUMER_KAFKA_") {
                self.consumer_kafka
                    .insert(env_property(property), value.clone());
                continue;
            }
            if let Some(property) = setting.strip_prefix("PRODUCER_KAFKA_") {
                self.producer_kafka
                    .insert(env_property(property), value.clone());
                continue;
            }
            match setting {
                "APP_ID" => self.app_id = value.trim().to_owned(),
                "BROKERS" | "BOOTSTRAP_SERVERS" => self.bootstrap_servers = value.trim().to_owned(),
                "INPUT_TOPICS" => {
                    self.input_topics = value
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "COMMIT_INTERVAL_MS" => self.commit_interval = ms()?,
                "COMMIT_WHEN_IDLE_MS" => self.commit_when_idle = ms()?,
                "GROUP_OFFSETS_INTERVAL_MS" => self.group_offsets_interval = ms()?,
                "MAX_BATCH_RECORDS" => {
                    self.max_batch_records =
                        usize::try_from(number()?).map_err(|_| env_err("number too large"))?
                }
                "FULL_SNAPSHOT_EVERY_RECORDS" => self.full_snapshot_every_records = number()?,
                "FULL_SNAPSHOT_INTERVAL_MS" => self.full_snapshot_interval = ms()?,
                "FULL_SNAPSHOTS" => self.full_snapshots = flag()?,
                "STUCK_INPUT_AFTER_MS" => self.stuck_input_after = ms()?,
                "METRICS_ADDR" => {
                    let v = value.trim();
                    self.metrics_addr = if v.is_empty() {
                        None
                    } else {
                        Some(v.parse().map_err(|_| {
                            env_err("expected a socket address such as 0.0.0.0:9464 or 127.0.0.1:0")
                        })?)
                    };
                }
                "MAX_RECOVERY_TIME_MS" => {
                    let bound = ms()?;
                    self.max_recovery_time = (!bound.is_zero()).then_some(bound);
                }
                "STATE_FINGERPRINT" => self.state_fingerprint = flag()?,
                "SNAPSHOT_TOPIC_PATTERN" => self.snapshot_topic_pattern = value.trim().to_owned(),
                "SNAPSHOT_TRIMMING" => self.snapshot_trimming = flag()?,
                "STATE_DIR" => {
                    if value.trim().is_empty() {
                        return Err(env_err("expected a directory"));
                    }
                    self.state_dir = value.trim().into();
                }
                "MAX_CHUNK_BYTES" => {
                    self.max_chunk_bytes =
                        usize::try_from(number()?).map_err(|_| env_err("number too large"))?
                }
                "ERROR_POLICY" => {
                    let v = value.trim();
                    let lower = v.to_ascii_lowercase();
                    self.error_policy = if lower == "fail" {
                        ErrorPolicy::Fail
                    } else if lower == "skip" {
                        ErrorPolicy::Skip
                    } else if let Some((kind, topic)) = v.split_once(':') {
                        if !matches!(
                            kind.to_ascii_lowercase().as_str(),
                            "dead-letter" | "dead_letter" | "deadletter"
                        ) || topic.trim().is_empty()
                        {
                            return Err(env_err("expected fail, skip or dead-letter:<topic>"));
                        }
                        ErrorPolicy::DeadLetter {
                            topic: topic.trim().to_owned(),
                        }
                    } else {
                        return Err(env_err("expected fail, skip or dead-letter:<topic>"));
                    };
                }
                "AUTO_OFFSET_RESET" => {
                    self.auto_offset_reset = match value.trim().to_ascii_lowercase().as_str() {
                        "earliest" => StartFrom::Earliest,
                        "latest" => StartFrom::Latest,
                        _ => return Err(env_err("expected earliest or latest")),
                    }
                }
                "TRANSACTION_TIMEOUT_MS" => self.transaction_timeout = ms()?,
                "MAX_BUFFERED_BYTES" => {
                    self.max_buffered_bytes = usize::try_from(number()?)
                        .map_err(|_| env_err("expected a number of bytes"))?
                }
                "MAX_CONSECUTIVE_ABORTS" => {
                    self.max_consecutive_aborts = u32::try_from(number()?)
                        .map_err(|_| env_err("expected a number below 2^32"))?
                }
                "GROUP_PROTOCOL" => {
                    self.group_protocol = match value.trim().to_ascii_lowercase().as_str() {
                        "cooperative-sticky" | "classic" => GroupProtocol::CooperativeSticky,
                        "consumer" => GroupProtocol::Consumer,
                        _ => return Err(env_err("expected cooperative-sticky or consumer")),
                    }
                }
                "MAX_INPUT_IDLE_MS" => self.max_input_idle = ms()?,
                "CO_PARTITIONED" => {
                    self.co_partitioned = match value.trim().to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(env_err("expected true or false")),
                    }
                }
                "INSTANCE_ID" => {
                    let id = value.trim();
                    self.instance_id = (!id.is_empty()).then(|| id.to_owned());
                }
                _ => {
                    // Not fatal: other EXACTLY_* variables may belong to the application or
                    // its tests; but a typo would silently leave a setting at its default.
                    let closest = format!("EXACTLY_{}", closest_setting(setting));
                    tracing::warn!(variable = %name, closest = %closest, "ignoring an unknown EXACTLY_* environment variable; did you mean the closest one?");
                }
            }
        }
        Ok(self)
    }

    /// Checks that the configuration can work; every error says what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name("app id", &self.app_id)?;
        if let Some(id) = &self.instance_id {
            validate_name("instance id", id)?;
        }
        if self.app_id.contains('.') {
            return Err(invalid(
                "app id",
                &self.app_id,
                "must not contain '.': transactional ids and snapshot topics are <app>.<topic>..., so app \"a.b\" reading topic \"c\" and app \"a\" reading topic \"b.c\" would share them (and fence each other); use '-' or '_' instead",
            ));
        }
        if self.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                "bootstrap servers",
                &self.bootstrap_servers,
                "give at least one host:port (AppConfig::new or EXACTLY_BROKERS)",
            ));
        }
        if self.input_topics.is_empty() {
            return Err(invalid(
                "input topics",
                "",
                "add at least one with AppConfig::input_topic or EXACTLY_INPUT_TOPICS",
            ));
        }
        for (i, topic) in self.input_topics.iter().enumerate() {
            validate_name("input topic", topic)?;
            if self.input_topics[..i].contains(topic) {
                return Err(invalid(
                    "input topics",
                    topic,
                    "topic listed twice; list each input topic once",
                ));
            }
        }
        if !self.snapshot_topic_pattern.contains("{topic}") {
            return Err(invalid(
                "snapshot_topic_pattern",
                &self.snapshot_topic_pattern,
                "must contain {topic}: every input topic needs its own, partition-aligned snapshot topic",
            ));
        }
        for topic in &self.input_topics {
            let snapshots = self.snapshot_topic(topic);
            validate_name("snapshot topic", &snapshots)?;
            if self.input_topics.contains(&snapshots) {
                return Err(invalid(
                    "snapshot_topic_pattern",
                    &self.snapshot_topic_pattern,
                    format!("snapshot topic {snapshots:?} is also an input topic"),
                ));
            }
        }
        if let ErrorPolicy::DeadLetter { topic } = &self.error_policy {
            validate_name("dead-letter topic", topic)?;
            if self.input_topics.contains(topic) {
                return Err(invalid(
                    "error_policy",
                    topic,
                    "the dead-letter topic is an input topic: failed records would be read again; use another topic",
                ));
            }
        }
        if self.max_consecutive_aborts == 0 {
            return Err(invalid(
                "max_consecutive_aborts",
                0,
                "must be at least 1 (a single abort is a normal event: a rebalance, a broker failover)",
            ));
        }
        if self.max_batch_records == 0 {
            return Err(invalid("max_batch_records", 0, "must be at least 1"));
        }
        if self.transaction_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "transaction_timeout",
                format!("{:?}", self.transaction_timeout),
                "must be at least 1 s (and below the broker's transaction.max.timeout.ms, 15 min by default)",
            ));
        }
        if self.commit_interval.is_zero()
            || self
                .commit_interval
                .checked_mul(2)
                .is_none_or(|twice| twice > self.transaction_timeout)
        {
            return Err(invalid(
                "commit_interval",
                format!("{:?}", self.commit_interval),
                format!(
                    "must be above zero and at most half of transaction_timeout ({:?}), or open transactions time out",
                    self.transaction_timeout
                ),
            ));
        }
        if self.max_chunk_bytes < 1024 {
            return Err(invalid(
                "max_chunk_bytes",
                self.max_chunk_bytes,
                "must be at least 1024 bytes",
            ));
        }
        self.validate_passthrough()?;
        let message_max = self.producer_property("message.max.bytes");
        let message_max_bytes = match message_max {
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map_err(|_| invalid("message.max.bytes", v, "must be a whole number of bytes"))?,
            None => LIBRDKAFKA_DEFAULT_MESSAGE_MAX_BYTES,
        };
        if self.max_chunk_bytes + CHUNK_ENVELOPE_ALLOWANCE > message_max_bytes {
            return Err(invalid(
                "max_chunk_bytes",
                self.max_chunk_bytes,
                format!(
                    "snapshot chunks would not fit the producer's message.max.bytes ({message_max_bytes}); lower max_chunk_bytes to at most {} or raise message.max.bytes (on the broker too)",
                    message_max_bytes.saturating_sub(CHUNK_ENVELOPE_ALLOWANCE)
                ),
            ));
        }
        if let Some(v) = self.producer_property("message.timeout.ms") {
            let ms = v.trim().parse::<u64>().map_err(|_| {
                invalid(
                    "message.timeout.ms",
                    v,
                    "must be a whole number of milliseconds",
                )
            })?;
            if u128::from(ms) >= self.transaction_timeout.as_millis() {
                return Err(invalid(
                    "message.timeout.ms",
                    v,
                    format!(
                        "must be below transaction_timeout ({} ms): a record still in flight when the transaction times out is lost to it; lower it or leave it unset",
                        self.transaction_timeout.as_millis()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_passthrough(&self) -> Result<(), ConfigError> {
        let maps = [&self.kafka, &self.consumer_kafka, &self.producer_kafka];
        for (property, value) in maps.iter().flat_map(|m| m.iter()) {
            let managed = |fix: &str| {
                Err(ConfigError::ManagedProperty {
                    property: property.clone(),
                    value: value.clone(),
                    fix: fix.to_owned(),
                })
            };
            let v = value.trim().to_ascii_lowercase();
            match property.as_str() {
                "transactional.id" => {
                    return managed("exactly sets it per input partition (<app>.<topic>.<partition>) to fence zombies; remove it")
                }
                "group.id" => return managed("the consumer group id is the app id; change the app id instead"),
                "transaction.timeout.ms" => {
                    return managed("use AppConfig::transaction_timeout (EXACTLY_TRANSACTION_TIMEOUT_MS)")
                }
                "isolation.level" if v != "read_committed" => {
                    return managed("exactly-once needs read_committed (aborted records must stay invisible); remove it")
                }
                "enable.auto.commit" if v != "false" => {
                    return managed("offsets are committed inside each transaction; remove it")
                }
                "enable.auto.offset.store" if v != "false" => {
                    return managed("offsets are committed inside each transaction; remove it")
                }
                "enable.idempotence" if v != "true" => {
                    return managed("transactional producers are idempotent; remove it")
                }
                "auto.offset.reset" => {
                    return managed("the group consumer never resets on its own (a position out of range is a retention-gap error); where a partition without snapshots starts is AppConfig::auto_offset_reset (EXACTLY_AUTO_OFFSET_RESET)")
                }
                "group.protocol" => {
                    return managed("use AppConfig::group_protocol (EXACTLY_GROUP_PROTOCOL)")
                }
                "group.instance.id" => {
                    return managed("use AppConfig::instance_id (EXACTLY_INSTANCE_ID)")
                }
                "partition.assignment.strategy" | "session.timeout.ms" | "heartbeat.interval.ms"
                    if self.group_protocol == GroupProtocol::Consumer =>
                {
                    return managed("with the consumer group protocol the broker owns this setting (group.consumer.* broker configs, or the group's own configs); remove it")
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The app id (consumer group id, prefix of transactional ids and snapshot topics).
    pub fn app_id(&self) -> &str {
        &self.app_id
    }

    /// The bootstrap servers.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The snapshot topic of `input_topic`.
    pub fn snapshot_topic(&self, input_topic: &str) -> String {
        self.snapshot_topic_pattern
            .replace("{app}", &self.app_id)
            .replace("{topic}", input_topic)
    }

    /// The transactional id of the producer that owns `input_topic`/`partition`:
    /// `<app>.<topic>.<partition>`.
    pub fn transactional_id(&self, input_topic: &str, partition: i32) -> String {
        format!("{}.{}.{}", self.app_id, input_topic, partition)
    }

    /// The effective `message.timeout.ms` of the producers: set explicitly, or 90 % of the
    /// transaction timeout.
    fn message_timeout_ms(&self) -> String {
        match self.producer_property("message.timeout.ms") {
            Some(v) => v.to_owned(),
            None => (self.transaction_timeout.as_millis() * 9 / 10)
                .max(1)
                .to_string(),
        }
    }

    /// A passthrough property as the producers see it (per-producer value wins).
    fn producer_property(&self, property: &str) -> Option<&str> {
        self.producer_kafka
            .get(property)
            .or_else(|| self.kafka.get(property))
            .map(String::as_str)
    }

    /// Configuration of the input consumer. `group`: join the app's consumer group (the main
    /// consumer); without it, a group-less consumer for reading snapshot partitions by
    /// assignment.
    pub(crate) fn consumer_config(&self, group: bool) -> ClientConfig {
        // Distinct client ids tell the group consumer from snapshot readers in broker logs
        // and quotas.
        let client_id = if group {
            format!("exactly-{}", self.app_id)
        } else {
            format!("exactly-{}-reader", self.app_id)
        };
        let mut c = self.client(&client_id);
        c.set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
        if group {
            // The worker always seeks; a position out of range means retention deleted input
            // that was never processed, which must be an error, never a silent jump.
            c.set("group.id", &self.app_id)
                .set("auto.offset.reset", "error")
                .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
            if let Some(id) = &self.instance_id {
                c.set("group.instance.id", id);
            }
            match self.group_protocol {
                // Co-partitioned inputs: the range assignor gives partition p of every input to
                // one member.
                GroupProtocol::CooperativeSticky if self.co_partitioned => {
                    c.set("partition.assignment.strategy", "range")
                        .set("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS.to_string())
                        .set(
                            "heartbeat.interval.ms",
                            DEFAULT_HEARTBEAT_INTERVAL_MS.to_string(),
                        );
                }
                GroupProtocol::CooperativeSticky => {
                    c.set("partition.assignment.strategy", "cooperative-sticky")
                        .set("session.timeout.ms", DEFAULT_SESSION_TIMEOUT_MS.to_string())
                        .set(
                            "heartbeat.interval.ms",
                            DEFAULT_HEARTBEAT_INTERVAL_MS.to_string(),
                        );
                }
                GroupProtocol::Consumer => {
                    c.set("group.protocol", "consumer");
                    if self.co_partitioned {
                        c.set("group.remote.assignor", "range");
                    }
                }
            }
        } else {
            c.set(
                "auto.offset.reset",
                match self.auto_offset_reset {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        }
        apply(&mut c, &self.kafka);
        apply(&mut c, &self.consumer_kafka);
        c
    }

    /// The largest record the framework writes to a snapshot topic: a chunk plus its envelope.
    pub(crate) fn snapshot_record_max_bytes(&self) -> usize {
        self.max_chunk_bytes + CHUNK_ENVELOPE_ALLOWANCE
    }

    /// The group's session timeout as this instance sees it: how long a member that stopped
    /// heartbeating keeps its partitions.
    pub(crate) fn session_timeout(&self) -> Duration {
        let configured = self
            .consumer_kafka
            .get("session.timeout.ms")
            .or_else(|| self.kafka.get("session.timeout.ms"))
            .and_then(|v| v.trim().parse::<u64>().ok());
        let ms = match self.group_protocol {
            GroupProtocol::CooperativeSticky => configured.unwrap_or(DEFAULT_SESSION_TIMEOUT_MS),
            GroupProtocol::Consumer => KIP848_DEFAULT_SESSION_TIMEOUT_MS,
        };
        Duration::from_millis(ms)
    }

    /// Configuration of the transactional producer `transactional_id`.
    pub(crate) fn producer_config(&self, transactional_id: &str) -> ClientConfig {
        let mut c = self.client(transactional_id);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "transaction.timeout.ms",
                self.transaction_timeout.as_millis().to_string(),
            )
            .set("message.timeout.ms", self.message_timeout_ms())
            .set("linger.ms", TXN_PRODUCER_LINGER_MS);
        apply(&mut c, &self.kafka);
        apply(&mut c, &self.producer_kafka);
        // Set last: the framework owns it (validate() rejects a passthrough value).
        c.set("transactional.id", transactional_id);
        c
    }

    /// Configuration of the admin client (snapshot topic creation).
    pub(crate) fn admin_config(&self) -> ClientConfig {
        let mut c = self.client(&format!("exactly-{}-admin", self.app_id));
        apply(&mut c, &self.kafka);
        c
    }

    /// What every client of the app starts from (the passthrough properties come after).
    fn client(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", client_id)
            .set("reconnect.backoff.ms", RECONNECT_BACKOFF_MS);
        c
    }
}

/// How long librdkafka postpones a partition's next fetch when its consumer queue is over
/// `queued.min.messages` (librdkafka's default: 1 000 ms).
///
/// The group consumer has one queue for all its partitions, and librdkafka compares that
/// queue's length with the per-partition threshold (100 000 records): eight partitions of
/// prefetched 1 MB fetches pass it, and every partition decided meanwhile waited a whole
/// second, although the consumer thread drains the queue in a fraction of that. Measured on
/// 1M records over 8 partitions: each partition got ~8 000 records and then none for
/// ~800 ms, over and over, with both cores three-quarters idle; at 20 ms the bench's run at
/// the default settings took 3.2–6.0 s in six runs instead of 5.4–8.4 s in six. The
/// framework's own backpressure (held records, then pause) bounds memory, so a short backoff
/// only costs a cheap re-check.
const FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// Every client's `reconnect.backoff.ms` (librdkafka's default: 100 ms).
///
/// Besides the first wait before a reconnect (which then doubles up to
/// `reconnect.backoff.max.ms`), librdkafka derives from it how soon a client may open a
/// connection to a broker it has not talked to yet: half of it, at least 11 ms. A new client
/// drops its bootstrap connection once the cluster names its brokers and reconnects to a named
/// one only then, so every new client paid ~50 ms before its first request: a metadata
/// request took 55 ms (16 ms at 20), and an app's start pays it several times in a row
/// (topic checks, each partition's producer and recovery readers). 20 ms gives the 11 ms
/// floor.
const RECONNECT_BACKOFF_MS: &str = "20";

/// How long the broker may hold the group consumer's fetch while it has no new records
/// (librdkafka's default: 500 ms).
///
/// librdkafka keeps one fetch per broker in flight, and a partition that is resumed or sought
/// is fetched only when the one in flight returns. A partition paused for backpressure has
/// usually been prefetched to the end of its log, so the fetch in flight then is one the
/// broker holds for this long: measured with one partition of 100k records, every pause
/// cost ~0.47 s with no records (three per run). New records still end a held fetch at once;
/// an idle consumer sends a few more empty fetches a second.
const FETCH_WAIT_MAX_MS: &str = "100";

/// The transactional producers' `linger.ms` (librdkafka's default: 5 ms).
///
/// A transaction's records are produced all at once when it commits, and none can be sent
/// before AddPartitionsToTxn registered their partitions, by when all are queued: lingering
/// batches nothing more and only delays every commit (measured: flush ~6 ms of a ~8 ms commit
/// path with 5 ms; commit p50 in the chain 12 → 9 ms with 0).
const TXN_PRODUCER_LINGER_MS: &str = "0";

/// The settings [`AppConfig::from_env`] reads, after `EXACTLY_` (besides the `KAFKA_`,
/// `CONSUMER_KAFKA_` and `PRODUCER_KAFKA_` prefixes).
const ENV_SETTINGS: &[&str] = &[
    "APP_ID",
    "BROKERS",
    "BOOTSTRAP_SERVERS",
    "INPUT_TOPICS",
    "COMMIT_INTERVAL_MS",
    "COMMIT_WHEN_IDLE_MS",
    "GROUP_OFFSETS_INTERVAL_MS",
    "MAX_BATCH_RECORDS",
    "FULL_SNAPSHOT_EVERY_RECORDS",
    "FULL_SNAPSHOT_INTERVAL_MS",
    "FULL_SNAPSHOTS",
    "STUCK_INPUT_AFTER_MS",
    "METRICS_ADDR",
    "MAX_RECOVERY_TIME_MS",
    "STATE_FINGERPRINT",
    "SNAPSHOT_TOPIC_PATTERN",
    "SNAPSHOT_TRIMMING",
    "STATE_DIR",
    "MAX_CHUNK_BYTES",
    "ERROR_POLICY",
    "AUTO_OFFSET_RESET",
    "TRANSACTION_TIMEOUT_MS",
    "MAX_BUFFERED_BYTES",
    "MAX_CONSECUTIVE_ABORTS",
    "GROUP_PROTOCOL",
    "INSTANCE_ID",
    "KAFKA_<PROPERTY>",
];

/// The known setting whose name is closest to `setting` (edit distance).
fn closest_setting(setting: &str) -> &'static str {
    ENV_SETTINGS
        .iter()
        .copied()
        .min_by_key(|known| strsim::levenshtein(setting, known))
        .unwrap_or("APP_ID")
}

/// `SASL_MECHANISMS` → `sasl.mechanisms`.
fn env_property(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', ".")
}

fn apply(c: &mut ClientConfig, properties: &BTreeMap<String, String>) {
    for (k, v) in properties {
        c.set(k, v);
    }
}

/// Kafka's rules for topic names, which app ids must follow too (they become part of topic
/// names and transactional ids).
fn validate_name(what: &str, name: &str) -> Result<(), ConfigError> {
    let fix = if name.is_empty() {
        "must not be empty".to_owned()
    } else if name.len() > 200 {
        format!("is {} characters long; use at most 200", name.len())
    } else if name == "." || name == ".." {
        "\".\" and \"..\" are not valid names".to_owned()
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        format!("contains {c:?}; use only ASCII letters, digits, '.', '_' and '-'")
    } else {
        return Ok(());
    };
    Err(invalid(what, name, fix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AppConfig {
        AppConfig::new("app", "localhost:9092").input_topic("in")
    }

    #[test]
    fn a_misspelt_setting_names_the_closest_known_one() {
        assert_eq!(closest_setting("ERROR_POLCY"), "ERROR_POLICY");
        assert_eq!(closest_setting("COMMIT_INTERVAL"), "COMMIT_INTERVAL_MS");
        assert_eq!(
            closest_setting("TRANSACTION_TIMEOUT"),
            "TRANSACTION_TIMEOUT_MS"
        );
        // Ignored, not fatal: the variable may be the application's own.
        assert!(base()
            .apply_env(vars(&[("EXACTLY_ERROR_POLCY", "skip")]))
            .is_ok());
    }

    #[test]
    fn every_listed_setting_is_read() {
        // A value no setting accepts: a listed setting fails to parse it instead of being
        // ignored as unknown.
        for setting in ENV_SETTINGS.iter().filter(|s| !s.contains('<')) {
            let name = format!("EXACTLY_{setting}");
            let ignored = base().apply_env(vars(&[(&name, "\u{1}not a value")]));
            let read = ignored
                .as_ref()
                .map_or(true, |c| format!("{c:?}").contains("not a value"));
            assert!(read, "{name} is listed but not read");
        }
    }

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = base()
            .kafka("sasl.username", "ledger")
            .kafka("sasl.password", "hunter2-sasl")
            .kafka("ssl.key.password", "hunter2-key")
            .consumer_kafka("ssl.keystore.password", "hunter2-keystore")
            .producer_kafka("ssl.key.pem", "-----BEGIN PRIVATE KEY-----hunter2")
            .kafka("sasl.oauthbearer.client.secret", "hunter2-oauth")
            .kafka("sasl.oauthbearer.config", "principal=x secret=hunter2");
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        // Everything else stays visible.
        assert!(shown.contains("\"sasl.username\": \"ledger\""), "{shown}");
        // The clients still get the real values.
        let consumer = c.consumer_config(true);
        assert_eq!(consumer.get("sasl.password"), Some("hunter2-sasl"));
        assert_eq!(
            consumer.get("ssl.keystore.password"),
            Some("hunter2-keystore")
        );
    }

    #[test]
    fn an_instance_id_makes_the_group_consumer_a_static_member() {
        assert_eq!(base().consumer_config(true).get("group.instance.id"), None);
        let c = base().instance_id("ledger-0");
        c.validate().unwrap();
        assert_eq!(
            c.consumer_config(true).get("group.instance.id"),
            Some("ledger-0")
        );
        // The snapshot readers are not group members.
        assert_eq!(c.consumer_config(false).get("group.instance.id"), None);

        let from_env = base()
            .apply_env(vars(&[("EXACTLY_INSTANCE_ID", " ledger-1 ")]))
            .unwrap();
        assert_eq!(from_env.instance_id.as_deref(), Some("ledger-1"));
        // An empty value (an unset template variable) means none.
        let empty = c.apply_env(vars(&[("EXACTLY_INSTANCE_ID", "")])).unwrap();
        assert_eq!(empty.instance_id, None);

        let err = base().instance_id("pod/0").validate().unwrap_err();
        assert!(err.to_string().contains("instance id"), "{err}");
        let err = base()
            .consumer_kafka("group.instance.id", "x")
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("use AppConfig::instance_id (EXACTLY_INSTANCE_ID)"),
            "{err}"
        );
    }

    #[test]
    fn defaults_validate_and_produce_exactly_once_clients() {
        let c = base();
        c.validate().unwrap();
        let consumer = c.consumer_config(true);
        assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        // The group consumer never resets on its own; the recovery reader starts where asked.
        assert_eq!(consumer.get("auto.offset.reset"), Some("error"));
        assert_eq!(
            c.consumer_config(false).get("auto.offset.reset"),
            Some("earliest")
        );
        assert_eq!(consumer.get("group.protocol"), Some("consumer"));
        assert_eq!(consumer.get("partition.assignment.strategy"), None);
        assert_eq!(c.consumer_config(false).get("group.protocol"), None);
        assert_eq!(consumer.get("group.id"), Some("app"));
        assert_eq!(consumer.get("bootstrap.servers"), Some("localhost:9092"));
        assert_eq!(c.consumer_config(false).get("group.id"), None);

        let producer = c.producer_config("app.in.3");
        assert_eq!(producer.get("transactional.id"), Some("app.in.3"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("transaction.timeout.ms"), Some("60000"));
        let message: u64 = producer.get("message.timeout.ms").unwrap().parse().unwrap();
        assert!(
            message < 60_000,
            "message.timeout.ms {message} must be below the txn timeout"
        );
        assert_eq!(
            c.admin_config().get("bootstrap.servers"),
            Some("localhost:9092")
        );
    }

    #[test]
    fn sasl_plain_by_configuration_alone_reaches_every_client() {
        let c = base()
            .kafka("security.protocol", "SASL_PLAINTEXT")
            .kafka("sasl.mechanisms", "PLAIN")
            .kafka("sasl.username", "alice")
            .kafka("sasl.password", "s3cret");
        c.validate().unwrap();
        for client in [
            c.consumer_config(true),
            c.consumer_config(false),
            c.producer_config("app.in.0"),
            c.admin_config(),
        ] {
            assert_eq!(client.get("security.protocol"), Some("SASL_PLAINTEXT"));
            assert_eq!(client.get("sasl.mechanisms"), Some("PLAIN"));
            assert_eq!(client.get("sasl.username"), Some("alice"));
            assert_eq!(client.get("sasl.password"), Some("s3cret"));
        }
    }

    #[test]
    fn co_partitioned_inputs_use_the_range_assignor_and_form_one_unit() {
        let c = base().input_topic("profiles").co_partitioned(true);
        let consumer = c.consumer_config(true);
        assert_eq!(consumer.get("group.remote.assignor"), Some("range"));
        let classic = c.clone().group_protocol(GroupProtocol::CooperativeSticky);
        let consumer = classic.consumer_config(true);
        assert_eq!(consumer.get("partition.assignment.strategy"), Some("range"));
        assert_eq!(c.unit_inputs("profiles"), c.input_topics);
        assert_eq!(base().unit_inputs("payments"), ["payments"]);
        let from_env = base()
            .apply_env([
                ("EXACTLY_CO_PARTITIONED".to_owned(), "true".to_owned()),
                ("EXACTLY_MAX_INPUT_IDLE_MS".to_owned(), "250".to_owned()),
            ])
            .unwrap();
        assert!(from_env.co_partitioned);
        assert_eq!(from_env.max_input_idle, Duration::from_millis(250));
        let refused = base().apply_env([("EXACTLY_CO_PARTITIONED".to_owned(), "maybe".to_owned())]);
        assert!(refused.is_err());
    }

    #[test]
    fn cooperative_sticky_sets_the_assignor_and_a_short_session() {
        let c = base().group_protocol(GroupProtocol::CooperativeSticky);
        c.validate().unwrap();
        let consumer = c.consumer_config(true);
        assert_eq!(
            consumer.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(consumer.get("session.timeout.ms"), Some("10000"));
        assert_eq!(consumer.get("group.protocol"), None);
        assert_eq!(c.session_timeout(), Duration::from_secs(10));
        let from_env = base()
            .apply_env([(
                "EXACTLY_GROUP_PROTOCOL".to_owned(),
                "cooperative-sticky".to_owned(),
            )])
            .unwrap();
        assert_eq!(from_env.group_protocol, GroupProtocol::CooperativeSticky);
    }

    #[test]
    fn the_consumer_group_protocol_leaves_session_settings_to_the_broker() {
        let c = base().group_protocol(GroupProtocol::Consumer);
        c.validate().unwrap();
        let consumer = c.consumer_config(true);
        assert_eq!(consumer.get("group.protocol"), Some("consumer"));
        assert_eq!(consumer.get("partition.assignment.strategy"), None);
        assert_eq!(consumer.get("session.timeout.ms"), None);
        assert_eq!(c.session_timeout(), Duration::from_secs(45));
        let refused = c.kafka("session.timeout.ms", "6000").validate();
        assert!(
            matches!(&refused, Err(ConfigError::ManagedProperty { property, .. }) if property == "session.timeout.ms"),
            "{refused:?}"
        );
        let from_env = base()
            .apply_env([("EXACTLY_GROUP_PROTOCOL".to_owned(), "consumer".to_owned())])
            .unwrap();
        assert_eq!(from_env.group_protocol, GroupProtocol::Consumer);
    }

    #[test]
    fn offset_reset_and_group_protocol_cannot_be_passed_through() {
        for property in ["auto.offset.reset", "group.protocol"] {
            let refused = base().consumer_kafka(property, "latest").validate();
            assert!(
                matches!(&refused, Err(ConfigError::ManagedProperty { property: p, .. }) if p == property),
                "{property}: {refused:?}"
            );
        }
    }

    #[test]
    fn app_ids_with_dots_are_refused_as_ambiguous() {
        // "a.b" + "c" and "a" + "b.c" would both own transactional id a.b.c.0.
        let error = AppConfig::new("a.b", "localhost:9092")
            .input_topic("c")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("must not contain '.'"), "{error}");
        AppConfig::new("a", "localhost:9092")
            .input_topic("b.c")
            .validate()
            .unwrap();
    }

    #[test]
    fn abort_budget_and_buffer_bounds_are_settable() {
        let c = base()
            .apply_env([
                ("EXACTLY_MAX_CONSECUTIVE_ABORTS".to_owned(), "3".to_owned()),
                (
                    "EXACTLY_MAX_BUFFERED_BYTES".to_owned(),
                    "1048576".to_owned(),
                ),
            ])
            .unwrap();
        assert_eq!(c.max_consecutive_aborts, 3);
        assert_eq!(c.max_buffered_bytes, 1 << 20);
        assert!(base().max_consecutive_aborts(0).validate().is_err());
    }

    #[test]
    fn passthrough_overrides_defaults_and_per_client_wins() {
        let c = base()
            .group_protocol(GroupProtocol::CooperativeSticky)
            .kafka("session.timeout.ms", "20000")
            .kafka("linger.ms", "1")
            .producer_kafka("linger.ms", "20")
            .consumer_kafka("fetch.wait.max.ms", "10")
            .kafka("message.timeout.ms", "5000");
        c.validate().unwrap();
        assert_eq!(
            c.consumer_config(true).get("session.timeout.ms"),
            Some("20000")
        );
        assert_eq!(c.session_timeout(), Duration::from_secs(20));
        assert_eq!(c.consumer_config(true).get("linger.ms"), Some("1"));
        assert_eq!(c.consumer_config(true).get("fetch.wait.max.ms"), Some("10"));
        let p = c.producer_config("x");
        assert_eq!(p.get("linger.ms"), Some("20"));
        assert_eq!(p.get("fetch.wait.max.ms"), None);
        assert_eq!(p.get("message.timeout.ms"), Some("5000"));
    }

    #[test]
    fn throughput_and_latency_defaults_are_set_and_can_be_overridden() {
        let c = base();
        assert_eq!(
            c.consumer_config(true).get("fetch.queue.backoff.ms"),
            Some(FETCH_QUEUE_BACKOFF_MS)
        );
        assert_eq!(
            c.consumer_config(true).get("fetch.wait.max.ms"),
            Some(FETCH_WAIT_MAX_MS)
        );
        assert_eq!(c.consumer_config(false).get("fetch.wait.max.ms"), None);
        for client in [
            c.consumer_config(true),
            c.consumer_config(false),
            c.producer_config("x"),
            c.admin_config(),
        ] {
            assert_eq!(
                client.get("reconnect.backoff.ms"),
                Some(RECONNECT_BACKOFF_MS)
            );
        }
        let slower = base().kafka("reconnect.backoff.ms", "100");
        assert_eq!(
            slower.producer_config("x").get("reconnect.backoff.ms"),
            Some("100")
        );
        assert_eq!(c.producer_config("x").get("linger.ms"), Some("0"));
        let c = base()
            .consumer_kafka("fetch.wait.max.ms", "500")
            .consumer_kafka("fetch.queue.backoff.ms", "1000")
            .producer_kafka("linger.ms", "5");
        c.validate().unwrap();
        assert_eq!(
            c.consumer_config(true).get("fetch.queue.backoff.ms"),
            Some("1000")
        );
        assert_eq!(c.producer_config("x").get("linger.ms"), Some("5"));
        assert_eq!(
            c.consumer_config(true).get("fetch.wait.max.ms"),
            Some("500")
        );
    }

    #[test]
    fn message_timeout_follows_transaction_timeout() {
        let c = base().transaction_timeout(Duration::from_secs(10));
        let p = c.producer_config("x");
        assert_eq!(p.get("transaction.timeout.ms"), Some("10000"));
        assert_eq!(p.get("message.timeout.ms"), Some("9000"));

        let err = base()
            .transaction_timeout(Duration::from_secs(10))
            .producer_kafka("message.timeout.ms", "10000")
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("must be below transaction_timeout"),
            "{err}"
        );
    }

    #[test]
    fn managed_properties_are_refused_with_a_reason() {
        for (k, v, hint) in [
            ("transactional.id", "x", "per input partition"),
            ("isolation.level", "read_uncommitted", "read_committed"),
            ("enable.auto.commit", "true", "inside each transaction"),
            ("group.id", "g", "app id"),
            ("transaction.timeout.ms", "1000", "transaction_timeout"),
            ("enable.idempotence", "false", "idempotent"),
        ] {
            let err = base().kafka(k, v).validate().unwrap_err();
            assert!(
                matches!(&err, ConfigError::ManagedProperty { property, .. } if property == k),
                "{k}: {err}"
            );
            assert!(err.to_string().contains(hint), "{k}: {err}");
        }
        // Setting a managed property to the value the framework uses anyway is harmless.
        base()
            .kafka("isolation.level", "read_committed")
            .validate()
            .unwrap();
    }

    #[test]
    fn validation_explains_what_to_fix() {
        let cases: Vec<(AppConfig, &str)> = vec![
            (AppConfig::new("app", "b:1"), "input_topic"),
            (
                AppConfig::new("", "b:1").input_topic("t"),
                "must not be empty",
            ),
            (
                AppConfig::new("my app", "b:1").input_topic("t"),
                "contains ' '",
            ),
            (AppConfig::new("a", " ").input_topic("t"), "host:port"),
            (base().input_topic("in"), "listed twice"),
            (
                base().snapshot_topic_pattern("{app}.snaps"),
                "must contain {topic}",
            ),
            (
                base().snapshot_topic_pattern("{topic}"),
                "also an input topic",
            ),
            (
                base().error_policy(ErrorPolicy::DeadLetter { topic: "in".into() }),
                "read again",
            ),
            (base().max_batch_records(0), "at least 1"),
            (base().commit_interval(Duration::ZERO), "above zero"),
            (
                base().commit_interval(Duration::from_secs(40)),
                "half of transaction_timeout",
            ),
            (
                base().commit_interval(Duration::MAX),
                "half of transaction_timeout",
            ),
            (base().max_chunk_bytes(10), "at least 1024"),
            (base().max_chunk_bytes(999_000), "message.max.bytes"),
            (
                base()
                    .kafka("message.max.bytes", "100000")
                    .max_chunk_bytes(200_000),
                "at most 95904",
            ),
        ];
        for (config, hint) in cases {
            let err = config.validate().unwrap_err();
            assert!(
                err.to_string().contains(hint),
                "expected {hint:?} in: {err}"
            );
        }
    }

    #[test]
    fn env_overrides_builder_values() {
        let c = base()
            .commit_interval(Duration::from_millis(5))
            .apply_env(vars(&[
                ("EXACTLY_APP_ID", "other"),
                ("EXACTLY_BROKERS", "b1:1,b2:2"),
                ("EXACTLY_INPUT_TOPICS", "a, b,,c"),
                ("EXACTLY_COMMIT_INTERVAL_MS", "250"),
                ("EXACTLY_COMMIT_WHEN_IDLE_MS", "40"),
                ("EXACTLY_GROUP_OFFSETS_INTERVAL_MS", "0"),
                ("EXACTLY_MAX_BATCH_RECORDS", "7"),
                ("EXACTLY_FULL_SNAPSHOT_EVERY_RECORDS", "0"),
                ("EXACTLY_FULL_SNAPSHOT_INTERVAL_MS", "1500"),
                ("EXACTLY_FULL_SNAPSHOTS", "false"),
                ("EXACTLY_STATE_FINGERPRINT", "no"),
                ("EXACTLY_SNAPSHOT_TOPIC_PATTERN", "snap-{topic}"),
                ("EXACTLY_MAX_CHUNK_BYTES", "65536"),
                ("EXACTLY_ERROR_POLICY", "dead-letter:bad.records"),
                ("EXACTLY_AUTO_OFFSET_RESET", "LATEST"),
                ("EXACTLY_TRANSACTION_TIMEOUT_MS", "30000"),
                ("EXACTLY_KAFKA_SASL_MECHANISMS", "PLAIN"),
                ("EXACTLY_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                ("EXACTLY_CONSUMER_KAFKA_FETCH_MIN_BYTES", "1"),
                ("EXACTLY_PRODUCER_KAFKA_LINGER_MS", "2"),
                ("EXACTLY_SOMETHING_ELSE", "ignored"),
                ("PATH", "/bin"),
            ]))
            .unwrap();
        c.validate().unwrap();
        assert_eq!(c.app_id(), "other");
        assert_eq!(c.bootstrap_servers(), "b1:1,b2:2");
        assert_eq!(c.input_topics, ["a", "b", "c"]);
        assert_eq!(c.commit_interval, Duration::from_millis(250));
        assert_eq!(c.commit_when_idle, Duration::from_millis(40));
        assert_eq!(c.group_offsets_interval, Duration::ZERO);
        assert_eq!(c.max_batch_records, 7);
        assert_eq!(c.full_snapshot_every_records, 0);
        assert_eq!(c.full_snapshot_interval, Duration::from_millis(1500));
        assert!(!c.full_snapshots);
        assert!(!c.state_fingerprint);
        assert_eq!(c.snapshot_topic("a"), "snap-a");
        assert_eq!(c.max_chunk_bytes, 65536);
        assert_eq!(
            c.error_policy,
            ErrorPolicy::DeadLetter {
                topic: "bad.records".into()
            }
        );
        assert_eq!(c.auto_offset_reset, StartFrom::Latest);
        assert_eq!(c.transaction_timeout, Duration::from_secs(30));
        let consumer = c.consumer_config(true);
        assert_eq!(consumer.get("sasl.mechanisms"), Some("PLAIN"));
        assert_eq!(consumer.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(consumer.get("fetch.min.bytes"), Some("1"));
        assert_eq!(
            c.consumer_config(false).get("auto.offset.reset"),
            Some("latest")
        );
        assert_eq!(c.producer_config("t").get("linger.ms"), Some("2"));
        assert_eq!(c.producer_config("t").get("sasl.mechanisms"), Some("PLAIN"));
    }

    #[test]
    fn env_errors_name_the_variable() {
        for (name, value, hint) in [
            ("EXACTLY_COMMIT_INTERVAL_MS", "1s", "milliseconds"),
            ("EXACTLY_FULL_SNAPSHOTS", "maybe", "true or false"),
            ("EXACTLY_ERROR_POLICY", "retry", "dead-letter:<topic>"),
            (
                "EXACTLY_ERROR_POLICY",
                "dead-letter:",
                "dead-letter:<topic>",
            ),
            ("EXACTLY_AUTO_OFFSET_RESET", "middle", "earliest or latest"),
            ("EXACTLY_MAX_BATCH_RECORDS", "-1", "whole number"),
        ] {
            let err = base().apply_env(vars(&[(name, value)])).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(name) && msg.contains(hint), "{msg}");
        }
        let c = base()
            .apply_env(vars(&[("EXACTLY_ERROR_POLICY", "skip")]))
            .unwrap();
        assert_eq!(c.error_policy, ErrorPolicy::Skip);
    }

    #[test]
    fn names_derived_from_app_and_topic() {
        let c = base();
        assert_eq!(c.snapshot_topic("in"), "app.in.snapshots");
        assert_eq!(c.transactional_id("in", 4), "app.in.4");
    }
}

//! Case 6, state at scale: how the commit path, restores and the snapshot topic behave as
//! the state grows from 10 000 to 10 000 000 keys.
//!
//! - **Commit latency vs state size.** [`ScaleProcessor`] keeps one counter per key, either
//!   in a plain state (a `BTreeMap` in the `State`, serialized whole with full snapshots) or
//!   in a keyed [`Store`] (RocksDB; a commit writes only the changed keys). For each variant
//!   and key count, on a 1-partition topic: a first process fills the state ("fill" records,
//!   [`FILL_KEYS_PER_RECORD`] keys each) and stops gracefully; the parent produces the update
//!   records (each bumps one existing key and emits one record); a second process resumes
//!   (the store from its local directory, the plain state from its full snapshot), applies
//!   them in transactions of [`UPDATE_BATCH`] records and reports its commit-path latency
//!   quantiles. Being a new process, its histogram holds only the update commits.
//! - **Warm vs cold restore** of the largest store: a process applies a few more updates and
//!   is killed with `SIGKILL`; a process on the same state directory restores warm (from the
//!   local RocksDB); it is killed too, the directory deleted, and a last process restores cold
//!   (from the full snapshot on Kafka).
//! - **Snapshot topic bytes**: an app with a 10 000-key plain state writes a full snapshot
//!   every [`SNAPSHOT_EVERY`] records, at least [`MIN_FULL_SNAPSHOTS`] of them, with trimming
//!   on (the default); everything still readable on its snapshot topic is summed and divided
//!   by the size of one full snapshot.
//!
//! Every process is the benchmark binary's hidden `scale-child` command ([`child`]), so each
//! measurement starts with nothing in memory.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use exactly::{AppConfig, Json, Output, ProcessError, Processor, Record, Store, Utf8};
use exactly_tests::process::{ChildProcess, ProcessSpec};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::engine::{blocking_with, RunningApp};
use super::progress::GroupOffsets;
use super::TOPIC_CONFIG;
use crate::producer::{send_waiting, DeliveryCounter};
use crate::topics::create_topics;

/// Keys one fill record inserts.
pub const FILL_KEYS_PER_RECORD: u64 = 10_000;
/// Input records per transaction while updating (so `updates / UPDATE_BATCH` commits).
pub const UPDATE_BATCH: usize = 100;
/// Input records per transaction while filling (`FILL_KEYS_PER_RECORD` times as many keys).
pub const FILL_BATCH: usize = 10;
/// Key counts measured by default (the BENCH line's ratio is 10M vs 10k).
pub const DEFAULT_KEYS: [u64; 3] = [10_000, 1_000_000, 10_000_000];
/// Keys of the warm-up measurement (not reported) that precedes the others.
pub const WARM_UP_KEYS: u64 = 10_000;
/// Updates applied after the update run by the process that is then killed.
pub const EXTRA_UPDATES: u64 = 1_000;
/// Keys of the snapshot-topic case's plain state.
pub const SNAPSHOT_CASE_KEYS: u64 = 10_000;
/// `full_snapshot_every_records` of the snapshot-topic case.
pub const SNAPSHOT_EVERY: u64 = 50;
/// Full snapshots the snapshot-topic case writes at least.
pub const MIN_FULL_SNAPSHOTS: u64 = 100;
/// The line a child prints, parsed by the parent.
pub const REPORT: &str = "SCALE-REPORT";

/// How long a child may take to fill, to apply the updates, or to restore.
const PHASE_LIMIT: Duration = Duration::from_secs(2700);
/// How long a child may take to stop gracefully (its final full snapshot included).
const STOP_LIMIT: Duration = Duration::from_secs(900);
/// A child told to wait for its `SIGKILL` gives up (exits with an error) after this long.
const HOLD_LIMIT: Duration = Duration::from_secs(3600);

/// Where the per-key counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// A `BTreeMap<String, u64>` in the state.
    Plain,
    /// A `Store<Utf8, Json<u64>>` in the state.
    Store,
}

impl Variant {
    /// Both, in table order.
    pub const ALL: [Variant; 2] = [Variant::Plain, Variant::Store];

    /// Its name on the command line and in topic names.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Store => "store",
        }
    }

    /// How the table describes it.
    pub fn describe(self) -> &'static str {
        match self {
            Variant::Plain => "plain state (BTreeMap)",
            Variant::Store => "keyed store (RocksDB)",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Variant::Plain),
            "store" => Ok(Variant::Store),
            other => Err(format!("unknown variant {other:?} (plain or store)")),
        }
    }
}

/// What a `scale-child` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Process the fill records, report, stop gracefully.
    Fill,
    /// Process up to the given input end, report its commit latencies, stop gracefully (or
    /// wait to be killed).
    Update,
    /// Report the partition's recovery as soon as it is live, then wait to be killed.
    Restore,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Fill => "fill",
            Mode::Update => "update",
            Mode::Restore => "restore",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fill" => Ok(Mode::Fill),
            "update" => Ok(Mode::Update),
            "restore" => Ok(Mode::Restore),
            other => Err(format!("unknown mode {other:?} (fill, update or restore)")),
        }
    }
}

/// Parses `--scale-keys`: a comma-separated list of positive key counts.
pub fn parse_key_counts(list: &str) -> Result<Vec<u64>, String> {
    let mut keys = Vec::new();
    for part in list.split(',') {
        let part = part.trim().replace('_', "");
        let n: u64 = part
            .parse()
            .map_err(|_| format!("{part:?} is not a key count"))?;
        if n == 0 {
            return Err("a key count must be positive".into());
        }
        keys.push(n);
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

/// The key with index `i`.
pub fn scale_key(i: u64) -> String {
    format!("key-{i:08}")
}

/// The key index the `n`-th update bumps among `keys` keys: `n` times a large prime, modulo
/// `keys`, so consecutive updates hit keys spread over the whole key space (and RocksDB's
/// whole key range), the same ones in every run.
pub fn update_target(n: u64, keys: u64) -> u64 {
    const STRIDE: u128 = 2_654_435_761; // prime, so coprime with any power of ten
    ((u128::from(n) * STRIDE) % u128::from(keys.max(1))) as u64
}

/// One input record of the scale case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Insert keys `start..start + count`, each with the value 0.
    Fill {
        /// First key index.
        start: u64,
        /// How many keys.
        count: u64,
    },
    /// Add 1 to the record's key, which must exist, and emit its new value.
    Update,
}

/// The fill records for `keys` keys: (record key, command).
pub fn fill_records(keys: u64) -> impl Iterator<Item = (String, Command)> {
    (0..keys.div_ceil(FILL_KEYS_PER_RECORD)).map(move |r| {
        let start = r * FILL_KEYS_PER_RECORD;
        let count = FILL_KEYS_PER_RECORD.min(keys - start);
        (format!("fill-{start}"), Command::Fill { start, count })
    })
}

/// Update records `from..to` over `keys` keys.
pub fn update_records(keys: u64, from: u64, to: u64) -> impl Iterator<Item = (String, Command)> {
    (from..to).map(move |n| (scale_key(update_target(n, keys)), Command::Update))
}

/// The counters a [`ScaleProcessor`] keeps, wherever they live. (Keys are `&String`
/// because that is what `Store<Utf8, _>` takes.)
#[allow(clippy::ptr_arg)]
pub trait Counters: Serialize + DeserializeOwned + Default + Send + 'static {
    /// Inserts `key` with the value 0.
    fn insert_zero(&mut self, key: &String) -> Result<(), ProcessError>;
    /// Adds 1 to `key` and returns the new value; `None` if the key does not exist.
    fn bump(&mut self, key: &String) -> Result<Option<u64>, ProcessError>;
    /// Number of keys.
    fn keys(&self) -> u64;
}

/// The plain variant's state.
pub type PlainCounters = BTreeMap<String, u64>;

#[allow(clippy::ptr_arg)]
impl Counters for PlainCounters {
    fn insert_zero(&mut self, key: &String) -> Result<(), ProcessError> {
        self.insert(key.clone(), 0);
        Ok(())
    }

    fn bump(&mut self, key: &String) -> Result<Option<u64>, ProcessError> {
        Ok(self.get_mut(key).map(|n| {
            *n += 1;
            *n
        }))
    }

    fn keys(&self) -> u64 {
        self.len() as u64
    }
}

/// The store variant's state.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StoreCounters {
    /// The counters by key.
    pub counts: Store<Utf8, Json<u64>>,
}

#[allow(clippy::ptr_arg)]
impl Counters for StoreCounters {
    fn insert_zero(&mut self, key: &String) -> Result<(), ProcessError> {
        self.counts.put(key, &0)?;
        Ok(())
    }

    fn bump(&mut self, key: &String) -> Result<Option<u64>, ProcessError> {
        let Some(n) = self.counts.get(key)? else {
            return Ok(None);
        };
        self.counts.put(key, &(n + 1))?;
        Ok(Some(n + 1))
    }

    fn keys(&self) -> u64 {
        self.counts.len()
    }
}

/// Fills and bumps per-key counters kept in `C`.
#[derive(Debug)]
pub struct ScaleProcessor<C> {
    /// Where each update's new value goes.
    pub output_topic: String,
    counters: PhantomData<fn() -> C>,
}

impl<C> ScaleProcessor<C> {
    /// A processor emitting to `output_topic`.
    pub fn new(output_topic: impl Into<String>) -> Self {
        ScaleProcessor {
            output_topic: output_topic.into(),
            counters: PhantomData,
        }
    }
}

impl<C: Counters> Processor for ScaleProcessor<C> {
    type State = C;
    type Key = Utf8;
    type Value = Json<Command>;

    fn process(
        &self,
        state: &mut C,
        record: &Record<'_, String, Command>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        match *record.value() {
            Command::Fill { start, count } => {
                for i in start..start + count {
                    state.insert_zero(&scale_key(i))?;
                }
            }
            Command::Update => {
                let Some(n) = state.bump(record.key())? else {
                    return Err(
                        format!("update of {:?}, which was never filled", record.key()).into(),
                    );
                };
                out.send_json(&self.output_topic, record.key(), &n)?;
            }
        }
        Ok(())
    }
}

/// Produces `records` to `topic` (idempotent, so none is written twice).
pub fn produce_commands(
    bootstrap: &str,
    topic: &str,
    records: impl Iterator<Item = (String, Command)>,
) -> anyhow::Result<u64> {
    let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create_with_context(DeliveryCounter::default())
        .context("creating the scale case's producer")?;
    let mut sent = 0;
    for (key, command) in records {
        let value = serde_json::to_vec(&command)?;
        let record = BaseRecord::<str, [u8]>::to(topic)
            .key(key.as_str())
            .payload(value.as_slice());
        send_waiting(&producer, record).with_context(|| format!("producing to {topic}"))?;
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(120))
        .with_context(|| format!("flushing the records of {topic}"))?;
    let context = producer.context();
    if context.failed() > 0 {
        bail!(
            "{} records to {topic} were not delivered; first error: {}",
            context.failed(),
            context.first_error()
        );
    }
    Ok(sent)
}

/// What a `scale-child` process is told.
#[derive(Debug, Clone)]
pub struct ChildArgs {
    /// Bootstrap servers.
    pub brokers: String,
    /// The app id.
    pub app_id: String,
    /// Its input topic (1 partition).
    pub topic: String,
    /// Its output topic.
    pub output: String,
    /// Where its counters live.
    pub variant: Variant,
    /// Its `AppConfig::state_dir`.
    pub state_dir: PathBuf,
    /// What it does.
    pub mode: Mode,
    /// The input end to process up to (fill and update).
    pub input_end: u64,
    /// After reporting, wait for `SIGKILL` instead of stopping gracefully.
    pub hold: bool,
}

impl ChildArgs {
    fn command_line(&self) -> Vec<String> {
        let mut args = vec![
            "scale-child".to_owned(),
            "--brokers".into(),
            self.brokers.clone(),
            "--app-id".into(),
            self.app_id.clone(),
            "--topic".into(),
            self.topic.clone(),
            "--output".into(),
            self.output.clone(),
            "--variant".into(),
            self.variant.to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--mode".into(),
            self.mode.to_string(),
            "--input-end".into(),
            self.input_end.to_string(),
        ];
        if self.hold {
            args.push("--hold".into());
        }
        args
    }
}

/// The child's side: runs the app as `args` says, prints one [`REPORT`] line, then stops
/// gracefully or (`hold`) waits to be killed.
pub async fn child(args: &ChildArgs) -> anyhow::Result<()> {
    match args.variant {
        Variant::Plain => child_with::<PlainCounters>(args).await,
        Variant::Store => child_with::<StoreCounters>(args).await,
    }
}

async fn child_with<C: Counters>(args: &ChildArgs) -> anyhow::Result<()> {
    let mut config = AppConfig::new(&args.app_id, &args.brokers)
        .input_topic(&args.topic)
        .state_dir(&args.state_dir);
    config = match args.mode {
        // Filling is set-up, not measured: large transactions, and no full snapshot before the
        // final one at the graceful stop (which the next process restores from).
        Mode::Fill => config
            .max_batch_records(FILL_BATCH)
            .full_snapshot_interval(Duration::ZERO)
            .full_snapshot_every_records(0),
        // Defaults otherwise (full snapshots every 100 000 records or 60 s).
        Mode::Update | Mode::Restore => config.max_batch_records(UPDATE_BATCH),
    };
    let offsets = GroupOffsets::new(&args.brokers, &args.app_id, &args.topic, 1)?;
    let app = RunningApp::start(config, ScaleProcessor::<C>::new(&args.output))?;
    let line = match args.mode {
        Mode::Fill | Mode::Update => {
            let elapsed = blocking_with(&app, |app| {
                offsets.wait_for(args.input_end, app.started(), PHASE_LIMIT, || {
                    app.check_alive()
                })
            })
            .await?;
            let m = app.metrics();
            format!(
                "{REPORT} mode={} elapsed_us={} commits={} records={} p50_us={} p99_us={} max_us={} recoveries={} from_full_snapshot={} recovery_us={} replayed={}",
                args.mode,
                elapsed.as_micros(),
                m.transactions_committed,
                m.records_processed,
                m.commit_latency_p50.as_micros(),
                m.commit_latency_p99.as_micros(),
                m.commit_latency_max.as_micros(),
                m.recoveries,
                m.recoveries_from_full_snapshot,
                m.last_recovery_time.as_micros(),
                m.last_recovery_replayed_records,
            )
        }
        Mode::Restore => {
            let live_after = blocking_with(&app, |app| {
                app.wait_for_metrics("the partition's recovery", PHASE_LIMIT, |m| {
                    m.recoveries >= 1
                })
            })
            .await?;
            let m = app.metrics();
            format!(
                "{REPORT} mode=restore live_after_us={} recoveries={} from_full_snapshot={} recovery_us={} replayed={}",
                live_after.as_micros(),
                m.recoveries,
                m.recoveries_from_full_snapshot,
                m.last_recovery_time.as_micros(),
                m.last_recovery_replayed_records,
            )
        }
    };
    println!("{line}");
    if args.hold || args.mode == Mode::Restore {
        // Killed with SIGKILL by the parent: nothing after this line runs then.
        tokio::time::sleep(HOLD_LIMIT).await;
        bail!("not killed within {HOLD_LIMIT:?} of reporting");
    }
    let stopping = Instant::now();
    let m = app.stop_within(STOP_LIMIT).await?;
    println!(
        "{REPORT}-STOPPED stop_us={} full_snapshots={} last_full_snapshot_bytes={} full_snapshot_us={}",
        stopping.elapsed().as_micros(),
        m.full_snapshots_written,
        m.last_full_snapshot_bytes,
        m.full_snapshot_time_total.as_micros(),
    );
    Ok(())
}

/// The 1-minute load average, if the system tells.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The value of `name=` in a report line.
fn field(line: &str, name: &str) -> anyhow::Result<u64> {
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no {name} in the report line {line:?}"))
}

fn micros(line: &str, name: &str) -> anyhow::Result<Duration> {
    Ok(Duration::from_micros(field(line, name)?))
}

/// A `scale-child` process as the parent runs it: one log per measurement.
struct Child {
    process: ChildProcess,
}

impl Child {
    fn spawn(bench_exe: &Path, args: &ChildArgs, log: &Path) -> anyhow::Result<Self> {
        let name = format!("scale-{}-{}", args.app_id, args.mode);
        let spec = ProcessSpec::new(bench_exe)
            .args(args.command_line())
            // Recovery's outcome and timings, and each transaction's flush / offsets / commit
            // times (the rest of the commit path: fingerprint, incremental record, local store).
            .env(
                "RUST_LOG",
                "warn,exactly::recovery=info,exactly::partition=debug",
            )
            .log_file(log);
        let process = ChildProcess::spawn(name, spec).context("starting a scale child")?;
        Ok(Child { process })
    }

    /// Its report line.
    async fn report(&mut self) -> anyhow::Result<String> {
        let pattern = format!("{REPORT} ");
        self.process
            .wait_for_log(&pattern, PHASE_LIMIT)
            .await
            .map_err(|e| anyhow!("{e}"))
    }

    /// Waits for its graceful stop; returns the stop line.
    async fn stopped(&mut self) -> anyhow::Result<String> {
        let line = self
            .process
            .wait_for_log(&format!("{REPORT}-STOPPED"), STOP_LIMIT)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let status = self
            .process
            .wait_exit(Duration::from_secs(60))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        if !status.success() {
            bail!(
                "a scale child exited with {status}; its log ends with:\n{}",
                self.process.log_tail(20)
            );
        }
        Ok(line)
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.process
            .kill_hard()
            .await
            .map(drop)
            .map_err(|e| anyhow!("{e}"))
    }
}

/// One commit-latency measurement: a variant at a key count.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitRow {
    /// Where the counters lived.
    pub variant: Variant,
    /// Keys in the state.
    pub keys: u64,
    /// Update records applied.
    pub updates: u64,
    /// Transactions the update process committed (the histogram's samples).
    pub commits: u64,
    /// Commit path, median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest.
    pub max: Duration,
    /// Filling the state (the first process, from start until its input was committed).
    pub fill: Duration,
    /// The first process's graceful stop (its final full snapshot).
    pub fill_stop: Duration,
    /// Size of that full snapshot.
    pub snapshot_bytes: u64,
    /// The update process's recovery.
    pub restore: Duration,
    /// Whether that recovery loaded the full snapshot (else: the local store).
    pub restored_from_full_snapshot: bool,
    /// The update process, from start until the updates were committed.
    pub update_elapsed: Duration,
    /// The machine's 1-minute load average when the updates were done (the bench itself
    /// keeps about 2 to 4 threads busy; much more means something else competed for the CPU).
    pub load: Option<f64>,
}

/// Warm and cold restore of the largest store.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmCold {
    /// Keys in the store.
    pub keys: u64,
    /// Restore from the local RocksDB.
    pub warm: Duration,
    /// Records the warm restore replayed.
    pub warm_replayed: u64,
    /// Restore from the full snapshot on Kafka (the local directory deleted).
    pub cold: Duration,
    /// Records the cold restore replayed.
    pub cold_replayed: u64,
}

/// What the snapshot topic holds after many full snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotTopicSize {
    /// Keys in the plain state.
    pub keys: u64,
    /// Full snapshots written.
    pub full_snapshots: u64,
    /// Trims done.
    pub trims: u64,
    /// Records readable on the snapshot topic (from its log start offset to its end).
    pub records: u64,
    /// Their bytes: keys, values and headers.
    pub bytes: u64,
    /// The latest full snapshot's serialized state.
    pub full_snapshot_bytes: u64,
}

impl SnapshotTopicSize {
    /// Snapshot topic bytes ÷ one full snapshot.
    pub fn ratio(&self) -> f64 {
        self.bytes as f64 / (self.full_snapshot_bytes.max(1)) as f64
    }
}

/// Everything case 6 measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleResults {
    /// Update records per commit-latency measurement.
    pub updates: u64,
    /// One row per variant and key count.
    pub rows: Vec<CommitRow>,
    /// The largest store's restores.
    pub warm_cold: Option<WarmCold>,
    /// The snapshot topic after many full snapshots.
    pub snapshot_topic: SnapshotTopicSize,
}

impl ScaleResults {
    fn row(&self, variant: Variant, keys: u64) -> Option<&CommitRow> {
        self.rows
            .iter()
            .find(|r| r.variant == variant && r.keys == keys)
    }

    /// p99 at `large` keys ÷ p99 at `small` keys, for `variant`, if both were measured.
    pub fn p99_ratio(&self, variant: Variant, small: u64, large: u64) -> Option<f64> {
        let (small, large) = (self.row(variant, small)?, self.row(variant, large)?);
        Some(large.p99.as_secs_f64() / small.p99.as_secs_f64().max(1e-9))
    }

    /// The larger (worse) of the two variants' p99 ratios 10M vs 10k keys, and whose it is;
    /// `None` unless both variants were measured at both sizes.
    pub fn commit_p99_ratio_10m_vs_10k(&self) -> Option<(f64, Variant)> {
        let plain = self.p99_ratio(Variant::Plain, 10_000, 10_000_000)?;
        let store = self.p99_ratio(Variant::Store, 10_000, 10_000_000)?;
        Some(if plain >= store {
            (plain, Variant::Plain)
        } else {
            (store, Variant::Store)
        })
    }

    /// Cold restore time ÷ warm restore time.
    pub fn warm_vs_cold_restore(&self) -> Option<f64> {
        let wc = self.warm_cold.as_ref()?;
        Some(wc.cold.as_secs_f64() / wc.warm.as_secs_f64().max(1e-9))
    }

    /// The case's tables.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        let _ = writeln!(
            t,
            "State at scale: commit path per transaction of {UPDATE_BATCH} updates ({} updates, 1 partition, one key bumped and one record emitted per update)",
            self.updates
        );
        let _ = writeln!(
            t,
            "  {:<24} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11} {:>12} {:>10} {:>7}",
            "variant",
            "keys",
            "commits",
            "p50 ms",
            "p99 ms",
            "max ms",
            "fill s",
            "snapshot MB",
            "restore ms",
            "restored",
            "load 1m"
        );
        for r in &self.rows {
            let _ = writeln!(
                t,
                "  {:<24} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9.1} {:>11.1} {:>12} {:>10} {:>7}",
                r.variant.describe(),
                r.keys,
                r.commits,
                ms(r.p50),
                ms(r.p99),
                ms(r.max),
                r.fill.as_secs_f64(),
                r.snapshot_bytes as f64 / 1e6,
                ms(r.restore),
                if r.restored_from_full_snapshot {
                    "snapshot"
                } else {
                    "local"
                },
                r.load.map_or_else(|| "?".to_owned(), |l| format!("{l:.1}"))
            );
        }
        let _ = writeln!(
            t,
            "  (commit path: fingerprint, incremental snapshot record, flush, offsets, commit, local store write; the first commit after a restart fingerprints a plain state whole once, which is the plain rows' max)"
        );
        let sizes: Vec<u64> = {
            let mut k: Vec<u64> = self.rows.iter().map(|r| r.keys).collect();
            k.sort_unstable();
            k.dedup();
            k
        };
        if let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) {
            if small != large {
                for variant in Variant::ALL {
                    if let Some(ratio) = self.p99_ratio(variant, small, large) {
                        let _ = writeln!(
                            t,
                            "  p99 at {large} keys / p99 at {small} keys, {}: {ratio:.2}",
                            variant.describe()
                        );
                    }
                }
            }
        }
        match self.commit_p99_ratio_10m_vs_10k() {
            Some((ratio, variant)) => {
                let _ = writeln!(
                    t,
                    "  commit_p99_ratio_10m_vs_10k = {ratio:.2} (the worse variant: {})",
                    variant.describe()
                );
            }
            None => {
                let _ = writeln!(
                    t,
                    "  commit_p99_ratio_10m_vs_10k: n/a (needs both variants at 10000 and 10000000 keys)"
                );
            }
        }
        match &self.warm_cold {
            Some(wc) => {
                let _ = writeln!(
                    t,
                    "  restore of the {}-key store after kill -9: warm (local RocksDB) {} ms ({} replayed), cold (full snapshot on Kafka, local dir deleted) {} ms ({} replayed): cold / warm = {:.1}",
                    wc.keys,
                    ms(wc.warm),
                    wc.warm_replayed,
                    ms(wc.cold),
                    wc.cold_replayed,
                    self.warm_vs_cold_restore().unwrap_or(f64::NAN)
                );
            }
            None => {
                let _ = writeln!(t, "  warm vs cold restore: not measured (no store row)");
            }
        }
        let s = &self.snapshot_topic;
        let _ = writeln!(
            t,
            "  snapshot topic after {} full snapshots of a {}-key plain state ({} trims): {} records, {} bytes readable = {:.2} x one full snapshot ({} bytes)",
            s.full_snapshots, s.keys, s.trims, s.records, s.bytes, s.ratio(), s.full_snapshot_bytes
        );
        t
    }
}

/// Names of one measurement's topics, app and state directory.
struct Names {
    input: String,
    output: String,
    app_id: String,
    state_dir: PathBuf,
    log: PathBuf,
}

/// What the parent needs to run the case.
#[derive(Debug, Clone)]
pub struct ScaleCase<'a> {
    /// The benchmark binary (run with `scale-child`).
    pub bench_exe: &'a Path,
    /// Bootstrap servers.
    pub bootstrap: &'a str,
    /// Prefix of every topic and app id of this run.
    pub run: &'a str,
    /// Key counts to measure.
    pub keys: &'a [u64],
    /// Update records per measurement.
    pub updates: u64,
    /// Where logs and state directories go.
    pub log_dir: &'a Path,
}

impl ScaleCase<'_> {
    fn names(&self, what: &str) -> Names {
        Names {
            input: format!("{}.scale-{what}", self.run),
            output: format!("{}.out-scale-{what}", self.run),
            // App ids take no '.' (they prefix transactional ids and snapshot topics).
            app_id: format!("{}-scale-{what}", self.run),
            state_dir: self.log_dir.join(format!("state-scale-{what}")),
            log: self.log_dir.join(format!("scale-{what}.log")),
        }
    }

    fn child_args(&self, names: &Names, variant: Variant, mode: Mode, input_end: u64) -> ChildArgs {
        ChildArgs {
            brokers: self.bootstrap.to_owned(),
            app_id: names.app_id.clone(),
            topic: names.input.clone(),
            output: names.output.clone(),
            variant,
            state_dir: names.state_dir.clone(),
            mode,
            input_end,
            hold: false,
        }
    }

    async fn produce(
        &self,
        topic: &str,
        records: impl Iterator<Item = (String, Command)> + Send + 'static,
    ) -> anyhow::Result<u64> {
        let (bootstrap, topic) = (self.bootstrap.to_owned(), topic.to_owned());
        tokio::task::spawn_blocking(move || produce_commands(&bootstrap, &topic, records))
            .await
            .context("the scale case's producer panicked")?
    }
}

/// Runs case 6; `say` reports progress.
pub async fn measure(
    case: &ScaleCase<'_>,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ScaleResults> {
    // The first transactions on a freshly started broker are slower: the producer's flush
    // takes about 24 ms rather than 6 ms for most commits in the first minute or so (in one
    // run a plain state of 10 000 keys had a commit p50 of 33 ms in this warm-up and 11 ms
    // right after it; in another, 35 and 28 ms). Without it the smallest state, measured
    // first, looks slower than the largest. In the full benchmark the broker is warm anyway.
    say(&format!(
        "  warm-up (not reported): both variants at {WARM_UP_KEYS} keys"
    ));
    for variant in Variant::ALL {
        let names = case.names(&format!("warmup-{variant}-{WARM_UP_KEYS}"));
        measure_commits(case, &names, variant, WARM_UP_KEYS)
            .await
            .with_context(|| format!("the warm-up (log {})", names.log.display()))?;
    }
    let mut rows = Vec::new();
    let mut largest_store = None;
    for &keys in case.keys {
        for variant in Variant::ALL {
            let what = format!("{variant}-{keys}");
            let names = case.names(&what);
            let (row, fills) = measure_commits(case, &names, variant, keys)
                .await
                .with_context(|| {
                    format!(
                        "the {variant} state with {keys} keys (log {})",
                        names.log.display()
                    )
                })?;
            say(&format!(
                "  {:<24} {keys:>9} keys: commit p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} commits); fill {:.1} s, restore {} ms from {}; load {}",
                variant.describe(),
                row.p50.as_secs_f64() * 1e3,
                row.p99.as_secs_f64() * 1e3,
                row.max.as_secs_f64() * 1e3,
                row.commits,
                row.fill.as_secs_f64(),
                row.restore.as_millis(),
                if row.restored_from_full_snapshot { "its full snapshot" } else { "its local store" },
                row.load.map_or_else(|| "?".to_owned(), |l| format!("{l:.1}"))
            ));
            if variant == Variant::Store {
                largest_store = Some((names, keys, fills));
            }
            rows.push(row);
        }
    }
    let warm_cold = match largest_store {
        Some((names, keys, fills)) => {
            say(&format!(
                "  warm vs cold restore of the {keys}-key store (kill -9, restart; kill -9, delete the local dir, restart)"
            ));
            let wc = measure_warm_cold(case, &names, keys, fills)
                .await
                .with_context(|| format!("warm vs cold restore (log {})", names.log.display()))?;
            say(&format!(
                "  warm {} ms ({} replayed), cold {} ms ({} replayed)",
                wc.warm.as_millis(),
                wc.warm_replayed,
                wc.cold.as_millis(),
                wc.cold_replayed
            ));
            Some(wc)
        }
        None => None,
    };
    say(&format!(
        "  snapshot topic size after >= {MIN_FULL_SNAPSHOTS} full snapshots of a {SNAPSHOT_CASE_KEYS}-key plain state"
    ));
    let snapshot_topic = measure_snapshot_topic(case)
        .await
        .context("the snapshot topic size")?;
    say(&format!(
        "  {} full snapshots, {} bytes readable on the snapshot topic = {:.2} x one full snapshot ({} bytes)",
        snapshot_topic.full_snapshots,
        snapshot_topic.bytes,
        snapshot_topic.ratio(),
        snapshot_topic.full_snapshot_bytes
    ));
    Ok(ScaleResults {
        updates: case.updates,
        rows,
        warm_cold,
        snapshot_topic,
    })
}

/// Fill, then update; returns the row and the number of fill records.
async fn measure_commits(
    case: &ScaleCase<'_>,
    names: &Names,
    variant: Variant,
    keys: u64,
) -> anyhow::Result<(CommitRow, u64)> {
    create_topics(
        case.bootstrap,
        &[&names.input, &names.output],
        1,
        &TOPIC_CONFIG,
    )
    .await?;
    let fills = case.produce(&names.input, fill_records(keys)).await?;

    let mut filler = Child::spawn(
        case.bench_exe,
        &case.child_args(names, variant, Mode::Fill, fills),
        &names.log,
    )?;
    let filled = filler.report().await?;
    let stopped = filler.stopped().await?;
    let fill = micros(&filled, "elapsed_us")?;
    let fill_stop = micros(&stopped, "stop_us")?;
    let snapshot_bytes = field(&stopped, "last_full_snapshot_bytes")?;

    case.produce(&names.input, update_records(keys, 0, case.updates))
        .await?;
    let mut updater = Child::spawn(
        case.bench_exe,
        &case.child_args(names, variant, Mode::Update, fills + case.updates),
        &names.log,
    )?;
    let updated = updater.report().await?;
    let load = load_average();
    updater.stopped().await?;
    if field(&updated, "recoveries")? != 1 {
        bail!("the update process did not restore the filled state: {updated}");
    }
    let row = CommitRow {
        variant,
        keys,
        updates: case.updates,
        commits: field(&updated, "commits")?,
        p50: micros(&updated, "p50_us")?,
        p99: micros(&updated, "p99_us")?,
        max: micros(&updated, "max_us")?,
        fill,
        fill_stop,
        snapshot_bytes,
        restore: micros(&updated, "recovery_us")?,
        restored_from_full_snapshot: field(&updated, "from_full_snapshot")? == 1,
        update_elapsed: micros(&updated, "elapsed_us")?,
        load,
    };
    Ok((row, fills))
}

/// After the update run of a store: a few more updates and `kill -9`, a warm restore and
/// `kill -9`, then a cold one without the local directory.
async fn measure_warm_cold(
    case: &ScaleCase<'_>,
    names: &Names,
    keys: u64,
    fills: u64,
) -> anyhow::Result<WarmCold> {
    let end = fills + case.updates + EXTRA_UPDATES;
    case.produce(
        &names.input,
        update_records(keys, case.updates, case.updates + EXTRA_UPDATES),
    )
    .await?;
    let mut args = case.child_args(names, Variant::Store, Mode::Update, end);
    args.hold = true;
    let mut updater = Child::spawn(case.bench_exe, &args, &names.log)?;
    updater.report().await?;
    updater.kill().await?;

    let restore = |case: &ScaleCase<'_>| case.child_args(names, Variant::Store, Mode::Restore, end);
    let mut warm = Child::spawn(case.bench_exe, &restore(case), &names.log)?;
    let warm_line = warm.report().await;
    warm.kill().await?;
    let warm_line = warm_line?;
    if field(&warm_line, "from_full_snapshot")? != 0 {
        bail!("the restart on the same state directory restored from the full snapshot, not the local store: {warm_line}");
    }

    std::fs::remove_dir_all(&names.state_dir)
        .with_context(|| format!("deleting {}", names.state_dir.display()))?;
    let mut cold = Child::spawn(case.bench_exe, &restore(case), &names.log)?;
    let cold_line = cold.report().await;
    cold.kill().await?;
    let cold_line = cold_line?;
    if field(&cold_line, "from_full_snapshot")? != 1 {
        bail!("the restart without the state directory did not restore from the full snapshot: {cold_line}");
    }
    Ok(WarmCold {
        keys,
        warm: micros(&warm_line, "recovery_us")?,
        warm_replayed: field(&warm_line, "replayed")?,
        cold: micros(&cold_line, "recovery_us")?,
        cold_replayed: field(&cold_line, "replayed")?,
    })
}

/// A plain-state app writing a full snapshot every [`SNAPSHOT_EVERY`] records; what its
/// snapshot topic holds once its trims settled.
async fn measure_snapshot_topic(case: &ScaleCase<'_>) -> anyhow::Result<SnapshotTopicSize> {
    let names = case.names("snapshots");
    create_topics(
        case.bootstrap,
        &[&names.input, &names.output],
        1,
        &TOPIC_CONFIG,
    )
    .await?;
    let updates = SNAPSHOT_EVERY * (MIN_FULL_SNAPSHOTS + 20);
    let fills = case
        .produce(&names.input, fill_records(SNAPSHOT_CASE_KEYS))
        .await?;
    case.produce(&names.input, update_records(SNAPSHOT_CASE_KEYS, 0, updates))
        .await?;
    let config = AppConfig::new(&names.app_id, case.bootstrap)
        .input_topic(&names.input)
        .state_dir(&names.state_dir)
        .max_batch_records(SNAPSHOT_EVERY as usize)
        // Transactions of SNAPSHOT_EVERY records each (none cut short by the interval), so
        // every commit is followed by a full snapshot.
        .commit_interval(Duration::from_secs(2))
        .full_snapshot_every_records(SNAPSHOT_EVERY);
    let snapshot_topic = config.snapshot_topic(&names.input);
    let offsets = GroupOffsets::new(case.bootstrap, &names.app_id, &names.input, 1)?;
    let app = RunningApp::start(config, ScaleProcessor::<PlainCounters>::new(&names.output))?;
    let bootstrap = case.bootstrap;
    let measured = blocking_with(&app, |app| -> anyhow::Result<SnapshotTopicSize> {
        offsets.wait_for(fills + updates, app.started(), PHASE_LIMIT, || {
            app.check_alive()
        })?;
        app.wait_for_metrics("the full snapshots", Duration::from_secs(60), |m| {
            m.full_snapshots_written >= MIN_FULL_SNAPSHOTS
        })?;
        let reader = TopicReader::new(bootstrap)?;
        reader.wait_for_trims(&snapshot_topic, || app.metrics().snapshot_trims)?;
        let (records, bytes) = reader.readable(&snapshot_topic)?;
        let m = app.metrics();
        Ok(SnapshotTopicSize {
            keys: SNAPSHOT_CASE_KEYS,
            full_snapshots: m.full_snapshots_written,
            trims: m.snapshot_trims,
            records,
            bytes,
            full_snapshot_bytes: m.last_full_snapshot_bytes,
        })
    })
    .await;
    let stopped = app.stop().await;
    let measured = measured?;
    stopped?;
    Ok(measured)
}

/// Reads a topic as stored: every record from each partition's log start offset, committed,
/// aborted or open (`read_uncommitted`).
struct TopicReader {
    consumer: BaseConsumer<EndIsNoError>,
}

/// A consumer context that does not log reaching the end of a partition (asked for with
/// `enable.partition.eof`) as an error.
struct EndIsNoError;

impl ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::error!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for EndIsNoError {}

impl TopicReader {
    fn new(bootstrap: &str) -> anyhow::Result<Self> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "exactly-bench-snapshot-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .set("enable.partition.eof", "true")
            .create_with_context(EndIsNoError)
            .context("creating the snapshot topic reader")?;
        Ok(TopicReader { consumer })
    }

    fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            bail!("topic {topic} has no partitions");
        }
        Ok(partitions)
    }

    /// The log start offsets of `topic`'s partitions.
    fn starts(&self, topic: &str) -> anyhow::Result<Vec<i64>> {
        self.partitions(topic)?
            .into_iter()
            .map(|p| {
                self.consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(low, _)| low)
                    .with_context(|| format!("reading the watermarks of {topic}/{p}"))
            })
            .collect()
    }

    /// Waits until the trims have settled: neither the trim count nor the log start offsets
    /// changed for a few seconds (the trimming thread works off the commit path).
    fn wait_for_trims(&self, topic: &str, trims: impl Fn() -> u64) -> anyhow::Result<()> {
        const STILL_FOR: u32 = 6;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = (trims(), self.starts(topic)?);
        let mut still = 0;
        while still < STILL_FOR {
            if Instant::now() >= deadline {
                bail!("the trims of {topic} did not settle within 120 s");
            }
            std::thread::sleep(Duration::from_millis(500));
            let now = (trims(), self.starts(topic)?);
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(())
    }

    /// Records and bytes (keys, values, header names and values) readable on `topic`.
    fn readable(&self, topic: &str) -> anyhow::Result<(u64, u64)> {
        let partitions = self.partitions(topic)?;
        let mut list = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for &p in &partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading the watermarks of {topic}/{p}"))?;
            if high > low {
                list.add_partition_offset(topic, p, Offset::Offset(low))?;
                ends.insert(p, high);
            }
        }
        let (mut records, mut bytes) = (0u64, 0u64);
        if ends.is_empty() {
            return Ok((0, 0));
        }
        self.consumer.assign(&list)?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while !ends.is_empty() {
            if Instant::now() >= deadline {
                bail!("reading {topic} did not finish within 300 s");
            }
            match self.consumer.poll(Duration::from_millis(500)) {
                None => {}
                Some(Ok(message)) => {
                    records += 1;
                    bytes += message.key().map_or(0, <[u8]>::len) as u64;
                    bytes += message.payload().map_or(0, <[u8]>::len) as u64;
                    if let Some(headers) = message.headers() {
                        for h in headers.iter() {
                            bytes += (h.key.len() + h.value.map_or(0, <[u8]>::len)) as u64;
                        }
                    }
                    let p = message.partition();
                    if ends.get(&p).is_some_and(|&end| message.offset() + 1 >= end) {
                        ends.remove(&p);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    ends.remove(&p);
                }
                Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
            }
        }
        self.consumer.unassign()?;
        Ok((records, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly::testing::TestDriver;

    #[test]
    fn key_counts_parse_sorted_and_deduplicated() {
        assert_eq!(
            parse_key_counts("10000,1_000_000, 100").unwrap(),
            vec![100, 10_000, 1_000_000]
        );
        assert_eq!(parse_key_counts("5,5").unwrap(), vec![5]);
        assert!(parse_key_counts("0").is_err());
        assert!(parse_key_counts("10k").is_err());
        assert!(parse_key_counts("").is_err());
    }

    #[test]
    fn fill_records_cover_every_key_once() {
        let fills: Vec<_> = fill_records(25_000).collect();
        assert_eq!(fills.len(), 3);
        assert_eq!(
            fills[2],
            (
                "fill-20000".to_owned(),
                Command::Fill {
                    start: 20_000,
                    count: 5_000
                }
            )
        );
        let total: u64 = fills
            .iter()
            .map(|(_, c)| match c {
                Command::Fill { count, .. } => *count,
                Command::Update => 0,
            })
            .sum();
        assert_eq!(total, 25_000);
    }

    #[test]
    fn updates_spread_over_the_filled_keys() {
        for keys in [10_000, 1_000_000, 10_000_000] {
            let targets: std::collections::HashSet<u64> =
                (0..20_000).map(|n| update_target(n, keys)).collect();
            assert!(targets.iter().all(|&t| t < keys));
            // A stride coprime with the key count: no repeats before `keys` updates.
            assert_eq!(targets.len() as u64, 20_000.min(keys));
        }
        assert_eq!(update_target(7, 10_000), update_target(7, 10_000));
    }

    fn run<C: Counters>() -> (Vec<(String, u64)>, u64) {
        let mut driver = TestDriver::new(ScaleProcessor::<C>::new("out"));
        for (key, command) in fill_records(300).chain(update_records(300, 0, 500)) {
            driver.pipe("in", &key, &command).expect("process");
        }
        driver.check_snapshot_roundtrip().expect("snapshot");
        driver.verify_determinism().expect("deterministic");
        let keys = driver.state("in", 0).expect("state").keys();
        (driver.read_json("out").expect("outputs"), keys)
    }

    #[test]
    fn both_variants_count_the_same() {
        let (plain, plain_keys) = run::<PlainCounters>();
        let (store, store_keys) = run::<StoreCounters>();
        assert_eq!(plain.len(), 500);
        assert_eq!(plain, store);
        assert_eq!((plain_keys, store_keys), (300, 300));
        // 500 updates over 300 keys: the first 300 each hit a different key once.
        assert!(plain[..300].iter().all(|(_, n)| *n == 1));
        assert!(plain[300..].iter().all(|(_, n)| *n == 2));
    }

    #[test]
    fn an_update_of_a_missing_key_fails() {
        let mut driver = TestDriver::new(ScaleProcessor::<StoreCounters>::new("out"));
        assert!(driver.pipe("in", &scale_key(3), &Command::Update).is_err());
    }

    #[test]
    fn report_fields_parse() {
        let line = "SCALE-REPORT mode=update elapsed_us=12 commits=200 p99_us=5400";
        assert_eq!(field(line, "commits").unwrap(), 200);
        assert_eq!(micros(line, "p99_us").unwrap(), Duration::from_micros(5400));
        assert!(field(line, "p50_us").is_err());
        // A name that is the end of another's is not that one.
        assert_eq!(field(line, "us").ok(), None);
    }

    fn row(variant: Variant, keys: u64, p99_ms: u64) -> CommitRow {
        CommitRow {
            variant,
            keys,
            updates: 20_000,
            commits: 200,
            p50: Duration::from_millis(p99_ms / 2),
            p99: Duration::from_millis(p99_ms),
            max: Duration::from_millis(p99_ms * 2),
            fill: Duration::from_secs(1),
            fill_stop: Duration::from_secs(1),
            snapshot_bytes: 1,
            restore: Duration::from_millis(5),
            restored_from_full_snapshot: variant == Variant::Plain,
            update_elapsed: Duration::from_secs(2),
            load: Some(2.5),
        }
    }

    fn results(rows: Vec<CommitRow>) -> ScaleResults {
        ScaleResults {
            updates: 20_000,
            rows,
            warm_cold: Some(WarmCold {
                keys: 10_000_000,
                warm: Duration::from_millis(200),
                warm_replayed: 0,
                cold: Duration::from_secs(30),
                cold_replayed: 1_000,
            }),
            snapshot_topic: SnapshotTopicSize {
                keys: 10_000,
                full_snapshots: 120,
                trims: 110,
                records: 12,
                bytes: 250_000,
                full_snapshot_bytes: 200_000,
            },
        }
    }

    #[test]
    fn the_ratio_is_the_worse_variant_s() {
        let r = results(vec![
            row(Variant::Plain, 10_000, 10),
            row(Variant::Store, 10_000, 10),
            row(Variant::Plain, 10_000_000, 40),
            row(Variant::Store, 10_000_000, 15),
        ]);
        let (ratio, variant) = r.commit_p99_ratio_10m_vs_10k().unwrap();
        assert!((ratio - 4.0).abs() < 1e-9);
        assert_eq!(variant, Variant::Plain);
        assert!((r.warm_vs_cold_restore().unwrap() - 150.0).abs() < 1e-9);
        assert!((r.snapshot_topic.ratio() - 1.25).abs() < 1e-9);
        let table = r.table();
        assert!(
            table.contains("commit_p99_ratio_10m_vs_10k = 4.00"),
            "{table}"
        );
        assert!(table.contains("cold / warm = 150.0"), "{table}");
    }

    #[test]
    fn no_ratio_without_both_sizes_and_variants() {
        let r = results(vec![
            row(Variant::Plain, 10_000, 10),
            row(Variant::Store, 10_000, 10),
            row(Variant::Plain, 100_000, 40),
            row(Variant::Store, 100_000, 15),
        ]);
        assert_eq!(r.commit_p99_ratio_10m_vs_10k(), None);
        assert!((r.p99_ratio(Variant::Plain, 10_000, 100_000).unwrap() - 4.0).abs() < 1e-9);
        assert!(r.table().contains("commit_p99_ratio_10m_vs_10k: n/a"));
        let one_variant = results(vec![
            row(Variant::Store, 10_000, 10),
            row(Variant::Store, 10_000_000, 15),
        ]);
        assert_eq!(one_variant.commit_p99_ratio_10m_vs_10k(), None);
    }
}

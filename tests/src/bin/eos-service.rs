//! A small stateful service built on `exactly`, used by the framework's integration tests
//! (kill -9, zombie, rebalance, error policies, recovery).
//!
//! Input: key = any UTF-8 string, value = a unique record id (UTF-8).
//! State per partition: the number of records seen per key.
//! Output (to `--output`): key = the input key, value = `"<id> <key> <count>"` where `count`
//! is the key's running count after this record. A reference model computed from the input
//! (counts per key in offset order) predicts every output value, so both lost/duplicated
//! outputs and lost/duplicated state show up.
//!
//! Records whose id equals `--poison` make the processor return an error, and `--panic-on`
//! makes it panic; with `--nondeterministic` the state also depends on the process id
//! (recovery must detect it).
//! Upgrades: `--state-v2` adds a defaulted field to the state type, `--state-v3` one without
//! a default (migrated from version 1's state with `--migrate`), `--output-v2` appends
//! ` v2` to every output value, and `--processor-version` is what `Processor::version` returns.
//! `--store` keeps the counts in a keyed store ([`exactly::Store`]: RocksDB under
//! `EXACTLY_STATE_DIR`) instead of a map in the state; `--poison-after-write` makes the poison
//! record write to the state before it fails (the write must not survive it).
//! Metrics are printed as `EXACTLY_METRICS {json}` lines whenever they change.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use exactly::{
    App, AppConfig, BoxError, ErrorPolicy, GroupProtocol, Json, OldState, Output, OutputRecord,
    ProcessError, Processor, Record, Store, Utf8,
};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "exactly test service: per-key running counts")]
struct Args {
    #[arg(long, env = "EOS_BROKERS")]
    brokers: String,
    #[arg(long, env = "EOS_APP_ID")]
    app_id: String,
    #[arg(long, env = "EOS_INPUT")]
    input: String,
    #[arg(long, env = "EOS_OUTPUT")]
    output: String,
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// The group consumer's `group.instance.id` (static membership).
    #[arg(long)]
    group_instance_id: Option<String>,
    /// A librdkafka property of the consumers, `NAME=VALUE` (repeatable).
    #[arg(long = "consumer-kafka", value_name = "NAME=VALUE", value_parser = parse_property)]
    consumer_kafka: Vec<(String, String)>,
    #[arg(long, default_value_t = 10_000)]
    max_batch_records: usize,
    #[arg(long, default_value_t = 100_000)]
    full_snapshot_every: u64,
    #[arg(long, default_value_t = 60_000)]
    full_snapshot_interval_ms: u64,
    /// AppConfig::max_recovery_time (0: no bound).
    #[arg(long, default_value_t = 0)]
    max_recovery_time_ms: u64,
    /// AppConfig::stuck_input_after (0: off).
    #[arg(long, default_value_t = 300_000)]
    stuck_input_after_ms: u64,
    /// AppConfig::metrics_addr: serve Prometheus metrics here (port 0: any; the bound address
    /// is printed as `METRICS_ADDR <addr>`).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    full_snapshots: bool,
    /// Delete what lies below each committed full snapshot (AppConfig::snapshot_trimming).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    snapshot_trimming: bool,
    /// fail | skip | dead-letter:<topic>
    #[arg(long, default_value = "fail")]
    error_policy: String,
    /// Record id that makes the processor return an error.
    #[arg(long)]
    poison: Option<String>,
    /// Mix the process id into the state (a deliberately non-deterministic processor).
    #[arg(long)]
    nondeterministic: bool,
    /// Grow the state by this many entries (`pad-NNNNNNN` counted 0) at its first record: a
    /// large state, deterministically.
    #[arg(long, default_value_t = 0)]
    pad_state: usize,
    /// Sleep this long per record (to keep transactions open for kill/pause tests).
    #[arg(long, default_value_t = 0)]
    per_record_delay_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    transaction_timeout_ms: u64,
    /// consumer (KIP-848, the framework's default) or cooperative-sticky.
    #[arg(long, default_value = "consumer")]
    group_protocol: String,
    /// Override the classic protocol's assignor (e.g. `range`, an eager one).
    #[arg(long)]
    assignment_strategy: Option<String>,
    /// Sleep this long the first time this process processes record `ID` (`ID:MS`): a
    /// transaction that outlives the transaction timeout once, deterministic in its outputs.
    #[arg(long, value_name = "ID:MS")]
    slow_once: Option<String>,
    /// Record id that makes the processor panic (`panic!("panic on record ID")`).
    #[arg(long, value_name = "ID")]
    panic_on: Option<String>,
    /// AppConfig::max_consecutive_aborts (default: the framework's).
    #[arg(long)]
    max_consecutive_aborts: Option<u32>,
    /// AppConfig::max_chunk_bytes: serialized state per full snapshot record.
    #[arg(long)]
    max_chunk_bytes: Option<usize>,
    /// AppConfig::max_buffered_bytes: fetched bytes held for a busy partition before the
    /// runtime pauses fetching it (small values keep the fetch position close to the worker).
    #[arg(long)]
    max_buffered_bytes: Option<usize>,
    /// Version 2 of the state type: one more field, `#[serde(default)]`.
    #[arg(long)]
    state_v2: bool,
    /// Version 3 of the state type: a field added without a default (an incompatible change).
    #[arg(long, conflicts_with = "state_v2")]
    state_v3: bool,
    /// Convert older states in `Processor::migrate_state` (for `--state-v3`).
    #[arg(long)]
    migrate: bool,
    /// Version 2 of the outputs: ` v2` appended to every value.
    #[arg(long)]
    output_v2: bool,
    /// What `Processor::version` returns.
    #[arg(long, default_value_t = 0)]
    processor_version: u32,
    /// Keep the counts in a keyed store (RocksDB under EXACTLY_STATE_DIR).
    #[arg(long, conflicts_with_all = ["state_v2", "state_v3"])]
    store: bool,
    /// The poison record bumps its key's count before it fails.
    #[arg(long)]
    poison_after_write: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Counts {
    counts: BTreeMap<String, u64>,
    salt: u64,
}

/// `Counts` after a compatible change: a field added with a default.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CountsV2 {
    counts: BTreeMap<String, u64>,
    salt: u64,
    #[serde(default)]
    records: u64,
}

/// `Counts` after an incompatible change: a field added without a default.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CountsV3 {
    counts: BTreeMap<String, u64>,
    salt: u64,
    generation: u64,
}

/// The counts in a keyed store.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreCounts {
    counts: Store<Utf8, Json<u64>>,
    salt: u64,
}

/// What the processor needs of its state, in any version.
trait CountState: Serialize + serde::de::DeserializeOwned + Default + Send + 'static {
    fn counts(&mut self) -> &mut BTreeMap<String, u64>;
    fn salt(&mut self) -> &mut u64;
    /// One more record of `key`: its new count.
    fn bump(&mut self, key: &str) -> Result<u64, ProcessError> {
        let count = self.counts().entry(key.to_owned()).or_default();
        *count += 1;
        Ok(*count)
    }
    /// At least `entries` entries (padding keys `pad-<i>`).
    fn pad(&mut self, entries: usize) -> Result<(), ProcessError> {
        if self.counts().len() < entries {
            let counts = self.counts();
            for i in 0..entries {
                counts.entry(format!("pad-{i:07}")).or_default();
            }
        }
        Ok(())
    }
    /// One more record seen (version 2 counts them).
    fn seen(&mut self) {}
    /// Converts a state of an older version (`Processor::migrate_state`).
    fn migrate(_old: &OldState<'_>) -> Result<Option<Self>, BoxError> {
        Ok(None)
    }
}

impl CountState for CountsV3 {
    fn counts(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.counts
    }
    fn salt(&mut self) -> &mut u64 {
        &mut self.salt
    }
    fn migrate(old: &OldState<'_>) -> Result<Option<Self>, BoxError> {
        let Counts { counts, salt } = old.decode()?;
        Ok(Some(CountsV3 {
            counts,
            salt,
            generation: 1,
        }))
    }
}

impl CountState for StoreCounts {
    fn counts(&mut self) -> &mut BTreeMap<String, u64> {
        unreachable!("StoreCounts overrides every user of counts()")
    }
    fn salt(&mut self) -> &mut u64 {
        &mut self.salt
    }
    fn bump(&mut self, key: &str) -> Result<u64, ProcessError> {
        let key = key.to_owned();
        let count = self.counts.get(&key)?.unwrap_or(0) + 1;
        self.counts.put(&key, &count)?;
        Ok(count)
    }
    fn pad(&mut self, entries: usize) -> Result<(), ProcessError> {
        if self.counts.len() < entries as u64 {
            for i in 0..entries {
                let key = format!("pad-{i:07}");
                if !self.counts.contains_key(&key)? {
                    self.counts.put(&key, &0)?;
                }
            }
        }
        Ok(())
    }
}

impl CountState for Counts {
    fn counts(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.counts
    }
    fn salt(&mut self) -> &mut u64 {
        &mut self.salt
    }
}

impl CountState for CountsV2 {
    fn counts(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.counts
    }
    fn salt(&mut self) -> &mut u64 {
        &mut self.salt
    }
    fn seen(&mut self) {
        self.records += 1;
    }
}

struct EosCounter<S> {
    state: std::marker::PhantomData<fn() -> S>,
    version: u32,
    migrate: bool,
    output_suffix: &'static str,
    output: String,
    poison: Option<String>,
    poison_after_write: bool,
    panic_on: Option<String>,
    salt: Option<u64>,
    pad_state: usize,
    delay: Duration,
    /// (record id, delay, already slept): timing only, never state or outputs.
    slow_once: Option<(String, Duration, std::sync::atomic::AtomicBool)>,
}

fn parse_slow_once(spec: &str) -> Result<(String, Duration), String> {
    let (id, ms) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("--slow-once expects ID:MS, got {spec:?}"))?;
    let ms: u64 = ms
        .parse()
        .map_err(|_| format!("--slow-once: {ms:?} is not a number of milliseconds"))?;
    Ok((id.to_owned(), Duration::from_millis(ms)))
}

impl<S: CountState> Processor for EosCounter<S> {
    type State = S;
    type Key = Utf8;
    type Value = Utf8;

    fn version(&self) -> u32 {
        self.version
    }

    fn migrate_state(&self, _from_version: u32, old: &OldState<'_>) -> Result<Option<S>, BoxError> {
        if self.migrate {
            S::migrate(old)
        } else {
            Ok(None)
        }
    }

    fn process(
        &self,
        state: &mut S,
        record: &Record<'_, String, String>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let id = record.value();
        if self.poison.as_deref() == Some(id.as_str()) {
            if self.poison_after_write {
                state.bump(record.key())?;
            }
            return Err(format!("poison record {id}").into());
        }
        if self.panic_on.as_deref() == Some(id.as_str()) {
            panic!("panic on record {id}");
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if let Some((slow_id, delay, slept)) = &self.slow_once {
            if slow_id == id && !slept.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!(id = %id, delay_ms = delay.as_millis() as u64, "processing a record slowly, once");
                std::thread::sleep(*delay);
            }
        }
        state.pad(self.pad_state)?;
        let count = state.bump(record.key())?;
        if let Some(salt) = self.salt {
            *state.salt() = state.salt().wrapping_add(salt);
        }
        state.seen();
        out.send(
            OutputRecord::new(&self.output)
                .key(record.key().as_bytes())
                .value(format!(
                    "{id} {} {count}{}",
                    record.key(),
                    self.output_suffix
                )),
        );
        Ok(())
    }
}

fn error_policy(spec: &str) -> Result<ErrorPolicy, String> {
    match spec {
        "fail" => Ok(ErrorPolicy::Fail),
        "skip" => Ok(ErrorPolicy::Skip),
        other => match other.strip_prefix("dead-letter:") {
            Some(topic) if !topic.is_empty() => Ok(ErrorPolicy::DeadLetter {
                topic: topic.to_owned(),
            }),
            _ => Err(format!("unknown error policy {other:?}")),
        },
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let policy = match error_policy(&args.error_policy) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("eos-service: {e}");
            std::process::exit(2);
        }
    };
    let config = AppConfig::new(&args.app_id, &args.brokers)
        .input_topic(&args.input)
        .commit_interval(Duration::from_millis(args.commit_interval_ms))
        .max_batch_records(args.max_batch_records)
        .full_snapshot_every_records(args.full_snapshot_every)
        .full_snapshot_interval(Duration::from_millis(args.full_snapshot_interval_ms))
        .stuck_input_after(Duration::from_millis(args.stuck_input_after_ms))
        .full_snapshots(args.full_snapshots)
        .snapshot_trimming(args.snapshot_trimming)
        .error_policy(policy)
        .transaction_timeout(Duration::from_millis(args.transaction_timeout_ms));
    let config = match args.metrics_addr {
        Some(addr) => config.metrics_addr(addr),
        None => config,
    };
    let config = match args.max_recovery_time_ms {
        0 => config,
        ms => config.max_recovery_time(Duration::from_millis(ms)),
    };
    let config = match args.group_protocol.as_str() {
        // Fast group membership changes for the rebalance / zombie tests.
        "cooperative-sticky" => config
            .group_protocol(GroupProtocol::CooperativeSticky)
            .consumer_kafka("session.timeout.ms", "6000")
            .consumer_kafka("heartbeat.interval.ms", "500"),
        // The broker owns session timeouts under KIP-848.
        "consumer" => config.group_protocol(GroupProtocol::Consumer),
        other => {
            eprintln!("eos-service: unknown --group-protocol {other:?}");
            std::process::exit(2);
        }
    };
    let config = match &args.group_instance_id {
        Some(id) => config.instance_id(id),
        None => config,
    };
    let config = args
        .consumer_kafka
        .iter()
        .fold(config, |config, (name, value)| {
            config.consumer_kafka(name, value)
        });
    let config = match &args.assignment_strategy {
        Some(strategy) => config.consumer_kafka("partition.assignment.strategy", strategy),
        None => config,
    };
    let config = match args.max_consecutive_aborts {
        Some(aborts) => config.max_consecutive_aborts(aborts),
        None => config,
    };
    let config = match args.max_chunk_bytes {
        Some(bytes) => config.max_chunk_bytes(bytes),
        None => config,
    };
    let config = match args.max_buffered_bytes {
        Some(bytes) => config.max_buffered_bytes(bytes),
        None => config,
    };
    // EXACTLY_KAFKA_* (security settings, ...) apply last, as in a real service.
    let config = match config.from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("eos-service: {e}");
            std::process::exit(2);
        }
    };
    let slow_once = match args.slow_once.as_deref().map(parse_slow_once).transpose() {
        Ok(slow) => slow,
        Err(e) => {
            eprintln!("eos-service: {e}");
            std::process::exit(2);
        }
    };
    if args.store {
        run(config, counter::<StoreCounts>(&args, slow_once)).await
    } else if args.state_v2 {
        run(config, counter::<CountsV2>(&args, slow_once)).await
    } else if args.state_v3 {
        run(config, counter::<CountsV3>(&args, slow_once)).await
    } else {
        run(config, counter::<Counts>(&args, slow_once)).await
    }
}

fn counter<S>(args: &Args, slow_once: Option<(String, Duration)>) -> EosCounter<S> {
    EosCounter {
        state: std::marker::PhantomData,
        version: args.processor_version,
        migrate: args.migrate,
        output_suffix: if args.output_v2 { " v2" } else { "" },
        output: args.output.clone(),
        poison: args.poison.clone(),
        poison_after_write: args.poison_after_write,
        panic_on: args.panic_on.clone(),
        salt: args.nondeterministic.then(|| u64::from(std::process::id())),
        pad_state: args.pad_state,
        delay: Duration::from_millis(args.per_record_delay_ms),
        slow_once: slow_once
            .map(|(id, delay)| (id, delay, std::sync::atomic::AtomicBool::new(false))),
    }
}

/// Runs the app until SIGTERM, printing metrics; exits 1 on failure, 2 on a bad setup.
async fn run<S: CountState>(config: AppConfig, processor: EosCounter<S>) {
    let app = match App::new(config, processor) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("eos-service failed: {e}");
            std::process::exit(2);
        }
    };
    if let Some(addr) = app.metrics_addr() {
        println!("METRICS_ADDR {addr}");
    }
    let metrics = app.metrics();
    let final_metrics = metrics.clone();
    let reporter = tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let line = metrics_line(&metrics.snapshot());
            if line != last {
                println!("EXACTLY_METRICS {line}");
                last = line;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let result = app.run().await;
    reporter.abort();
    println!(
        "EXACTLY_METRICS {}",
        metrics_line(&final_metrics.snapshot())
    );
    match result {
        Ok(()) => println!("eos-service stopped cleanly"),
        Err(e) => {
            println!("eos-service failed: {e}");
            std::process::exit(1);
        }
    }
}

fn metrics_line(m: &exactly::MetricsSnapshot) -> String {
    serde_json::json!({
        "records_processed": m.records_processed,
        "records_skipped": m.records_skipped,
        "records_dead_lettered": m.records_dead_lettered,
        "transactions_committed": m.transactions_committed,
        "transactions_aborted": m.transactions_aborted,
        "full_snapshots_written": m.full_snapshots_written,
        "full_snapshot_ms": m.full_snapshot_time_total.as_millis() as u64,
        "snapshot_trims": m.snapshot_trims,
        "snapshot_trim_failures": m.snapshot_trim_failures,
        "recoveries": m.recoveries,
        "fresh_starts": m.fresh_starts,
        "recoveries_from_full_snapshot": m.recoveries_from_full_snapshot,
        "last_recovery_replayed_records": m.last_recovery_replayed_records,
        "last_recovery_ms": m.last_recovery_time.as_millis() as u64,
        "max_recovery_replayed_records": m.max_recovery_replayed_records,
        "partitions_assigned": m.partitions_assigned,
        "partitions_fenced": m.partitions_fenced,
        "max_buffered_bytes": m.max_buffered_bytes,
        "stuck_input_partitions": m.stuck_input_partitions,
    })
    .to_string()
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))
}

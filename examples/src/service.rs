//! What the three service binaries share: command-line flags (with environment fallbacks),
//! logging, and running a processor until SIGTERM.

use std::io::IsTerminal;
use std::time::Duration;

use exactly::{App, AppConfig, ErrorPolicy, Processor};

use crate::ledger::Ledger;
use crate::stats::Stats;
use crate::validate::Validate;

/// Default bootstrap servers.
pub const DEFAULT_BROKERS: &str = "localhost:9092";
/// Default topic of payment commands (input of `validate`).
pub const DEFAULT_COMMANDS_TOPIC: &str = "payments.commands";
/// Default topic of transfer legs (output of `validate` and `ledger`, input of `ledger`).
pub const DEFAULT_LEDGER_TOPIC: &str = "payments.ledger";
/// Default dead-letter topic of `validate`.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "payments.dead-letters";
/// Default topic of balance events (output of `ledger`, input of `stats`).
pub const DEFAULT_BALANCES_TOPIC: &str = "payments.balances";
/// Default topic of the ledger's rejections.
pub const DEFAULT_REJECTIONS_TOPIC: &str = "payments.rejections";
/// Default topic of `stats`' summaries.
pub const DEFAULT_STATS_TOPIC: &str = "payments.stats";

/// Flags every service has. Every flag falls back to an environment variable; the `EXACTLY_*`
/// ones are the framework's own (see [`AppConfig`]), so `EXACTLY_KAFKA_*` and friends work
/// too.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Kafka bootstrap servers (comma-separated host:port).
    #[arg(long, env = "EXACTLY_BROKERS", default_value = DEFAULT_BROKERS)]
    pub brokers: String,
    /// Application id: consumer group, transactional-id prefix, snapshot topic prefix.
    /// Defaults to the service's name.
    #[arg(long, env = "EXACTLY_APP_ID")]
    pub app_id: Option<String>,
    /// Longest time a transaction collects records, in ms.
    #[arg(long, env = "EXACTLY_COMMIT_INTERVAL_MS", default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// Write a full state snapshot after this many records (bounds recovery replay).
    #[arg(
        long,
        env = "EXACTLY_FULL_SNAPSHOT_EVERY_RECORDS",
        default_value_t = 5_000
    )]
    pub snapshot_every_records: u64,
    /// Write a full state snapshot at least this often while records arrive, in ms.
    #[arg(
        long,
        env = "EXACTLY_FULL_SNAPSHOT_INTERVAL_MS",
        default_value_t = 10_000
    )]
    pub snapshot_interval_ms: u64,
    /// How often to log the service's metrics, in ms (0 = never).
    #[arg(long, env = "PAYMENTS_METRICS_INTERVAL_MS", default_value_t = 10_000)]
    pub metrics_interval_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any free port; the address is
    /// logged as `metrics endpoint listening`). EXACTLY_METRICS_ADDR sets it too.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Installs the `tracing` subscriber: `RUST_LOG` (default `info`), no colours unless stdout is
/// a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// Builds the configuration of service `name` reading `input_topic`, runs `processor` until
/// SIGTERM / ctrl-c (graceful: commit, final snapshot, leave the group) and logs its metrics
/// periodically and at the end.
pub async fn run<P: Processor>(
    name: &str,
    common: &CommonArgs,
    input_topic: &str,
    error_policy: ErrorPolicy,
    processor: P,
) -> anyhow::Result<()> {
    let app_id = common.app_id.clone().unwrap_or_else(|| name.to_owned());
    let config = AppConfig::new(&app_id, &common.brokers)
        .input_topic(input_topic)
        .commit_interval(Duration::from_millis(common.commit_interval_ms))
        .full_snapshot_every_records(common.snapshot_every_records)
        .full_snapshot_interval(Duration::from_millis(common.snapshot_interval_ms))
        .error_policy(error_policy);
    let config = match common.metrics_addr {
        Some(addr) => config.metrics_addr(addr),
        None => config,
    }
    // Any EXACTLY_* variable (e.g. EXACTLY_KAFKA_SECURITY_PROTOCOL) applies last.
    .from_env()?;
    tracing::info!(
        service = name,
        app_id = config.app_id(),
        brokers = config.bootstrap_servers(),
        input_topic,
        "service starting"
    );
    let app = App::new(config, processor)?;
    let metrics = app.metrics();
    let reporter = (common.metrics_interval_ms > 0).then(|| {
        let metrics = metrics.clone();
        let every = Duration::from_millis(common.metrics_interval_ms);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                log_metrics(&metrics.snapshot(), "metrics");
            }
        })
    });
    let result = app.run().await;
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    log_metrics(&metrics.snapshot(), "final metrics");
    match result {
        Ok(()) => {
            tracing::info!(service = name, "service stopped");
            Ok(())
        }
        Err(error) => {
            tracing::error!(service = name, error = %error, "service failed");
            Err(error.into())
        }
    }
}

fn log_metrics(m: &exactly::MetricsSnapshot, what: &'static str) {
    tracing::info!(
        records_processed = m.records_processed,
        records_dead_lettered = m.records_dead_lettered,
        output_records = m.output_records,
        transactions_committed = m.transactions_committed,
        transactions_aborted = m.transactions_aborted,
        full_snapshots_written = m.full_snapshots_written,
        recoveries = m.recoveries,
        max_recovery_ms = m.max_recovery_time.as_millis() as u64,
        partitions_assigned = m.partitions_assigned,
        "{what}"
    );
}

/// Flags of service A, `validate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Input: payment commands.
    #[arg(long, env = "PAYMENTS_COMMANDS_TOPIC", default_value = DEFAULT_COMMANDS_TOPIC)]
    pub commands_topic: String,
    /// Output: ledger legs (the ledger's input).
    #[arg(long, env = "PAYMENTS_LEDGER_TOPIC", default_value = DEFAULT_LEDGER_TOPIC)]
    pub ledger_topic: String,
    /// Output: malformed and invalid commands (original record + `exactly.*` headers).
    #[arg(long, env = "PAYMENTS_DEAD_LETTER_TOPIC", default_value = DEFAULT_DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,
}

/// Runs service A until SIGTERM.
pub async fn run_validate(args: ValidateArgs) -> anyhow::Result<()> {
    // Undecodable records are dead-lettered by the framework; invalid commands by the
    // processor, to the same topic in the same shape.
    let policy = ErrorPolicy::DeadLetter {
        topic: args.dead_letter_topic.clone(),
    };
    let processor = Validate {
        ledger_topic: args.ledger_topic,
        dead_letter_topic: args.dead_letter_topic,
    };
    run(
        "validate",
        &args.common,
        &args.commands_topic,
        policy,
        processor,
    )
    .await
}

/// Flags of service B, `ledger`.
#[derive(Debug, Clone, clap::Args)]
pub struct LedgerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Input: ledger legs. Also an output: the credit legs of accepted debits.
    #[arg(long, env = "PAYMENTS_LEDGER_TOPIC", default_value = DEFAULT_LEDGER_TOPIC)]
    pub ledger_topic: String,
    /// Output: balance-changed events.
    #[arg(long, env = "PAYMENTS_BALANCES_TOPIC", default_value = DEFAULT_BALANCES_TOPIC)]
    pub balances_topic: String,
    /// Output: refused debits.
    #[arg(long, env = "PAYMENTS_REJECTIONS_TOPIC", default_value = DEFAULT_REJECTIONS_TOPIC)]
    pub rejections_topic: String,
}

/// Runs service B until SIGTERM.
pub async fn run_ledger(args: LedgerArgs) -> anyhow::Result<()> {
    let processor = Ledger {
        ledger_topic: args.ledger_topic.clone(),
        balances_topic: args.balances_topic,
        rejections_topic: args.rejections_topic,
    };
    // Legs come from `validate` and from the ledger itself: a bad one is a bug upstream that
    // needs a human, so the partition stops on it (ErrorPolicy::Fail).
    run(
        "ledger",
        &args.common,
        &args.ledger_topic,
        ErrorPolicy::Fail,
        processor,
    )
    .await
}

/// Flags of service C, `stats`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Input: balance-changed events.
    #[arg(long, env = "PAYMENTS_BALANCES_TOPIC", default_value = DEFAULT_BALANCES_TOPIC)]
    pub balances_topic: String,
    /// Output: account summaries.
    #[arg(long, env = "PAYMENTS_STATS_TOPIC", default_value = DEFAULT_STATS_TOPIC)]
    pub stats_topic: String,
}

/// Runs service C until SIGTERM.
pub async fn run_stats(args: StatsArgs) -> anyhow::Result<()> {
    let processor = Stats {
        summaries_topic: args.stats_topic,
    };
    run(
        "stats",
        &args.common,
        &args.balances_topic,
        ErrorPolicy::Fail,
        processor,
    )
    .await
}

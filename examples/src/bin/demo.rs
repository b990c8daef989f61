//! The one-command demo: the payments chain A → B → C through a crash, checked end to end.
//!
//! `cargo run --release -p exactly-examples --bin demo [-- --count N --seed S --brokers H:P]`
//!
//! 1. Starts a local Apache Kafka with the fault-injecting proxy in front (unless `--brokers`).
//! 2. Creates the chain's topics (8 partitions).
//! 3. Starts `validate`, two `ledger` instances and `stats` as child processes, and produces
//!    the seeded payment commands at a steady rate.
//! 4. Half-way through, kills one `ledger` instance with SIGKILL and restarts it.
//! 5. Waits until every service has consumed everything committed on its input (checked
//!    with the groups' committed offsets, not with a sleep), stops the services with SIGTERM.
//! 6. Reads every output topic back with read_committed, checks for duplicates and missing
//!    records, compares B's final balances and C's totals with the reference model, and
//!    prints `EOS-CHECK ...`. Exits non-zero on any mismatch.
//!
//! The services are this same executable, re-run with a hidden `service-*` subcommand: a
//! `cargo run --bin demo` builds only the demo binary, so separate service binaries next to
//! it would be missing or stale. They run exactly the code of the `validate`, `ledger` and
//! `stats` binaries (`exactly_examples::service`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand};
use exactly_examples::generator::{self, InputCommand, Intent};
use exactly_examples::model;
use exactly_examples::producer::{command_producer, command_record, send_waiting, DeliveryCounter};
use exactly_examples::service::{self, LedgerArgs, StatsArgs, ValidateArgs};
use exactly_examples::topics::create_topics;
use exactly_examples::verify::{verify_chain, OutputTopics, TopicCheck};
use exactly_tests::chaos::ChainTopics;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::eos::CheckOptions;
use exactly_tests::kafka::ClusterOptions;
use exactly_tests::process::{ProcessSpec, Supervisor};
use exactly_tests::security::Connection;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "exactly demo: payments A -> B -> C through a SIGKILL, checked end to end"
)]
struct Cli {
    #[command(subcommand)]
    service: Option<ServiceCommand>,
    #[command(flatten)]
    demo: DemoArgs,
}

/// The services, run by the demo as its own child processes.
#[derive(Debug, Subcommand)]
enum ServiceCommand {
    #[command(name = "service-validate", hide = true)]
    Validate(ValidateArgs),
    #[command(name = "service-ledger", hide = true)]
    Ledger(LedgerArgs),
    #[command(name = "service-stats", hide = true)]
    Stats(StatsArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct DemoArgs {
    /// Use these Kafka brokers instead of starting a local Apache Kafka.
    #[arg(long, env = "DEMO_BROKERS")]
    brokers: Option<String>,
    /// Payment commands to produce.
    #[arg(long, default_value_t = 30_000)]
    count: usize,
    /// Production rate, commands per second (0 = as fast as possible).
    #[arg(long, default_value_t = 1_200)]
    rate: u64,
    /// Seed of the command generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of accounts.
    #[arg(long, default_value_t = 2_000)]
    accounts: u64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Kill a ledger instance when this fraction of the commands has been produced.
    #[arg(long, default_value_t = 0.5)]
    kill_at: f64,
    /// Longest wait for the chain to drain after the last command, in seconds.
    #[arg(long, default_value_t = 300)]
    drain_timeout_secs: u64,
    /// Directory for the services' logs (default: a fresh one under the temp directory).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Start a secured local Kafka and run the services through it by configuration alone
    /// (EXACTLY_KAFKA_*): plain (SASL/PLAIN), scram (SASL/SCRAM-SHA-512), tls or mtls. The
    /// demo's own clients use the cluster's super user.
    #[arg(long, conflicts_with = "brokers", value_parser = ["plain", "scram", "tls", "mtls"])]
    security: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("demo: cannot start the tokio runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.service {
            Some(command) => {
                service::init_logging();
                match command {
                    ServiceCommand::Validate(args) => service::run_validate(args).await,
                    ServiceCommand::Ledger(args) => service::run_ledger(args).await,
                    ServiceCommand::Stats(args) => service::run_stats(args).await,
                }
                .map(|()| true)
            }
            None => {
                // On ctrl-c / SIGTERM the demo's future is dropped, and with it the services
                // (killed and reaped by the supervisor) and the local broker.
                tokio::select! {
                    result = run_demo(cli.demo) => result,
                    () = interrupted() => Err(anyhow!("interrupted; services and broker stopped")),
                }
            }
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Resolves on ctrl-c or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Topic and app names of one demo run (unique, so runs never see each other's data).
#[derive(Debug, Clone)]
struct Names {
    topics: ChainTopics,
    validate_app: String,
    ledger_app: String,
    stats_app: String,
}

impl Names {
    fn new(run: &str) -> Self {
        Names {
            topics: ChainTopics::new(run),
            validate_app: format!("{run}-validate"),
            ledger_app: format!("{run}-ledger"),
            stats_app: format!("{run}-stats"),
        }
    }
    fn outputs(&self) -> OutputTopics<'_> {
        OutputTopics {
            dead_letters: &self.topics.dead_letters,
            ledger: &self.topics.ledger,
            balances: &self.topics.balances,
            rejections: &self.topics.rejections,
            stats: &self.topics.stats,
        }
    }
}

/// Sends the demo's own `tracing` output (broker launcher, proxy, checker) to a file, so the
/// terminal shows only the demo's story. `DEMO_LOG` sets the filter.
fn init_harness_log(path: &std::path::Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the harness log {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DEMO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,exactly_tests=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .init();
    Ok(())
}

/// How many state mismatches the summary lists (the count of all of them follows).
const STATE_PROBLEMS_SHOWN: usize = 20;

/// Prints a progress line with the time since the demo started.
fn say(started: Instant, line: impl std::fmt::Display) {
    println!("[{:6.1}s] {line}", started.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let run = unique_name("demo");
    let log_dir = match &args.log_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join("exactly-demo").join(&run),
    };
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating the log directory {}", log_dir.display()))?;
    init_harness_log(&log_dir.join("harness.log"))?;
    let (cluster, bootstrap) = match &args.brokers {
        Some(brokers) => (None, brokers.clone()),
        None => {
            say(
                started,
                "starting a local Apache Kafka behind the fault-injecting proxy",
            );
            let cluster = match &args.security {
                None => TestCluster::start().await,
                Some(_) => {
                    TestCluster::start_owned(ClusterOptions {
                        secured: true,
                        ..ClusterOptions::default()
                    })
                    .await
                }
            }
            .context("starting the local Apache Kafka")?;
            let bootstrap = cluster.bootstrap_servers();
            (Some(cluster), bootstrap)
        }
    };
    let names = Names::new(&run);
    say(started, format_args!("brokers {bootstrap}; run {run}"));
    let access = match (&args.security, &cluster) {
        (Some(mechanism), Some(cluster)) => {
            let access = secured_access(cluster, mechanism, &run)?;
            say(
                started,
                format_args!(
                    "services connect with {mechanism} to {} as {}, with prefix ACLs on {run}",
                    access.bootstrap, access.principal
                ),
            );
            access
        }
        _ => Connection {
            bootstrap: bootstrap.clone(),
            env: Vec::new(),
            principal: String::new(),
        },
    };

    let commands = generator::generate(args.seed, args.count, args.accounts);
    let expectation = model::expect(&commands).context("the reference model refused the input")?;
    create_topics(&bootstrap, &names.topics.all(), args.partitions, &[]).await?;
    say(
        started,
        format_args!("created 6 topics with {} partitions", args.partitions),
    );

    let exe = std::env::current_exe().context("locating the demo executable")?;
    let mut services = Supervisor::new();
    let service_spec = |name: &str, subcommand: &str, app: &str, topics: &[(&str, &str)]| {
        let mut spec = ProcessSpec::new(&exe)
            .arg(subcommand)
            .args(["--brokers", &access.bootstrap, "--app-id", app])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env_remove("EXACTLY_APP_ID")
            .env_remove("EXACTLY_BROKERS")
            .env_remove("EXACTLY_BOOTSTRAP_SERVERS")
            .env_remove("EXACTLY_INPUT_TOPICS")
            // Each service its own state dir (the ledger keeps its accounts in a store).
            .env("EXACTLY_STATE_DIR", log_dir.join("state").join(name))
            .log_file(log_dir.join(format!("{name}.log")));
        for (flag, topic) in topics {
            spec = spec.args([*flag, *topic]);
        }
        for (name, value) in &access.env {
            spec = spec.env(name, value);
        }
        spec
    };
    let specs = [
        (
            "validate",
            service_spec(
                "validate",
                "service-validate",
                &names.validate_app,
                &[
                    ("--commands-topic", &names.topics.commands),
                    ("--ledger-topic", &names.topics.ledger),
                    ("--dead-letter-topic", &names.topics.dead_letters),
                ],
            ),
        ),
        (
            "ledger-1",
            service_spec(
                "ledger-1",
                "service-ledger",
                &names.ledger_app,
                &[
                    ("--ledger-topic", &names.topics.ledger),
                    ("--balances-topic", &names.topics.balances),
                    ("--rejections-topic", &names.topics.rejections),
                ],
            ),
        ),
        (
            "ledger-2",
            service_spec(
                "ledger-2",
                "service-ledger",
                &names.ledger_app,
                &[
                    ("--ledger-topic", &names.topics.ledger),
                    ("--balances-topic", &names.topics.balances),
                    ("--rejections-topic", &names.topics.rejections),
                ],
            ),
        ),
        (
            "stats",
            service_spec(
                "stats",
                "service-stats",
                &names.stats_app,
                &[
                    ("--balances-topic", &names.topics.balances),
                    ("--stats-topic", &names.topics.stats),
                ],
            ),
        ),
    ];
    for (name, spec) in specs {
        services.spawn(name, spec)?;
    }
    for name in ["validate", "ledger-1", "ledger-2", "stats"] {
        services
            .child(name)?
            .wait_for_log("consumer started", Duration::from_secs(60))
            .await?;
    }
    say(
        started,
        format_args!(
            "started validate, ledger-1, ledger-2, stats (logs in {})",
            log_dir.display()
        ),
    );

    let probes = Arc::new(Probes::new(&bootstrap, &names, args.partitions)?);
    let mut producer = InputProducer::start(
        &bootstrap,
        &names.topics.commands,
        commands.clone(),
        args.rate,
    )?;
    say(
        started,
        format_args!(
            "producing {} payment commands at {} per second (seed {})",
            commands.len(),
            args.rate,
            args.seed
        ),
    );

    // Live phase: progress, the crash, and watching that no service dies on its own.
    let kill_threshold = ((commands.len() as f64) * args.kill_at.clamp(0.0, 1.0)) as u64;
    let mut killed_at: Option<u64> = None;
    let reporter = ProgressReporter::start(started, &producer, &probes);
    loop {
        ensure_running(&mut services)?;
        let produced = producer.produced();
        if killed_at.is_none() && produced >= kill_threshold {
            let victim = services.child("ledger-2")?;
            let status = victim.kill_hard().await?;
            victim.restart()?;
            killed_at = Some(produced);
            say(
                started,
                format_args!(
                    "CRASH: killed ledger-2 with SIGKILL ({status}) after {produced} commands; restarted it"
                ),
            );
        }
        if producer.finished() && killed_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let production = producer.join()?;
    say(
        started,
        format_args!(
            "produced all {} commands; waiting for the chain to drain",
            production
        ),
    );

    // Drain: every group has consumed everything committed on its input, checked in chain
    // order (A cannot produce more once drained, then B, then C).
    let drain_deadline = Instant::now() + Duration::from_secs(args.drain_timeout_secs);
    let drained = loop {
        ensure_running(&mut services)?;
        let p = Arc::clone(&probes);
        match tokio::task::spawn_blocking(move || p.all_drained()).await? {
            Ok(true) => break true,
            Ok(false) => {}
            // A slow broker answer is not a verdict: ask again until the deadline.
            Err(error) => say(
                started,
                format_args!("drain check failed, retrying: {error:#}"),
            ),
        }
        if Instant::now() >= drain_deadline {
            say(started, "the chain did not drain in time");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let drain_time = started.elapsed();
    reporter.stop();
    if !drained {
        // Evidence for whoever debugs it: partitions whose read_committed end (last stable
        // offset) stays below the high watermark have a transaction that never completed.
        let (b, t, n) = (
            bootstrap.clone(),
            names.topics.all().map(str::to_owned),
            args.partitions,
        );
        let stuck = tokio::task::spawn_blocking(move || stable_offset_gaps(&b, &t, n)).await?;
        match stuck {
            Ok(lines) if lines.is_empty() => say(
                started,
                "every partition's last stable offset equals its high watermark",
            ),
            Ok(lines) => {
                say(
                    started,
                    "partitions whose last stable offset is below the high watermark:",
                );
                for line in lines {
                    println!("    {line}");
                }
            }
            Err(error) => say(
                started,
                format_args!("could not compare stable offsets: {error:#}"),
            ),
        }
    }
    let mut operated = true;
    if drained {
        operated = show_operations(started, &mut services, &bootstrap, &names.ledger_app).await;
        say(started, "chain drained; stopping the services (SIGTERM)");
    }
    let mut stop_statuses = Vec::new();
    for name in ["validate", "ledger-1", "ledger-2", "stats"] {
        let status = services
            .child(name)?
            .terminate(Duration::from_secs(30))
            .await?;
        stop_statuses.push((name, status));
    }
    let recoveries = Recoveries::from_logs(&mut services)?;

    say(started, "reading every output topic back (read_committed)");
    let check_options = CheckOptions {
        timeout: Duration::from_secs(90),
        max_listed: 10,
        ..CheckOptions::default()
    };
    let verdict = verify_chain(&bootstrap, &names.outputs(), &expectation, &check_options).await?;
    let wall = started.elapsed();

    // The human summary.
    println!();
    println!("== exactly demo: payments validate -> ledger (x2) -> stats ==");
    let intents = count_intents(&commands);
    println!(
        "inputs        {} commands: {} transfers, {} deposits, {} overdrafts, {} invalid, {} malformed",
        commands.len(),
        intents.get(&Intent::Transfer).unwrap_or(&0),
        intents.get(&Intent::Deposit).unwrap_or(&0),
        intents.get(&Intent::Overdraft).unwrap_or(&0),
        intents.get(&Intent::Invalid).unwrap_or(&0),
        intents.get(&Intent::Malformed).unwrap_or(&0),
    );
    println!(
        "crash         ledger-2 killed with SIGKILL after {} commands, restarted",
        killed_at.unwrap_or(0)
    );
    for TopicCheck { label, report } in &verdict.topics {
        println!(
            "{:<13} {:>7} records  duplicates={} missing={} unexpected={} order_violations={}",
            label,
            report.records_read,
            report.duplicate_count,
            report.missing_count,
            report.unexpected_count,
            report.order_violation_count
        );
    }
    println!(
        "state         B balances: {} of {} (account, currency) match the model; C totals: {} of {} match",
        verdict.state.balances_matching,
        expectation.balances.len(),
        verdict.state.totals_matching,
        expectation.totals.len()
    );
    for line in verdict.state.problems.iter().take(STATE_PROBLEMS_SHOWN) {
        println!("  state mismatch: {line}");
    }
    if verdict.state.problems.len() > STATE_PROBLEMS_SHOWN {
        println!(
            "  ... {} state mismatches in all",
            verdict.state.problems.len()
        );
    }
    println!(
        "recoveries    {} (max {} ms): {}",
        recoveries.count,
        recoveries.max_ms,
        recoveries.describe()
    );
    println!(
        "time          drained after {:.1}s, total {:.1}s; service logs in {}",
        drain_time.as_secs_f64(),
        wall.as_secs_f64(),
        log_dir.display()
    );
    if let Some(cluster) = &cluster {
        let p = cluster.proxy.stats();
        println!(
            "proxy         {} connections, {} rewrite failures",
            p.connections, p.rewrite_failures
        );
    }
    for (name, status) in &stop_statuses {
        if !status.success() {
            println!("  note: {name} exited with {status} on SIGTERM");
        }
    }
    for TopicCheck { report, .. } in &verdict.topics {
        if !report.is_clean() {
            println!("{report}");
        }
    }
    println!();
    println!(
        "EOS-CHECK inputs={} outputs={} duplicates={} missing={} state={} recoveries={} max_recovery_ms={}",
        commands.len(),
        verdict.records_read(),
        verdict.duplicates(),
        verdict.missing(),
        verdict.state.verdict(),
        recoveries.count,
        recoveries.max_ms
    );
    if !drained {
        println!(
            "FAILED: the chain did not drain within {}s",
            args.drain_timeout_secs
        );
    }
    drop(services);
    drop(cluster);
    Ok(drained && verdict.is_clean() && operated)
}

fn count_intents(commands: &[InputCommand]) -> BTreeMap<Intent, usize> {
    let mut counts = BTreeMap::new();
    for c in commands {
        *counts.entry(c.intent).or_default() += 1;
    }
    counts
}

/// Fails if a service exited on its own (the deliberate kill restarts at once).
fn ensure_running(services: &mut Supervisor) -> anyhow::Result<()> {
    let names: Vec<String> = services.names().map(str::to_owned).collect();
    for name in names {
        let child = services.child(&name)?;
        if let Some(status) = child.try_status()? {
            bail!(
                "service {name} exited unexpectedly ({status}); last log lines of {}:\n{}",
                child.log_path().display(),
                child.log_tail(30)
            );
        }
    }
    Ok(())
}

/// Prints a progress line every few seconds, off the main loop (a slow broker answer must
/// not delay the crash or the drain checks).
struct ProgressReporter {
    task: tokio::task::JoinHandle<()>,
}

impl ProgressReporter {
    const EVERY: Duration = Duration::from_secs(3);

    fn start(started: Instant, producer: &InputProducer, probes: &Arc<Probes>) -> Self {
        let produced = Arc::clone(&producer.produced);
        let total = producer.total;
        let probes = Arc::clone(probes);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Self::EVERY).await;
                let p = Arc::clone(&probes);
                let lag_text = match tokio::task::spawn_blocking(move || p.lags()).await {
                    Ok(Ok(lags)) => lags
                        .iter()
                        .map(|(name, lag)| format!("{name} lag {lag}"))
                        .collect::<Vec<_>>()
                        .join(" | "),
                    Ok(Err(e)) => format!("(lag unavailable: {e:#})"),
                    Err(e) => format!("(lag unavailable: {e})"),
                };
                say(
                    started,
                    format_args!(
                        "produced {}/{total} | {lag_text}",
                        produced.load(Ordering::Relaxed)
                    ),
                );
            }
        });
        ProgressReporter { task }
    }

    fn stop(self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Topics

// ---------------------------------------------------------------------------------------
// Producing the input

/// Produces the commands on a dedicated thread at a steady rate.
struct InputProducer {
    total: usize,
    produced: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

impl InputProducer {
    fn start(
        bootstrap: &str,
        topic: &str,
        commands: Vec<InputCommand>,
        rate: u64,
    ) -> anyhow::Result<Self> {
        let producer = command_producer(bootstrap).context("creating the input producer")?;
        let produced = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let total = commands.len();
        let topic = topic.to_owned();
        let (p, f) = (Arc::clone(&produced), Arc::clone(&finished));
        let thread = std::thread::Builder::new()
            .name("demo-producer".into())
            .spawn(move || {
                let result = produce_all(&producer, &topic, &commands, rate, &p);
                f.store(true, Ordering::Release);
                result
            })
            .context("starting the producer thread")?;
        Ok(InputProducer {
            total,
            produced,
            finished,
            thread: Some(thread),
        })
    }

    fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }

    fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    fn join(&mut self) -> anyhow::Result<u64> {
        self.thread
            .take()
            .ok_or_else(|| anyhow!("the producer thread was already joined"))?
            .join()
            .map_err(|_| anyhow!("the producer thread panicked"))?
    }
}

fn produce_all(
    producer: &BaseProducer<DeliveryCounter>,
    topic: &str,
    commands: &[InputCommand],
    rate: u64,
    produced: &AtomicU64,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    for (i, command) in commands.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                producer.poll(Duration::ZERO);
                std::thread::sleep(due - now);
            }
        }
        send_waiting(producer, command_record(topic, command))
            .with_context(|| format!("producing command {} to {topic}", command.id))?;
        produced.fetch_add(1, Ordering::Relaxed);
    }
    producer
        .flush(Duration::from_secs(60))
        .with_context(|| format!("flushing the commands to {topic}"))?;
    let failed = producer.context().failed();
    if failed > 0 {
        let first = producer.context().first_error();
        bail!("{failed} command(s) were not delivered to {topic}; first error: {first}");
    }
    Ok(commands.len() as u64)
}

// ---------------------------------------------------------------------------------------
// Watching the consumer groups

/// Reads one service's committed offsets and its input's end offsets.
struct GroupProbe {
    service: &'static str,
    topic: String,
    partitions: i32,
    /// Has the service's group id, only to read its committed offsets (never joins, never
    /// assigns, never commits).
    consumer: BaseConsumer,
    /// Reads from the committed offsets (assign-only needs a group id in librdkafka; its own,
    /// so nothing it does can touch the service's group).
    reader: BaseConsumer,
    /// read_uncommitted: its high watermarks include open transactions, which is fine for a
    /// progress display and needs no last-stable-offset lookup.
    watermarks: BaseConsumer,
}

impl GroupProbe {
    fn new(
        bootstrap: &str,
        service: &'static str,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .with_context(|| format!("creating the offset probe of {service}"))?;
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("{group}.drain-probe"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create()
            .with_context(|| format!("creating the drain probe of {service}"))?;
        let watermarks: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("isolation.level", "read_uncommitted")
            .create()
            .with_context(|| format!("creating the watermark probe of {service}"))?;
        Ok(GroupProbe {
            service,
            topic: topic.to_owned(),
            partitions,
            consumer,
            reader,
            watermarks,
        })
    }

    fn all_partitions(&self) -> anyhow::Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        Ok(tpl)
    }

    fn committed(&self) -> anyhow::Result<TopicPartitionList> {
        self.consumer
            .committed_offsets(self.all_partitions()?, Duration::from_secs(10))
            .with_context(|| {
                format!(
                    "reading the committed offsets of {} on {}",
                    self.service, self.topic
                )
            })
    }

    /// Σ (end offset − committed offset) over the partitions: offsets, not records (markers
    /// occupy offsets too), good enough to watch progress.
    fn lag(&self) -> anyhow::Result<i64> {
        let committed = self.committed()?;
        let mut lag = 0;
        for e in committed.elements() {
            let (_, high) = self.watermarks.fetch_watermarks(
                &self.topic,
                e.partition(),
                Duration::from_secs(5),
            )?;
            let done = match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            };
            lag += (high - done).max(0);
        }
        Ok(lag)
    }

    /// Whether no committed record is left after the group's committed offsets: reads from
    /// the committed offsets with read_committed until every partition reports its end.
    fn drained(&self) -> anyhow::Result<bool> {
        let committed = self.committed()?;
        let mut assignment = TopicPartitionList::new();
        for e in committed.elements() {
            let offset = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            assignment.add_partition_offset(&self.topic, e.partition(), offset)?;
        }
        self.reader.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut at_end = std::collections::BTreeSet::new();
        let result = loop {
            if at_end.len() == self.partitions as usize {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            match self.reader.poll(Duration::from_millis(200)) {
                Some(Ok(_)) => break false,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(_)) | None => {}
            }
        };
        self.reader.unassign()?;
        Ok(result)
    }
}

struct Probes {
    chain: [GroupProbe; 3],
}

impl Probes {
    fn new(bootstrap: &str, names: &Names, partitions: i32) -> anyhow::Result<Self> {
        Ok(Probes {
            chain: [
                GroupProbe::new(
                    bootstrap,
                    "validate",
                    &names.validate_app,
                    &names.topics.commands,
                    partitions,
                )?,
                GroupProbe::new(
                    bootstrap,
                    "ledger",
                    &names.ledger_app,
                    &names.topics.ledger,
                    partitions,
                )?,
                GroupProbe::new(
                    bootstrap,
                    "stats",
                    &names.stats_app,
                    &names.topics.balances,
                    partitions,
                )?,
            ],
        })
    }

    fn lags(&self) -> anyhow::Result<Vec<(&'static str, i64)>> {
        self.chain
            .iter()
            .map(|p| Ok((p.service, p.lag()?)))
            .collect()
    }

    /// In chain order: once A has nothing left it produces nothing more, so B's and then C's
    /// checks see their final input.
    fn all_drained(&self) -> anyhow::Result<bool> {
        for probe in &self.chain {
            if !probe.drained()? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// `topic/partition: last stable offset L < high watermark H` for every partition where the
/// read_committed end is below the high watermark (a transaction that never completed).
fn stable_offset_gaps(
    bootstrap: &str,
    topics: &[String],
    partitions: i32,
) -> anyhow::Result<Vec<String>> {
    let committed: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", "read_committed")
        .create()?;
    let uncommitted: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let timeout = Duration::from_secs(10);
    let mut gaps = Vec::new();
    for topic in topics {
        for p in 0..partitions {
            let (_, lso) = committed.fetch_watermarks(topic, p, timeout)?;
            let (_, hw) = uncommitted.fetch_watermarks(topic, p, timeout)?;
            if lso < hw {
                gaps.push(format!(
                    "{topic}/{p}: last stable offset {lso} < high watermark {hw}"
                ));
            }
        }
    }
    Ok(gaps)
}

// ---------------------------------------------------------------------------------------
// Recoveries, from the services' logs

/// Recoveries the framework logged (`partition recovered ... elapsed_ms=N`).
#[derive(Debug, Default)]
struct Recoveries {
    count: usize,
    max_ms: u64,
    per_service: BTreeMap<String, (usize, u64)>,
}

impl Recoveries {
    fn from_logs(services: &mut Supervisor) -> anyhow::Result<Self> {
        let mut r = Recoveries::default();
        let names: Vec<String> = services.names().map(str::to_owned).collect();
        for name in names {
            let text = services.child(&name)?.log_text()?;
            for line in text.lines().filter(|l| l.contains("partition recovered")) {
                let ms = field(line, "elapsed_ms")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                r.count += 1;
                r.max_ms = r.max_ms.max(ms);
                let entry = r.per_service.entry(name.clone()).or_default();
                entry.0 += 1;
                entry.1 = entry.1.max(ms);
            }
        }
        Ok(r)
    }

    fn describe(&self) -> String {
        if self.per_service.is_empty() {
            return "none logged".into();
        }
        self.per_service
            .iter()
            .map(|(name, (n, ms))| format!("{name} {n} (max {ms} ms)"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How the services reach a secured local cluster through `mechanism`, with ACLs for every
/// app, topic and transactional id of this run (whose names start with `run`).
fn secured_access(cluster: &TestCluster, mechanism: &str, run: &str) -> anyhow::Result<Connection> {
    let kafka = cluster
        .kafka()
        .lock()
        .map_err(|_| anyhow::anyhow!("the cluster lock is poisoned"))?;
    let access = exactly_tests::security::connection(&kafka, mechanism)
        .with_context(|| format!("no {mechanism} listener on the local Kafka"))?;
    if access.principal != "User:ANONYMOUS" {
        exactly_tests::kafka::acl::create_acls(
            &kafka.bootstrap_servers(),
            &access.principal,
            &exactly_tests::security::prefix_acls(run),
        )?;
    }
    Ok(access)
}

/// Scrapes every service's Prometheus endpoint once and prints
/// `METRICS services=S series=N lag_max=L`, then `exactly inspect` of `app`. False when a
/// scrape or the inspection failed (each failure is said).
async fn show_operations(
    started: Instant,
    services: &mut Supervisor,
    bootstrap: &str,
    app: &str,
) -> bool {
    let mut ok = true;
    let (mut scraped, mut series, mut lag_max) = (0usize, 0usize, 0u64);
    let names: Vec<String> = services.names().map(str::to_owned).collect();
    for name in names {
        match scrape_service(services, &name).await {
            Ok(text) => {
                scraped += 1;
                let samples = text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.is_empty());
                series += samples.clone().count();
                for line in samples.filter(|l| l.starts_with("exactly_partition_lag_records{")) {
                    let lag = line.rsplit(' ').next().and_then(|v| v.parse().ok());
                    lag_max = lag_max.max(lag.unwrap_or(0));
                }
            }
            Err(error) => {
                ok = false;
                say(
                    started,
                    format_args!("scraping {name}'s metrics failed: {error:#}"),
                );
            }
        }
    }
    println!("METRICS services={scraped} series={series} lag_max={lag_max}");
    say(started, format_args!("exactly inspect --app {app}:"));
    let argv = ["exactly", "inspect", "--brokers", bootstrap, "--app", app].map(str::to_owned);
    let inspected = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let result = exactly::cli::run(argv, &mut out);
        (result, out)
    })
    .await;
    match inspected {
        Ok((result, out)) => {
            print!("{}", String::from_utf8_lossy(&out));
            if let Err(error) = result {
                ok = false;
                say(started, format_args!("exactly inspect failed: {error}"));
            }
        }
        Err(error) => {
            ok = false;
            say(
                started,
                format_args!("exactly inspect did not finish: {error}"),
            );
        }
    }
    ok
}

/// The metrics text of service `name`, at the address its current run logged.
async fn scrape_service(services: &mut Supervisor, name: &str) -> anyhow::Result<String> {
    let log = services.child(name)?.run_log_text()?;
    let addr = log
        .lines()
        .rev()
        .find(|l| l.contains("metrics endpoint listening"))
        .and_then(|l| field(l, "addr"))
        .context("no `metrics endpoint listening` line in its log")?;
    let addr: std::net::SocketAddr = addr.parse().context("its metrics address")?;
    exactly_tests::scrape::scrape(addr)
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

/// The value of `name=value` in a `tracing` fmt line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    Some(
        rest.split(|c: char| c.is_whitespace())
            .next()
            .unwrap_or(rest),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tracing_fields() {
        let line = "2026-11-21T20:00:00Z  INFO partition_worker{topic=t partition=3}: exactly::recovery: partition recovered topic=\"t\" partition=3 replayed=120 elapsed_ms=87";
        assert_eq!(field(line, "elapsed_ms"), Some("87"));
        assert_eq!(field(line, "replayed"), Some("120"));
        assert_eq!(field(line, "missing"), None);
    }
}

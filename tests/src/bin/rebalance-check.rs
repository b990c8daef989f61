//! `rebalance-check`: do rebalances stop only the partitions that move?
//!
//! ```text
//! cargo run --release -p exactly-tests --bin rebalance-check [-- --protocol cooperative-sticky|range]
//! ```
//!
//! Runs 3 instances of the stateful `eos-service` on a 12-partition topic under continuous
//! input, adds a 4th, then stops one (SIGTERM), and prints exactly
//! `REBALANCE-CHECK protocol=P moved=M unmoved_stopped=U commits_during_rebalance=C duplicates=D missing=N verdict=PASS|FAIL`:
//! `moved` counts partitions that changed owner over both rebalances, `unmoved_stopped`
//! those that kept their owner but were revoked or re-assigned anyway (must be 0),
//! `commits_during_rebalance` the transactions the untouched partitions committed while the
//! group rebalanced (must be > 0), and the outputs must hold every input exactly once.
//! Exit code 0 on PASS, 1 on FAIL, 2 when the check could not run.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Parser;
use exactly_tests::eos_service::{expected_outputs, service_spec_at, wait_for_outputs, Input};
use exactly_tests::kafka::ClusterOptions;
use exactly_tests::process::{ProcessSpec, Supervisor};
use exactly_tests::rebalance::{
    analyse, owners_at, parse_log, settled_at, Logged, RebalanceOutcome,
};
use exactly_tests::{unique_name, TestCluster};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

#[derive(Debug, Parser)]
#[command(about = "Checks that rebalances stop only the partitions that change owner")]
struct Cli {
    /// Group protocol of the services: consumer (KIP-848, the framework's default),
    /// cooperative-sticky, or range (the classic eager assignor, which stops every partition on
    /// every rebalance: the check must fail with it).
    #[arg(long, default_value = "consumer", value_parser = ["consumer", "cooperative-sticky", "range"])]
    protocol: String,
    /// Partitions of the input and output topics.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Input records per second, spread over every partition.
    #[arg(long, default_value_t = 600)]
    rate: usize,
    /// Seconds to wait for the group to settle after each change.
    #[arg(long, default_value_t = 120)]
    settle_timeout_secs: u64,
}

/// How long to keep the group under input after it settled, so every partition commits.
const STEADY: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> ExitCode {
    // The output check asks for end-of-partition events, which rdkafka also logs as client
    // errors.
    exactly_tests::init_tool_logging("warn,rdkafka::client=off");
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("rebalance-check: could not run: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// What the run needs to talk to: topics, app, the service binary.
struct Setup {
    bootstrap: String,
    input: String,
    output: String,
    app: String,
    binary: std::path::PathBuf,
    protocol: String,
}

impl Setup {
    fn spec(&self) -> ProcessSpec {
        let spec = service_spec_at(
            &self.binary,
            &self.bootstrap,
            &self.app,
            &self.input,
            &self.output,
        )
        .args(["--commit-interval-ms", "100"]);
        match self.protocol.as_str() {
            "range" => spec.args([
                "--group-protocol",
                "cooperative-sticky",
                "--assignment-strategy",
                "range",
            ]),
            protocol => spec.args(["--group-protocol", protocol]),
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let say = |line: String| eprintln!("[{:6.1}s] {line}", started.elapsed().as_secs_f64());
    let cluster = TestCluster::start_owned(ClusterOptions::default()).await?;
    let setup = Setup {
        bootstrap: cluster.direct_bootstrap_servers(),
        input: unique_name("rebalance-in"),
        output: unique_name("rebalance-out"),
        app: unique_name("rebalance-app"),
        binary: exactly_tests::sibling_binary("eos-service")?,
        protocol: cli.protocol.clone(),
    };
    cluster.create_topic(&setup.input, cli.partitions).await?;
    cluster.create_topic(&setup.output, cli.partitions).await?;
    say(format!(
        "Kafka {}; protocol {}",
        setup.bootstrap, cli.protocol
    ));

    let producer = InputProducer::start(&setup.bootstrap, &setup.input, cli.partitions, cli.rate);
    let mut services = Supervisor::new();
    for n in 1..=3 {
        services.spawn(format!("instance-{n}"), setup.spec())?;
    }
    let settle = Duration::from_secs(cli.settle_timeout_secs);
    let n = cli.partitions as usize;
    let all_owned = |owners: &Owners| owners.len() == n;
    wait_settled(
        &mut services,
        &setup,
        cli.partitions,
        0.0,
        all_owned,
        settle,
    )
    .await?;
    say("3 instances own all partitions".into());
    tokio::time::sleep(STEADY).await;

    let join = now();
    services.spawn("instance-4", setup.spec())?;
    let joined = |owners: &Owners| owners.len() == n && owners.values().any(|o| o == "instance-4");
    let join_settled =
        wait_settled(&mut services, &setup, cli.partitions, join, joined, settle).await?;
    say(format!(
        "a 4th instance joined; settled after {:.1}s",
        join_settled - join
    ));
    tokio::time::sleep(STEADY).await;

    let leave = now();
    let status = services
        .child("instance-1")?
        .terminate(Duration::from_secs(60))
        .await?;
    if !status.success() {
        bail!("instance-1 did not stop cleanly on SIGTERM: {status}");
    }
    let left = |owners: &Owners| owners.len() == n && owners.values().all(|o| o != "instance-1");
    let leave_settled =
        wait_settled(&mut services, &setup, cli.partitions, leave, left, settle).await?;
    say(format!(
        "instance-1 left; settled after {:.1}s",
        leave_settled - leave
    ));
    tokio::time::sleep(STEADY).await;

    let inputs = producer.stop()?;
    say(format!(
        "{} inputs produced; checking the outputs",
        inputs.len()
    ));
    let report = wait_for_outputs(
        &setup.bootstrap,
        &setup.output,
        &expected_outputs(&inputs),
        Duration::from_secs(120),
    )
    .await;
    let events = all_events(&mut services, &setup.input)?;
    let outcomes = [
        analyse(&events, join, join_settled),
        analyse(&events, leave, leave_settled),
    ];
    for (what, outcome) in ["join", "leave"].iter().zip(&outcomes) {
        say(describe(what, outcome));
    }
    services.kill_all().await?;
    let moved: usize = outcomes.iter().map(|o| o.moved.len()).sum();
    let unmoved_stopped: usize = outcomes.iter().map(|o| o.unmoved_stopped.len()).sum();
    let commits: u64 = outcomes.iter().map(|o| o.commits_during).sum();
    let pass = moved > 0
        && unmoved_stopped == 0
        && commits > 0
        && report.duplicate_count == 0
        && report.missing_count == 0
        && report.is_clean();
    if !report.is_clean() {
        eprintln!("{report}");
    }
    println!(
        "REBALANCE-CHECK protocol={} moved={moved} unmoved_stopped={unmoved_stopped} commits_during_rebalance={commits} duplicates={} missing={} verdict={}",
        cli.protocol,
        report.duplicate_count,
        report.missing_count,
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

fn describe(what: &str, outcome: &RebalanceOutcome) -> String {
    format!(
        "{what}: moved {:?}, kept but stopped {:?}, {} commits by the others in {:.1}s",
        outcome.moved,
        outcome.unmoved_stopped,
        outcome.commits_during,
        outcome.window.1 - outcome.window.0
    )
}

/// Seconds since the Unix epoch, on the clock the services' log timestamps use.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Every instance's events about `topic`, from all of its runs.
fn all_events(services: &mut Supervisor, topic: &str) -> anyhow::Result<Vec<Logged>> {
    let mut events = Vec::new();
    for child in services.iter_mut() {
        let text = child.log_text()?;
        events.extend(parse_log(child.name(), topic, &text));
    }
    Ok(events)
}

/// Partition → owning instance.
type Owners = std::collections::BTreeMap<i32, String>;

/// Waits until the owners are `expected` and every partition is live under its owner;
/// returns the moment the last one went live (not before `since`).
async fn wait_settled(
    services: &mut Supervisor,
    setup: &Setup,
    partitions: i32,
    since: f64,
    expected: impl Fn(&Owners) -> bool,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        for child in services.iter_mut() {
            if let Some(status) = child.try_status()? {
                if status.success() {
                    continue;
                }
                bail!(
                    "{} exited with {status}:\n{}",
                    child.name(),
                    child.log_tail(30)
                );
            }
        }
        let events = all_events(services, &setup.input)?;
        if expected(&owners_at(&events, f64::MAX)) {
            if let Some(at) = settled_at(&events, partitions, since) {
                return Ok(at);
            }
        }
        if Instant::now() > deadline {
            bail!("the group did not settle within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces inputs at a steady rate on a thread until stopped; remembers what it produced.
struct InputProducer {
    stop: Arc<AtomicBool>,
    produced: Arc<Mutex<Vec<Input>>>,
    thread: std::thread::JoinHandle<()>,
}

impl InputProducer {
    fn start(bootstrap: &str, topic: &str, partitions: i32, rate: usize) -> InputProducer {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(Mutex::new(Vec::new()));
        let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
        let (stop_flag, log) = (Arc::clone(&stop), Arc::clone(&produced));
        // Ten batches a second; keys k0.. pinned one per partition, so every partition works.
        let per_batch = (rate / 10).max(1);
        let thread = std::thread::spawn(move || {
            let producer = input_producer(&bootstrap);
            let mut next = 0usize;
            while !stop_flag.load(Ordering::Acquire) {
                let batch: Vec<Input> = (next..next + per_batch)
                    .map(|i| {
                        let partition = (i % partitions as usize) as i32;
                        Input {
                            id: format!("id-{i:07}"),
                            key: format!("k{partition}"),
                            partition,
                        }
                    })
                    .collect();
                next += per_batch;
                send_all(&producer, &topic, &batch);
                log.lock().unwrap_or_else(|p| p.into_inner()).extend(batch);
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = producer.flush(Duration::from_secs(30));
        });
        InputProducer {
            stop,
            produced,
            thread,
        }
    }

    fn stop(self) -> anyhow::Result<Vec<Input>> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the input producer panicked"))?;
        let produced = self.produced.lock().unwrap_or_else(|p| p.into_inner());
        Ok(produced.clone())
    }
}

/// An idempotent producer (a retry never duplicates an input, which would look like a
/// framework duplicate).
fn input_producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("creating the input producer: {e}"))
}

/// Sends `records` in order and waits for their delivery.
fn send_all(producer: &BaseProducer, topic: &str, records: &[Input]) {
    for r in records {
        let mut record = BaseRecord::to(topic)
            .key(r.key.as_str())
            .payload(r.id.as_str())
            .partition(r.partition);
        while let Err((_, returned)) = producer.send(record) {
            record = returned;
            producer.poll(Duration::from_millis(20));
        }
    }
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        panic!("delivering inputs: {e}");
    }
}

//! The exactly-once chaos suite: the payments chain A → B → C (`exactly-examples`' `validate`,
//! `ledger`, `stats`), three instances each on 8-partition topics under continuous input,
//! through a seeded schedule of faults, then drained and verified.
//!
//! Modelled on Apache Kafka's `transactions_test.py` (copiers bounced hard and clean; the
//! read_committed output must equal the input with no duplicates) and the Kafka Streams EOS
//! system test (repeated kill -9; aggregates recomputed from the input must match).
//!
//! Split of work:
//! - this module (harness crate): a local Apache Kafka of its own (one node, or three with
//!   `--kafka-nodes 3`) behind the fault-injecting proxy, the service processes, the fault
//!   [`schedule`] (service kills, zombies, rebalances, network faults, broker crashes) and its
//!   application, waiting for the chain to [`drain`];
//! - `chaos-workload` (an `exactly-examples` binary, run as a child because this crate cannot
//!   link the examples crate): producing the seeded payment commands and verifying every
//!   output topic plus B's balances and C's totals against the examples' reference model.
//!
//! Entry point: `cargo run --release -p exactly-tests --bin chaos -- --events E [--seed S]
//! [--kafka-nodes 3]`.

pub mod binaries;
pub mod drain;
pub mod schedule;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::cluster::{unique_name, TestCluster};
use crate::error::HarnessError;
use crate::kafka::ClusterOptions;
use crate::process::{ProcessError, ProcessSpec, Supervisor};
use binaries::{Binaries, BinariesError};
use drain::{ChainProbe, GroupProbe};
use schedule::{BrokerTarget, Counts, Fault, ScheduledFault, Service, INITIAL_INSTANCES};

/// How long a service may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How long the first start of a service may take to join its group.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Settings of one chaos run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Number of fault events.
    pub events: usize,
    /// Seed of the fault schedule and of the input.
    pub seed: u64,
    /// Payment commands per second while the faults run.
    pub rate: u64,
    /// Accounts of the generated input.
    pub accounts: u64,
    /// Partitions of every topic.
    pub partitions: i32,
    /// The group session timeout of the services (KIP-848: the broker's
    /// `group.consumer.session.timeout.ms`, 6 s on the local Kafka); a zombie is paused 3 s
    /// longer.
    pub session_timeout: Duration,
    /// Longest wait for the chain to drain after the last event.
    pub drain_timeout: Duration,
    /// The drain fails early when no group commits anything for this long while input is
    /// left (a stuck partition does not heal by waiting).
    pub drain_stall_timeout: Duration,
    /// Directory for every log of the run (default: a fresh one under the temp directory).
    pub log_dir: Option<PathBuf>,
    /// Run `$CARGO build -p exactly-examples --bins` first (when run through cargo).
    pub build: bool,
    /// A service that exits on its own fails the run. Without it the run restarts the
    /// service (as an orchestrator would), reports the crash and goes on verifying.
    pub fail_on_crash: bool,
    /// Kafka nodes of the run's own cluster: 1, or 3 (replication factor 3, `min.insync.replicas`
    /// 2; broker crashes then hit a partition leader or the active controller).
    pub kafka_nodes: u32,
}

impl ChaosOptions {
    /// Defaults for `events` faults with `seed`.
    pub fn new(events: usize, seed: u64) -> Self {
        ChaosOptions {
            events,
            seed,
            rate: 150,
            accounts: 500,
            partitions: 8,
            session_timeout: Duration::from_secs(6),
            drain_timeout: Duration::from_secs(300),
            drain_stall_timeout: Duration::from_secs(90),
            log_dir: None,
            build: true,
            fail_on_crash: false,
            kafka_nodes: 1,
        }
    }

    /// A generous bound on the whole run: start-up, the schedule (gaps plus the faults' own
    /// durations), draining and verification.
    pub fn default_deadline(&self) -> Duration {
        let schedule: Duration = schedule::schedule(self.seed, self.events, self.kafka_nodes > 1)
            .iter()
            .map(|e| e.gap + fault_duration(&e.fault, self.zombie_pause()) + Duration::from_secs(3))
            .sum();
        Duration::from_secs(240) + schedule + self.drain_timeout
    }

    fn zombie_pause(&self) -> Duration {
        self.session_timeout + Duration::from_secs(3)
    }
}

/// How long applying a fault takes at least (the time it keeps the system disturbed).
fn fault_duration(fault: &Fault, zombie_pause: Duration) -> Duration {
    match fault {
        Fault::Zombie { .. } => zombie_pause,
        Fault::LatencySpike { duration, .. }
        | Fault::BrokerOutage { duration }
        | Fault::DelayedEndTxn { duration, .. } => *duration,
        // Down time plus a generous JVM restart.
        Fault::BrokerCrash { down, .. } => *down + Duration::from_secs(30),
        _ => Duration::ZERO,
    }
}

/// What went wrong in a chaos run other than an exactly-once violation (those are reported
/// in [`ChaosOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// Broker, proxy or topics could not be set up.
    #[error("chaos setup: {0}")]
    Harness(#[from] HarnessError),
    /// The service binaries are missing or did not build.
    #[error(transparent)]
    Binaries(#[from] BinariesError),
    /// Starting, signalling or waiting for a child failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A service (or the input producer) exited without being told to.
    #[error("{instance} exited on its own ({status}) {when}; log {log}:\n{tail}")]
    Died {
        /// Instance name.
        instance: String,
        /// Exit status.
        status: ExitStatus,
        /// During which phase.
        when: String,
        /// Its log file.
        log: String,
        /// Last lines of the log.
        tail: String,
    },
    /// A Kafka client call of the orchestrator failed.
    #[error("{context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The chain did not drain in time.
    #[error("the chain did not drain (waited {waited:?}, no group committed anything for the last {stalled_for:?}): group {group} still has committed input left; logs in {log_dir}")]
    NotDrained {
        /// The first group with input left.
        group: String,
        /// How long the run waited.
        waited: Duration,
        /// How long no group's committed offsets moved.
        stalled_for: Duration,
        /// Where the logs are.
        log_dir: String,
    },
    /// The input producer or the verifier misbehaved.
    #[error("{0}")]
    Workload(String),
}

/// The result of a run that got as far as verification.
#[derive(Debug, Clone)]
pub struct ChaosOutcome {
    /// The seed.
    pub seed: u64,
    /// Events per category.
    pub counts: Counts,
    /// Payment commands produced.
    pub inputs: usize,
    /// Ids seen more than once, summed over the output topics.
    pub duplicates: u64,
    /// Expected ids never seen, summed over the output topics.
    pub missing: u64,
    /// Ids seen that the model does not expect, plus per-key order violations.
    pub other_violations: u64,
    /// Whether B's balances and C's totals equal the model.
    pub state_match: bool,
    /// The verifier's `OFFENDING ...` lines (first offending records) and state mismatches.
    pub offending: Vec<String>,
    /// Things that are not violations but worth a look (e.g. a service that did not stop
    /// cleanly on SIGTERM).
    pub notes: Vec<String>,
    /// Services that exited on their own (and were restarted), with the end of their log.
    pub crashes: Vec<String>,
    /// Where the logs of the run are.
    pub log_dir: PathBuf,
    /// Wall time of the run.
    pub wall: Duration,
}

impl ChaosOutcome {
    /// True when nothing was duplicated, missing, unexpected or out of order and the state
    /// matches.
    pub fn is_clean(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.other_violations == 0 && self.state_match
    }

    /// `CHAOS events=E kills=K zombies=Z rebalances=B net_faults=F broker_crashes=C
    /// duplicates=D missing=M state=match|mismatch seed=S`.
    pub fn chaos_line(&self) -> String {
        let c = &self.counts;
        format!(
            "CHAOS events={} kills={} zombies={} rebalances={} net_faults={} broker_crashes={} duplicates={} missing={} state={} seed={}",
            c.events,
            c.kills,
            c.zombies,
            c.rebalances,
            c.net_faults,
            c.broker_crashes,
            self.duplicates,
            self.missing,
            if self.state_match { "match" } else { "mismatch" },
            self.seed
        )
    }
}

/// The six topics of one run of the payments chain A → B → C (`<run>.payments.<topic>`),
/// shared by the chaos suite, the demo and the benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainTopics {
    /// Payment commands (A's input).
    pub commands: String,
    /// Ledger legs (A's output, B's input and output).
    pub ledger: String,
    /// A's dead letters.
    pub dead_letters: String,
    /// Balance events (B's output, C's input).
    pub balances: String,
    /// B's rejections.
    pub rejections: String,
    /// C's summaries.
    pub stats: String,
}

impl ChainTopics {
    /// The topics of run `run`.
    pub fn new(run: &str) -> Self {
        let topic = |name: &str| format!("{run}.payments.{name}");
        ChainTopics {
            commands: topic("commands"),
            ledger: topic("ledger"),
            dead_letters: topic("dead-letters"),
            balances: topic("balances"),
            rejections: topic("rejections"),
            stats: topic("stats"),
        }
    }

    /// All six.
    pub fn all(&self) -> [&str; 6] {
        [
            &self.commands,
            &self.ledger,
            &self.dead_letters,
            &self.balances,
            &self.rejections,
            &self.stats,
        ]
    }
}

/// Topic and group names of one run (unique, so runs never see each other's data).
#[derive(Debug, Clone)]
struct Names {
    topics: ChainTopics,
    run: String,
}

impl Names {
    fn new(run: &str) -> Self {
        Names {
            topics: ChainTopics::new(run),
            run: run.to_owned(),
        }
    }

    fn app(&self, service: Service) -> String {
        format!("{}-{}", self.run, service.name())
    }

    /// The topic flags of a service.
    fn flags(&self, service: Service) -> Vec<(&'static str, &str)> {
        match service {
            Service::Validate => vec![
                ("--commands-topic", &self.topics.commands),
                ("--ledger-topic", &self.topics.ledger),
                ("--dead-letter-topic", &self.topics.dead_letters),
            ],
            Service::Ledger => vec![
                ("--ledger-topic", &self.topics.ledger),
                ("--balances-topic", &self.topics.balances),
                ("--rejections-topic", &self.topics.rejections),
            ],
            Service::Stats => vec![
                ("--balances-topic", &self.topics.balances),
                ("--stats-topic", &self.topics.stats),
            ],
        }
    }

    fn input(&self, service: Service) -> &str {
        match service {
            Service::Validate => &self.topics.commands,
            Service::Ledger => &self.topics.ledger,
            Service::Stats => &self.topics.balances,
        }
    }
}

/// Prints a progress line with the time since the run started.
fn say(started: Instant, line: impl std::fmt::Display) {
    use std::io::Write as _;
    println!("[{:7.1}s] {line}", started.elapsed().as_secs_f64());
    let _ = std::io::stdout().flush();
}

/// One chaos run: everything it started is stopped when it is dropped (the supervisor kills
/// and reaps the children, the cluster stops the broker).
struct Run {
    options: ChaosOptions,
    started: Instant,
    binaries: Binaries,
    cluster: TestCluster,
    names: Names,
    log_dir: PathBuf,
    services: Supervisor,
    producer: Supervisor,
    notes: Vec<String>,
    crashes: Vec<String>,
}

/// Runs the chaos suite. `Err` means the run could not complete (a service died, the chain
/// did not drain, set-up failed); exactly-once violations are in the `Ok` outcome.
pub async fn run(options: ChaosOptions) -> Result<ChaosOutcome, ChaosError> {
    let started = Instant::now();
    let binaries = Binaries::beside_current_exe()?;
    if options.build {
        let b = binaries.clone();
        tokio::task::spawn_blocking(move || b.build_if_possible())
            .await
            .map_err(|e| ChaosError::Workload(format!("build task failed: {e}")))??;
    } else {
        binaries.check()?;
    }
    let schedule = schedule::schedule(options.seed, options.events, options.kafka_nodes > 1);
    let counts = Counts::of(&schedule);
    say(
        started,
        format_args!(
            "seed {}: {} events ({} kills, {} zombies, {} rebalances, {} net faults, {} broker crashes)",
            options.seed,
            counts.events,
            counts.kills,
            counts.zombies,
            counts.rebalances,
            counts.net_faults,
            counts.broker_crashes
        ),
    );

    say(
        started,
        format_args!(
            "starting Apache Kafka ({} node{}) behind the fault-injecting proxy",
            options.kafka_nodes,
            if options.kafka_nodes == 1 { "" } else { "s" }
        ),
    );
    let cluster = TestCluster::start_owned(ClusterOptions {
        nodes: options.kafka_nodes,
        ..if options.kafka_nodes > 1 {
            ClusterOptions::three_nodes()
        } else {
            ClusterOptions::default()
        }
    })
    .await?;
    let names = Names::new(&unique_name("chaos"));
    for topic in names.topics.all() {
        cluster.create_topic(topic, options.partitions).await?;
    }
    let log_dir = match &options.log_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join("exactly-chaos").join(&names.run),
    };
    std::fs::create_dir_all(&log_dir).map_err(|e| {
        HarnessError::io(
            format!("creating the log directory {}", log_dir.display()),
            e,
        )
    })?;
    say(
        started,
        format_args!(
            "Kafka {} via proxy {}; 6 topics with {} partitions; logs in {}",
            cluster.direct_bootstrap_servers(),
            cluster.bootstrap_servers(),
            options.partitions,
            log_dir.display()
        ),
    );

    let mut run = Run {
        options,
        started,
        binaries,
        cluster,
        names,
        log_dir,
        services: Supervisor::new(),
        producer: Supervisor::new(),
        notes: Vec::new(),
        crashes: Vec::new(),
    };
    match run.faults_drain_verify(&schedule).await {
        Ok(mut outcome) => {
            outcome.counts = counts;
            outcome.wall = run.started.elapsed();
            Ok(outcome)
        }
        Err(error) => {
            say(run.started, format_args!("FAILED: {error}"));
            run.diagnose().await;
            Err(error)
        }
    }
}

impl Run {
    async fn faults_drain_verify(
        &mut self,
        schedule: &[ScheduledFault],
    ) -> Result<ChaosOutcome, ChaosError> {
        let run = self;
        run.start_services().await?;
        run.start_producer()?;
        for (i, event) in schedule.iter().enumerate() {
            run.sleep_checking(event.gap, "between faults").await?;
            say(
                run.started,
                format_args!("event {}/{}: {}", i + 1, schedule.len(), event.fault),
            );
            run.apply(event).await?;
        }
        run.cluster.proxy.clear_faults();
        let inputs = run.stop_producer().await?;
        say(
            run.started,
            format_args!(
                "all faults applied; {inputs} commands produced; waiting for the chain to drain"
            ),
        );
        run.wait_drained().await?;
        say(
            run.started,
            "chain drained; stopping the services (SIGTERM)",
        );
        run.stop_services().await?;
        say(
            run.started,
            "verifying every output topic against the reference model",
        );
        let outcome = run.verify(inputs).await?;
        if !outcome.is_clean() {
            // Open transactions (last stable offset below the high watermark) explain missing
            // records; group offsets say where each stage stopped.
            run.diagnose().await;
        }
        Ok(outcome)
    }
    fn service_spec(&self, service: Service, instance: &str) -> ProcessSpec {
        let bootstrap = self.cluster.bootstrap_servers();
        let mut spec = ProcessSpec::new(self.binaries.path(service.name()))
            .args([
                "--brokers",
                &bootstrap,
                "--app-id",
                &self.names.app(service),
            ])
            // Frequent full snapshots: recoveries exercise snapshot + short replay.
            .args([
                "--snapshot-every-records",
                "1000",
                "--snapshot-interval-ms",
                "5000",
            ])
            .args(["--metrics-interval-ms", "0"])
            // `CHAOS_SERVICE_LOG` overrides the services' log filter (e.g. to add
            // `exactly::runtime=debug` when investigating a stuck partition).
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_SERVICE_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
            )
            .env_remove("EXACTLY_APP_ID")
            .env_remove("EXACTLY_BROKERS")
            .env_remove("EXACTLY_BOOTSTRAP_SERVERS")
            .env_remove("EXACTLY_INPUT_TOPICS")
            // Each instance its own state dir (the ledger keeps its accounts in a store), kept
            // across its restarts: a restart after kill -9 resumes from it.
            .env(
                "EXACTLY_STATE_DIR",
                self.log_dir.join("state").join(instance),
            )
            .log_file(self.log_dir.join(format!("{instance}.log")));
        for (flag, topic) in self.names.flags(service) {
            spec = spec.args([flag, topic]);
        }
        spec
    }

    async fn start_services(&mut self) -> Result<(), ChaosError> {
        for service in Service::ALL {
            for n in 1..=INITIAL_INSTANCES {
                let instance = service.instance(n);
                let spec = self.service_spec(service, &instance);
                self.services.spawn(instance, spec)?;
            }
        }
        let names: Vec<String> = self.services.names().map(str::to_owned).collect();
        for name in &names {
            self.services
                .child(name)?
                .wait_for_log("consumer started", START_TIMEOUT)
                .await?;
        }
        say(
            self.started,
            format_args!(
                "started {} service instances: {}",
                names.len(),
                names.join(", ")
            ),
        );
        Ok(())
    }

    fn start_producer(&mut self) -> Result<(), ChaosError> {
        // Straight to the broker, not through the proxy: the faults are for the services. An
        // input record duplicated by a producer retry would look like a framework duplicate.
        let spec = ProcessSpec::new(self.binaries.path("chaos-workload"))
            .arg("produce")
            .args(["--brokers", &self.cluster.direct_bootstrap_servers()])
            .args(["--topic", &self.names.topics.commands])
            .args(["--seed", &self.options.seed.to_string()])
            .args(["--accounts", &self.options.accounts.to_string()])
            .args(["--rate", &self.options.rate.to_string()])
            .env("RUST_LOG", "warn")
            .log_file(self.log_dir.join("producer.log"));
        self.producer.spawn("producer", spec)?;
        say(
            self.started,
            format_args!(
                "producing payment commands at {} per second",
                self.options.rate
            ),
        );
        Ok(())
    }

    /// Fails if the producer exited without being told to; a service that did is restarted
    /// and reported (or fails the run with [`ChaosOptions::fail_on_crash`]).
    fn check_alive(&mut self, when: &str) -> Result<(), ChaosError> {
        let died =
            |child: &mut crate::process::ChildProcess, status: ExitStatus| ChaosError::Died {
                instance: child.name().to_owned(),
                status,
                when: when.to_owned(),
                log: child.log_path().display().to_string(),
                tail: child.log_tail(40),
            };
        for child in self.producer.iter_mut() {
            if let Some(status) = child.try_status()? {
                return Err(died(child, status));
            }
        }
        for child in self.services.iter_mut() {
            if let Some(status) = child.try_status()? {
                if self.options.fail_on_crash {
                    return Err(died(child, status));
                }
                let error = child
                    .run_log_text()
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .find(|l| l.contains(" ERROR "))
                    .unwrap_or("(no ERROR line)")
                    .to_owned();
                let crash = format!(
                    "{} exited on its own ({status}) {when}; restarted; log {}; last error: {error}",
                    child.name(),
                    child.log_path().display()
                );
                println!(
                    "[{:7.1}s] CRASH: {crash}",
                    self.started.elapsed().as_secs_f64()
                );
                self.crashes.push(crash);
                child.restart()?;
            }
        }
        Ok(())
    }

    /// Prints, for every topic of the run, the partitions whose last stable offset (through
    /// the proxy, read_committed) is behind the broker's high watermark (open transactions),
    /// and every group's committed offsets: what a stuck run needs investigated.
    async fn diagnose(&mut self) {
        let proxy = self.cluster.bootstrap_servers();
        let broker = self.cluster.direct_bootstrap_servers();
        let prefix = self.names.run.clone();
        let groups: Vec<(String, String)> = Service::ALL
            .iter()
            .map(|s| (self.names.app(*s), self.names.input(*s).to_owned()))
            .collect();
        let partitions = self.options.partitions;
        let kafka = self.cluster.kafka().clone();
        let lines = tokio::task::spawn_blocking(move || {
            diagnostics(&proxy, &broker, &prefix, &groups, partitions, &kafka)
        })
        .await
        .unwrap_or_else(|e| vec![format!("diagnostics task failed: {e}")]);
        for line in lines {
            println!("  diag: {line}");
        }
    }

    /// Sleeps for `duration`, checking every 200 ms that nothing died.
    async fn sleep_checking(&mut self, duration: Duration, when: &str) -> Result<(), ChaosError> {
        let until = Instant::now() + duration;
        loop {
            self.check_alive(when)?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(200))).await;
        }
    }

    async fn apply(&mut self, event: &ScheduledFault) -> Result<(), ChaosError> {
        match &event.fault {
            Fault::Kill { instance } => {
                let child = self.services.child(instance)?;
                child.kill_hard().await?;
                child.restart()?;
            }
            Fault::Zombie { instance } => {
                let pause = self.options.zombie_pause();
                self.services.child(instance)?.pause()?;
                let result = self
                    .sleep_checking(pause, "while a zombie was paused")
                    .await;
                // Resume even when something else died, so the report's logs are complete.
                self.services.child(instance)?.resume()?;
                result?;
            }
            Fault::CleanRestart { instance } => {
                let status = self.services.child(instance)?.terminate(STOP_GRACE).await?;
                self.note_stop(instance, status);
                self.services.child(instance)?.restart()?;
            }
            Fault::ScaleOut { instance } => {
                let service = schedule::service_of(instance).ok_or_else(|| {
                    ChaosError::Workload(format!("no service for instance {instance}"))
                })?;
                let spec = self.service_spec(service, instance);
                self.services.spawn(instance.clone(), spec)?;
            }
            Fault::ScaleIn { instance } => {
                let status = self.services.child(instance)?.terminate(STOP_GRACE).await?;
                self.note_stop(instance, status);
                self.services.remove(instance);
            }
            Fault::DropConnections => self.cluster.proxy.drop_connections(),
            Fault::LatencySpike {
                api,
                latency,
                duration,
            } => {
                self.cluster.proxy.set_latency(*api, *latency);
                let result = self
                    .sleep_checking(*duration, "during a latency spike")
                    .await;
                self.cluster.proxy.set_latency(*api, Duration::ZERO);
                result?;
            }
            Fault::BrokerOutage { duration } => {
                self.cluster.proxy.refuse_connections_for(*duration);
                self.sleep_checking(*duration, "during a broker outage")
                    .await?;
            }
            Fault::DelayedEndTxn { delay, duration } => {
                self.cluster.proxy.delay_end_txn_response(*delay);
                let result = self
                    .sleep_checking(*duration, "while EndTxn was delayed")
                    .await;
                self.cluster.proxy.delay_end_txn_response(Duration::ZERO);
                result?;
            }
            Fault::BrokerCrash { target, down } => self.crash_broker(*target, *down).await?,
        }
        Ok(())
    }

    /// SIGKILLs the node `target` resolves to now, keeps it down for `down`, starts it again
    /// (same ports, same data) and waits until it serves. Only 3-node runs schedule this: a
    /// single Kafka node loses transaction state it acknowledged when it goes down, by SIGKILL
    /// (`single_node_crash_keeps_acknowledged_commits` in tests/tests/integration/kafka.rs) and even by a
    /// controlled shutdown (commit markers of a completed transaction missing after the
    /// restart, see the README), which nothing built on Kafka can make exactly-once.
    async fn crash_broker(
        &mut self,
        target: BrokerTarget,
        down: Duration,
    ) -> Result<(), ChaosError> {
        let node = self.resolve(target).await?;
        say(
            self.started,
            format_args!("SIGKILL Kafka node {node} ({target})"),
        );
        self.cluster.kill_broker(node).await?;
        let result = self
            .sleep_checking(down, "while a Kafka node was down")
            .await;
        // Start it again even when something else died, so the report's logs are complete.
        self.cluster.start_broker(node).await?;
        say(self.started, format_args!("Kafka node {node} serves again"));
        result
    }

    /// The node id a [`BrokerTarget`] names right now.
    async fn resolve(&self, target: BrokerTarget) -> Result<u32, ChaosError> {
        let partitions = self.options.partitions.max(1);
        let topic = match target {
            BrokerTarget::LeaderOf { service, .. } => Some(self.names.input(service).to_owned()),
            BrokerTarget::Controller => None,
        };
        let resolved = self
            .cluster
            .with_owned_kafka(move |kafka| {
                Ok(match (target, topic) {
                    (BrokerTarget::LeaderOf { partition, .. }, Some(topic)) => {
                        kafka.leader_of(&topic, partition % partitions)?
                    }
                    _ => kafka.active_controller(),
                })
            })
            .await?;
        // No leader known right now (an election under way): any node will do.
        Ok(resolved.unwrap_or(1))
    }

    fn note_stop(&mut self, instance: &str, status: ExitStatus) {
        if !status.success() {
            let note = format!("{instance} did not stop cleanly on SIGTERM: {status}");
            say(self.started, format_args!("note: {note}"));
            self.notes.push(note);
        }
    }

    /// SIGTERMs the producer and returns how many commands it produced.
    async fn stop_producer(&mut self) -> Result<usize, ChaosError> {
        let child = self.producer.child("producer")?;
        let status = child.terminate(Duration::from_secs(90)).await?;
        let text = child.log_text()?;
        let count = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("PRODUCED count="))
            .and_then(|n| n.trim().parse::<usize>().ok());
        match count {
            Some(count) if status.success() => {
                self.producer.remove("producer");
                Ok(count)
            }
            _ => Err(ChaosError::Workload(format!(
                "the input producer failed ({status}); log {}:\n{}",
                child.log_path().display(),
                child.log_tail(30)
            ))),
        }
    }

    async fn wait_drained(&mut self) -> Result<(), ChaosError> {
        let bootstrap = self.cluster.bootstrap_servers();
        let kafka = |context: String| move |source| ChaosError::Kafka { context, source };
        let mut probes = Vec::new();
        for service in Service::ALL {
            let group = self.names.app(service);
            probes.push(
                GroupProbe::new(
                    &bootstrap,
                    &group,
                    self.names.input(service),
                    self.options.partitions,
                )
                .map_err(kafka(format!("creating the drain probe of {group}")))?,
            );
        }
        let chain = std::sync::Arc::new(ChainProbe::new(probes));
        let started = Instant::now();
        let mut last_report = Instant::now();
        // (committed offsets summed over the groups, when that sum last changed)
        let mut progress: (i64, Instant) = (-1, Instant::now());
        loop {
            self.check_alive("while draining")?;
            let c = std::sync::Arc::clone(&chain);
            let (behind, committed) = tokio::task::spawn_blocking(move || {
                let behind = c.first_not_drained().map(|g| g.map(str::to_owned));
                (behind, c.progress().ok())
            })
            .await
            .map_err(|e| ChaosError::Workload(format!("drain probe task failed: {e}")))?;
            let group = match behind {
                Ok(None) => return Ok(()),
                Ok(Some(group)) => group,
                // A slow answer during recovery is not a verdict: ask again until the deadline.
                Err(error) => format!("(probe failed: {error})"),
            };
            if let Some(sum) = committed.filter(|sum| *sum != progress.0) {
                progress = (sum, Instant::now());
            }
            let stalled = progress.1.elapsed() >= self.options.drain_stall_timeout;
            if stalled || started.elapsed() >= self.options.drain_timeout {
                return Err(ChaosError::NotDrained {
                    group,
                    waited: started.elapsed(),
                    stalled_for: progress.1.elapsed(),
                    log_dir: self.log_dir.display().to_string(),
                });
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                say(
                    self.started,
                    format_args!("draining: {group} still has input left"),
                );
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn stop_services(&mut self) -> Result<(), ChaosError> {
        let names: Vec<String> = self.services.names().map(str::to_owned).collect();
        for name in names {
            let status = self.services.child(&name)?.terminate(STOP_GRACE).await?;
            self.note_stop(&name, status);
        }
        Ok(())
    }

    async fn verify(&mut self, inputs: usize) -> Result<ChaosOutcome, ChaosError> {
        let n = &self.names.topics;
        let spec = ProcessSpec::new(self.binaries.path("chaos-workload"))
            .arg("verify")
            .args(["--brokers", &self.cluster.bootstrap_servers()])
            .args(["--seed", &self.options.seed.to_string()])
            .args(["--accounts", &self.options.accounts.to_string()])
            .args(["--count", &inputs.to_string()])
            .args(["--ledger-topic", &n.ledger])
            .args(["--dead-letter-topic", &n.dead_letters])
            .args(["--balances-topic", &n.balances])
            .args(["--rejections-topic", &n.rejections])
            .args(["--stats-topic", &n.stats])
            .env("RUST_LOG", "warn")
            .log_file(self.log_dir.join("verify.log"));
        let child = self.producer.spawn("verify", spec)?;
        let status = child.wait_exit(Duration::from_secs(900)).await?;
        let text = child.run_log_text()?;
        let verdict = text.lines().rev().find(|l| l.starts_with("VERIFY "));
        let Some(verdict) = verdict.filter(|_| status.code().is_some_and(|c| c == 0 || c == 1))
        else {
            return Err(ChaosError::Workload(format!(
                "the verifier failed ({status}); log {}:\n{}",
                child.log_path().display(),
                child.log_tail(30)
            )));
        };
        let field = |name: &str| -> Option<String> {
            verdict
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_owned))
        };
        let number = |name: &str| {
            field(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        let mut offending: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("OFFENDING ") || l.starts_with("state mismatch: "))
            .map(str::to_owned)
            .collect();
        offending.truncate(40);
        let outcome = ChaosOutcome {
            seed: self.options.seed,
            counts: Counts::default(),
            inputs,
            duplicates: number("duplicates"),
            missing: number("missing"),
            other_violations: number("unexpected").saturating_add(number("order_violations")),
            state_match: field("state").as_deref() == Some("match"),
            offending,
            notes: std::mem::take(&mut self.notes),
            crashes: std::mem::take(&mut self.crashes),
            log_dir: self.log_dir.clone(),
            wall: Duration::ZERO,
        };
        if outcome.is_clean() != (status.code() == Some(0)) {
            return Err(ChaosError::Workload(format!(
                "the verifier's exit status ({status}) contradicts its verdict line {verdict:?}"
            )));
        }
        say(self.started, verdict);
        Ok(outcome)
    }
}

/// How many partitions with an open transaction the diagnostics describe in detail.
const OPEN_TRANSACTIONS_DESCRIBED: usize = 4;

/// The blocking body of [`Run::diagnose`].
fn diagnostics(
    proxy: &str,
    broker: &str,
    prefix: &str,
    groups: &[(String, String)],
    partitions: i32,
    kafka: &crate::kafka::SharedCluster,
) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client = |bootstrap: &str, isolation: &str| -> Result<BaseConsumer, String> {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("isolation.level", isolation)
            .create()
            .map_err(|e| format!("diagnostics client for {bootstrap}: {e}"))
    };
    let mut lines = Vec::new();
    let (committed, uncommitted) = match (
        client(proxy, "read_committed"),
        client(broker, "read_uncommitted"),
    ) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => return vec![e],
    };
    let timeout = Duration::from_secs(5);
    let metadata = match uncommitted.fetch_metadata(None, timeout) {
        Ok(m) => m,
        Err(e) => return vec![format!("reading metadata from {broker}: {e}")],
    };
    let mut open = Vec::new();
    for topic in metadata
        .topics()
        .iter()
        .filter(|t| t.name().starts_with(prefix))
    {
        for p in topic.partitions() {
            let high = uncommitted.fetch_watermarks(topic.name(), p.id(), timeout);
            let stable = committed.fetch_watermarks(topic.name(), p.id(), timeout);
            match (high, stable) {
                (Ok((_, high)), Ok((_, stable))) if stable < high => {
                    open.push((topic.name().to_owned(), p.id(), stable));
                    lines.push(format!(
                        "{}/{}: last stable offset {stable} < high watermark {high} (open transaction)",
                        topic.name(),
                        p.id()
                    ));
                }
                (Ok(_), Ok(_)) => {}
                (h, s) => lines.push(format!(
                    "{}/{}: watermarks unavailable: {:?} / {:?}",
                    topic.name(),
                    p.id(),
                    h.err(),
                    s.err()
                )),
            }
        }
    }
    lines.push(format!(
        "{} partitions of the run's topics have an open transaction",
        open.len()
    ));
    // Who holds each (the first few): the log's producer and the coordinator's records of it.
    let cluster = kafka
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (topic, partition, stable) in open.iter().take(OPEN_TRANSACTIONS_DESCRIBED) {
        lines.extend(crate::kafka::inspect::describe_open_transaction(
            &cluster, topic, *partition, *stable,
        ));
    }
    drop(cluster);
    for (group, topic) in groups {
        let probe = match drain::GroupProbe::new(proxy, group, topic, partitions) {
            Ok(p) => p,
            Err(e) => {
                lines.push(format!("group {group}: {e}"));
                continue;
            }
        };
        match probe.committed() {
            Ok(offsets) => {
                let described: Vec<String> = offsets
                    .iter()
                    .map(|(p, o)| {
                        let stable = committed
                            .fetch_watermarks(topic, *p, timeout)
                            .map(|(_, h)| h.to_string())
                            .unwrap_or_else(|_| "?".into());
                        format!(
                            "p{p}={}/{stable}",
                            o.map_or("none".into(), |o| o.to_string())
                        )
                    })
                    .collect();
                lines.push(format!(
                    "group {group} committed/stable end on {topic}: {}",
                    described.join(" ")
                ));
            }
            Err(e) => lines.push(format!("group {group}: committed offsets: {e}")),
        }
    }
    lines
}

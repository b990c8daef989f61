//! `fraud --check`: the detector on Kafka through kill -9 restarts, its outputs compared with
//! the [reference model](super::model).
//!
//! Every card's profile is produced first; two instances of the detector share the inputs'
//! partitions (profiles and transactions co-partitioned), and the transactions follow once
//! every partition reports holding its profiles. While the input streams in,
//! one is killed mid-stream, and (twice or more) one is killed right after a wall-clock tick
//! and before the commit that would carry it (checked in its log), and restarted without its
//! local state, so that recovery replays the ticks committed before from Kafka (at least one
//! recovery must have). A detector that fails (recovery refusing a replay) fails the check.
//! Once the input is in and
//! every partition's latest report shows the model's end state, the read_committed outputs
//! must hold every expected record exactly once:
//! `FRAUD-CHECK inputs=N alerts=A timers_fired=T duplicates=0 missing=0 state=match verdict=PASS`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::eos_service::{read_all, ReadRecord};
use exactly_tests::process::{ChildProcess, ProcessSpec};
use rdkafka::producer::{BaseRecord, Producer};
use serde::de::DeserializeOwned;

use super::model::{expect, generate, profiles, Expected, Input, PartitionEnd, ProfileInput};
use super::{Alert, CardHour, Expired, Late, Report, Topics};
use crate::producer::{command_producer, send_waiting};
use crate::topics::create_topics;

/// What the check runs.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Use these Kafka brokers instead of starting a local Apache Kafka.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Transactions to produce.
    #[arg(long, default_value_t = 20_000)]
    pub count: usize,
    /// Cards.
    #[arg(long, default_value_t = 2_000)]
    pub cards: u64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Seed of the input.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Transactions produced per second.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Longest wait for the outputs after the last transaction, in seconds.
    #[arg(long, default_value_t = 180)]
    pub drain_timeout_secs: u64,
    /// Directory for the detectors' logs (default: a fresh one under the temp directory).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

/// How the detector instances run in the check: a report every 700 ms; a partition's
/// transaction stays open 1.5 s after its last input, so that a kill right after a tick lands
/// before the commit that would carry it; a transaction waits up to 500 ms for the profiles
/// input to have records too (they are all older, so they all go first).
const SERVICE_FLAGS: [&str; 8] = [
    "--report-ms",
    "700",
    "--commit-interval-ms",
    "2000",
    "--commit-when-idle-ms",
    "1500",
    "--max-input-idle-ms",
    "500",
];
/// Kills right after a tick that must land before the next commit.
const TICK_KILLS: usize = 2;

/// Runs the check; `Ok(true)` when it passed. `exe` is the `fraud` binary (the detectors are
/// its `service` subcommand).
pub async fn run_check(args: CheckArgs, exe: PathBuf) -> anyhow::Result<bool> {
    let started = Instant::now();
    let say = |line: &dyn std::fmt::Display| {
        println!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    };
    let run = unique_name("fraud");
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("exactly-fraud").join(&run));
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating the log directory {}", log_dir.display()))?;
    let (_cluster, bootstrap) = match &args.brokers {
        Some(brokers) => (None, brokers.clone()),
        None => {
            say(&"starting a local Apache Kafka");
            let cluster = TestCluster::start()
                .await
                .context("starting the local Apache Kafka")?;
            let bootstrap = cluster.bootstrap_servers();
            (Some(cluster), bootstrap)
        }
    };
    let input_topic = format!("{run}.transactions");
    let profiles_topic = format!("{run}.profiles");
    let topics = Topics::with_prefix(&run);
    let mut all_topics = vec![input_topic.as_str(), profiles_topic.as_str()];
    all_topics.extend(topics.all());
    // The records carry their own (past) timestamps: time-based retention must not delete
    // them (nor the outputs, which carry the same times) while the check runs.
    create_topics(
        &bootstrap,
        &all_topics,
        args.partitions,
        &[("retention.ms", "-1")],
    )
    .await?;
    let inputs = generate(args.seed, args.count, args.cards, args.partitions);
    let cards = profiles(args.seed, args.cards, args.partitions);
    let expected = expect(&inputs, &cards);
    produce_profiles(&bootstrap, &profiles_topic, &cards)?;
    say(&format_args!(
        "brokers {bootstrap}; {} transactions of {} cards on {} partitions; the model expects {} closed hours, {} alerts, {} expired cards, {} late transactions",
        inputs.len(),
        args.cards,
        args.partitions,
        expected.card_hours.len(),
        expected.alerts.len(),
        expected.expired.len(),
        expected.late.len()
    ));

    let app = format!("{run}-detector");
    let spec = |name: &str| {
        ProcessSpec::new(&exe)
            .arg("service")
            .args(["--brokers", &bootstrap, "--app-id", &app])
            .args(["--input", &input_topic, "--profiles", &profiles_topic])
            .args(["--prefix", &run])
            .args(SERVICE_FLAGS)
            .env(
                "RUST_LOG",
                "info,exactly=debug,librdkafka=warn,rdkafka=warn",
            )
            .env("EXACTLY_STATE_DIR", log_dir.join("state").join(name))
            .log_file(log_dir.join(format!("{name}.log")))
    };
    let mut detectors = [
        ChildProcess::spawn("detector-1", spec("detector-1"))?,
        ChildProcess::spawn("detector-2", spec("detector-2"))?,
    ];
    // The transactions come once every partition holds its profiles (a committed report says
    // so): which profile a transaction meets then depends on nothing but the input, and every
    // recovery after that replays the profiles from the recorded order.
    let loaded: BTreeMap<i32, u64> = expected
        .partitions
        .iter()
        .map(|(p, end)| (*p, end.profiles))
        .collect();
    wait_for_profiles(
        &bootstrap,
        &topics.reports,
        &loaded,
        Duration::from_secs(120),
    )
    .await?;
    say(&"every partition holds its profiles; producing the transactions");
    let producer = InputProducer::start(&bootstrap, &input_topic, inputs.clone(), args.rate)?;

    let total = inputs.len() as u64;
    wait_until(|| producer.produced() >= total * 3 / 10, &producer).await?;
    say(&"kill -9 detector-1 mid-stream; restarting it");
    detectors[0].kill_hard().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    detectors[0].restart()?;

    wait_until(|| producer.produced() >= total * 6 / 10, &producer).await?;
    // Committed ticks behind the next kills, for their recoveries to replay.
    let reports = 2 * args.partitions as usize;
    wait_for_records(
        &bootstrap,
        &topics.reports,
        reports,
        Duration::from_secs(120),
    )
    .await?;
    let mut landed = 0;
    let mut attempts = 0;
    while landed < TICK_KILLS && attempts < 3 * TICK_KILLS {
        let detector = &mut detectors[attempts % 2];
        attempts += 1;
        let between = kill_right_after_a_tick(detector).await?;
        say(&format_args!(
            "kill -9 {} right after a wall-clock tick: {}; restarting it without its local state",
            detector.name(),
            if between {
                "before the commit that would carry it"
            } else {
                "a commit came first (not counted)"
            }
        ));
        landed += usize::from(between);
        // Its partitions restore from Kafka and replay the ticks committed since their base.
        let state = log_dir.join("state").join(detector.name());
        if state.exists() {
            std::fs::remove_dir_all(&state)
                .with_context(|| format!("wiping {}", state.display()))?;
        }
        detector.restart()?;
    }
    // Joining the producer's thread blocks: not on the runtime's worker.
    tokio::task::spawn_blocking(move || producer.finish())
        .await
        .map_err(|_| anyhow!("the producer's join task failed"))??;
    say(&format_args!("all {total} transactions produced"));

    let drained = wait_for_end_state(
        &bootstrap,
        &topics.reports,
        &expected.partitions,
        Duration::from_secs(args.drain_timeout_secs),
    )
    .await;
    // A detector that stopped on its own failed (e.g. recovery's checks refused a replay).
    let mut failures = Vec::new();
    for detector in &mut detectors {
        if let Some(status) = detector.try_status()? {
            failures.push(format!("{} exited on its own ({status})", detector.name()));
        }
        let failed = detector.log_text()?.matches("partition failed").count();
        if failed > 0 {
            failures.push(format!(
                "{}: {failed} partition failure(s) in its log",
                detector.name()
            ));
        }
    }
    say(&"stopping the detectors");
    for detector in &mut detectors {
        detector.terminate(Duration::from_secs(60)).await?;
    }
    for failure in &failures {
        say(failure);
    }
    let outcome = compare(&bootstrap, &topics, &expected).await?;
    let replaying = recoveries_replaying_ticks(&detectors)?;
    say(&format_args!(
        "{replaying} recover(ies) replayed committed wall-clock ticks"
    ));
    let state = if drained.is_ok() { "match" } else { "differ" };
    if let Err(error) = &drained {
        say(&format_args!("state: {error}"));
    }
    let pass = drained.is_ok()
        && outcome.duplicates == 0
        && outcome.missing == 0
        && outcome.unexpected == 0
        && landed >= TICK_KILLS
        && replaying > 0
        && failures.is_empty();
    if landed < TICK_KILLS {
        say(&format_args!(
            "only {landed} of {TICK_KILLS} kills landed between a tick and its commit"
        ));
    }
    for line in &outcome.notes {
        say(line);
    }
    say(&format_args!("logs in {}", log_dir.display()));
    println!(
        "FRAUD-CHECK inputs={} alerts={} timers_fired={} duplicates={} missing={} state={state} verdict={}",
        inputs.len(),
        outcome.alerts,
        outcome.timers_fired,
        outcome.duplicates,
        outcome.missing,
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

/// Waits for a live wall-clock tick in `detector`'s log on a partition that has processed
/// input (so that it reports), kills the detector at once, and tells whether the kill landed
/// before that partition's next commit (no `transaction committed` line of the tick's
/// partition after the tick's line).
async fn kill_right_after_a_tick(detector: &mut ChildProcess) -> anyhow::Result<bool> {
    let before = reporting_ticks(&detector.run_log_text()?).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reporting_ticks(&detector.run_log_text()?).count() <= before {
        if Instant::now() > deadline {
            bail!(
                "{} logged no wall-clock tick in 60 s:\n{}",
                detector.name(),
                detector.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    detector.kill_hard().await?;
    let log = detector.run_log_text()?;
    let tick = reporting_ticks(&log)
        .nth(before)
        .ok_or_else(|| anyhow!("the tick's line vanished from the log"))?;
    // The tick's partition worker: its span, `partition_worker{...}`.
    let span = tick
        .find("partition_worker{")
        .and_then(|s| tick[s..].find('}').map(|e| &tick[s..=s + e]))
        .ok_or_else(|| anyhow!("the tick's line names no partition worker: {tick}"))?;
    let after = log.split_once(tick).map_or("", |(_, after)| after);
    Ok(!after
        .lines()
        .any(|l| l.contains(span) && l.contains("transaction committed")))
}

/// The log lines of wall-clock ticks on partitions past their first record.
fn reporting_ticks(log: &str) -> impl Iterator<Item = &str> {
    log.lines()
        .filter(|l| l.contains("wall-clock tick") && !l.contains("next_offset=0 "))
}

/// Waits until `topic` holds at least `count` committed records.
async fn wait_for_records(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while read_all(bootstrap, topic).await.len() < count {
        if Instant::now() > deadline {
            bail!("{topic} did not reach {count} committed records in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Recoveries (in every run of the detectors) that replayed wall-clock ticks from the
/// incremental records: without one the kills did not test that path.
fn recoveries_replaying_ticks(detectors: &[ChildProcess]) -> anyhow::Result<usize> {
    let mut count = 0;
    for detector in detectors {
        count += detector
            .log_text()?
            .lines()
            .filter(|l| l.contains("partition recovered"))
            .filter(|l| {
                l.split_once("wall_clock_ticks=")
                    .and_then(|(_, n)| n.split(' ').next()?.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
            .count();
    }
    Ok(count)
}

/// Waits until every partition's latest committed report holds its `expected` profiles.
async fn wait_for_profiles(
    bootstrap: &str,
    reports_topic: &str,
    expected: &BTreeMap<i32, u64>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let latest = latest_reports(bootstrap, reports_topic).await?;
        let loaded: BTreeMap<i32, u64> = latest.iter().map(|(p, r)| (*p, r.profiles)).collect();
        if loaded == *expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {timeout:?} the reports say {loaded:?} profiles; the model expects {expected:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every partition's latest committed report shows the model's end state.
async fn wait_for_end_state(
    bootstrap: &str,
    reports_topic: &str,
    expected: &BTreeMap<i32, PartitionEnd>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let latest = latest_reports(bootstrap, reports_topic).await?;
        let ends: BTreeMap<i32, PartitionEnd> = latest
            .iter()
            .map(|(p, r)| {
                let end = PartitionEnd {
                    cards: r.cards,
                    alerts: r.alerts,
                    transactions: r.transactions,
                    profiles: r.profiles,
                };
                (*p, end)
            })
            .collect();
        if ends == *expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {timeout:?} the latest reports say {ends:?}; the model expects {expected:?}"
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn latest_reports(bootstrap: &str, topic: &str) -> anyhow::Result<HashMap<i32, Report>> {
    let mut latest: HashMap<i32, Report> = HashMap::new();
    for record in read_all(bootstrap, topic).await {
        let report: Report = decode(&record)?;
        let newer = latest
            .get(&report.partition)
            .is_none_or(|r| r.seq < report.seq);
        if newer {
            latest.insert(report.partition, report);
        }
    }
    Ok(latest)
}

/// The outputs against the model.
struct Outcome {
    alerts: usize,
    timers_fired: usize,
    duplicates: usize,
    missing: usize,
    unexpected: usize,
    notes: Vec<String>,
}

async fn compare(bootstrap: &str, topics: &Topics, expected: &Expected) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        alerts: 0,
        timers_fired: 0,
        duplicates: 0,
        missing: 0,
        unexpected: 0,
        notes: Vec::new(),
    };
    let hours: Vec<CardHour> = read_values(bootstrap, &topics.card_hours).await?;
    let alerts: Vec<Alert> = read_values(bootstrap, &topics.alerts).await?;
    let expired: Vec<Expired> = read_values(bootstrap, &topics.expired).await?;
    let late: Vec<Late> = read_values(bootstrap, &topics.late).await?;
    let expected_late: Vec<Late> = expected.late.iter().map(|(_, l)| l.clone()).collect();
    outcome.alerts = alerts.len();
    outcome.timers_fired = hours.len() + expired.len();
    outcome.tally("closed hours", &hours, &expected.card_hours);
    outcome.tally("alerts", &alerts, &expected.alerts);
    outcome.tally("expired cards", &expired, &expected.expired);
    outcome.tally("late transactions", &late, &expected_late);
    let reports: Vec<Report> = read_values(bootstrap, &topics.reports).await?;
    outcome.check_report_sequences(&reports);
    Ok(outcome)
}

impl Outcome {
    /// Counts records seen more than once, expected ones missing, and unexpected ones.
    fn tally<T: Ord + Clone + std::fmt::Debug>(&mut self, what: &str, got: &[T], expected: &[T]) {
        let mut counts: BTreeMap<&T, (usize, usize)> = BTreeMap::new();
        for record in got {
            counts.entry(record).or_default().0 += 1;
        }
        for record in expected {
            counts.entry(record).or_default().1 += 1;
        }
        let (mut duplicates, mut missing, mut unexpected) = (0, 0, 0);
        for (record, (seen, wanted)) in counts {
            if wanted == 0 {
                unexpected += seen;
                if unexpected == seen {
                    self.notes.push(format!("unexpected {what}: {record:?}"));
                }
            } else if seen > wanted {
                duplicates += seen - wanted;
            } else if seen < wanted {
                missing += wanted - seen;
            }
        }
        self.notes.push(format!(
            "{what}: {} read, {} expected; duplicates {duplicates}, missing {missing}, unexpected {unexpected}",
            got.len(),
            expected.len()
        ));
        self.duplicates += duplicates;
        self.missing += missing;
        self.unexpected += unexpected;
    }

    /// Each partition's reports must be numbered 1, 2, ... without a gap or a repeat.
    fn check_report_sequences(&mut self, reports: &[Report]) {
        let mut seqs: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
        for report in reports {
            seqs.entry(report.partition).or_default().push(report.seq);
        }
        let (mut repeated, mut gaps) = (0, 0);
        for seqs in seqs.values_mut() {
            seqs.sort_unstable();
            let read = seqs.len();
            seqs.dedup();
            repeated += read - seqs.len();
            let last = seqs.last().copied().unwrap_or(0) as usize;
            gaps += last.saturating_sub(seqs.len());
        }
        self.notes.push(format!(
            "reports: {} read; repeated sequence numbers {repeated}, gaps {gaps}",
            reports.len()
        ));
        self.duplicates += repeated;
        self.missing += gaps;
    }
}

async fn read_values<T: DeserializeOwned>(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<T>> {
    read_all(bootstrap, topic)
        .await
        .iter()
        .map(decode)
        .collect()
}

fn decode<T: DeserializeOwned>(record: &ReadRecord) -> anyhow::Result<T> {
    let value = record.value.as_deref().unwrap_or_default();
    serde_json::from_slice(value).with_context(|| {
        format!(
            "decoding {:?} at offset {} of partition {}",
            String::from_utf8_lossy(value),
            record.offset,
            record.partition
        )
    })
}

/// Waits (bounded) for `condition`, failing early if the producer failed.
async fn wait_until(condition: impl Fn() -> bool, producer: &InputProducer) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !condition() {
        if producer.done() && !condition() {
            bail!("the input producer stopped early");
        }
        if Instant::now() > deadline {
            bail!("no progress in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Produces every card's profile, timestamped before the first transaction.
fn produce_profiles(bootstrap: &str, topic: &str, cards: &[ProfileInput]) -> anyhow::Result<()> {
    let producer = command_producer(bootstrap).context("creating the profiles producer")?;
    for card in cards {
        let value = serde_json::to_vec(&card.profile)?;
        let record = BaseRecord::to(topic)
            .key(card.card.as_str())
            .payload(value.as_slice())
            .partition(card.partition)
            .timestamp(super::model::START_MS - 1);
        send_waiting(&producer, record)
            .with_context(|| format!("producing {}'s profile", card.card))?;
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the profiles")?;
    Ok(())
}

/// Produces the input at a rate on a thread of its own, each transaction to its partition
/// with its timestamp.
struct InputProducer {
    produced: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InputProducer {
    fn start(bootstrap: &str, topic: &str, inputs: Vec<Input>, rate: u64) -> anyhow::Result<Self> {
        let producer = command_producer(bootstrap).context("creating the input producer")?;
        let produced = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (count, finished, topic) = (Arc::clone(&produced), Arc::clone(&done), topic.to_owned());
        let thread = std::thread::Builder::new()
            .name("fraud-producer".into())
            .spawn(move || {
                let started = Instant::now();
                let result = (|| {
                    for (i, input) in inputs.iter().enumerate() {
                        let due = started + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            producer.poll(Duration::ZERO);
                            std::thread::sleep(wait);
                        }
                        let value = serde_json::to_vec(&input.tx)?;
                        let record = BaseRecord::to(&topic)
                            .key(input.card.as_str())
                            .payload(value.as_slice())
                            .partition(input.partition)
                            .timestamp(input.timestamp);
                        send_waiting(&producer, record)
                            .with_context(|| format!("producing {}", input.tx.id))?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    producer
                        .flush(Duration::from_secs(60))
                        .context("flushing the transactions")?;
                    let failed = producer.context().failed();
                    if failed > 0 {
                        bail!(
                            "{failed} transaction(s) not delivered; first error: {}",
                            producer.context().first_error()
                        );
                    }
                    Ok(())
                })();
                finished.store(true, Ordering::Release);
                result
            })
            .context("starting the producer thread")?;
        Ok(InputProducer {
            produced,
            done,
            thread: Some(thread),
        })
    }

    fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }

    fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for the last transaction to be delivered.
    fn finish(mut self) -> anyhow::Result<()> {
        self.thread
            .take()
            .ok_or_else(|| anyhow!("the producer thread was already joined"))?
            .join()
            .map_err(|_| anyhow!("the producer thread panicked"))?
    }
}

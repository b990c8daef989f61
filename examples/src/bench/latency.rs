//! End-to-end latency through the payments chain A (validate) → B (ledger) → C (stats) at a
//! fixed input rate.
//!
//! Every output record carries its input record's timestamp (the framework's default), so
//! a summary that C emits carries the time its payment command was produced. The latency of
//! a summary is the time a read_committed consumer receives it minus that timestamp: the
//! whole chain, three (for credits four) transactions deep, as a downstream reader sees it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use exactly::{AppConfig, ErrorPolicy};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use exactly_tests::chaos::ChainTopics;

use super::engine::{blocking_with, RunningApp};
use crate::generator;
use crate::ledger::Ledger;
use crate::producer::{command_producer, command_record, send_waiting};
use crate::stats::Stats;
use crate::validate::Validate;

/// What the latency run measured.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    /// Commands produced (at the target rate).
    pub commands: u64,
    /// Summaries whose latency was sampled (after the warm-up).
    pub samples: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
    /// Latency up to each topic of the chain, in chain order (the last is C's summaries): where
    /// the time goes.
    pub hops: Vec<HopLatency>,
    /// Each service's transactions and their commit latency.
    pub services: Vec<ServiceCommits>,
    /// The 99th percentile of the summaries of commands sent in the second half of the run:
    /// the chain's steady state, without its first seconds (new producers' first requests).
    pub second_half_p99: Option<Duration>,
    /// The seconds of the run (by when their commands were sent) whose slowest summary took
    /// longer than [`SLOW_SECOND`]: whether the tail is spread over the run or one stall.
    pub slow_seconds: Vec<SlowSecond>,
    /// The unmeasured pass of the same chain that ran before this one, if any.
    pub warm_up: Option<WarmUp>,
}

/// What the unmeasured warm-up pass of the latency case saw (a broker whose JIT is cold for
/// this load): reported, never counted.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    /// Median latency of the warm-up pass.
    pub p50: Duration,
    /// Its 99th percentile.
    pub p99: Duration,
}

/// A second of the latency run with a slow summary.
#[derive(Debug, Clone, Copy)]
pub struct SlowSecond {
    /// Seconds after the first command.
    pub at: u64,
    /// Summaries of the commands sent in that second.
    pub samples: usize,
    /// Their slowest.
    pub max: Duration,
}

/// A second whose slowest summary took longer than this is listed in the report.
pub const SLOW_SECOND: Duration = Duration::from_millis(300);

/// One service's transactions in the latency run.
#[derive(Debug, Clone)]
pub struct ServiceCommits {
    /// Which service.
    pub service: &'static str,
    /// Transactions committed (all partitions, start-up and shutdown included).
    pub transactions: u64,
    /// Median commit latency (the whole commit path).
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

impl LatencyRun {
    /// The latency up to each topic of the chain, one line per topic.
    pub fn hop_table(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        if let Some(warm_up) = self.warm_up {
            let _ = writeln!(
                t,
                "  warm-up pass before it (not counted; same chain, rate and length, own topics): p50 {} ms, p99 {} ms",
                warm_up.p50.as_millis(),
                warm_up.p99.as_millis()
            );
        }
        for hop in &self.hops {
            let _ = writeln!(
                t,
                "  up to {:<24} p50 {:>5} ms, p99 {:>5} ms ({} records)",
                hop.topic,
                hop.p50.as_millis(),
                hop.p99.as_millis(),
                hop.samples
            );
        }
        if let Some(p99) = self.second_half_p99 {
            let _ = writeln!(
                t,
                "  summaries of the commands sent in the second half of the run: p99 {} ms",
                p99.as_millis()
            );
        }
        if !self.slow_seconds.is_empty() {
            let seconds: Vec<String> = self
                .slow_seconds
                .iter()
                .map(|s| {
                    format!(
                        "{}s ({} ms, {} summaries)",
                        s.at,
                        s.max.as_millis(),
                        s.samples
                    )
                })
                .collect();
            let _ = writeln!(
                t,
                "  seconds with a summary slower than {} ms (by send time, after the first command): {}",
                SLOW_SECOND.as_millis(),
                seconds.join(", ")
            );
        }
        for s in &self.services {
            let _ = writeln!(
                t,
                "  service {:<11} {:>6} transactions, commit p50 {:>5} ms, p99 {:>5} ms",
                s.service,
                s.transactions,
                s.p50.as_millis(),
                s.p99.as_millis()
            );
        }
        t
    }
}

/// The latency of one topic of the chain: from a command's production to a read_committed
/// reader receiving a record on this topic that carries the command's timestamp.
#[derive(Debug, Clone)]
pub struct HopLatency {
    /// Which topic (by its role in the chain).
    pub topic: &'static str,
    /// Records sampled after the warm-up.
    pub samples: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// How long after the first command samples count (the chain's first transactions include
/// partition start-up).
const WARM_UP: Duration = Duration::from_secs(2);
/// The chain is done with the input when no summary arrived for this long after the last
/// command was produced.
const QUIET: Duration = Duration::from_secs(3);

/// Runs A, B and C (one instance each, default commit interval) on `topics`, produces
/// `rate` commands per second for `duration`, and samples the latency of C's summaries.
pub async fn measure_chain_latency(
    bootstrap: &str,
    prefix: &str,
    topics: &ChainTopics,
    partitions: i32,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<LatencyRun> {
    let config = |service: &str, input: &str, policy: ErrorPolicy| {
        AppConfig::new(format!("{prefix}-{service}"), bootstrap)
            .input_topic(input)
            .error_policy(policy)
    };
    let validate = RunningApp::start(
        config(
            "validate",
            &topics.commands,
            ErrorPolicy::DeadLetter {
                topic: topics.dead_letters.clone(),
            },
        ),
        Validate {
            ledger_topic: topics.ledger.clone(),
            dead_letter_topic: topics.dead_letters.clone(),
        },
    )?;
    let ledger = RunningApp::start(
        config("ledger", &topics.ledger, ErrorPolicy::Fail),
        Ledger {
            ledger_topic: topics.ledger.clone(),
            balances_topic: topics.balances.clone(),
            rejections_topic: topics.rejections.clone(),
        },
    )?;
    let stats = RunningApp::start(
        config("stats", &topics.balances, ErrorPolicy::Fail),
        Stats {
            summaries_topic: topics.stats.clone(),
        },
    )?;
    let limit = Duration::from_secs(120);
    for app in [&validate, &ledger, &stats] {
        blocking_with(app, |app| {
            app.wait_for_metrics("every partition live", limit, |m| {
                m.recoveries + m.fresh_starts >= partitions as u64
                    && m.partitions_assigned == partitions as u64
            })
        })
        .await?;
    }

    let hop_topics = [
        ("commands", &topics.commands),
        ("ledger (A's output)", &topics.ledger),
        ("balances (B's output)", &topics.balances),
        ("summaries (C's output)", &topics.stats),
    ];
    // One reader for all of them: a reader per topic would add its own fetch load to the
    // broker it measures.
    let reader = LatencyReader::start(
        bootstrap,
        &hop_topics.map(|(_, topic)| topic.as_str()),
        partitions,
    )?;
    let produced = {
        let (bootstrap, commands_topic) = (bootstrap.to_owned(), topics.commands.clone());
        tokio::task::spawn_blocking(move || {
            produce_at_rate(&bootstrap, &commands_topic, rate, duration)
        })
        .await
        .context("the command producer panicked")??
    };
    let per_topic = tokio::task::spawn_blocking(move || reader.finish(produced.first_sent))
        .await
        .context("the latency reader panicked")??;
    let hops = hop_topics.map(|(role, _)| role).into_iter().zip(per_topic);
    let mut services = Vec::new();
    for (name, app) in [
        ("A validate", validate),
        ("B ledger", ledger),
        ("C stats", stats),
    ] {
        let m = app.stop().await?;
        services.push(ServiceCommits {
            service: name,
            transactions: m.transactions_committed,
            p50: m.commit_latency_p50,
            p99: m.commit_latency_p99,
        });
    }
    let mut hop_latencies = Vec::new();
    let mut last = Vec::new();
    for (role, sampled) in hops {
        let latencies = sorted(sampled.iter().map(|(_, latency)| *latency));
        if latencies.is_empty() {
            bail!("no record reached the {role} topic after the warm-up");
        }
        hop_latencies.push(HopLatency {
            topic: role,
            samples: latencies.len(),
            p50: quantile(&latencies, 0.50),
            p99: quantile(&latencies, 0.99),
        });
        last = sampled;
    }
    // The last topic is C's summaries: the chain's end.
    let summaries = sorted(last.iter().map(|(_, latency)| *latency));
    let half_ms = duration.as_millis() as i64 / 2;
    let second_half = sorted(
        last.iter()
            .filter(|(sent, _)| *sent >= half_ms)
            .map(|(_, latency)| *latency),
    );
    Ok(LatencyRun {
        commands: produced.count,
        samples: summaries.len(),
        p50: quantile(&summaries, 0.50),
        p99: quantile(&summaries, 0.99),
        max: quantile(&summaries, 1.0),
        second_half_p99: (!second_half.is_empty()).then(|| quantile(&second_half, 0.99)),
        slow_seconds: slow_seconds(&last),
        warm_up: None,
        hops: hop_latencies,
        services,
    })
}

/// The seconds (by send time, ms after the first command) whose slowest latency exceeds
/// [`SLOW_SECOND`], in time order.
fn slow_seconds(sampled: &[(i64, Duration)]) -> Vec<SlowSecond> {
    let mut seconds: std::collections::BTreeMap<u64, (usize, Duration)> = Default::default();
    for &(sent, latency) in sampled {
        let second = seconds.entry(sent.max(0) as u64 / 1000).or_default();
        second.0 += 1;
        second.1 = second.1.max(latency);
    }
    seconds
        .into_iter()
        .filter(|(_, (_, max))| *max > SLOW_SECOND)
        .map(|(at, (samples, max))| SlowSecond { at, samples, max })
        .collect()
}

/// `latencies`, sorted.
fn sorted(latencies: impl Iterator<Item = Duration>) -> Vec<Duration> {
    let mut sorted: Vec<Duration> = latencies.collect();
    sorted.sort_unstable();
    sorted
}

/// The `q` quantile of `sorted` (not empty).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

struct Produced {
    count: u64,
    /// Unix ms of the first command.
    first_sent: i64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Produces generated commands at `rate` per second for `duration` (paced per millisecond
/// slot, so the rate holds within a few ms).
fn produce_at_rate(
    bootstrap: &str,
    topic: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Produced> {
    let total = (rate as f64 * duration.as_secs_f64()).round() as usize;
    let commands = generator::generate(11, total, 500);
    let producer = command_producer(bootstrap).context("creating the command producer")?;
    let started = Instant::now();
    let first_sent = now_ms();
    for (i, command) in commands.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait); // pacing the input rate, not waiting for a condition
        }
        send_waiting(&producer, command_record(topic, command))
            .with_context(|| format!("producing command {} to {topic}", command.id))?;
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the commands")?;
    if producer.context().failed() > 0 {
        bail!(
            "{} commands were not delivered: {}",
            producer.context().failed(),
            producer.context().first_error()
        );
    }
    Ok(Produced {
        count: commands.len() as u64,
        first_sent,
    })
}

/// Latencies per topic: (send time of the command, latency).
type Sampled = Vec<Vec<(i64, Duration)>>;

/// Reads the chain's topics read_committed on its own thread and keeps each record's latency.
struct LatencyReader {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Sampled>>,
    last_seen: Arc<std::sync::Mutex<Instant>>,
}

impl LatencyReader {
    fn start(bootstrap: &str, topics: &[&str], partitions: i32) -> anyhow::Result<Self> {
        let last = topics.last().context("no topic to read")?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            // librdkafka wants a group id even for a consumer that never joins it.
            .set("group.id", format!("{last}.latency-reader"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            // A fetch returns as soon as committed data is there; this only bounds the wait
            // when there is none.
            .set("fetch.wait.max.ms", "50")
            .create()
            .context("creating the latency reader")?;
        // Assigned, not subscribed: a group join takes seconds, and summaries that waited for
        // it would count the join as latency.
        let mut assignment = TopicPartitionList::new();
        for topic in topics {
            for partition in 0..partitions {
                assignment
                    .add_partition_offset(topic, partition, Offset::Beginning)
                    .context("building the latency reader's assignment")?;
            }
        }
        consumer
            .assign(&assignment)
            .context("assigning the chain's topics to the latency reader")?;
        let index: std::collections::HashMap<String, usize> = topics
            .iter()
            .enumerate()
            .map(|(i, topic)| (topic.to_string(), i))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let last_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
        let thread = {
            let (stop, last_seen) = (stop.clone(), last_seen.clone());
            std::thread::spawn(move || {
                let mut latencies: Sampled = vec![Vec::new(); index.len()];
                while !stop.load(Ordering::Relaxed) {
                    let Some(message) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let message = message.context("reading the summaries")?;
                    let received = now_ms();
                    let (Some(sent), Some(&topic)) =
                        (message.timestamp().to_millis(), index.get(message.topic()))
                    else {
                        continue;
                    };
                    latencies[topic]
                        .push((sent, Duration::from_millis((received - sent).max(0) as u64)));
                    if topic + 1 == latencies.len() {
                        *last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    }
                }
                Ok(latencies)
            })
        };
        Ok(LatencyReader {
            stop,
            thread,
            last_seen,
        })
    }

    /// Waits until the chain has gone quiet (no new summary), stops reading and returns the
    /// latencies, per topic, of the records of commands sent after the warm-up, each with
    /// when its command was sent (ms after the first).
    fn finish(self, first_sent: i64) -> anyhow::Result<Sampled> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let quiet_for = self
                .last_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            if quiet_for >= QUIET || Instant::now() >= deadline || self.thread.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, Ordering::Relaxed);
        let latencies = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the latency reader panicked"))??;
        let warm = first_sent + WARM_UP.as_millis() as i64;
        Ok(latencies
            .into_iter()
            .map(|topic| {
                topic
                    .into_iter()
                    .filter(|(sent, _)| *sent >= warm)
                    .map(|(sent, latency)| (sent - first_sent, latency))
                    .collect()
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_seconds_are_those_whose_slowest_summary_is_over_the_bound() {
        let ms = Duration::from_millis;
        let sampled = [
            (100, ms(120)),
            (900, ms(310)),
            (1_500, ms(200)),
            (2_000, ms(299)),
            (2_999, ms(900)),
            (3_100, ms(300)),
        ];
        let slow: Vec<(u64, usize, u128)> = slow_seconds(&sampled)
            .into_iter()
            .map(|s| (s.at, s.samples, s.max.as_millis()))
            .collect();
        assert_eq!(slow, vec![(0, 2, 310), (2, 2, 900)]);
    }
}

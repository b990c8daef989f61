//! `broker-check`: does a Kafka-compatible broker give read_committed consumers what
//! exactly-once needs?
//!
//! On a fresh single-partition topic it runs: a committed transaction (2 records), an
//! explicitly aborted one (1 record), a committed one (1), a zombie (a producer whose open
//! transaction is aborted when a new producer with the same `transactional.id` calls
//! `init_transactions`; its commit must fail as fenced), a committed one from the new producer
//! (1), and finally an open transaction (1 record) from another `transactional.id`. A
//! read_committed consumer must then see exactly the 4 committed records, and its
//! `fetch_watermarks` high watermark must be the last stable offset (the open record's offset).
//!
//! ```text
//! cargo run --release -p exactly-tests --bin broker-check                 # a local Apache Kafka
//! cargo run --release -p exactly-tests --bin broker-check -- --brokers HOST:PORT [-X key=value]
//! cargo run -p exactly-tests --bin broker-check -- --install-only         # just fetch Kafka's jars
//! ```
//!
//! It prints one line:
//! `BROKER-CHECK target=kafka committed_seen=4 aborted_seen=0 open_seen=0 fenced=yes lso=ok verdict=PASS`
//! (`target=` the `--brokers` value for a cluster of your own).
//! Exit code: 0 when the target passes, 1 when it fails the scenario, 2 when the check could
//! not run to the end (brokers unreachable, a step failed or timed out).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use exactly_tests::kafka::{installation, ClusterOptions, KafkaCluster, KAFKA_VERSION};
use exactly_tests::unique_name;
use futures::executor::block_on;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Header that marks what each record is, so the consumer can classify what it sees.
const KIND_HEADER: &str = "broker-check-kind";

/// How long the consumer keeps reading after all committed records arrived, to give a broker
/// that leaks the open transaction the chance to show it. Bounded on purpose: "not seen" can
/// only be established by waiting.
const OPEN_GRACE: Duration = Duration::from_secs(2);

/// How long the zombie's commit may take to fail.
const ZOMBIE_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "broker-check",
    about = "Checks that a Kafka-compatible broker hides aborted and open transactions from \
             read_committed consumers and fences zombie producers"
)]
struct Args {
    /// Check this cluster (bootstrap servers) instead of starting a local Apache Kafka.
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    brokers: Option<String>,

    /// Extra librdkafka client setting for --brokers, e.g. `-X security.protocol=SASL_SSL`
    /// (repeatable).
    #[arg(short = 'X', long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    config: Vec<(String, String)>,

    /// Replication factor of the check topic (--brokers only; a real cluster may require 3).
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,

    /// Seconds allowed for each step (metadata, transactions, reading).
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,

    /// Only make sure the local Apache Kafka's jars are in the cache (fetching them with Maven
    /// if needed), print where, exit.
    #[arg(long, conflicts_with = "brokers")]
    install_only: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// One target to check: its label in the output and how to reach it.
#[derive(Debug, Clone)]
struct Target {
    label: String,
    bootstrap: String,
    config: Vec<(String, String)>,
    replication_factor: i32,
    timeout: Duration,
}

/// What the scenario observed on one target.
#[derive(Debug, Default)]
struct Outcome {
    committed_seen: u32,
    aborted_seen: u32,
    open_seen: u32,
    fenced: bool,
    /// The read_committed high watermark and the offset it should equal.
    lso: Option<(i64, i64)>,
    /// A step that failed and stopped the scenario.
    error: Option<String>,
}

impl Outcome {
    fn lso_ok(&self) -> bool {
        matches!(self.lso, Some((high, open)) if high == open)
    }

    /// Why the target fails; empty when it passes.
    fn failures(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(error) = &self.error {
            reasons.push(format!("error: {error}"));
        }
        if self.committed_seen != 4 {
            reasons.push(format!("committed_seen={}!=4", self.committed_seen));
        }
        if self.aborted_seen != 0 {
            reasons.push(format!("aborted_seen={}!=0", self.aborted_seen));
        }
        if self.open_seen != 0 {
            reasons.push(format!("open_seen={}!=0", self.open_seen));
        }
        if !self.fenced {
            reasons.push("zombie_not_fenced".into());
        }
        if !self.lso_ok() {
            reasons.push(match self.lso {
                Some((high, open)) => format!("lso={high}!={open}"),
                None => "lso=unknown".into(),
            });
        }
        reasons
    }

    fn line(&self, target: &str) -> String {
        let failures = self.failures();
        let verdict = if failures.is_empty() {
            "PASS".to_owned()
        } else {
            format!("FAIL({})", failures.join(","))
        };
        format!(
            "BROKER-CHECK target={target} committed_seen={} aborted_seen={} open_seen={} fenced={} lso={} verdict={verdict}",
            self.committed_seen,
            self.aborted_seen,
            self.open_seen,
            if self.fenced { "yes" } else { "no" },
            if self.lso_ok() { "ok" } else { "wrong" },
        )
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    exactly_tests::init_tool_logging("warn");
    let args = Args::parse();
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout_secs.max(1));

    if args.install_only {
        return match tokio::task::spawn_blocking(installation).await {
            Ok(Ok(installed)) => {
                println!(
                    "Apache Kafka {KAFKA_VERSION} is installed: {}",
                    installed.root.display()
                );
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                eprintln!("broker-check: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("broker-check: {e}");
                ExitCode::from(2)
            }
        };
    }

    let code = match &args.brokers {
        Some(brokers) => {
            let target = Target {
                label: brokers.clone(),
                bootstrap: brokers.clone(),
                config: args.config.clone(),
                replication_factor: args.replication_factor,
                timeout,
            };
            let outcome = check(target.clone()).await;
            println!("{}", outcome.line(&target.label));
            exit_code(&outcome)
        }
        None => check_local_kafka(timeout).await,
    };
    eprintln!("broker-check: done in {:.1?}", started.elapsed());
    code
}

/// Starts a single-node Apache Kafka, checks it directly, stops it.
async fn check_local_kafka(timeout: Duration) -> ExitCode {
    let step = Instant::now();
    let started = tokio::task::spawn_blocking(|| KafkaCluster::start(ClusterOptions::default()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|result| result.map_err(|e| e.to_string()));
    let mut kafka = match started {
        Ok(kafka) => kafka,
        Err(e) => {
            eprintln!("broker-check: cannot start the local Apache Kafka: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "broker-check: Apache Kafka {KAFKA_VERSION} on {} (log {}), started in {:.1?}",
        kafka.bootstrap_servers(),
        kafka.log_paths()[0].display(),
        step.elapsed()
    );
    let target = Target {
        label: "kafka".to_owned(),
        bootstrap: kafka.bootstrap_servers(),
        config: Vec::new(),
        replication_factor: 1,
        timeout,
    };
    let outcome = check(target).await;
    println!("{}", outcome.line("kafka"));
    let stopped = tokio::task::spawn_blocking(move || kafka.stop_node(1)).await;
    if let Ok(Err(e)) = stopped {
        eprintln!("broker-check: stopping Kafka: {e}");
    }
    exit_code(&outcome)
}

/// 0: passed; 1: the scenario ran and the target failed it; 2: it could not run to the end.
fn exit_code(outcome: &Outcome) -> ExitCode {
    if outcome.error.is_some() {
        ExitCode::from(2)
    } else if outcome.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the scenario against one target on a blocking thread (rdkafka's transactional calls
/// block) and prints what it did.
async fn check(target: Target) -> Outcome {
    let label = target.label.clone();
    let step = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut outcome = Outcome::default();
        if let Err(error) = run_scenario(&target, &mut outcome) {
            outcome.error = Some(error);
        }
        outcome
    })
    .await
    .unwrap_or_else(|e| Outcome {
        error: Some(format!("scenario task failed: {e}")),
        ..Outcome::default()
    });
    eprintln!(
        "broker-check: target={label} checked in {:.1?}",
        step.elapsed()
    );
    outcome
}

/// A client config for the target.
fn client_config(target: &Target) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &target.bootstrap);
    for (key, value) in &target.config {
        config.set(key, value);
    }
    config
}

/// The scenario. Fills `outcome` as it goes; an `Err` is a step that could not be done.
fn run_scenario(target: &Target, outcome: &mut Outcome) -> Result<(), String> {
    let timeout = target.timeout;
    let label = &target.label;
    let admin: AdminClient<DefaultClientContext> = client_config(target)
        .create()
        .map_err(|e| format!("creating an admin client: {e}"))?;
    admin.inner().fetch_metadata(None, timeout).map_err(|e| {
        format!(
            "brokers at {} did not answer a metadata request within {timeout:?}: {e}",
            target.bootstrap
        )
    })?;

    let topic = unique_name("broker-check");
    let new_topic = NewTopic::new(
        &topic,
        1,
        TopicReplication::Fixed(target.replication_factor),
    );
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = block_on(admin.create_topics([&new_topic], &options))
        .map_err(|e| format!("creating topic {topic}: {e}"))?;
    for result in results {
        if let Err((name, code)) = result {
            return Err(format!("creating topic {name}: {code}"));
        }
    }
    wait_for_partition(&admin, &topic, timeout)?;
    eprintln!("broker-check: target={label} topic={topic}");

    let result = produce_and_consume(target, &topic, outcome);

    let deleted = block_on(admin.delete_topics(&[&topic], &options));
    if let Err(e) = deleted {
        eprintln!("broker-check: target={label}: could not delete topic {topic}: {e}");
    }
    result
}

/// Polls metadata until the topic's partition has a leader.
fn wait_for_partition(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = admin
            .inner()
            .fetch_metadata(Some(topic), remaining(deadline))
            .map(|m| {
                m.topics().iter().any(|t| {
                    t.name() == topic
                        && t.error().is_none()
                        && t.partitions().first().is_some_and(|p| p.leader() >= 0)
                })
            })
            .unwrap_or(false);
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("topic {topic} has no leader after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A transactional producer with `init_transactions` done.
fn producer(target: &Target, transactional_id: &str) -> Result<FutureProducer, String> {
    let timeout_ms = target.timeout.as_millis().to_string();
    let producer: FutureProducer = client_config(target)
        .set("transactional.id", transactional_id)
        .set("message.timeout.ms", &timeout_ms)
        // Above message.timeout.ms, as librdkafka requires.
        .set(
            "transaction.timeout.ms",
            (target.timeout.as_millis() * 2).to_string(),
        )
        .create()
        .map_err(|e| format!("creating producer {transactional_id}: {e}"))?;
    producer
        .init_transactions(target.timeout)
        .map_err(|e| format!("init_transactions for {transactional_id}: {e}"))?;
    Ok(producer)
}

/// Sends one record marked with `kind` into the open transaction.
fn send(
    producer: &FutureProducer,
    topic: &str,
    kind: &str,
    n: u32,
) -> Result<DeliveryFuture, String> {
    let payload = format!("{kind}-{n}");
    let headers = OwnedHeaders::new().insert(Header {
        key: KIND_HEADER,
        value: Some(kind),
    });
    producer
        .send_result(
            FutureRecord::to(topic)
                .partition(0)
                .key(kind)
                .payload(&payload)
                .headers(headers),
        )
        .map_err(|(e, _)| format!("sending {payload}: {e}"))
}

/// Flushes and returns the offsets the records were written at.
fn delivered(
    producer: &FutureProducer,
    deliveries: Vec<DeliveryFuture>,
    timeout: Duration,
) -> Result<Vec<i64>, String> {
    producer
        .flush(timeout)
        .map_err(|e| format!("flushing: {e}"))?;
    deliveries
        .into_iter()
        .map(|d| match block_on(d) {
            Ok(Ok(delivery)) => Ok(delivery.offset),
            Ok(Err((e, _))) => Err(format!("record not delivered: {e}")),
            Err(_) => Err("delivery report lost".to_owned()),
        })
        .collect()
}

/// A transaction sending `count` records of `kind`; committed or aborted. Returns the offsets.
fn transaction(
    producer: &FutureProducer,
    topic: &str,
    kind: &str,
    count: u32,
    commit: bool,
    timeout: Duration,
) -> Result<Vec<i64>, String> {
    producer
        .begin_transaction()
        .map_err(|e| format!("begin_transaction ({kind}): {e}"))?;
    let deliveries = (1..=count)
        .map(|n| send(producer, topic, kind, n))
        .collect::<Result<Vec<_>, _>>()?;
    // Flushing first makes sure even the aborted records are in the log before the marker.
    let offsets = delivered(producer, deliveries, timeout)?;
    if commit {
        producer
            .commit_transaction(timeout)
            .map_err(|e| format!("commit_transaction ({kind}): {e}"))?;
    } else {
        producer
            .abort_transaction(timeout)
            .map_err(|e| format!("abort_transaction ({kind}): {e}"))?;
    }
    Ok(offsets)
}

/// True for the errors a fenced producer gets.
fn is_fenced(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

fn produce_and_consume(target: &Target, topic: &str, outcome: &mut Outcome) -> Result<(), String> {
    let timeout = target.timeout;
    let label = &target.label;
    let txn_id = unique_name("broker-check-txn");

    let first = producer(target, &txn_id)?;
    let c12 = transaction(&first, topic, "committed", 2, true, timeout)?;
    let a1 = transaction(&first, topic, "aborted", 1, false, timeout)?;
    // Numbered 3 so all committed payloads differ.
    first
        .begin_transaction()
        .map_err(|e| format!("begin_transaction (committed-3): {e}"))?;
    let d = send(&first, topic, "committed", 3)?;
    let c3 = delivered(&first, vec![d], timeout)?;
    first
        .commit_transaction(timeout)
        .map_err(|e| format!("commit_transaction (committed-3): {e}"))?;

    // The zombie: an open transaction on the broker, then a new instance takes over the id.
    first
        .begin_transaction()
        .map_err(|e| format!("begin_transaction (zombie): {e}"))?;
    let d = send(&first, topic, "zombie", 1)?;
    let z1 = delivered(&first, vec![d], timeout)?;
    let successor = producer(target, &txn_id)?;
    // A fencing broker answers at once; a broker that does not fence would leave librdkafka
    // retrying until this timeout, so do not wait the full step timeout for it.
    match first.commit_transaction(timeout.min(ZOMBIE_COMMIT_TIMEOUT)) {
        Ok(()) => {
            eprintln!("broker-check: target={label}: the zombie's commit succeeded: not fenced");
            outcome.fenced = false;
        }
        Err(e) => {
            outcome.fenced = is_fenced(&e);
            eprintln!(
                "broker-check: target={label}: zombie commit failed: {e} (fenced={})",
                outcome.fenced
            );
        }
    }
    drop(first);
    successor
        .begin_transaction()
        .map_err(|e| format!("begin_transaction (committed-4): {e}"))?;
    let d = send(&successor, topic, "committed", 4)?;
    let c4 = delivered(&successor, vec![d], timeout)?;
    successor
        .commit_transaction(timeout)
        .map_err(|e| format!("commit_transaction (committed-4): {e}"))?;

    let open_producer = producer(target, &unique_name("broker-check-open"))?;
    open_producer
        .begin_transaction()
        .map_err(|e| format!("begin_transaction (open): {e}"))?;
    let d = send(&open_producer, topic, "open", 1)?;
    let open = delivered(&open_producer, vec![d], timeout)?;
    eprintln!(
        "broker-check: target={label}: offsets committed={:?} aborted={a1:?} zombie={z1:?} open={open:?}",
        [c12, c3, c4].concat()
    );

    let read = consume(target, topic, open[0], outcome);
    // Leave nothing open behind, also when reading failed.
    if let Err(e) = open_producer.abort_transaction(timeout) {
        eprintln!("broker-check: target={label}: aborting the open transaction: {e}");
    }
    read
}

/// Reads the partition with read_committed and counts what it sees by kind.
fn consume(
    target: &Target,
    topic: &str,
    open_offset: i64,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let timeout = target.timeout;
    let consumer: BaseConsumer = client_config(target)
        .set("group.id", unique_name("broker-check-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(|e| format!("creating the read_committed consumer: {e}"))?;
    let (_, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| format!("fetch_watermarks (read_committed): {e}"))?;
    outcome.lso = Some((high, open_offset));
    eprintln!(
        "broker-check: target={}: read_committed high watermark {high}, open record at {open_offset}",
        target.label
    );

    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| format!("building the assignment: {e}"))?;
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning {topic}/0: {e}"))?;

    let deadline = Instant::now() + timeout;
    let mut grace_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if grace_until.is_some_and(|until| now >= until) {
            return Ok(());
        }
        if now >= deadline {
            return Err(format!(
                "read only {} of 4 committed records within {timeout:?}",
                outcome.committed_seen
            ));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let kind = message
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == KIND_HEADER))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                match kind.as_str() {
                    "committed" => outcome.committed_seen += 1,
                    "aborted" | "zombie" => outcome.aborted_seen += 1,
                    "open" => outcome.open_seen += 1,
                    other => {
                        return Err(format!(
                            "unexpected record at offset {} (kind {other:?})",
                            message.offset()
                        ))
                    }
                }
                if outcome.committed_seen >= 4 && grace_until.is_none() {
                    grace_until = Some(Instant::now() + OPEN_GRACE);
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
            }
            None => {}
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passing() -> Outcome {
        Outcome {
            committed_seen: 4,
            aborted_seen: 0,
            open_seen: 0,
            fenced: true,
            lso: Some((10, 10)),
            error: None,
        }
    }

    #[test]
    fn a_correct_broker_passes_with_the_documented_line() {
        assert_eq!(
            passing().line("proxy"),
            "BROKER-CHECK target=proxy committed_seen=4 aborted_seen=0 open_seen=0 fenced=yes lso=ok verdict=PASS"
        );
    }

    #[test]
    fn every_deviation_is_a_listed_failure() {
        let outcome = Outcome {
            committed_seen: 3,
            aborted_seen: 2,
            open_seen: 1,
            fenced: false,
            lso: Some((0, 10)),
            error: None,
        };
        assert_eq!(
            outcome.line("bare"),
            "BROKER-CHECK target=bare committed_seen=3 aborted_seen=2 open_seen=1 fenced=no lso=wrong \
             verdict=FAIL(committed_seen=3!=4,aborted_seen=2!=0,open_seen=1!=0,zombie_not_fenced,lso=0!=10)"
        );
        let errored = Outcome {
            error: Some("brokers did not answer".into()),
            ..passing()
        };
        assert!(errored
            .line("x")
            .contains("verdict=FAIL(error: brokers did not answer)"));
        assert_eq!(exit_code(&errored), ExitCode::from(2));
        assert_eq!(exit_code(&outcome), ExitCode::FAILURE);
        assert!(exit_code_is_success(&passing()));
    }

    fn exit_code_is_success(outcome: &Outcome) -> bool {
        exit_code(outcome) == ExitCode::SUCCESS
    }

    #[test]
    fn config_pairs_parse() {
        assert_eq!(
            parse_key_value("sasl.password=a=b").unwrap(),
            ("sasl.password".to_owned(), "a=b".to_owned())
        );
        assert!(parse_key_value("nonsense").is_err());
    }
}

//! Manual end-to-end check of the benchmark's Quix Streams peer (`bench::quix`) against the
//! test broker: pip-installs quixstreams 3.28.1 on first use, so it is `#[ignore]`d (too heavy
//! for CI). Run it with:
//!
//! ```text
//! cargo test -p exactly-examples --test end_to_end quix_peer -- --ignored --nocapture
//! ```
//!
//! `QUIX_COMMIT_INTERVAL_MS=1000` sets Quix's checkpoint period (default: Quix's 5 s),
//! `QUIX_PARTITIONS=1` the partition count of both topics (default 8).
//!
//! It produces 20 000 records to an 8-partition topic, lets Quix count them exactly-once,
//! waits for the group's committed offsets to cover the input, prints records/s, and checks
//! the read-committed output: one record per input record, final count and sum right for
//! every key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use exactly_examples::bench::quix::{self, QuixCountArgs};
use exactly_tests::{unique_name, TestCluster};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

const RECORDS: i64 = 20_000;
/// Partitions of the input and output topics; `QUIX_PARTITIONS` overrides the default 8.
fn partitions() -> i32 {
    std::env::var("QUIX_PARTITIONS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8)
}
const KEYS: i64 = 1_000;
const TOPIC_CONFIG: &[(&str, &str)] = &[("retention.ms", "604800000"), ("retention.bytes", "-1")];

/// Every key's final (count, sum).
type FinalTotals = HashMap<String, (i64, i64)>;

fn key_of(seq: i64) -> String {
    format!("key-{:06}", seq % KEYS)
}

fn amount_of(seq: i64) -> i64 {
    (seq * 7919) % 1000
}

fn produce_input(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("input producer")?;
    let pad = "x".repeat(60);
    for seq in 0..RECORDS {
        let key = key_of(seq);
        let value =
            serde_json::json!({"seq": seq, "amount": amount_of(seq), "pad": pad}).to_string();
        let mut record = BaseRecord::to(topic).key(&key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing input"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing input")?;
    Ok(())
}

fn committed_sum(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<i64> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions() {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => n,
            _ => 0,
        })
        .sum())
}

/// Reads the whole output topic read_committed; returns every key's last (count, sum) and the
/// number of records.
fn read_output(bootstrap: &str, topic: &str) -> anyhow::Result<(FinalTotals, i64)> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("quix-peer-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in 0..partitions() {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
    }
    consumer.assign(&tpl)?;
    let mut last = HashMap::new();
    let mut records = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let position = consumer.position()?;
        let done = position.elements().iter().all(|e| match e.offset() {
            Offset::Offset(n) => n >= ends[&e.partition()],
            _ => ends[&e.partition()] == 0,
        });
        if done {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "output not read to its end in time"
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let key = String::from_utf8(message.key().context("output key")?.to_vec())?;
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().context("payload")?)?;
        let count = value["count"].as_i64().context("count")?;
        let sum = value["sum"].as_i64().context("sum")?;
        last.insert(key, (count, sum));
        records += 1;
    }
    Ok((last, records))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "pip-installs quixstreams 3.28.1; run by hand (see module docs)"]
async fn quix_peer_counts_20k_records_exactly_once_against_kafka() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let bootstrap = cluster.bootstrap_servers();
    let input = unique_name("quix-in");
    let output = unique_name("quix-out");
    let group = unique_name("quix-group");
    cluster
        .create_topic_with_config(&input, partitions(), TOPIC_CONFIG)
        .await?;
    cluster
        .create_topic_with_config(&output, partitions(), TOPIC_CONFIG)
        .await?;

    let (b, t) = (bootstrap.clone(), input.clone());
    let produce_started = Instant::now();
    tokio::task::spawn_blocking(move || produce_input(&b, &t)).await??;
    eprintln!(
        "produced {RECORDS} records in {:?}",
        produce_started.elapsed()
    );

    let prepare_started = Instant::now();
    let env =
        tokio::task::spawn_blocking(|| quix::prepare(|step| eprintln!("quix: {step}"))).await??;
    eprintln!("prepare took {:?}", prepare_started.elapsed());

    // QUIX_COMMIT_INTERVAL_MS overrides Quix's default 5 s checkpoint period: the end of the
    // run is seen only at a commit, so a long period inflates the measured time.
    let commit_interval = match std::env::var("QUIX_COMMIT_INTERVAL_MS") {
        Ok(ms) => Some(Duration::from_millis(
            ms.parse().context("QUIX_COMMIT_INTERVAL_MS")?,
        )),
        Err(_) => None,
    };
    eprintln!("commit interval: {commit_interval:?} (None = Quix default 5 s)");
    let log_path = std::env::temp_dir().join(format!("{group}.log"));
    let started = Instant::now();
    let mut process = env.spawn_count(&QuixCountArgs {
        broker: bootstrap.clone(),
        input_topic: input.clone(),
        output_topic: output.clone(),
        group: group.clone(),
        commit_interval,
        log_path: log_path.clone(),
    })?;
    eprintln!("quix log: {}", log_path.display());

    let offsets: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let deadline = started + Duration::from_secs(600);
    let mut ready_after = None;
    let mut first_progress_after = None;
    // (time since spawn, committed sum) at every change: shows start-up versus steady rate.
    let mut timeline = Vec::new();
    loop {
        if let Some(why) = process.try_exit() {
            bail!("Quix exited before consuming the input: {why}");
        }
        if ready_after.is_none() && process.is_ready() {
            ready_after = Some(started.elapsed());
        }
        let sum = tokio::task::block_in_place(|| committed_sum(&offsets, &input))?;
        if sum > 0 && first_progress_after.is_none() {
            first_progress_after = Some((started.elapsed(), sum));
        }
        if timeline.last().map(|&(_, s)| s) != Some(sum) {
            timeline.push((started.elapsed(), sum));
        }
        if sum == RECORDS {
            break;
        }
        ensure!(sum <= RECORDS, "committed offsets sum to {sum} > {RECORDS}");
        if Instant::now() > deadline {
            bail!(
                "Quix committed {sum}/{RECORDS} within 600 s; log {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "QUIX RESULT: {RECORDS} records in {:.2} s wall from spawn = {:.0} records/s \
         (QUIX-READY after {:?}, first commit after {:?}; from READY: {:.0} records/s)",
        elapsed.as_secs_f64(),
        RECORDS as f64 / elapsed.as_secs_f64(),
        ready_after,
        first_progress_after,
        ready_after
            .map(|r| RECORDS as f64 / (elapsed - r).as_secs_f64())
            .unwrap_or(f64::NAN),
    );

    eprintln!("committed offsets over time (since spawn): {timeline:?}");
    if let Some((first_at, first_sum)) = first_progress_after {
        if first_sum < RECORDS && elapsed > first_at {
            eprintln!(
                "between the first and the last commit: {:.0} records/s",
                (RECORDS - first_sum) as f64 / (elapsed - first_at).as_secs_f64()
            );
        }
    }
    let stopped = tokio::task::spawn_blocking(move || process.stop()).await??;
    eprintln!(
        "quix stopped: {} (killed: {})",
        stopped.status, stopped.killed
    );
    ensure!(
        stopped.status.success() && !stopped.killed,
        "Quix did not stop cleanly: {}\n{}",
        stopped.status,
        stopped.log_tail
    );

    let (b, t) = (bootstrap.clone(), output.clone());
    let (last, records) = tokio::task::spawn_blocking(move || read_output(&b, &t)).await??;
    ensure!(
        records == RECORDS,
        "output has {records} records, expected {RECORDS}"
    );
    let mut expected = FinalTotals::new();
    for seq in 0..RECORDS {
        let e = expected.entry(key_of(seq)).or_default();
        e.0 += 1;
        e.1 += amount_of(seq);
    }
    ensure!(
        last == expected,
        "final per-key (count, sum) differ from the input"
    );
    eprintln!(
        "output checked: {records} records, {} keys with correct final count and sum",
        last.len()
    );
    Ok(())
}

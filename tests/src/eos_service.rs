//! The `eos-service` workload: input generation, the reference model of the `eos-service`
//! test binary's outputs, and process/metrics helpers. Used by the `framework_*` integration
//! tests and the `rebalance-check` binary; helpers panic on harness failures (they are test
//! code).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::eos::{check_topic_with, CheckOptions, EosReport, Observed};
use crate::process::{ChildProcess, ProcessSpec};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

/// Distinct keys in generated inputs.
pub const KEYS: usize = 7;

/// One generated input record.
#[derive(Debug, Clone)]
pub struct Input {
    pub id: String,
    pub key: String,
    pub partition: i32,
}

/// Input records `range` for a topic with `partitions` partitions: id `id-NNNNNN`, key `kX`,
/// each key pinned to one partition so per-key order = production order.
pub fn inputs(range: std::ops::Range<usize>, partitions: i32) -> Vec<Input> {
    range
        .map(|i| {
            let k = i % KEYS;
            Input {
                id: format!("id-{i:06}"),
                key: format!("k{k}"),
                partition: (k as i32) % partitions,
            }
        })
        .collect()
}

/// Produces `records` (idempotent producer, in order) and waits for every delivery.
pub fn produce(bootstrap: &str, topic: &str, records: &[Input]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("input producer");
    for r in records {
        let mut record = BaseRecord::to(topic)
            .key(r.key.as_str())
            .payload(r.id.as_str())
            .partition(r.partition);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(20));
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flushing inputs");
}

/// Produces raw (key, value) bytes to one partition.
pub fn produce_raw(bootstrap: &str, topic: &str, partition: i32, key: &[u8], value: &[u8]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("raw producer");
    producer
        .send(
            BaseRecord::to(topic)
                .key(key)
                .payload(value)
                .partition(partition),
        )
        .map_err(|(e, _)| e)
        .expect("raw send");
    producer.flush(Duration::from_secs(30)).expect("raw flush");
}

/// The reference model of `eos-service`: the output value each input produces
/// (`"<id> <key> <count>"`, count = the key's running count in input order).
pub fn expected_outputs(records: &[Input]) -> Vec<String> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    records
        .iter()
        .map(|r| {
            let c = counts.entry(r.key.as_str()).or_default();
            *c += 1;
            format!("{} {} {}", r.id, r.key, c)
        })
        .collect()
}

/// Extractor for `eos-service` outputs: the whole value is the id (so a wrong count is an
/// unexpected + a missing id), the key orders by count.
pub fn output_extractor(message: &BorrowedMessage<'_>) -> Result<Option<Observed>, String> {
    let value = match message.payload_view::<str>() {
        Some(Ok(v)) => v.to_owned(),
        _ => return Err(format!("bad output payload at offset {}", message.offset())),
    };
    let mut parts = value.split(' ');
    let (_, key, count) = (parts.next(), parts.next(), parts.next());
    Ok(Some(Observed {
        key: key.map(str::to_owned),
        seq: count.and_then(|c| c.parse().ok()),
        id: value,
    }))
}

/// Checks `topic` against `expected` once.
pub async fn check(bootstrap: &str, topic: &str, expected: &[String]) -> EosReport {
    let options = CheckOptions {
        timeout: Duration::from_secs(60),
        ..CheckOptions::default()
    };
    check_topic_with(
        bootstrap,
        topic,
        expected.to_vec(),
        output_extractor,
        &options,
    )
    .await
    .expect("eos check")
}

/// Polls until every expected output is visible (read_committed) or `timeout` passes;
/// returns the last report. Duplicates end the wait at once (they never go away).
pub async fn wait_for_outputs(
    bootstrap: &str,
    topic: &str,
    expected: &[String],
    timeout: Duration,
) -> EosReport {
    let deadline = Instant::now() + timeout;
    loop {
        let report = check(bootstrap, topic, expected).await;
        if report.missing_count == 0 || report.duplicate_count > 0 || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Counts read_committed records of `topic` (all partitions) now; 0 if that fails.
pub async fn count_records(bootstrap: &str, topic: &str) -> u64 {
    let options = CheckOptions {
        timeout: Duration::from_secs(20),
        ..CheckOptions::default()
    };
    match check_topic_with(
        bootstrap,
        topic,
        Vec::<String>::new(),
        |_m: &BorrowedMessage<'_>| Ok(None),
        &options,
    )
    .await
    {
        Ok(report) => report.records_read,
        Err(e) => {
            eprintln!("counting {topic} failed: {e}");
            0
        }
    }
}

/// Where clients connect: the fault-injecting proxy (DEBUG_BYPASS_PROXY=1 connects to the
/// brokers themselves, to rule the proxy out while debugging).
pub fn bootstrap_of(cluster: &crate::TestCluster) -> String {
    if std::env::var_os("DEBUG_BYPASS_PROXY").is_some() {
        cluster.direct_bootstrap_servers()
    } else {
        cluster.bootstrap_servers()
    }
}

/// Polls until at least `n` committed output records exist.
pub async fn wait_for_count(bootstrap: &str, topic: &str, n: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let c = count_records(bootstrap, topic).await;
        if c >= n || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `eos-service` command (the binary at `binary`) for app `app_id` reading `input` and
/// writing `output`.
pub fn service_spec_at(
    binary: impl AsRef<std::ffi::OsStr>,
    bootstrap: &str,
    app_id: &str,
    input: &str,
    output: &str,
) -> ProcessSpec {
    ProcessSpec::new(binary)
        .args([
            "--brokers",
            bootstrap,
            "--app-id",
            app_id,
            "--input",
            input,
            "--output",
            output,
        ])
        .env(
            "RUST_LOG",
            "info,exactly=debug,librdkafka=warn,rdkafka=warn",
        )
}

/// The last `EXACTLY_METRICS` JSON line of the child's current run.
pub fn last_metrics(child: &ChildProcess) -> Option<serde_json::Value> {
    let text = child.run_log_text().ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("EXACTLY_METRICS "))
        .and_then(|json| serde_json::from_str(json).ok())
}

/// Polls the child's metrics until `predicate` holds.
pub async fn wait_for_metrics(
    child: &ChildProcess,
    what: &str,
    timeout: Duration,
    predicate: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(m) = last_metrics(child) {
            if predicate(&m) {
                return m;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for metrics: {what}; last: {:?}\nlog tail:\n{}",
                last_metrics(child),
                child.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn metric(m: &serde_json::Value, name: &str) -> u64 {
    m.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// One committed record as read back.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ReadRecord {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads every committed record of `topic` (read_committed, to the end of each partition).
pub async fn read_all(bootstrap: &str, topic: &str) -> Vec<ReadRecord> {
    read_all_with_isolation(bootstrap, topic, "read_committed").await
}

/// Reads every record of `topic` with `isolation` (`read_committed` or `read_uncommitted`:
/// the latter also returns records of open and aborted transactions) up to the end of each
/// partition that isolation level sees now (last stable offset, or high watermark).
pub async fn read_all_with_isolation(
    bootstrap: &str,
    topic: &str,
    isolation: &'static str,
) -> Vec<ReadRecord> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_all_blocking(&bootstrap, &topic, isolation))
        .await
        .expect("read task")
}

fn read_all_blocking(bootstrap: &str, topic: &str, isolation: &str) -> Vec<ReadRecord> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique_name("reader"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("reader");
    // Read uncommitted partitions until the Fetch path reports their end (the high
    // watermark), not to a watermark taken at the start: writers may still be running.
    let uncommitted = isolation == "read_uncommitted";
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0);
    // Read each partition up to its last stable offset now (an open transaction of a killed
    // producer keeps it there; its records are not committed).
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        if !uncommitted {
            let (_, end) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            ends.insert(p, end);
        }
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut at_end: std::collections::HashSet<i32> = Default::default();
    // A partition is read when the fetcher reported its end (for read_committed: the last
    // stable offset, which only grows, so it is at or past `ends`) or, for read_committed,
    // when the position passed the end taken at the start.
    let done = |consumer: &BaseConsumer, at_end: &std::collections::HashSet<i32>| {
        if at_end.len() == partitions as usize {
            return true;
        }
        if uncommitted {
            return false;
        }
        let Ok(positions) = consumer.position() else {
            return false;
        };
        (0..partitions).all(|p| {
            let end = ends[&p];
            end == 0
                || at_end.contains(&p)
                || positions
                    .find_partition(topic, p)
                    .and_then(|e| e.offset().to_raw())
                    .is_some_and(|pos| pos >= end)
        })
    };
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(&consumer, &at_end) {
        assert!(
            Instant::now() < deadline,
            "reading {topic} timed out: ends {ends:?}, positions {:?}",
            consumer.position()
        );
        let m = match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => m,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
                continue;
            }
            _ => continue,
        };
        out.push(ReadRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    out
}

/// Where the outputs a read_committed check missed are, for a failure message: each one's
/// partition and offset when a read_uncommitted reader sees it (written, then hidden by an
/// abort marker or an open transaction), or "not written" (lost, or never produced), plus each
/// output partition's watermarks. Tells a broker that lost acknowledged data from a
/// transaction that did not commit.
pub async fn locate_missing(bootstrap: &str, topic: &str, missing: &[String]) -> MissingOutputs {
    let records = read_all_with_isolation(bootstrap, topic, "read_uncommitted").await;
    let mut lines = Vec::new();
    let mut hidden: std::collections::BTreeMap<i32, (i64, i64)> = Default::default();
    for id in missing {
        let found = records
            .iter()
            .find(|r| r.value.as_deref() == Some(id.as_bytes()));
        lines.push(match found {
            Some(r) => {
                let range = hidden.entry(r.partition).or_insert((r.offset, r.offset));
                *range = (range.0.min(r.offset), range.1.max(r.offset));
                format!(
                    "  {id}: uncommitted at {topic}/{} offset {}",
                    r.partition, r.offset
                )
            }
            None => format!("  {id}: not written"),
        });
    }
    let mut per_partition: std::collections::BTreeMap<i32, (i64, i64, usize)> = Default::default();
    for r in &records {
        let e = per_partition
            .entry(r.partition)
            .or_insert((i64::MAX, -1, 0));
        e.0 = e.0.min(r.offset);
        e.1 = e.1.max(r.offset);
        e.2 += 1;
    }
    let ends = {
        let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
        let partitions: Vec<i32> = per_partition.keys().copied().collect();
        tokio::task::spawn_blocking(move || partition_ends(&bootstrap, &topic, &partitions))
            .await
            .unwrap_or_default()
    };
    for (p, (first, last, n)) in per_partition {
        let (high, stable) = ends.get(&p).copied().unwrap_or((-1, -1));
        lines.push(format!(
            "  {topic}/{p} read_uncommitted: {n} records, offsets {first}..={last}; \
             high watermark {high}, last stable offset {stable}"
        ));
    }
    MissingOutputs {
        text: lines.join("\n"),
        hidden,
    }
}

/// What [`locate_missing`] found.
pub struct MissingOutputs {
    /// One line per missing output, then one per output partition.
    pub text: String,
    /// Per output partition, the lowest and highest offset of the missing outputs that are
    /// written but not visible to read_committed readers.
    pub hidden: std::collections::BTreeMap<i32, (i64, i64)>,
}

/// Each partition's high watermark and last stable offset (-1 where the broker did not say).
fn partition_ends(bootstrap: &str, topic: &str, partitions: &[i32]) -> HashMap<i32, (i64, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let end = |isolation: &str, p: i32| -> i64 {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("isolation.level", isolation)
            .create::<BaseConsumer>()
            .ok()
            .and_then(|c| c.fetch_watermarks(topic, p, Duration::from_secs(10)).ok())
            .map_or(-1, |(_, high)| high)
    };
    partitions
        .iter()
        .map(|&p| (p, (end("read_uncommitted", p), end("read_committed", p))))
        .collect()
}

/// Waits for the child to exit and returns its current-run log.
pub async fn wait_for_failure(child: &mut ChildProcess, timeout: Duration) -> (i32, String) {
    let status = child
        .wait_exit(timeout)
        .await
        .unwrap_or_else(|e| panic!("service did not exit: {e}\n{}", child.log_tail(80)));
    let log = child.run_log_text().expect("log");
    (status.code().unwrap_or(-1), log)
}

/// Minimal protobuf reading for snapshot records (proto/exactly.proto): the fields of one
/// message as (field number, varint value or bytes).
pub enum ProtoValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Parses the top-level fields of a protobuf message (varint and length-delimited only).
pub fn proto_fields(bytes: &[u8]) -> Vec<(u64, ProtoValue<'_>)> {
    let mut pos = 0;
    let mut fields = Vec::new();
    while pos < bytes.len() {
        let Some(tag) = read_varint(bytes, &mut pos) else {
            break;
        };
        match tag & 7 {
            0 => match read_varint(bytes, &mut pos) {
                Some(v) => fields.push((tag >> 3, ProtoValue::Varint(v))),
                None => break,
            },
            2 => {
                let Some(len) = read_varint(bytes, &mut pos) else {
                    break;
                };
                let end = pos + len as usize;
                if end > bytes.len() {
                    break;
                }
                fields.push((tag >> 3, ProtoValue::Bytes(&bytes[pos..end])));
                pos = end;
            }
            _ => break,
        }
    }
    fields
}

/// The `next_input_offset` of the last committed incremental snapshot record of each snapshot
/// partition (partition -> offset).
pub async fn last_committed_offsets(bootstrap: &str, snapshot_topic: &str) -> HashMap<i32, i64> {
    let mut last = HashMap::new();
    for record in read_all(bootstrap, snapshot_topic).await {
        let Some(value) = record.value.as_deref() else {
            continue;
        };
        for (field, v) in proto_fields(value) {
            if let (2, ProtoValue::Bytes(incremental)) = (field, v) {
                let next = proto_fields(incremental)
                    .into_iter()
                    .find_map(|(f, v)| match (f, v) {
                        (3, ProtoValue::Varint(n)) => Some(n as i64),
                        _ => None,
                    })
                    .unwrap_or(0);
                last.insert(record.partition, next);
            }
        }
    }
    last
}

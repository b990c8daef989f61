//! Integration tests of the fault-injecting proxy in front of real Apache Kafka.
//!
//! Every test starts its own [`TestCluster`] (its own proxy) and uses unique topic and
//! transactional ids. Clients are rdkafka (librdkafka) producers and
//! `isolation.level=read_committed` consumers. The read_committed tests check, through the
//! proxy, that Kafka behaves as the framework assumes (aborted, zombie and open transactions
//! are invisible, the last stable offset stops readers at the first open transaction) and
//! that the proxy changes none of it; the fault tests check each fault and that exactly the
//! committed records survive it. The address-mapping test needs no Kafka: its brokers are
//! fakes that answer Metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use exactly_tests::proxy::client::KafkaConnection;
use exactly_tests::proxy::framing::{read_frame, response_correlation_id, write_frame};
use exactly_tests::{unique_name, Proxy, ProxyStats, TestCluster};
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    AddPartitionsToTxnRequest, ApiKey, ApiVersionsRequest, BrokerId, EndTxnRequest, EndTxnResponse,
    FetchRequest, InitProducerIdRequest, ListOffsetsRequest, MetadataRequest, MetadataResponse,
    ProduceRequest, ProducerId, RequestHeader, ResponseHeader, TopicName, TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

const DEADLINE: Duration = Duration::from_secs(90);
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// Proxy logs go to the test output (`RUST_LOG=exactly_tests=debug` for details).
fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "exactly_tests=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Runs blocking rdkafka code off the reactor (the proxy runs on it).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

fn transactional_producer(bootstrap: &str, transactional_id: &str) -> BaseProducer {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "60000")
        .set("message.timeout.ms", "50000")
        // Small batches: many record batches per transaction, so a transaction spans fetches.
        .set("batch.size", "200")
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    producer
        .init_transactions(OP_TIMEOUT)
        .expect("init_transactions");
    producer
}

fn send(producer: &BaseProducer, topic: &str, partition: i32, payload: &str) {
    loop {
        let record = BaseRecord::<str, str>::to(topic)
            .partition(partition)
            .key(payload)
            .payload(payload);
        match producer.send(record) {
            Ok(()) => return,
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                _,
            )) => {
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => panic!("send {payload}: {e}"),
        }
    }
}

/// One transaction with `payloads` to `partition`; commits or aborts it.
fn transaction(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    payloads: &[String],
    commit: bool,
) {
    producer.begin_transaction().expect("begin");
    for payload in payloads {
        send(producer, topic, partition, payload);
    }
    if commit {
        producer.commit_transaction(OP_TIMEOUT).expect("commit");
    } else {
        producer.flush(OP_TIMEOUT).expect("flush");
        producer.abort_transaction(OP_TIMEOUT).expect("abort");
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn consumer(bootstrap: &str, isolation: &str, extra: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("proxy-test-group"))
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config.create().expect("consumer")
}

/// A record as a consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    partition: i32,
    offset: i64,
    payload: String,
}

/// Reads the given partitions from the given offsets until every one reports EOF (the end
/// of what this isolation level may see: the LSO for read_committed).
fn read_to_end(consumer: &BaseConsumer, topic: &str, starts: &[(i32, Offset)]) -> Vec<Seen> {
    let mut assignment = TopicPartitionList::new();
    for (partition, offset) in starts {
        assignment
            .add_partition_offset(topic, *partition, *offset)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assign");
    let mut pending: BTreeSet<i32> = starts.iter().map(|(p, _)| *p).collect();
    let mut seen = Vec::new();
    let started = Instant::now();
    while !pending.is_empty() {
        assert!(
            started.elapsed() < DEADLINE,
            "no EOF on partitions {pending:?} of {topic} after {DEADLINE:?}; seen {} records",
            seen.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(message)) => {
                pending.insert(message.partition());
                seen.push(Seen {
                    partition: message.partition(),
                    offset: message.offset(),
                    payload: String::from_utf8_lossy(message.payload().unwrap_or_default())
                        .into_owned(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) => eprintln!("consumer error (retried by librdkafka): {e}"),
        }
    }
    seen
}

/// Reads partition 0 of `topic` from its beginning to its end with `isolation`, off the
/// reactor.
async fn read_partition_0(bootstrap: &str, topic: &str, isolation: &'static str) -> Vec<Seen> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    blocking(move || {
        read_to_end(
            &consumer(&bootstrap, isolation, &[]),
            &topic,
            &[(0, Offset::Beginning)],
        )
    })
    .await
}

fn payloads(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(|s| s.payload.clone()).collect()
}

/// Asserts every expected payload was seen exactly once and nothing else.
fn assert_exactly(seen: &[Seen], expected: &BTreeSet<String>, what: &str) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in seen {
        *counts.entry(&s.payload).or_default() += 1;
    }
    let duplicates: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    let unexpected: Vec<_> = counts.keys().filter(|p| !expected.contains(**p)).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|p| !counts.contains_key(p.as_str()))
        .collect();
    assert!(
        duplicates.is_empty() && unexpected.is_empty() && missing.is_empty(),
        "{what}: duplicates {duplicates:?}, unexpected {unexpected:?}, missing {missing:?}"
    );
}

fn offset_of(seen: &[Seen], payload: &str) -> i64 {
    seen.iter()
        .find(|s| s.payload == payload)
        .unwrap_or_else(|| panic!("{payload} not in the log"))
        .offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_abort_zombie_and_open_transaction() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("scenario");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    let direct = cluster.proxy.upstream().to_string();

    let (t, p) = (topic.clone(), proxy.clone());
    let open_producer = blocking(move || {
        let committer = transactional_producer(&p, &unique_name("committer"));
        transaction(&committer, &t, 0, &names("c1", 1), true);
        let aborter = transactional_producer(&p, &unique_name("aborter"));
        transaction(&aborter, &t, 0, &names("a1", 1), false);
        // A zombie: its open transaction is aborted when a new producer with the same
        // transactional id initialises, and its own commit then fails.
        let zombie_id = unique_name("zombie");
        let zombie = transactional_producer(&p, &zombie_id);
        zombie.begin_transaction().unwrap();
        send(&zombie, &t, 0, "z1-0");
        zombie.flush(OP_TIMEOUT).unwrap();
        let successor = transactional_producer(&p, &zombie_id);
        let fenced = zombie.commit_transaction(OP_TIMEOUT);
        assert!(
            fenced.is_err(),
            "the zombie's commit must fail after fencing"
        );
        transaction(&successor, &t, 0, &names("c2", 1), true);
        let open = transactional_producer(&p, &unique_name("open"));
        open.begin_transaction().unwrap();
        send(&open, &t, 0, "o1-0");
        open.flush(OP_TIMEOUT).unwrap();
        transaction(&committer, &t, 0, &names("c3", 1), true);
        open
    })
    .await;

    // The whole log, uncommitted, to learn offsets.
    let log = read_partition_0(&proxy, &topic, "read_uncommitted").await;
    assert_eq!(
        payloads(&log),
        ["c1-0", "a1-0", "z1-0", "c2-0", "o1-0", "c3-0"]
    );
    let open_offset = offset_of(&log, "o1-0");

    // Aborted and zombie records are filtered, the open transaction holds the LSO.
    let (t, p) = (topic.clone(), proxy.clone());
    let (seen, lso) = blocking(move || {
        let c = consumer(&p, "read_committed", &[]);
        let seen = read_to_end(&c, &t, &[(0, Offset::Beginning)]);
        (seen, c.fetch_watermarks(&t, 0, OP_TIMEOUT).unwrap().1)
    })
    .await;
    assert_eq!(payloads(&seen), ["c1-0", "c2-0"]);
    assert_eq!(
        lso, open_offset,
        "read_committed high watermark must be the LSO"
    );

    // The broker read directly answers the same: the proxy changes nothing.
    let direct_seen = read_partition_0(&direct, &topic, "read_committed").await;
    assert_eq!(
        direct_seen, seen,
        "read_committed directly vs through the proxy"
    );

    // Commit the open transaction: everything committed becomes visible, LSO = HW.
    blocking(move || open_producer.commit_transaction(OP_TIMEOUT))
        .await
        .expect("commit open");
    let (t, p) = (topic.clone(), proxy.clone());
    let (seen, (_, high)) = blocking(move || {
        let c = consumer(&p, "read_committed", &[]);
        let seen = read_to_end(&c, &t, &[(0, Offset::Beginning)]);
        let uncommitted = consumer(&p, "read_uncommitted", &[])
            .fetch_watermarks(&t, 0, OP_TIMEOUT)
            .unwrap();
        assert_eq!(
            c.fetch_watermarks(&t, 0, OP_TIMEOUT).unwrap().1,
            uncommitted.1
        );
        (seen, uncommitted)
    })
    .await;
    assert_eq!(payloads(&seen), ["c1-0", "c2-0", "o1-0", "c3-0"]);
    assert!(high > offset_of(&log, "c3-0"));
    // Every address Kafka advertised pointed at the proxy's listener: no client went around it.
    let stats = cluster.proxy.stats();
    assert_eq!(
        (stats.rewrite_failures, stats.addresses_unmapped),
        (0, 0),
        "{stats:?}"
    );
}

/// A fenced producer learns it promptly: the commit fails in well under this (a broker that
/// closed the connection instead would make librdkafka retry until the 30 s `OP_TIMEOUT`; the
/// transaction timeout is 60 s).
const PROMPT: Duration = Duration::from_secs(10);

/// True for the error librdkafka raises once a broker tells a producer it is fenced: a fatal
/// transaction error with the fenced code.
fn is_fatal_fenced(error: &KafkaError) -> bool {
    let fenced_code = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    );
    let fatal = match error {
        KafkaError::Transaction(e) => e.is_fatal(),
        _ => true,
    };
    fenced_code && fatal
}

/// A zombie (a producer whose transactional id a newer instance re-initialised) is told it is
/// fenced at its next coordinator request - EndTxn, AddPartitionsToTxn or AddOffsetsToTxn -
/// promptly, and none of its records becomes visible to read_committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_commit_fails_promptly_as_fenced() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("fenced");
    cluster.create_topic(&topic, 2).await.expect("topic");
    let proxy = cluster.bootstrap_servers();

    let (t, p) = (topic.clone(), proxy.clone());
    let committed = blocking(move || {
        let mut committed = BTreeSet::new();
        for step in ["end-txn", "add-partitions", "add-offsets"] {
            let id = unique_name(&format!("zombie-{step}"));
            let zombie = transactional_producer(&p, &id);
            zombie.begin_transaction().expect("begin");
            send(&zombie, &t, 0, &format!("zombie-{step}"));
            // The record (and its AddPartitionsToTxn) reaches the broker before the fencing.
            zombie.flush(OP_TIMEOUT).expect("flush");
            let successor = transactional_producer(&p, &id);
            let started = Instant::now();
            let outcome = match step {
                "end-txn" => zombie.commit_transaction(OP_TIMEOUT),
                "add-partitions" => {
                    send(&zombie, &t, 1, &format!("zombie-{step}-p1"));
                    zombie.commit_transaction(OP_TIMEOUT)
                }
                _ => {
                    let group = consumer(&p, "read_committed", &[]);
                    let metadata = group.group_metadata().expect("group metadata");
                    let mut offsets = TopicPartitionList::new();
                    offsets
                        .add_partition_offset(&t, 0, Offset::Offset(1))
                        .expect("offsets");
                    zombie
                        .send_offsets_to_transaction(&offsets, &metadata, OP_TIMEOUT)
                        .and_then(|()| zombie.commit_transaction(OP_TIMEOUT))
                }
            };
            let elapsed = started.elapsed();
            let error = match outcome {
                Ok(()) => panic!("{step}: the zombie committed"),
                Err(error) => error,
            };
            assert!(
                is_fatal_fenced(&error),
                "{step}: not a fatal fenced error: {error:?}"
            );
            assert!(
                elapsed < PROMPT,
                "{step}: the zombie learnt it was fenced only after {elapsed:?}"
            );
            drop(zombie);
            let batch = vec![format!("successor-{step}")];
            transaction(&successor, &t, 0, &batch, true);
            committed.extend(batch);
        }
        committed
    })
    .await;

    // The zombies' records are in the log (so their absence below means something) ...
    let (t, p) = (topic.clone(), proxy.clone());
    let log = blocking(move || {
        read_to_end(
            &consumer(&p, "read_uncommitted", &[]),
            &t,
            &[(0, Offset::Beginning), (1, Offset::Beginning)],
        )
    })
    .await;
    for zombie in [
        "zombie-end-txn",
        "zombie-add-partitions",
        "zombie-add-offsets",
    ] {
        assert!(
            payloads(&log).contains(&zombie.to_string()),
            "{zombie} not in the log: {log:?}"
        );
    }
    // ... and read_committed shows exactly the successors' records.
    let (t, p) = (topic.clone(), proxy.clone());
    let seen = blocking(move || {
        read_to_end(
            &consumer(&p, "read_committed", &[]),
            &t,
            &[(0, Offset::Beginning), (1, Offset::Beginning)],
        )
    })
    .await;
    assert_exactly(&seen, &committed, "read_committed after fenced zombies");
}

/// Encodes a request frame (header and body) as a client would.
fn request_frame<R: Encodable>(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    request: &R,
) -> BytesMut {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api_key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("proxy-test-raw")))
        .encode(&mut buf, api_key.request_header_version(version))
        .expect("encode header");
    request.encode(&mut buf, version).expect("encode request");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_spanning_many_fetch_responses() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("spanning");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();

    let (t, p) = (topic.clone(), proxy.clone());
    let expected = blocking(move || {
        let aborter = transactional_producer(&p, &unique_name("aborter"));
        let committer = transactional_producer(&p, &unique_name("committer"));
        let mut expected = BTreeSet::new();
        for round in 0..3 {
            // Interleave an aborted transaction with a committed one of another producer.
            aborter.begin_transaction().unwrap();
            committer.begin_transaction().unwrap();
            for i in 0..60 {
                send(&aborter, &t, 0, &format!("aborted-{round}-{i}"));
                aborter.flush(OP_TIMEOUT).unwrap();
                let committed = format!("committed-{round}-{i}");
                send(&committer, &t, 0, &committed);
                committer.flush(OP_TIMEOUT).unwrap();
                expected.insert(committed);
            }
            aborter.abort_transaction(OP_TIMEOUT).unwrap();
            committer.commit_transaction(OP_TIMEOUT).unwrap();
            // The same producer id then commits: readers whose fetch offset is past the abort
            // marker must still see this.
            let later = names(&format!("aborter-commits-{round}"), 30);
            transaction(&aborter, &t, 0, &later, true);
            expected.extend(later);
        }
        expected
    })
    .await;

    let small_fetches = [("max.partition.fetch.bytes", "600")];
    let (t, p) = (topic.clone(), proxy.clone());
    let seen = blocking(move || {
        read_to_end(
            &consumer(&p, "read_committed", &small_fetches),
            &t,
            &[(0, Offset::Beginning)],
        )
    })
    .await;
    assert_exactly(&seen, &expected, "small fetches through the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_partitions_and_concurrent_consumers() {
    const PARTITIONS: i32 = 8;
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("many");
    cluster
        .create_topic(&topic, PARTITIONS)
        .await
        .expect("topic");
    let proxy = cluster.bootstrap_servers();

    // Three producers write transactions across all partitions concurrently; every third
    // transaction of each is aborted.
    let mut writers = Vec::new();
    for w in 0..3 {
        let (t, p) = (topic.clone(), proxy.clone());
        writers.push(blocking(move || {
            let producer = transactional_producer(&p, &unique_name(&format!("writer{w}")));
            let mut committed = BTreeSet::new();
            for txn in 0..12 {
                let commit = txn % 3 != 1;
                producer.begin_transaction().unwrap();
                for i in 0..(PARTITIONS * 3) {
                    let payload = format!("w{w}-t{txn}-{i}-{}", if commit { "c" } else { "a" });
                    send(&producer, &t, i % PARTITIONS, &payload);
                    if commit {
                        committed.insert(payload);
                    }
                }
                if commit {
                    producer.commit_transaction(OP_TIMEOUT).unwrap();
                } else {
                    producer.flush(OP_TIMEOUT).unwrap();
                    producer.abort_transaction(OP_TIMEOUT).unwrap();
                }
            }
            committed
        }));
    }
    let mut expected = BTreeSet::new();
    for writer in writers {
        expected.extend(writer.await);
    }

    let starts: Vec<(i32, Offset)> = (0..PARTITIONS).map(|p| (p, Offset::Beginning)).collect();
    let mut readers = Vec::new();
    for r in 0..3 {
        let (t, p, s) = (topic.clone(), proxy.clone(), starts.clone());
        let extra: &'static [(&str, &str)] = if r == 0 {
            &[("max.partition.fetch.bytes", "400")]
        } else {
            &[]
        };
        readers.push(blocking(move || {
            read_to_end(&consumer(&p, "read_committed", extra), &t, &s)
        }));
    }
    for (r, reader) in readers.into_iter().enumerate() {
        let seen = reader.await;
        assert_exactly(&seen, &expected, &format!("reader {r}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_starting_inside_an_aborted_transaction() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("inside");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();

    let (t, p) = (topic.clone(), proxy.clone());
    blocking(move || {
        let a = transactional_producer(&p, &unique_name("a"));
        let b = transactional_producer(&p, &unique_name("b"));
        transaction(&a, &t, 0, &names("before", 3), true);
        a.begin_transaction().unwrap();
        for payload in names("aborted", 10) {
            send(&a, &t, 0, &payload);
            a.flush(OP_TIMEOUT).unwrap();
        }
        transaction(&b, &t, 0, &names("other", 3), true);
        a.abort_transaction(OP_TIMEOUT).unwrap();
        // The same producer commits after its abort.
        transaction(&a, &t, 0, &names("after", 3), true);
    })
    .await;
    let log = read_partition_0(&proxy, &topic, "read_uncommitted").await;
    let after: BTreeSet<String> = names("after", 3).into_iter().collect();
    let other_and_after: BTreeSet<String> =
        names("other", 3).into_iter().chain(after.clone()).collect();

    // Start points: inside the aborted transaction, at its last record, and past its abort
    // marker (which must then not be listed, or "after" would be skipped).
    let inside = offset_of(&log, "aborted-5");
    let last_aborted = offset_of(&log, "aborted-9");
    let after_marker = offset_of(&log, "after-0");
    for (start, expected) in [
        (inside, other_and_after.clone()),
        (last_aborted, other_and_after.clone()),
        (after_marker, after.clone()),
    ] {
        for extra in [&[][..], &[("max.partition.fetch.bytes", "300")][..]] {
            let (t, p) = (topic.clone(), proxy.clone());
            let seen = blocking(move || {
                read_to_end(
                    &consumer(&p, "read_committed", extra),
                    &t,
                    &[(0, Offset::Offset(start))],
                )
            })
            .await;
            assert_exactly(
                &seen,
                &expected,
                &format!("start at {start} with {extra:?}"),
            );
        }
    }
}

/// Writes committed and aborted transactions while the proxy injects faults, retrying as an
/// exactly-once application would; returns the payloads that committed and how often a
/// commit was retried.
fn write_through_faults(
    proxy: &str,
    topic: &str,
    phase: &str,
    txns: usize,
    commit_timeout: Duration,
) -> (BTreeSet<String>, usize) {
    let producer_id = unique_name("faulty");
    let mut producer = transactional_producer(proxy, &producer_id);
    let mut committed = BTreeSet::new();
    let mut commit_retries = 0;
    let mut txn = 0;
    let started = Instant::now();
    while txn < txns {
        assert!(
            started.elapsed() < DEADLINE * 2,
            "transactions stuck under faults"
        );
        let abort_on_purpose = txn % 4 == 3;
        let batch = names(
            &format!(
                "{phase}-t{txn}-{}",
                if abort_on_purpose { "a" } else { "c" }
            ),
            5,
        );
        let outcome = (|| -> Result<bool, KafkaError> {
            producer.begin_transaction()?;
            for payload in &batch {
                send(&producer, topic, 0, payload);
            }
            if abort_on_purpose {
                producer.flush(OP_TIMEOUT)?;
                producer.abort_transaction(OP_TIMEOUT)?;
                return Ok(false);
            }
            loop {
                match producer.commit_transaction(commit_timeout) {
                    Ok(()) => return Ok(true),
                    Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                        commit_retries += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        })();
        match outcome {
            Ok(true) => {
                committed.extend(batch);
                txn += 1;
            }
            Ok(false) => txn += 1,
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() => {
                eprintln!("transaction {txn} must abort: {e}; retrying it");
                if let Err(e) = producer.abort_transaction(OP_TIMEOUT) {
                    eprintln!("abort failed: {e}; restarting the producer");
                    producer = transactional_producer(proxy, &producer_id);
                }
            }
            Err(e) => {
                // Fatal or unclear: a new producer with the same id fences and aborts the
                // old one's transaction, so the batch did not commit; write it again.
                eprintln!("transaction {txn} failed: {e}; restarting the producer");
                producer = transactional_producer(proxy, &producer_id);
            }
        }
    }
    (committed, commit_retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_latency_dropped_connections_outage_and_delayed_end_txn() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("faults");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    let mut expected = BTreeSet::new();

    // Latency on the produce and commit paths and on fetches.
    cluster
        .proxy
        .set_latency(ApiKey::Produce, Duration::from_millis(50));
    cluster
        .proxy
        .set_latency(ApiKey::EndTxn, Duration::from_millis(200));
    cluster
        .proxy
        .set_latency(ApiKey::Fetch, Duration::from_millis(30));
    let (t, p) = (topic.clone(), proxy.clone());
    let (committed, _) =
        blocking(move || write_through_faults(&p, &t, "latency", 6, Duration::from_secs(10))).await;
    expected.extend(committed);
    cluster.proxy.clear_faults();

    // An EndTxn response held longer than the client's commit timeout: the commit is retried
    // and must not duplicate or lose anything.
    cluster.proxy.delay_end_txn_response(Duration::from_secs(4));
    let (t, p) = (topic.clone(), proxy.clone());
    let delayed_at = Instant::now();
    let (committed, retries) =
        blocking(move || write_through_faults(&p, &t, "end-txn-delay", 2, Duration::from_secs(1)))
            .await;
    assert!(
        delayed_at.elapsed() >= Duration::from_secs(8),
        "EndTxn responses were not held"
    );
    assert!(
        retries >= 2,
        "commits did not time out and retry: {retries}"
    );
    expected.extend(committed);
    cluster.proxy.clear_faults();

    // Connections dropped and an outage while transactions are written.
    let (t, p) = (topic.clone(), proxy.clone());
    let writer = tokio::task::spawn_blocking(move || {
        write_through_faults(&p, &t, "dropped", 16, Duration::from_secs(10))
    });
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await; // spacing of injected faults, not a wait for a condition
        if round == 3 {
            cluster.proxy.refuse_connections_for(Duration::from_secs(2));
        } else {
            cluster.proxy.drop_connections();
        }
    }
    expected.extend(writer.await.unwrap().0);

    // Read while connections are being dropped: the consumer recovers and sees exactly the
    // committed set.
    let (t, p) = (topic.clone(), proxy.clone());
    let reader = tokio::task::spawn_blocking(move || {
        read_to_end(
            &consumer(
                &p,
                "read_committed",
                &[("max.partition.fetch.bytes", "500")],
            ),
            &t,
            &[(0, Offset::Beginning)],
        )
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await; // spacing of injected faults
        cluster.proxy.drop_connections();
    }
    let seen = reader.await.unwrap();
    assert_exactly(&seen, &expected, "read through faults");
    let stats = cluster.proxy.stats();
    assert!(stats.connections > 3, "{stats:?}");
}

/// `records` as one uncompressed v2 record batch.
fn encode_batch(records: &[Record]) -> bytes::Bytes {
    let mut batch = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut batch,
        records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode records");
    batch.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_refuses_connections_then_recovers() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("outage");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    cluster.proxy.refuse_connections_for(Duration::from_secs(3));
    let refused_at = Instant::now();
    let (t, p) = (topic.clone(), proxy.clone());
    let committed = blocking(move || {
        let producer = transactional_producer(&p, &unique_name("after-outage"));
        let batch = names("x", 3);
        transaction(&producer, &t, 0, &batch, true);
        batch
    })
    .await;
    assert!(
        refused_at.elapsed() >= Duration::from_secs(3),
        "the outage did not hold the client back"
    );
    assert!(cluster.proxy.stats().connections_refused > 0);
    let seen = read_partition_0(&proxy, &topic, "read_committed").await;
    assert_exactly(&seen, &committed.into_iter().collect(), "after the outage");
}

/// Polls the proxy's counters until `condition` holds.
async fn wait_for_stats(
    proxy: &Proxy,
    what: &str,
    condition: impl Fn(&ProxyStats) -> bool,
) -> ProxyStats {
    let started = Instant::now();
    loop {
        let stats = proxy.stats();
        if condition(&stats) {
            return stats;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn read_committed_lso(bootstrap: &str, topic: &str) -> i64 {
    consumer(bootstrap, "read_committed", &[])
        .fetch_watermarks(topic, 0, OP_TIMEOUT)
        .expect("read_committed watermarks")
        .1
}

/// While EndTxn requests are held, a producer's commit waits and its transaction stays open
/// on the broker (read_committed stops before it); a release lets the commit complete, and
/// turning the hold off releases too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_end_txn_blocks_the_commit_until_released() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("hold");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();

    let (t, p) = (topic.clone(), proxy.clone());
    let producer = blocking(move || {
        let producer = transactional_producer(&p, &unique_name("held"));
        transaction(&producer, &t, 0, &names("before", 2), true);
        producer.begin_transaction().expect("begin");
        for payload in names("held", 3) {
            send(&producer, &t, 0, &payload);
        }
        producer.flush(OP_TIMEOUT).expect("flush");
        producer
    })
    .await;

    cluster.proxy.hold_end_txn_requests(true);
    let commit = tokio::task::spawn_blocking(move || {
        let outcome = producer.commit_transaction(OP_TIMEOUT);
        (outcome, producer)
    });
    let stats = wait_for_stats(&cluster.proxy, "a held EndTxn", |s| {
        s.end_txn_holding() == 1
    })
    .await;
    assert_eq!(stats.end_txn_held, 1, "{stats:?}");

    // Held: the transaction is open on the broker, so read_committed ends before it.
    let seen = read_partition_0(&proxy, &topic, "read_committed").await;
    assert_eq!(payloads(&seen), ["before-0", "before-1"]);
    assert!(
        !commit.is_finished(),
        "the commit completed while its EndTxn was held"
    );

    cluster.proxy.release_end_txn_requests();
    let (outcome, producer) = commit.await.expect("commit task");
    outcome.expect("commit after the release");
    let stats = cluster.proxy.stats();
    assert_eq!(
        (stats.end_txn_released, stats.end_txn_discarded),
        (1, 0),
        "{stats:?}"
    );

    // The hold is still on: the next commit is held as well, until the hold is turned off.
    let (t, p) = (topic.clone(), proxy.clone());
    let commit = tokio::task::spawn_blocking(move || {
        transaction(&producer, &t, 0, &names("after", 2), true);
        read_committed_lso(&p, &t)
    });
    wait_for_stats(&cluster.proxy, "the second held EndTxn", |s| {
        s.end_txn_holding() == 1 && s.end_txn_held == 2
    })
    .await;
    assert!(!commit.is_finished(), "the second commit was not held");
    cluster.proxy.hold_end_txn_requests(false);
    commit.await.expect("second commit");
    let stats = cluster.proxy.stats();
    assert_eq!(
        (
            stats.end_txn_held,
            stats.end_txn_released,
            stats.end_txn_discarded
        ),
        (2, 2, 0),
        "{stats:?}"
    );

    let seen = read_partition_0(&proxy, &topic, "read_committed").await;
    let expected: BTreeSet<String> = [names("before", 2), names("held", 3), names("after", 2)]
        .concat()
        .into_iter()
        .collect();
    assert_exactly(&seen, &expected, "after the releases");
}

/// A transaction written with raw requests: InitProducerId, AddPartitionsToTxn and one
/// transactional Produce of `payloads` to partition 0, left open. Returns the producer id,
/// epoch and the offset of its first record.
async fn open_raw_transaction(
    proxy: &Proxy,
    topic: &str,
    transactional_id: &str,
    payloads: &[String],
) -> (i64, i16, i64) {
    let txn_id = || TransactionalId(StrBytes::from_string(transactional_id.to_string()));
    let topic_name = || TopicName(StrBytes::from_string(topic.to_string()));
    let mut connection = KafkaConnection::connect(proxy.address())
        .await
        .expect("connect");
    let init = connection
        .send(
            1,
            &InitProducerIdRequest::default()
                .with_transactional_id(Some(txn_id()))
                .with_transaction_timeout_ms(60_000),
        )
        .await
        .expect("InitProducerId");
    assert_eq!(init.error_code, 0, "{init:?}");
    let (producer_id, epoch) = (init.producer_id, init.producer_epoch);

    let added = connection
        .send(
            1,
            &AddPartitionsToTxnRequest::default()
                .with_v3_and_below_transactional_id(txn_id())
                .with_v3_and_below_producer_id(producer_id)
                .with_v3_and_below_producer_epoch(epoch)
                .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                    .with_name(topic_name())
                    .with_partitions(vec![0])]),
        )
        .await
        .expect("AddPartitionsToTxn");
    for topic_result in &added.results_by_topic_v3_and_below {
        for partition in &topic_result.results_by_partition {
            assert_eq!(partition.partition_error_code, 0, "{added:?}");
        }
    }

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let records: Vec<Record> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| Record {
            transactional: true,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: producer_id.0,
            producer_epoch: epoch,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: i as i32,
            timestamp: now_ms,
            key: Some(bytes::Bytes::from(payload.clone())),
            value: Some(bytes::Bytes::from(payload.clone())),
            headers: Default::default(),
        })
        .collect();
    let batch = encode_batch(&records);
    let produced = connection
        .send(
            3,
            &ProduceRequest::default()
                .with_transactional_id(Some(txn_id()))
                .with_acks(-1)
                .with_timeout_ms(30_000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(topic_name())
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch))])]),
        )
        .await
        .expect("Produce");
    let partition = &produced.responses[0].partition_responses[0];
    assert_eq!(partition.error_code, 0, "{produced:?}");
    (producer_id.0, epoch, partition.base_offset)
}

/// Writes an EndTxn(commit) and an ApiVersions request pipelined on a new raw connection.
async fn pipelined_end_txn(
    proxy: &Proxy,
    transactional_id: &str,
    producer_id: i64,
    epoch: i16,
) -> tokio::net::TcpStream {
    let end_txn = EndTxnRequest::default()
        .with_transactional_id(TransactionalId(StrBytes::from_string(
            transactional_id.to_string(),
        )))
        .with_producer_id(ProducerId(producer_id))
        .with_producer_epoch(epoch)
        .with_committed(true);
    let mut stream = tokio::net::TcpStream::connect(proxy.address())
        .await
        .expect("connect");
    for frame in [
        request_frame(ApiKey::EndTxn, 1, 1, &end_txn),
        request_frame(ApiKey::ApiVersions, 0, 2, &ApiVersionsRequest::default()),
    ] {
        write_frame(&mut stream, &frame).await.expect("write");
    }
    stream
}

/// A held EndTxn keeps the connection's response order when released (the request behind it
/// is answered after it). A held EndTxn whose client dies is discarded: it never reaches the
/// broker, the transaction stays open until a new producer with the same transactional id
/// initialises (which aborts it), and read_committed never shows its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_end_txn_keeps_order_and_dies_with_its_client() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("hold-raw");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    cluster.proxy.hold_end_txn_requests(true);

    // Released: both pipelined responses arrive, in request order, and the commit succeeded.
    let released_id = unique_name("released");
    let (producer_id, epoch, _) =
        open_raw_transaction(&cluster.proxy, &topic, &released_id, &names("released", 3)).await;
    let mut stream = pipelined_end_txn(&cluster.proxy, &released_id, producer_id, epoch).await;
    wait_for_stats(&cluster.proxy, "the first held EndTxn", |s| {
        s.end_txn_holding() == 1
    })
    .await;
    cluster.proxy.release_end_txn_requests();
    let mut correlation_ids = Vec::new();
    let mut end_txn_error = None;
    for _ in 0..2 {
        let frame = tokio::time::timeout(OP_TIMEOUT, read_frame(&mut stream))
            .await
            .expect("a response in time")
            .expect("read")
            .expect("connection open");
        let mut frame = frame.freeze();
        let correlation_id = response_correlation_id(&frame).expect("correlation id");
        if correlation_id == 1 {
            ResponseHeader::decode(&mut frame, ApiKey::EndTxn.response_header_version(1))
                .expect("header");
            end_txn_error = Some(
                EndTxnResponse::decode(&mut frame, 1)
                    .expect("EndTxn")
                    .error_code,
            );
        }
        correlation_ids.push(correlation_id);
    }
    assert_eq!(correlation_ids, [1, 2], "responses out of request order");
    assert_eq!(end_txn_error, Some(0), "the released commit failed");
    drop(stream);

    // Discarded: the client dies while its EndTxn is held.
    let killed_id = unique_name("killed");
    let (producer_id, epoch, first_offset) =
        open_raw_transaction(&cluster.proxy, &topic, &killed_id, &names("killed", 3)).await;
    let mut stream = pipelined_end_txn(&cluster.proxy, &killed_id, producer_id, epoch).await;
    wait_for_stats(&cluster.proxy, "the second held EndTxn", |s| {
        s.end_txn_holding() == 1 && s.end_txn_held == 2
    })
    .await;
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        use tokio::io::AsyncReadExt;
        stream.read(&mut byte).await
    })
    .await;
    assert!(
        early.is_err(),
        "a response arrived while its EndTxn was held: {early:?}"
    );
    drop(stream);
    let stats = wait_for_stats(&cluster.proxy, "the discarded EndTxn", |s| {
        s.end_txn_discarded == 1
    })
    .await;
    cluster.proxy.hold_end_txn_requests(false);
    assert_eq!(
        (
            stats.end_txn_held,
            stats.end_txn_released,
            stats.end_txn_holding()
        ),
        (2, 1, 0),
        "{stats:?}"
    );

    // The commit never reached the broker: the transaction is still open and holds the LSO.
    let (t, p) = (topic.clone(), proxy.clone());
    let lso = blocking(move || read_committed_lso(&p, &t)).await;
    assert_eq!(
        lso, first_offset,
        "the killed client's transaction is not open"
    );

    // A successor with the same transactional id aborts it; only committed records show.
    let (t, p) = (topic.clone(), proxy.clone());
    let (seen, log) = blocking(move || {
        let successor = transactional_producer(&p, &killed_id);
        transaction(&successor, &t, 0, &names("successor", 2), true);
        let seen = read_to_end(
            &consumer(&p, "read_committed", &[]),
            &t,
            &[(0, Offset::Beginning)],
        );
        let log = read_to_end(
            &consumer(&p, "read_uncommitted", &[]),
            &t,
            &[(0, Offset::Beginning)],
        );
        (seen, log)
    })
    .await;
    assert!(
        payloads(&log).contains(&"killed-0".to_string()),
        "the killed client's records are not in the log: {log:?}"
    );
    let expected: BTreeSet<String> = [names("released", 3), names("successor", 2)]
        .concat()
        .into_iter()
        .collect();
    assert_exactly(&seen, &expected, "read_committed after the killed client");
}

/// The partitions of the watermark test, one situation each.
const EMPTY: i32 = 0;
const PLAIN: i32 = 1;
const TXNS: i32 = 2;
const OPEN: i32 = 3;
const DELETED: i32 = 4;
const SITUATIONS: [(i32, &str); 5] = [
    (EMPTY, "empty"),
    (PLAIN, "non-transactional batches"),
    (TXNS, "committed + aborted transactions"),
    (OPEN, "open transaction"),
    (DELETED, "after DeleteRecords"),
];
/// Records of the non-transactional partition.
const PLAIN_RECORDS: usize = 4000;
/// Where DeleteRecords cuts the deleted partition (inside a batch).
const DELETE_BEFORE: i64 = 45;

/// The offsets of one partition, known from how the test wrote it and from its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Truth {
    log_start: i64,
    high_watermark: i64,
    last_stable: i64,
}

/// What one address answers for one partition: raw ListOffsets (latest, earliest) per
/// isolation level, the offsets in a raw uncommitted Fetch, and rdkafka's
/// `fetch_watermarks` per isolation level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answers {
    latest_uncommitted: i64,
    earliest_uncommitted: i64,
    latest_committed: i64,
    earliest_committed: i64,
    /// (log_start_offset, high_watermark, last_stable_offset) of a Fetch at the log start.
    fetch: (i64, i64, i64),
    watermarks_uncommitted: (i64, i64),
    watermarks_committed: (i64, i64),
}

impl Answers {
    /// The differences from the log's offsets, as `field: got != want` strings.
    fn mismatches(&self, truth: &Truth) -> Vec<String> {
        let Truth {
            log_start,
            high_watermark: hw,
            last_stable: lso,
        } = *truth;
        let checks = [
            (
                "ListOffsets(uncommitted, latest)",
                self.latest_uncommitted,
                hw,
            ),
            (
                "ListOffsets(uncommitted, earliest)",
                self.earliest_uncommitted,
                log_start,
            ),
            ("ListOffsets(committed, latest)", self.latest_committed, lso),
            (
                "ListOffsets(committed, earliest)",
                self.earliest_committed,
                log_start,
            ),
            (
                "watermarks(uncommitted).low",
                self.watermarks_uncommitted.0,
                log_start,
            ),
            (
                "watermarks(uncommitted).high",
                self.watermarks_uncommitted.1,
                hw,
            ),
            (
                "watermarks(committed).low",
                self.watermarks_committed.0,
                log_start,
            ),
            (
                "watermarks(committed).high",
                self.watermarks_committed.1,
                lso,
            ),
            ("Fetch.log_start_offset", self.fetch.0, log_start),
            ("Fetch.high_watermark", self.fetch.1, hw),
            ("Fetch.last_stable_offset", self.fetch.2, lso),
        ];
        checks
            .iter()
            .filter(|(_, got, want)| got != want)
            .map(|(what, got, want)| format!("{what}: {got} != {want}"))
            .collect()
    }
}

/// One raw ListOffsets request for `partition` at `timestamp` with `isolation_level`.
async fn raw_list_offsets(
    connection: &mut KafkaConnection,
    topic: &str,
    partition: i32,
    isolation_level: i8,
    timestamp: i64,
) -> i64 {
    let request = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_isolation_level(isolation_level)
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![ListOffsetsPartition::default()
                .with_partition_index(partition)
                .with_current_leader_epoch(-1)
                .with_timestamp(timestamp)])]);
    let response = connection.send(5, &request).await.expect("ListOffsets");
    let answer = &response.topics[0].partitions[0];
    assert_eq!(answer.error_code, 0, "{response:?}");
    answer.offset
}

/// One raw uncommitted Fetch of `partition` from `offset`: the response's partition data.
async fn raw_fetch(
    connection: &mut KafkaConnection,
    topic: &str,
    partition: i32,
    offset: i64,
) -> PartitionData {
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(100)
        .with_min_bytes(0)
        .with_max_bytes(64 * 1024 * 1024)
        .with_isolation_level(0)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default()
            .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
            .with_partitions(vec![FetchPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(offset)
                .with_last_fetched_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(64 * 1024 * 1024)])]);
    let response = connection.send(11, &request).await.expect("Fetch");
    let data = response.responses[0]
        .partitions
        .iter()
        .find(|p| p.partition_index == partition)
        .expect("the partition in the Fetch response")
        .clone();
    assert_eq!(
        data.error_code, 0,
        "Fetch of {topic}/{partition} at {offset}"
    );
    data
}

/// Everything `address` answers about `topic`/`partition` (whose log starts at `log_start`).
async fn answers(
    address: std::net::SocketAddr,
    topic: &str,
    partition: i32,
    log_start: i64,
) -> Answers {
    let mut connection = KafkaConnection::connect(address).await.expect("connect");
    let fetched = raw_fetch(&mut connection, topic, partition, log_start).await;
    let watermarks = |isolation: &'static str| {
        let (t, b) = (topic.to_string(), address.to_string());
        blocking(move || {
            consumer(&b, isolation, &[])
                .fetch_watermarks(&t, partition, OP_TIMEOUT)
                .expect("fetch_watermarks")
        })
    };
    Answers {
        latest_uncommitted: raw_list_offsets(&mut connection, topic, partition, 0, -1).await,
        earliest_uncommitted: raw_list_offsets(&mut connection, topic, partition, 0, -2).await,
        latest_committed: raw_list_offsets(&mut connection, topic, partition, 1, -1).await,
        earliest_committed: raw_list_offsets(&mut connection, topic, partition, 1, -2).await,
        fetch: (
            fetched.log_start_offset,
            fetched.high_watermark,
            fetched.last_stable_offset,
        ),
        watermarks_uncommitted: watermarks("read_uncommitted").await,
        watermarks_committed: watermarks("read_committed").await,
    }
}

/// The end of `partition`'s log from its own record batches (markers included), read raw
/// and uncommitted: the true high watermark, independent of the broker's offset fields.
async fn log_end_from_batches(
    address: std::net::SocketAddr,
    topic: &str,
    partition: i32,
    log_start: i64,
) -> i64 {
    let mut connection = KafkaConnection::connect(address).await.expect("connect");
    let mut next = log_start;
    loop {
        let data = raw_fetch(&mut connection, topic, partition, next).await;
        let batches = data
            .records
            .as_deref()
            .map(batch_headers)
            .unwrap_or_default();
        match batches.last() {
            Some(last) if last.last_offset >= next => next = last.last_offset + 1,
            _ => return next,
        }
    }
}

/// ListOffsets(latest/earliest) and `fetch_watermarks` give the offsets the log itself implies
/// (log start, high watermark, last stable offset), for both isolation levels: an empty
/// partition, many non-transactional batches, committed and aborted transactions, an open
/// transaction, and a partition after DeleteRecords. The framework's readers rely on these
/// (a "latest" too low would end a snapshot tail read early, an "earliest" too low would hide
/// a retention gap). Asked through the proxy and of the broker directly, with the same
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_and_watermarks_match_the_log() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("watermarks");
    cluster.create_topic(&topic, 5).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    let direct = cluster.proxy.upstream();

    // Non-transactional batches: flushed in chunks so the log holds many batches.
    let plain_producer = |records: usize, partition: i32| {
        let (t, p) = (topic.clone(), proxy.clone());
        blocking(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &p)
                .set("linger.ms", "0")
                .create()
                .expect("producer");
            for chunk in 0..records.div_ceil(500) {
                for i in chunk * 500..records.min((chunk + 1) * 500) {
                    send(&producer, &t, partition, &format!("plain-{i}"));
                }
                producer.flush(OP_TIMEOUT).expect("flush");
            }
        })
    };
    plain_producer(PLAIN_RECORDS, PLAIN).await;
    plain_producer(100, DELETED).await;

    let (t, p) = (topic.clone(), proxy.clone());
    let (open_producer, open_first) = blocking(move || {
        let committer = transactional_producer(&p, &unique_name("committer"));
        let aborter = transactional_producer(&p, &unique_name("aborter"));
        transaction(&committer, &t, TXNS, &names("c1", 3), true);
        transaction(&aborter, &t, TXNS, &names("a1", 2), false);
        transaction(&committer, &t, TXNS, &names("c2", 2), true);
        transaction(&committer, &t, OPEN, &names("c3", 2), true);
        let open = transactional_producer(&p, &unique_name("open"));
        open.begin_transaction().unwrap();
        send(&open, &t, OPEN, "open-0");
        open.flush(OP_TIMEOUT).unwrap();
        // Written after the open transaction began: the high watermark moves past it, the
        // last stable offset stays at its first record.
        transaction(&committer, &t, OPEN, &names("c4", 2), true);
        let log = read_to_end(
            &consumer(&p, "read_uncommitted", &[]),
            &t,
            &[(OPEN, Offset::Beginning)],
        );
        (open, offset_of(&log, "open-0"))
    })
    .await;

    // DeleteRecords: everything below DELETE_BEFORE goes.
    let admin: AdminClient<DefaultClientContext> =
        cluster.client_config().create().expect("admin client");
    let mut cut = TopicPartitionList::new();
    cut.add_partition_offset(&topic, DELETED, Offset::Offset(DELETE_BEFORE))
        .expect("cut");
    let deleted = admin
        .delete_records(
            &cut,
            &AdminOptions::new().operation_timeout(Some(OP_TIMEOUT)),
        )
        .await
        .expect("DeleteRecords");
    let low_watermark = deleted
        .find_partition(&topic, DELETED)
        .expect("the partition in the DeleteRecords result");
    assert_eq!(low_watermark.error(), Ok(()));
    assert_eq!(low_watermark.offset(), Offset::Offset(DELETE_BEFORE));

    let mut truths = BTreeMap::new();
    for (partition, _) in SITUATIONS {
        let log_start = if partition == DELETED {
            DELETE_BEFORE
        } else {
            0
        };
        let hw = log_end_from_batches(direct, &topic, partition, log_start).await;
        let lso = if partition == OPEN { open_first } else { hw };
        truths.insert(
            partition,
            Truth {
                log_start,
                high_watermark: hw,
                last_stable: lso,
            },
        );
    }
    // Sanity of the construction: markers take offsets, an open transaction holds the LSO.
    assert_eq!(truths[&EMPTY].high_watermark, 0);
    assert_eq!(truths[&PLAIN].high_watermark, PLAIN_RECORDS as i64);
    assert_eq!(truths[&TXNS].high_watermark, 3 + 1 + 2 + 1 + 2 + 1);
    assert!(truths[&OPEN].last_stable < truths[&OPEN].high_watermark - 1);
    assert_eq!(truths[&DELETED].high_watermark, 100);

    let mut mismatches = Vec::new();
    for (partition, situation) in SITUATIONS {
        let truth = truths[&partition];
        let from_broker = answers(direct, &topic, partition, truth.log_start).await;
        let from_proxy = answers(cluster.proxy.address(), &topic, partition, truth.log_start).await;
        eprintln!("{situation} (partition {partition}): {truth:?}\n  broker: {from_broker:?}\n  proxy:  {from_proxy:?}");
        for (via, answers) in [("broker", from_broker), ("proxy", from_proxy)] {
            mismatches.extend(
                answers
                    .mismatches(&truth)
                    .into_iter()
                    .map(|m| format!("{situation} via the {via}: {m}")),
            );
        }
    }
    assert!(
        mismatches.is_empty(),
        "answers differ from the log's offsets: {mismatches:#?}"
    );
    drop(open_producer);
}

/// While a producer writes, every `fetch_watermarks` through the proxy answers a high
/// watermark the partition really had during the call: at least what was acknowledged before
/// it, at most what was sent by its end, and never less than an earlier answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermarks_under_concurrent_writes() {
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("concurrent-watermarks");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    let acked = Arc::new(AtomicI64::new(0));
    let sent = Arc::new(AtomicI64::new(0));
    let writing = Arc::new(AtomicBool::new(true));

    let writer = {
        let (t, p) = (topic.clone(), proxy.clone());
        let (acked, sent, writing) = (acked.clone(), sent.clone(), writing.clone());
        tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &p)
                .set("linger.ms", "0")
                .create()
                .expect("producer");
            let mut n = 0;
            while writing.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    sent.fetch_add(1, Ordering::SeqCst);
                    send(&producer, &t, 0, &format!("w-{n}"));
                    n += 1;
                }
                producer.flush(OP_TIMEOUT).expect("flush");
                acked.store(n, Ordering::SeqCst);
            }
        })
    };

    let (t, p) = (topic.clone(), proxy.clone());
    let (acked_r, sent_r) = (acked.clone(), sent.clone());
    let answers = blocking(move || {
        let uncommitted = consumer(&p, "read_uncommitted", &[]);
        let committed = consumer(&p, "read_committed", &[]);
        let mut answers = Vec::new();
        let mut last = 0;
        let mut acked_at_last_wait = 0;
        for call in 0..40 {
            let client = if call % 2 == 0 {
                &uncommitted
            } else {
                &committed
            };
            if call % 8 == 0 {
                // Calls answer in milliseconds: let the partition grow between groups of them,
                // so the answers span a growing log.
                let started = Instant::now();
                while acked_r.load(Ordering::SeqCst) <= acked_at_last_wait {
                    assert!(started.elapsed() < DEADLINE, "the writer is stuck");
                    std::thread::sleep(Duration::from_millis(5));
                }
                acked_at_last_wait = acked_r.load(Ordering::SeqCst);
            }
            let before = acked_r.load(Ordering::SeqCst);
            let (low, high) = client
                .fetch_watermarks(&t, 0, OP_TIMEOUT)
                .expect("watermarks");
            let after = sent_r.load(Ordering::SeqCst);
            assert_eq!(low, 0, "call {call}");
            assert!(
                before <= high && high <= after && high >= last,
                "call {call}: high watermark {high} outside [{before}, {after}] or below the \
                 earlier {last}"
            );
            last = high;
            answers.push(high);
        }
        answers
    })
    .await;
    writing.store(false, Ordering::SeqCst);
    writer.await.expect("writer");
    assert!(
        answers.first() < answers.last(),
        "the partition did not grow during the calls: {answers:?}"
    );
}

/// A transaction that started before an abandoned (still open) one and then committed is
/// visible below the open one's first offset (LSO = first offset of the earliest open
/// transaction), even while the abandoned one stays open: the framework's readers must not
/// wait for a killed producer's transaction to see what committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transaction_below_an_abandoned_one_is_visible() {
    init_tracing();
    let cluster = TestCluster::start().await.expect("cluster");
    let topic = unique_name("overlap");
    cluster.create_topic(&topic, 1).await.expect("topic");
    let proxy = cluster.bootstrap_servers();
    let direct = cluster.proxy.upstream().to_string();

    let (t, p) = (topic.clone(), proxy.clone());
    let abandoned = blocking(move || {
        let committer = transactional_producer(&p, &unique_name("committer"));
        committer.begin_transaction().unwrap();
        send(&committer, &t, 0, "p-0");
        committer.flush(OP_TIMEOUT).unwrap();
        let abandoned = transactional_producer(&p, &unique_name("abandoned"));
        abandoned.begin_transaction().unwrap();
        send(&abandoned, &t, 0, "k-0");
        abandoned.flush(OP_TIMEOUT).unwrap();
        committer.commit_transaction(OP_TIMEOUT).expect("commit");
        // After the abandoned transaction started: withheld while it is open.
        transaction(&committer, &t, 0, &names("p-late", 1), true);
        abandoned
    })
    .await;

    // The log as written (diagnostics for the report).
    let mut connection = KafkaConnection::connect(cluster.proxy.upstream())
        .await
        .expect("connect");
    let uncommitted = raw_fetch(&mut connection, &topic, 0, 0).await;
    let log: Vec<(i64, i64, i64)> = uncommitted
        .records
        .as_deref()
        .map(batch_headers)
        .unwrap_or_default()
        .iter()
        .map(|b| (b.base_offset, b.last_offset, b.producer_id))
        .collect();
    eprintln!(
        "log (base, last, pid): {log:?}; hw {}, lso {}",
        uncommitted.high_watermark, uncommitted.last_stable_offset
    );

    let seen = read_partition_0(&proxy, &topic, "read_committed").await;
    assert_eq!(payloads(&seen), ["p-0"], "read_committed through the proxy");
    let (t, p) = (topic.clone(), proxy.clone());
    assert_eq!(
        blocking(move || read_committed_lso(&p, &t)).await,
        offset_of(&seen, "p-0") + 1,
        "the LSO is the abandoned transaction's first offset"
    );
    let direct_seen = read_partition_0(&direct, &topic, "read_committed").await;
    assert_eq!(
        direct_seen, seen,
        "read_committed directly vs through the proxy"
    );
    drop(abandoned);
}

/// The offsets and producer of one record batch, read from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchHeader {
    base_offset: i64,
    last_offset: i64,
    producer_id: i64,
}

/// The headers of the v2 record batches in a Fetch response's `records`, in log order (a
/// partial batch at the end, cut by the fetch's byte limit, is left out).
fn batch_headers(records: &[u8]) -> Vec<BatchHeader> {
    let be_i64 = |b: &[u8]| i64::from_be_bytes(b.try_into().expect("8 bytes"));
    let be_i32 = |b: &[u8]| i32::from_be_bytes(b.try_into().expect("4 bytes"));
    let mut batches = Vec::new();
    let mut rest = records;
    // baseOffset i64, batchLength i32, partitionLeaderEpoch i32, magic i8, crc i32,
    // attributes i16, lastOffsetDelta i32 (at 23), ..., producerId i64 (at 43).
    while rest.len() >= 61 {
        let Ok(batch_len) = usize::try_from(be_i32(&rest[8..12])) else {
            break;
        };
        if rest.len() < 12 + batch_len {
            break;
        }
        let base_offset = be_i64(&rest[0..8]);
        batches.push(BatchHeader {
            base_offset,
            last_offset: base_offset + i64::from(be_i32(&rest[23..27])),
            producer_id: be_i64(&rest[43..51]),
        });
        rest = &rest[12 + batch_len..];
    }
    batches
}

/// A fake broker for the address-mapping test: answers every request on every connection with
/// a Metadata response listing `brokers` (id, host, port), whose cluster id is `name` so a
/// client can tell which broker it reached.
async fn fake_broker(
    listener: tokio::net::TcpListener,
    name: String,
    brokers: Vec<(i32, String, i32)>,
) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let (name, brokers) = (name.clone(), brokers.clone());
        tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut socket).await {
                let mut body = frame.freeze();
                let header = kafka_protocol::protocol::decode_request_header_from_buffer(&mut body)
                    .expect("request header");
                assert_eq!(header.request_api_key, ApiKey::Metadata as i16);
                let version = header.request_api_version;
                let mut response = MetadataResponse::default().with_brokers(
                    brokers
                        .iter()
                        .map(|(id, host, port)| {
                            MetadataResponseBroker::default()
                                .with_node_id(BrokerId(*id))
                                .with_host(StrBytes::from_string(host.clone()))
                                .with_port(*port)
                        })
                        .collect(),
                );
                if version >= 2 {
                    response.cluster_id = Some(StrBytes::from_string(name.clone()));
                }
                let mut out = BytesMut::new();
                ResponseHeader::default()
                    .with_correlation_id(header.correlation_id)
                    .encode(&mut out, ApiKey::Metadata.response_header_version(version))
                    .expect("encode header");
                response.encode(&mut out, version).expect("encode Metadata");
                if write_frame(&mut socket, &out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// (id, host, port) of every broker in a Metadata response.
fn advertised(response: &MetadataResponse) -> Vec<(i32, String, i32)> {
    response
        .brokers
        .iter()
        .map(|b| (b.node_id.0, b.host.to_string(), b.port))
        .collect()
}

/// A proxy for three brokers (fakes that answer Metadata) listens once per broker, forwards
/// each listener to its own broker, and tells clients every broker's listener in place of the
/// broker's address (a `localhost` address too); an address of no broker of the proxy passes
/// unchanged. Faults (an outage, dropped connections) hit every listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_cluster_maps_each_broker_to_its_own_listener() {
    init_tracing();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a fake broker"),
        );
    }
    let upstreams: Vec<std::net::SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("fake broker address"))
        .collect();
    // Port 1: no broker of the proxy (its brokers have ephemeral ports).
    let brokers = vec![
        (1, "127.0.0.1".to_string(), i32::from(upstreams[0].port())),
        (2, "localhost".to_string(), i32::from(upstreams[1].port())),
        (3, "127.0.0.1".to_string(), i32::from(upstreams[2].port())),
        (4, "127.0.0.1".to_string(), 1),
    ];
    for (i, listener) in listeners.into_iter().enumerate() {
        tokio::spawn(fake_broker(
            listener,
            format!("broker-{i}"),
            brokers.clone(),
        ));
    }

    let proxy = Proxy::start_cluster(&upstreams).await.expect("proxy");
    let addresses = proxy.addresses();
    assert_eq!(addresses.len(), 3);
    assert_eq!(proxy.address(), addresses[0]);
    assert_eq!(proxy.upstream(), upstreams[0]);
    assert_eq!(proxy.upstreams(), upstreams);
    assert_eq!(
        proxy.bootstrap_servers(),
        format!("{},{},{}", addresses[0], addresses[1], addresses[2])
    );
    let distinct: BTreeSet<_> = addresses.iter().chain(&upstreams).collect();
    assert_eq!(
        distinct.len(),
        6,
        "listeners {addresses:?}, brokers {upstreams:?}"
    );

    let expected: Vec<(i32, String, i32)> = vec![
        (1, "127.0.0.1".to_string(), i32::from(addresses[0].port())),
        (2, "127.0.0.1".to_string(), i32::from(addresses[1].port())),
        (3, "127.0.0.1".to_string(), i32::from(addresses[2].port())),
        (4, "127.0.0.1".to_string(), 1),
    ];
    let mut streams = Vec::new();
    for (i, &listener) in addresses.iter().enumerate() {
        for version in [0, 12] {
            let mut connection = KafkaConnection::connect(listener).await.expect("connect");
            let response = connection
                .send(version, &MetadataRequest::default())
                .await
                .expect("Metadata");
            assert_eq!(advertised(&response), expected, "listener {i}, v{version}");
            if version >= 2 {
                assert_eq!(
                    response.cluster_id.as_deref(),
                    Some(format!("broker-{i}").as_str()),
                    "listener {i} reached another broker"
                );
            }
        }
        // A raw connection through each listener, answered once, for the drop below.
        let mut stream = tokio::net::TcpStream::connect(listener)
            .await
            .expect("connect");
        let request = request_frame(ApiKey::Metadata, 12, 1, &MetadataRequest::default());
        write_frame(&mut stream, &request).await.expect("write");
        read_frame(&mut stream)
            .await
            .expect("read")
            .expect("a Metadata response");
        streams.push(stream);
    }
    let stats = proxy.stats();
    assert_eq!(stats.connections, 9, "{stats:?}");
    // The stranger, once in each of the nine responses.
    assert_eq!(stats.addresses_unmapped, 9, "{stats:?}");
    assert_eq!(stats.rewrite_failures, 0, "{stats:?}");

    // Dropped connections: every listener's connection closes.
    proxy.drop_connections();
    for (i, stream) in streams.iter_mut().enumerate() {
        let end = tokio::time::timeout(OP_TIMEOUT, read_frame(stream))
            .await
            .expect("the connection closes in time");
        assert!(
            !matches!(end, Ok(Some(_))),
            "listener {i}: a frame after drop_connections"
        );
    }

    // An outage: every listener accepts only to close.
    proxy.refuse_connections_for(Duration::from_secs(60));
    for (i, &listener) in addresses.iter().enumerate() {
        let mut connection = KafkaConnection::connect(listener).await.expect("connect");
        let answer = connection.send(12, &MetadataRequest::default()).await;
        assert!(answer.is_err(), "listener {i} answered during an outage");
    }
    assert_eq!(proxy.stats().connections_refused, 3);
    proxy.clear_faults();
    let mut connection = KafkaConnection::connect(addresses[2])
        .await
        .expect("connect");
    let response = connection
        .send(12, &MetadataRequest::default())
        .await
        .expect("Metadata after the outage");
    assert_eq!(advertised(&response), expected);
}

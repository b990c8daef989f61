//! Recovery refuses what it cannot do correctly: a non-deterministic processor, a retention
//! gap in the input, a corrupt full snapshot. Each is set up for real on the broker.

mod framework_support;

use std::time::Duration;

use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;
use framework_support::*;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

struct Setup {
    cluster: TestCluster,
    bootstrap: String,
    input: String,
    output: String,
    app: String,
}

async fn setup(prefix: &str) -> Setup {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name(&format!("{prefix}-in"));
    let output = unique_name(&format!("{prefix}-out"));
    let app = unique_name(&format!("{prefix}-app"));
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");
    Setup {
        cluster,
        bootstrap,
        input,
        output,
        app,
    }
}

/// Runs the service over `n` records until every output committed.
async fn process_records(s: &Setup, n: usize, extra: &[&str]) -> ChildProcess {
    let records = inputs(0..n, 1);
    produce(&s.bootstrap, &s.input, &records);
    let spec = service_spec(&s.bootstrap, &s.app, &s.input, &s.output).args(extra);
    let service = ChildProcess::spawn(s.app.clone(), spec).expect("spawn");
    let expected = expected_outputs(&records);
    let report =
        wait_for_outputs(&s.bootstrap, &s.output, &expected, Duration::from_secs(60)).await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_deterministic_processor_is_detected_on_recovery() {
    let s = setup("nondet").await;
    // Without full snapshots recovery replays everything since the start; the processor mixes
    // its process id into the state, so the replay in a new process cannot match.
    let mut service = process_records(
        &s,
        100,
        &["--nondeterministic", "--full-snapshots", "false"],
    )
    .await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&format!("non-deterministic processor on {}/0", s.input)),
        "{log}"
    );
    drop(s.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_gap_is_refused_with_partition_and_offsets() {
    let s = setup("gap").await;
    let mut service = process_records(&s, 100, &["--full-snapshots", "false"]).await;
    let status = service
        .terminate(Duration::from_secs(30))
        .await
        .expect("stop");
    assert!(status.success(), "{}", service.log_tail(40));

    // Retention (here: DeleteRecords, what retention does) removes input the replay needs.
    let admin: AdminClient<DefaultClientContext> =
        s.cluster.client_config().create().expect("admin");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&s.input, 0, Offset::Offset(50))
        .expect("tpl");
    let result = admin
        .delete_records(&tpl, &AdminOptions::new())
        .await
        .expect("delete records");
    let element = result.elements().into_iter().next().expect("one partition");
    assert!(
        element.error().is_ok(),
        "delete records failed: {:?}",
        element.error()
    );
    service.restart().expect("restart");
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    // Kafka moves the log start exactly to the DeleteRecords offset.
    let expected = format!(
        "retention gap on {}/0: recovery must replay from offset 0 but the log starts at 50;",
        s.input
    );
    assert!(log.contains(&expected), "expected {expected:?} in:\n{log}");
}

// --- protobuf encoding of snapshot records (proto/exactly.proto), by hand ---

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(v, out);
}

fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn snapshot_record(kind_field: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    field_varint(1, 1, &mut out); // format_version
    field_bytes(kind_field, body, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_chunk_is_detected_and_never_loaded() {
    let s = setup("corrupt").await;
    let mut service = process_records(&s, 100, &[]).await;
    // A graceful stop writes a final full snapshot.
    let status = service
        .terminate(Duration::from_secs(30))
        .await
        .expect("stop");
    assert!(status.success(), "{}", service.log_tail(40));

    // Append, in a committed transaction, a full snapshot chunk whose data does not match its
    // checksum and an incremental record pointing at it.
    let snapshot_topic = format!("{}.{}.snapshots", s.app, s.input);
    let bootstrap = s.bootstrap.clone();
    let input = s.input.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let (_, end) = consumer
            .fetch_watermarks(&snapshot_topic, 0, Duration::from_secs(10))
            .expect("watermarks");
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("transactional.id", unique_name("corruptor"))
            .create()
            .expect("producer");
        producer
            .init_transactions(Duration::from_secs(30))
            .expect("init");
        producer.begin_transaction().expect("begin");
        let data = b"definitely not msgpack of the state";
        let mut chunk = Vec::new();
        field_bytes(1, b"corrupt-snapshot", &mut chunk); // snapshot_id
        field_varint(3, 1, &mut chunk); // count
        field_varint(4, 100, &mut chunk); // input_offset
        field_varint(5, 12345, &mut chunk); // crc32c: wrong on purpose
        field_bytes(6, data, &mut chunk);
        field_bytes(7, b"msgpack", &mut chunk);
        let mut reference = Vec::new();
        field_varint(1, end as u64, &mut reference); // first_chunk_offset: the next offset
        field_varint(2, 1, &mut reference);
        field_varint(3, 100, &mut reference);
        field_varint(4, data.len() as u64, &mut reference);
        field_varint(5, 12345, &mut reference);
        field_bytes(6, b"corrupt-snapshot", &mut reference);
        let mut incremental = Vec::new();
        field_bytes(1, input.as_bytes(), &mut incremental);
        field_varint(3, 100, &mut incremental); // next_input_offset
        field_bytes(4, &reference, &mut incremental);
        field_varint(5, 100, &mut incremental); // base_input_offset
        field_varint(10, 1_000, &mut incremental); // transaction_seq
        for payload in [snapshot_record(3, &chunk), snapshot_record(2, &incremental)] {
            producer
                .send(
                    BaseRecord::<(), _>::to(&snapshot_topic)
                        .partition(0)
                        .payload(&payload),
                )
                .map_err(|(e, _)| e)
                .expect("send");
        }
        producer
            .commit_transaction(Duration::from_secs(30))
            .expect("commit");
    })
    .await
    .expect("corruptor");

    service.restart().expect("restart");
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("corrupt full snapshot \"corrupt-snapshot\""),
        "{log}"
    );
    drop(s.cluster);
}

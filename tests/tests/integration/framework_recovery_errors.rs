//! Recovery refuses what it cannot do correctly: a non-deterministic processor, a retention
//! gap in the input, a corrupt full snapshot. Each is set up for real on the broker.

use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::unique_name;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_deterministic_processor_is_detected_on_recovery() {
    let s = Setup::new("nondet").await;
    // Without full snapshots recovery replays everything since the start; the processor mixes
    // its process id into the state, so the replay in a new process cannot match.
    let mut service = s
        .process(
            &inputs(0..100, 1),
            &["--nondeterministic", "--full-snapshots", "false"],
        )
        .await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    for needle in [
        &format!(
            "replaying {}/0 offsets [0, 100) gave state fingerprint",
            s.input
        ),
        "but the same code (processor version 0) recorded",
        "either a non-deterministic processor",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
    drop(s.cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_gap_is_refused_with_partition_and_offsets() {
    let s = Setup::new("gap").await;
    let mut service = s
        .process(&inputs(0..100, 1), &["--full-snapshots", "false"])
        .await;
    stop_cleanly(&mut service).await;

    // Retention (here: DeleteRecords, what retention does) removes input the replay needs.
    s.delete_records_before(&s.input, 50).await;
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
    let s = Setup::new("corrupt").await;
    let mut service = s.process(&inputs(0..100, 1), &[]).await;
    // A graceful stop writes a final full snapshot.
    stop_cleanly(&mut service).await;

    // Append, in a committed transaction, a full snapshot chunk whose data does not match its
    // checksum and an incremental record pointing at it.
    let snapshot_topic = s.snapshot_topic();
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

//! Outputs and the incremental snapshot record are one atomic unit: a transaction that already
//! holds both and is then aborted leaves neither visible to read_committed readers.
//!
//! The scenario is forced, not hoped for: the fault-injecting proxy holds the service's EndTxn
//! (commit) request, so the transaction is open on the broker with its outputs and its
//! incremental record written, and the test proves both are there (read_uncommitted). The
//! service is then killed with SIGKILL: its held commit dies with its connections and never
//! reaches the broker. The restarted service's `init_transactions` aborts the open
//! transaction and recovery rebuilds the state from the last committed incremental record.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;
use exactly_tests::{Proxy, ProxyStats};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// An incremental snapshot record as found on the snapshot topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Incremental {
    /// Offset of the record on the snapshot partition.
    offset: i64,
    next_input_offset: i64,
    transaction_seq: u64,
}

/// The incremental snapshot records among `records` (full-snapshot chunks are skipped).
fn incrementals(records: &[ReadRecord]) -> Vec<Incremental> {
    records
        .iter()
        .filter_map(|record| {
            let value = record.value.as_deref()?;
            let incremental =
                proto_fields(value)
                    .into_iter()
                    .find_map(|(field, v)| match (field, v) {
                        (2, ProtoValue::Bytes(bytes)) => Some(bytes),
                        _ => None,
                    })?;
            let (mut next_input_offset, mut transaction_seq) = (0, 0);
            for (field, v) in proto_fields(incremental) {
                match (field, v) {
                    (3, ProtoValue::Varint(n)) => next_input_offset = n as i64,
                    (10, ProtoValue::Varint(n)) => transaction_seq = n,
                    _ => {}
                }
            }
            Some(Incremental {
                offset: record.offset,
                next_input_offset,
                transaction_seq,
            })
        })
        .collect()
}

/// The last stable offset of partition 0 of `topic` (through the proxy: the true LSO).
async fn last_stable_offset(bootstrap: &str, topic: &str) -> i64 {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique_name("lso-reader"))
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        consumer
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .expect("read_committed watermarks")
            .1
    })
    .await
    .expect("lso task")
}

/// Polls the proxy's counters until `condition` holds.
async fn wait_for_proxy(
    proxy: &Proxy,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&ProxyStats) -> bool,
) -> ProxyStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = proxy.stats();
        if condition(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn utf8(record: &ReadRecord) -> String {
    String::from_utf8(record.value.clone().unwrap_or_default()).expect("utf-8 output")
}

/// Per-key count of the last output of each key (`"<id> <key> <count>"`), in offset order.
fn final_counts(values: impl IntoIterator<Item = String>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for value in values {
        let mut parts = value.split(' ');
        let (_, key, count) = (parts.next(), parts.next(), parts.next());
        if let (Some(key), Some(count)) = (key, count.and_then(|c| c.parse().ok())) {
            counts.insert(key.to_owned(), count);
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transaction_leaves_neither_outputs_nor_incremental_record_visible() {
    let cluster = TestCluster::start().await.expect("cluster");
    // The scenario needs the proxy (it holds the commit), whatever DEBUG_BYPASS_PROXY says.
    let bootstrap = cluster.bootstrap_servers();
    let input = unique_name("atomic-abort-in");
    let output = unique_name("atomic-abort-out");
    let app = unique_name("atomic-abort-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");
    let snapshot_topic = format!("{app}.{input}.snapshots");
    // One input partition written by a plain producer: input offset i is records[i].
    let records = inputs(0..4000, 1);
    produce(&bootstrap, &input, &records);
    let expected = expected_outputs(&records);

    // Slow processing, short commit interval: many small transactions, full snapshots among
    // them; a transaction timeout long enough that the broker never aborts the held
    // transaction on its own while the test looks at it. The first full snapshot comes well
    // after the hold (armed at 200 outputs, it holds the next commit, by about 400 records):
    // a full snapshot's chunks go in a transaction of their own, without an incremental
    // record, and holding that one instead (1 run in 14 with a snapshot every 300) is not
    // this scenario.
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--commit-interval-ms",
        "200",
        "--per-record-delay-ms",
        "2",
        "--full-snapshot-every",
        "1000",
        // The test reads the aborted transaction's records back from the log at the end.
        "--snapshot-trimming",
        "false",
        "--transaction-timeout-ms",
        "60000",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");
    let committed_before_hold =
        wait_for_count(&bootstrap, &output, 200, Duration::from_secs(60)).await;
    assert!(
        committed_before_hold >= 200,
        "no transactions committed:\n{}",
        service.log_tail(60)
    );

    // Hold the next commit: the transaction stays open with everything it wrote.
    cluster.proxy.hold_end_txn_requests(true);
    // (Processing all input takes at least 8 s at 2 ms per record: a commit is still to come.)
    wait_for_proxy(
        &cluster.proxy,
        "the service's EndTxn to be held",
        Duration::from_secs(30),
        |s| s.end_txn_holding() >= 1,
    )
    .await;

    // What committed so far, and what the open (held) transaction wrote.
    let snapshot_lso = last_stable_offset(&bootstrap, &snapshot_topic).await;
    let output_lso = last_stable_offset(&bootstrap, &output).await;
    let committed_incrementals = incrementals(&read_all(&bootstrap, &snapshot_topic).await);
    let last_committed = *committed_incrementals
        .last()
        .expect("a committed incremental record");
    let snapshot_log =
        read_all_with_isolation(&bootstrap, &snapshot_topic, "read_uncommitted").await;
    let open_incrementals: Vec<Incremental> = incrementals(&snapshot_log)
        .into_iter()
        .filter(|i| i.offset >= snapshot_lso)
        .collect();
    let output_log = read_all_with_isolation(&bootstrap, &output, "read_uncommitted").await;
    let open_outputs: Vec<&ReadRecord> = output_log
        .iter()
        .filter(|r| r.offset >= output_lso)
        .collect();
    let committed_outputs = read_all(&bootstrap, &output).await;

    // The open transaction holds exactly one incremental record, the successor of the last
    // committed one, and the outputs of exactly the input records between the two.
    assert_eq!(
        open_incrementals.len(),
        1,
        "open incremental records {open_incrementals:?} (snapshot LSO {snapshot_lso}, last \
         committed {last_committed:?})"
    );
    let aborted = open_incrementals[0];
    assert_eq!(
        aborted.transaction_seq,
        last_committed.transaction_seq + 1,
        "{aborted:?} vs {last_committed:?}"
    );
    let (from, to) = (
        last_committed.next_input_offset as usize,
        aborted.next_input_offset as usize,
    );
    assert!(
        from < to,
        "the open transaction processed no input: {aborted:?} vs {last_committed:?}"
    );
    let open_values: Vec<String> = open_outputs.iter().map(|r| utf8(r)).collect();
    assert_eq!(
        open_values,
        expected[from..to],
        "outputs of the open transaction"
    );
    assert_eq!(
        committed_outputs.len(),
        from,
        "committed outputs vs the last committed next_input_offset"
    );
    let aborted_output_offsets: BTreeSet<i64> = open_outputs.iter().map(|r| r.offset).collect();

    // SIGKILL: the held commit dies with the service's connections, never reaching the broker.
    service.kill_hard().await.expect("kill -9");
    let stats = wait_for_proxy(
        &cluster.proxy,
        "the killed service's EndTxn to be discarded",
        Duration::from_secs(30),
        |s| s.end_txn_discarded >= 1 && s.end_txn_holding() == 0,
    )
    .await;
    assert_eq!(stats.end_txn_released, 0, "{stats:?}");
    cluster.proxy.hold_end_txn_requests(false);
    assert_eq!(
        last_stable_offset(&bootstrap, &snapshot_topic).await,
        snapshot_lso,
        "the killed service's transaction is no longer open: did its commit reach the broker?"
    );

    // Restart: init_transactions aborts the open transaction, recovery rebuilds the state from
    // the last committed incremental record, and processing finishes.
    service.restart().expect("restart");
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(120)).await;
    assert!(
        report.is_clean(),
        "{report}\nservice log tail:\n{}",
        service.log_tail(80)
    );
    assert_eq!(report.records_read, expected.len() as u64, "{report}");
    assert_eq!(report.duplicate_count, 0, "{report}");
    assert_eq!(report.missing_count, 0, "{report}");
    let m = wait_for_metrics(&service, "a recovery", Duration::from_secs(30), |m| {
        metric(m, "recoveries") >= 1
    })
    .await;
    assert!(metric(&m, "records_processed") > 0, "{m}");

    // State: the per-key counts the committed outputs end with are the reference model's.
    let committed_outputs = read_all(&bootstrap, &output).await;
    assert_eq!(
        final_counts(committed_outputs.iter().map(utf8)),
        final_counts(expected.iter().cloned()),
        "per-key counts (state) differ from the reference model"
    );

    // Neither half of the aborted transaction is visible to read_committed, although both are
    // still in the log.
    let committed_incrementals = incrementals(&read_all(&bootstrap, &snapshot_topic).await);
    assert!(
        committed_incrementals
            .iter()
            .all(|i| i.offset != aborted.offset),
        "the aborted incremental record {aborted:?} is visible to read_committed"
    );
    // Recovery continued from the last committed record, so the aborted record's sequence
    // number was written again, committed, at another offset.
    let redone = committed_incrementals
        .iter()
        .find(|i| i.transaction_seq == aborted.transaction_seq);
    assert!(
        redone.is_some_and(|r| r.offset > aborted.offset),
        "no committed redo of transaction {aborted:?}: {committed_incrementals:?}"
    );
    assert!(
        committed_incrementals
            .windows(2)
            .all(|w| w[0].transaction_seq < w[1].transaction_seq
                && w[0].next_input_offset <= w[1].next_input_offset),
        "committed incremental records out of order: {committed_incrementals:?}"
    );
    let snapshot_log =
        read_all_with_isolation(&bootstrap, &snapshot_topic, "read_uncommitted").await;
    assert!(
        incrementals(&snapshot_log).contains(&aborted),
        "the aborted incremental record {aborted:?} is not in the log"
    );
    let visible_aborted_outputs: Vec<i64> = committed_outputs
        .iter()
        .map(|r| r.offset)
        .filter(|offset| aborted_output_offsets.contains(offset))
        .collect();
    assert!(
        visible_aborted_outputs.is_empty(),
        "outputs of the aborted transaction visible to read_committed at {visible_aborted_outputs:?}"
    );
    let output_log = read_all_with_isolation(&bootstrap, &output, "read_uncommitted").await;
    let logged: BTreeSet<i64> = output_log.iter().map(|r| r.offset).collect();
    assert!(
        aborted_output_offsets.is_subset(&logged),
        "the aborted outputs are not in the log"
    );
    // The only EndTxn the proxy held was the killed service's, and it never reached Kafka:
    // the abort that hid its outputs is Kafka's own (the restarted producer's
    // init_transactions), not a commit the proxy let through late.
    let stats = cluster.proxy.stats();
    assert!(
        stats.end_txn_held >= 1
            && stats.end_txn_discarded == stats.end_txn_held
            && stats.end_txn_released == 0,
        "{stats:?}"
    );

    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

//! Exactly-once across crashes: the `eos-service` test binary is killed with SIGKILL while it
//! processes, restarted, and the read_committed output must hold every expected record exactly
//! once with the counts of the reference model (state survived the crash intact).

use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;
use exactly_tests::scrape::{sample, scrape};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_is_exactly_once() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("eos-in");
    let output = unique_name("eos-out");
    let app = unique_name("eos-app");
    cluster.create_topic(&input, 3).await.expect("input topic");
    cluster
        .create_topic(&output, 3)
        .await
        .expect("output topic");

    let first = inputs(0..3000, 3);
    produce(&bootstrap, &input, &first);

    // Slow processing + long transactions: a kill lands inside an open transaction.
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--commit-interval-ms",
        "300",
        "--full-snapshot-every",
        "700",
        "--per-record-delay-ms",
        "1",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");

    // Kill #1 once some, but not all, outputs committed.
    let seen = wait_for_count(&bootstrap, &output, 400, Duration::from_secs(60)).await;
    assert!(
        seen >= 400,
        "service made no progress:\n{}",
        service.log_tail(80)
    );
    service.kill_hard().await.expect("kill -9");

    // More input while it is down, then restart and kill #2 mid-stream again.
    let second = inputs(3000..6000, 3);
    produce(&bootstrap, &input, &second);
    service.restart().expect("restart");
    let seen2 = wait_for_count(&bootstrap, &output, seen + 1500, Duration::from_secs(90)).await;
    assert!(
        seen2 > seen,
        "no progress after restart:\n{}",
        service.log_tail(80)
    );
    service.kill_hard().await.expect("second kill -9");

    service.restart().expect("second restart");
    let all: Vec<Input> = first.iter().chain(second.iter()).cloned().collect();
    let expected = expected_outputs(&all);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(120)).await;
    assert!(
        report.is_clean(),
        "{report}\nservice log tail:\n{}",
        service.log_tail(80)
    );
    assert_eq!(report.records_read, expected.len() as u64, "{report}");

    // Recovery after the kills started from full snapshots.
    let m = wait_for_metrics(&service, "a recovery", Duration::from_secs(10), |m| {
        metric(m, "recoveries") >= 3
    })
    .await;
    assert!(metric(&m, "recoveries_from_full_snapshot") >= 1, "{m}");
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_replays_at_most_one_snapshot_interval() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("snap-in");
    let output = unique_name("snap-out");
    let app = unique_name("snap-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");

    const EVERY: u64 = 200;
    const MAX_BATCH: u64 = 50;
    let records = inputs(0..1130, 1);
    produce(&bootstrap, &input, &records);
    // All input is there before the start, so transactions are full batches of MAX_BATCH
    // (the commit interval is long): full snapshots land at 200, 400, ..., 1000.
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--full-snapshot-every",
        &EVERY.to_string(),
        "--max-batch-records",
        &MAX_BATCH.to_string(),
        "--commit-interval-ms",
        "2000",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");
    let expected = expected_outputs(&records);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(90)).await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    let before = wait_for_metrics(&service, "snapshots", Duration::from_secs(10), |m| {
        metric(m, "full_snapshots_written") >= 1
    })
    .await;
    assert!(metric(&before, "full_snapshots_written") >= 5, "{before}");

    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    let m = wait_for_metrics(&service, "recovery", Duration::from_secs(60), |m| {
        metric(m, "recoveries") >= 1
    })
    .await;
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 1, "{m}");
    let replayed = metric(&m, "max_recovery_replayed_records");
    // A full snapshot is written at the first commit with >= EVERY records since the last one.
    assert!(
        replayed < EVERY + MAX_BATCH,
        "replayed {replayed} records, more than one snapshot interval: {m}"
    );
    // The last full snapshot is at 1000 at the latest, so the replay is not empty: the replay
    // path really ran.
    assert!(replayed > 0, "{m}");

    // More input after recovery continues the same counts.
    let more = inputs(1130..1300, 1);
    produce(&bootstrap, &input, &more);
    let all: Vec<Input> = records.iter().chain(more.iter()).cloned().collect();
    let expected = expected_outputs(&all);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(60)).await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

/// Outputs and the incremental snapshot record are committed atomically: after each crash, at
/// rest, the committed outputs of every input partition are exactly those of the input records
/// below the partition's last committed `next_input_offset` — no output of an aborted or
/// unfinished transaction is visible, and no snapshot record claims more than the outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_and_snapshot_record_commit_atomically_across_crashes() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("atomic-in");
    let output = unique_name("atomic-out");
    let app = unique_name("atomic-app");
    cluster.create_topic(&input, 2).await.expect("input topic");
    cluster
        .create_topic(&output, 2)
        .await
        .expect("output topic");
    let records = inputs(0..6000, 2);
    produce(&bootstrap, &input, &records);
    // id -> input partition; the inputs of a partition have offsets 0, 1, 2, ... in id order.
    let partition_of: std::collections::HashMap<String, i32> = records
        .iter()
        .map(|r| (r.id.clone(), r.partition))
        .collect();
    let snapshot_topic = format!("{app}.{input}.snapshots");

    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--commit-interval-ms",
        "200",
        "--per-record-delay-ms",
        "2",
        "--full-snapshot-every",
        "500",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn");
    let mut seen = 0;
    for round in 0..3 {
        if round > 0 {
            service.restart().expect("restart");
        }
        seen = wait_for_count(&bootstrap, &output, seen + 300, Duration::from_secs(60)).await;
        service.kill_hard().await.expect("kill -9");
        // Fence the killed producers, as the restart would: Kafka withholds every record
        // above a partition's earliest open transaction, so while a killed producer's
        // transaction is open, another producer's committed outputs behind it are not yet
        // visible although its snapshot record (in its own partition) is.
        fence_producers(&bootstrap, &app, &input, 2).await;

        let committed = last_committed_offsets(&bootstrap, &snapshot_topic).await;
        let mut outputs_per_partition: std::collections::HashMap<i32, i64> = Default::default();
        for r in read_all(&bootstrap, &output).await {
            let value = String::from_utf8(r.value.unwrap_or_default()).expect("utf-8");
            let id = value.split(' ').next().unwrap_or_default();
            *outputs_per_partition
                .entry(*partition_of.get(id).expect("known id"))
                .or_default() += 1;
        }
        for p in 0..2 {
            assert_eq!(
                outputs_per_partition.get(&p).copied().unwrap_or(0),
                committed.get(&p).copied().unwrap_or(0),
                "round {round}, input partition {p}: committed outputs vs the last committed \
                 snapshot record's next_input_offset\n{}",
                service.log_tail(40)
            );
        }
        assert!(
            committed.values().sum::<i64>() > 0,
            "round {round}: nothing committed"
        );
    }
    service.restart().expect("final restart");
    let expected = expected_outputs(&records);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(120)).await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

/// SIGTERM: the service commits, writes a final full snapshot per partition and leaves the
/// group; the next start recovers from those snapshots without replaying anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_writes_final_snapshots() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("term-in");
    let output = unique_name("term-out");
    let app = unique_name("term-app");
    cluster.create_topic(&input, 2).await.expect("input topic");
    cluster
        .create_topic(&output, 2)
        .await
        .expect("output topic");
    let records = inputs(0..500, 2);
    produce(&bootstrap, &input, &records);
    // Full snapshots by count or time would never be due here: only shutdown writes one.
    let spec = service_spec(&bootstrap, &app, &input, &output);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn");
    let expected = expected_outputs(&records);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(60)).await;
    assert!(report.is_clean(), "{report}");

    let status = service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
    assert!(status.success(), "{}", service.log_tail(40));
    let m = last_metrics(&service).expect("metrics");
    assert_eq!(metric(&m, "full_snapshots_written"), 2, "{m}");
    assert!(service
        .run_log_text()
        .expect("log")
        .contains("eos-service stopped cleanly"));

    service.restart().expect("restart");
    let m = wait_for_metrics(&service, "recovered", Duration::from_secs(60), |m| {
        metric(m, "recoveries") >= 2
    })
    .await;
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 2, "{m}");
    assert_eq!(metric(&m, "max_recovery_replayed_records"), 0, "{m}");
    let report = check(&bootstrap, &output, &expected).await;
    assert!(report.is_clean(), "{report}");
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

/// Initialises a producer with each partition's transactional id, which aborts the open
/// transactions of the producers a kill -9 left behind.
async fn fence_producers(bootstrap: &str, app: &str, input: &str, partitions: i32) {
    let (bootstrap, app, input) = (bootstrap.to_string(), app.to_string(), input.to_string());
    tokio::task::spawn_blocking(move || {
        for p in 0..partitions {
            let producer: rdkafka::producer::BaseProducer = rdkafka::config::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("transactional.id", format!("{app}.{input}.{p}"))
                .create()
                .expect("fencing producer");
            rdkafka::producer::Producer::init_transactions(&producer, Duration::from_secs(30))
                .expect("fencing the killed producer");
        }
    })
    .await
    .expect("fencing task");
}

/// A broker crash must not make recovery read a stale end of the snapshot partition: a new
/// partition leader (failover, or a restarted node) keeps its previous high watermark until
/// something is written in its new leader epoch, so a reader right after it sees old snapshot
/// records as the latest. Recovering from one of those would replay input whose outputs
/// already committed: duplicates. The worker writes (and aborts) a barrier record first.
/// Three nodes: a single Kafka node loses acknowledged transactions when SIGKILLed
/// (`single_node_crash_keeps_acknowledged_commits` in kafka.rs), which nothing on top can fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_broker_crash_sees_every_committed_snapshot() {
    let cluster = TestCluster::start_owned(exactly_tests::ClusterOptions::three_nodes())
        .await
        .expect("cluster");
    let bootstrap = cluster.direct_bootstrap_servers();
    let input = unique_name("crash-in");
    let output = unique_name("crash-out");
    let app = unique_name("crash-app");
    cluster.create_topic(&input, 3).await.expect("input topic");
    cluster
        .create_topic(&output, 3)
        .await
        .expect("output topic");
    let all = inputs(0..4500, 3);
    produce(&bootstrap, &input, &all);
    // Slow enough that every crash lands while the service commits every 50 ms, and the
    // workers recover as soon as leadership moved.
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--commit-interval-ms",
        "50",
        "--full-snapshot-every",
        "400",
        "--per-record-delay-ms",
        "1",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");
    let snapshots = format!("{app}.{input}.snapshots");
    let mut seen = 0;
    for crash in 1..=2u64 {
        seen = wait_for_count(&bootstrap, &output, seen + 600, Duration::from_secs(90)).await;
        let topic = snapshots.clone();
        let leader = cluster
            .with_owned_kafka(move |kafka| kafka.leader_of(&topic, 0))
            .await
            .expect("metadata")
            .unwrap_or(1);
        cluster.kill_broker(leader).await.expect("kill -9 a leader");
        cluster.start_broker(leader).await.expect("restart it");
        eprintln!("crash {crash}: node {leader} after {seen} outputs");
    }
    let expected = expected_outputs(&all);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(240)).await;
    if !report.is_clean() {
        let explained = explain_missing(&cluster, &bootstrap, &output, &report.missing).await;
        panic!("{report}\n{explained}\n{}", service.log_tail(80));
    }
    assert_eq!(report.records_read, expected.len() as u64, "{report}");
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("stop the service");
}

/// Where the missing outputs are ([`locate_missing`]), and the batches and transaction
/// markers around the hidden ones on every replica of their partition.
async fn explain_missing(
    cluster: &TestCluster,
    bootstrap: &str,
    output: &str,
    missing: &[String],
) -> String {
    let located = locate_missing(bootstrap, output, missing).await;
    let mut logs = Vec::new();
    for (&partition, &(low, high)) in &located.hidden {
        let topic = output.to_owned();
        logs.extend(
            cluster
                .with_owned_kafka(move |kafka| {
                    Ok(exactly_tests::kafka::inspect::log_window(
                        kafka,
                        &topic,
                        partition,
                        low - 20,
                        high + 40,
                    ))
                })
                .await
                .unwrap_or_else(|e| vec![format!("reading the logs: {e}")]),
        );
    }
    format!(
        "{}\nbatches around the hidden outputs, per replica:\n{}",
        located.text,
        logs.join("\n")
    )
}

/// The snapshot partition's first offset and the records from there to its end (aborted ones
/// and transaction markers included in the span, not in the records).
async fn snapshot_partition(bootstrap: &str, topic: &str) -> (i64, i64, Vec<ReadRecord>) {
    let (config, name) = (
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .clone(),
        topic.to_owned(),
    );
    let (low, high) = tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = config.create().expect("consumer");
        rdkafka::consumer::Consumer::fetch_watermarks(&consumer, &name, 0, Duration::from_secs(10))
            .expect("watermarks")
    })
    .await
    .expect("watermarks task");
    let records = read_all_with_isolation(bootstrap, topic, "read_uncommitted").await;
    (low, high, records)
}

/// Snapshot topics stay bounded: once a full snapshot's pointer committed, the records below its
/// first chunk are deleted. Recovery works from a trimmed topic, and a topic left untrimmed (as
/// by a crash between a snapshot's commit and its trim: here trimming is off until then) is
/// trimmed by the next full snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_topics_are_trimmed_below_the_latest_full_snapshot() {
    let s = Setup::new("trim").await;
    let topic = s.snapshot_topic();
    // A transaction every 10 records, a full snapshot every 20: many snapshots.
    let frequent = [
        "--max-batch-records",
        "10",
        "--full-snapshot-every",
        "20",
        "--commit-interval-ms",
        "50",
    ];
    let untrimmed: Vec<&str> = frequent
        .iter()
        .copied()
        .chain(["--snapshot-trimming", "false"])
        .collect();
    let records = inputs(0..900, 1);

    // Untrimmed, the topic keeps every snapshot.
    let mut service = s.process(&records[..300], &untrimmed).await;
    let m = wait_for_metrics(
        &service,
        "10 full snapshots",
        Duration::from_secs(30),
        |m| metric(m, "full_snapshots_written") >= 10,
    )
    .await;
    let (low, _, kept) = snapshot_partition(&s.bootstrap, &topic).await;
    assert_eq!(low, 0);
    assert_eq!(metric(&m, "snapshot_trims"), 0, "{m}");
    assert!(kept.len() >= 20, "{} records kept", kept.len());
    service.kill_hard().await.expect("kill -9");

    // Trimming on: the next full snapshot deletes everything below it, and every later one.
    let mut service = s.spawn(&frequent);
    produce(&s.bootstrap, &s.input, &records[300..600]);
    s.assert_outputs(&service, &records[..600], Duration::from_secs(60))
        .await;
    let m = wait_for_metrics(&service, "trims", Duration::from_secs(30), |m| {
        metric(m, "snapshot_trims") >= 5
    })
    .await;
    assert_eq!(metric(&m, "snapshot_trim_failures"), 0, "{m}");
    let (low, high, left) = snapshot_partition(&s.bootstrap, &topic).await;
    assert!(low > 0, "nothing trimmed:\n{}", service.log_tail(30));
    // What is left: the latest full snapshot (one chunk and its pointer), the incremental
    // records after it (fewer than one snapshot interval's transactions) and markers.
    assert!(
        left.len() <= 6 && high - low <= 12,
        "{} records in [{low}, {high}) after {} full snapshots",
        left.len(),
        metric(&m, "full_snapshots_written")
    );
    eprintln!(
        "trimmed: {} records in [{low}, {high}) after {} full snapshots of this run (untrimmed: \
         {} records)",
        left.len(),
        metric(&m, "full_snapshots_written"),
        kept.len()
    );

    // A crash, and recovery from the trimmed topic.
    service.kill_hard().await.expect("kill -9");
    let mut service = s.spawn(&frequent);
    produce(&s.bootstrap, &s.input, &records[600..]);
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    let m = last_metrics(&service).expect("metrics");
    assert!(metric(&m, "recoveries_from_full_snapshot") >= 1, "{m}");
    stop_cleanly(&mut service).await;
}

/// A recovery that takes more than a few seconds says how far it got, how fast it goes and how
/// long it still needs, every few seconds: here a replay of 3000 records at 2 ms each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_recovery_logs_its_progress() {
    let s = Setup::new("progress").await;
    let slow = [
        "--full-snapshots",
        "false",
        "--per-record-delay-ms",
        "2",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let records = inputs(0..3000, 1);
    let mut service = s.process(&records, &slow).await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    // The metrics endpoint shows the replay while it runs.
    let addr = metrics_addr_of(&service).await;
    let partition = format!(r#"topic="{}",partition="0""#, s.input);
    let replay = format!(r#"{{{partition},step="replay"}}"#);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(addr).await.unwrap_or_default();
        let recovering = sample(
            &text,
            &format!("exactly_partition_recovering{{{partition}}}"),
        );
        let done = sample(&text, &format!("exactly_recovery_done{replay}")).unwrap_or(0.0);
        let total = sample(&text, &format!("exactly_recovery_total{replay}"));
        if recovering == Some(1.0) && done > 0.0 {
            assert_eq!(total, Some(3000.0), "{text}");
            assert!(
                sample(
                    &text,
                    &format!("exactly_recovery_eta_seconds{{{partition}}}")
                )
                .is_some(),
                "{text}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replay never showed in the metrics:\n{text}\n{}",
            service.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = wait_for_metrics(&service, "the replay", Duration::from_secs(60), |m| {
        metric(m, "recoveries") >= 1
    })
    .await;
    assert_eq!(metric(&m, "last_recovery_replayed_records"), 3000, "{m}");
    let log = service.run_log_text().expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("recovery in progress"))
        .unwrap_or_else(|| panic!("no progress line:\n{}", service.log_tail(30)));
    for field in [
        "step=\"replay\"",
        "total=3000",
        "percent=",
        "per_second=",
        "eta_s=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    stop_cleanly(&mut service).await;
}

/// A state whose fingerprint costs more than a tenth of the commit interval (50 000 entries:
/// 17 ms in a debug build, against 2 ms for a 20 ms interval) is
/// fingerprinted with full snapshots only, not on every commit, and says so; recovery after a
/// crash then checks record counts and output digests, and the outputs stay exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_fingerprint_leaves_the_commit_path() {
    let s = Setup::new("costly-fp").await;
    let large = ["--pad-state", "50000", "--commit-interval-ms", "20"];
    let records = inputs(0..400, 1);
    let mut service = s.process(&records[..200], &large).await;
    let log = service.run_log_text().expect("log");
    assert!(
        log.contains("taken with full snapshots only from now on"),
        "{}",
        service.log_tail(30)
    );
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    produce(&s.bootstrap, &s.input, &records[200..]);
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    let m = last_metrics(&service).expect("metrics");
    assert!(metric(&m, "recoveries") >= 1, "{m}");
    stop_cleanly(&mut service).await;
}

/// `max_recovery_time` bounds recovery: with 10 ms per record and a bound of 6 s, a full snapshot
/// comes whenever replaying since the last one would take 3 s, so the recovery after a kill -9
/// stays within the bound. The count trigger alone (every 100 000 records) would replay all 1000
/// records: 10 s of processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_recovery_time_bounds_the_recovery_after_a_crash() {
    const BOUND_MS: u64 = 6000;
    let s = Setup::new("bounded").await;
    let bound = BOUND_MS.to_string();
    let args = [
        "--per-record-delay-ms",
        "10",
        "--max-recovery-time-ms",
        bound.as_str(),
    ];
    let records = inputs(0..1000, 1);
    let mut service = s.process(&records, &args).await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    let m = wait_for_metrics(&service, "the recovery", Duration::from_secs(60), |m| {
        metric(m, "recoveries") >= 1
    })
    .await;
    assert!(metric(&m, "recoveries_from_full_snapshot") >= 1, "{m}");
    assert!(metric(&m, "last_recovery_replayed_records") < 1000, "{m}");
    assert!(
        metric(&m, "last_recovery_ms") <= BOUND_MS,
        "recovery took longer than the bound: {m}\n{}",
        service.log_tail(20)
    );
    eprintln!(
        "recovered in {} ms, replaying {} records",
        metric(&m, "last_recovery_ms"),
        metric(&m, "last_recovery_replayed_records")
    );
    stop_cleanly(&mut service).await;
}

//! Keyed stores (`exactly::Store`, RocksDB under the state dir) on real Kafka: a restart after
//! kill -9 resumes from the local store (warm) and stays exactly once; a local store that is
//! not this partition's is discarded and the partition restores from Kafka; without any local
//! store the stores restore from their full snapshot; a failed record's store writes vanish.

use std::path::Path;
use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;

/// Two partitions, an app with its counts in a store, its state dir owned by the test.
struct StoreSetup {
    _cluster: TestCluster,
    bootstrap: String,
    input: String,
    output: String,
    app: String,
    state_dir: tempfile::TempDir,
}

impl StoreSetup {
    async fn new(prefix: &str, partitions: i32) -> StoreSetup {
        let cluster = TestCluster::start().await.expect("cluster");
        let bootstrap = bootstrap_of(&cluster);
        let input = unique_name(&format!("{prefix}-in"));
        let output = unique_name(&format!("{prefix}-out"));
        let app = unique_name(&format!("{prefix}-app"));
        cluster
            .create_topic(&input, partitions)
            .await
            .expect("input topic");
        cluster
            .create_topic(&output, partitions)
            .await
            .expect("output topic");
        StoreSetup {
            _cluster: cluster,
            bootstrap,
            input,
            output,
            app,
            state_dir: tempfile::tempdir().expect("state dir"),
        }
    }

    fn spawn(&self, extra: &[&str]) -> ChildProcess {
        let spec = service_spec(&self.bootstrap, &self.app, &self.input, &self.output)
            .arg("--store")
            .args(extra)
            .env("EXACTLY_STATE_DIR", self.state_dir.path());
        ChildProcess::spawn(self.app.clone(), spec).expect("spawn eos-service")
    }

    fn partition_dir(&self, partition: i32) -> std::path::PathBuf {
        self.state_dir
            .path()
            .join(&self.app)
            .join(format!("{}-{partition}", self.input))
    }

    async fn assert_outputs(&self, service: &ChildProcess, records: &[Input]) {
        let expected = expected_outputs(records);
        let report = wait_for_outputs(
            &self.bootstrap,
            &self.output,
            &expected,
            Duration::from_secs(90),
        )
        .await;
        assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    }
}

fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The `chunks=N` field of a log line (0 without one).
fn chunks_of(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("chunks="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn dir_exists(dir: &Path) -> bool {
    dir.join("CURRENT").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_resumes_from_local_disk_after_kill_9_and_restores_from_kafka_without_it() {
    let s = StoreSetup::new("store", 2).await;
    // 3000 more keys per partition and 4 KiB chunks: each full snapshot streams out in pieces
    // over several transactions while records keep coming (kills land mid-stream too).
    let args = [
        "--commit-interval-ms",
        "100",
        "--full-snapshot-every",
        "300",
        "--per-record-delay-ms",
        "1",
        "--pad-state",
        "3000",
        "--max-chunk-bytes",
        "4096",
    ];
    let records = inputs(0..4000, 2);
    produce(&s.bootstrap, &s.input, &records[..2000]);
    let mut service = s.spawn(&args);

    // kill -9 mid-stream: the restart resumes both partitions from their local stores.
    let seen = wait_for_count(&s.bootstrap, &s.output, 600, Duration::from_secs(60)).await;
    assert!(seen >= 600, "no progress:\n{}", service.log_tail(60));
    service.kill_hard().await.expect("kill -9");
    assert!(dir_exists(&s.partition_dir(0)) && dir_exists(&s.partition_dir(1)));
    service.restart().expect("restart");
    s.assert_outputs(&service, &records[..2000]).await;
    let streamed = service.log_text().expect("log");
    assert!(
        streamed
            .lines()
            .filter(|l| l.contains("full snapshot streamed"))
            .any(|l| chunks_of(l) > 8),
        "no full snapshot streamed over several transactions:\n{}",
        service.log_tail(60)
    );
    let log = service.run_log_text().expect("log");
    assert_eq!(
        count_lines(&log, "resuming from the local state store"),
        2,
        "{log}"
    );
    assert_eq!(count_lines(&log, "discarding the local state store"), 0);
    let m = last_metrics(&service).expect("metrics");
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 0, "{m}");
    service.kill_hard().await.expect("kill -9");

    // The partitions' directories swapped: neither is its partition's; both are discarded and
    // the partitions restore from Kafka.
    let (d0, d1) = (s.partition_dir(0), s.partition_dir(1));
    let scratch = s.state_dir.path().join("scratch");
    std::fs::rename(&d0, &scratch).expect("move");
    std::fs::rename(&d1, &d0).expect("move");
    std::fs::rename(&scratch, &d1).expect("move");
    produce(&s.bootstrap, &s.input, &records[2000..3000]);
    service.restart().expect("restart");
    s.assert_outputs(&service, &records[..3000]).await;
    let log = service.run_log_text().expect("log");
    assert_eq!(
        count_lines(&log, "it belongs to another app or partition"),
        2,
        "{log}"
    );
    let m = wait_for_metrics(&service, "recoveries", Duration::from_secs(10), |m| {
        metric(m, "recoveries") >= 2
    })
    .await;
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 2, "{m}");

    // No local state at all (a new machine): the stores restore from their full snapshots.
    service.kill_hard().await.expect("kill -9");
    std::fs::remove_dir_all(s.state_dir.path().join(&s.app)).expect("wipe the state dir");
    produce(&s.bootstrap, &s.input, &records[3000..]);
    service.restart().expect("restart");
    s.assert_outputs(&service, &records).await;
    let log = service.run_log_text().expect("log");
    assert_eq!(count_lines(&log, "resuming from the local state store"), 0);
    let m = wait_for_metrics(&service, "recoveries", Duration::from_secs(10), |m| {
        metric(m, "recoveries") >= 2
    })
    .await;
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 2, "{m}");
    assert!(dir_exists(&s.partition_dir(0)) && dir_exists(&s.partition_dir(1)));
    stop_cleanly(&mut service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_record_leaves_no_trace_in_the_store() {
    let s = StoreSetup::new("store-skip", 1).await;
    let records = inputs(0..60, 1);
    produce(&s.bootstrap, &s.input, &records);
    // id-000021 (key k0) bumps k0's count in the store, then fails: under Skip its write is
    // rolled back, so k0's later counts are those of a run without it.
    let mut service = s.spawn(&[
        "--error-policy",
        "skip",
        "--poison",
        "id-000021",
        "--poison-after-write",
    ]);
    let good: Vec<Input> = records
        .iter()
        .filter(|r| r.id != "id-000021")
        .cloned()
        .collect();
    s.assert_outputs(&service, &good).await;
    // And recovery agrees: a restart replays nothing new, a replay of the skip rolls back too.
    service.kill_hard().await.expect("kill -9");
    std::fs::remove_dir_all(s.state_dir.path().join(&s.app)).expect("wipe the state dir");
    let more = inputs(60..80, 1);
    produce(&s.bootstrap, &s.input, &more);
    service.restart().expect("restart");
    let all: Vec<Input> = good.iter().chain(more.iter()).cloned().collect();
    s.assert_outputs(&service, &all).await;
    stop_cleanly(&mut service).await;
}

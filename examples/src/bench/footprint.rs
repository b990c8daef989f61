//! The partition scaling curve: throughput, threads and resident memory of an app process with
//! 1, 8, 32 and 128 partitions (one transactional producer and one worker thread per
//! partition), on the same number of records.
//!
//! Each measurement is a separate process (the benchmark binary's hidden `footprint-child`
//! command), so nothing else of the benchmark is counted: it runs the counting app on a topic
//! until it has processed the records there and every partition is live, then reports its
//! `/proc/self/status` and shuts down gracefully.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use exactly::AppConfig;
use exactly_tests::process::{ChildProcess, ProcessSpec};

use super::engine::{blocking_with, RunningApp};
use super::workload::CountProcessor;

/// The line the child prints, parsed by the parent.
const REPORT: &str = "FOOTPRINT";

/// Threads and memory of a process with `partitions` assigned partitions.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    /// Assigned partitions.
    pub partitions: i32,
    /// Threads of the process.
    pub threads: u64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
    /// Records per second from the first record processed to the last.
    pub records_per_s: f64,
    /// From the app's start to its first processed record (assignment, one
    /// `init_transactions` and recovery per partition).
    pub first_record_ms: u64,
}

/// The child's side: runs the app on `topic` until `records` are processed and all
/// `partitions` are live, prints the report line, and stops.
pub async fn child(
    bootstrap: &str,
    app_id: &str,
    topic: &str,
    output: &str,
    partitions: i32,
    records: u64,
) -> anyhow::Result<()> {
    let app = RunningApp::start(
        AppConfig::new(app_id, bootstrap).input_topic(topic),
        CountProcessor {
            output_topic: output.to_owned(),
        },
    )?;
    let (first_record, all_processed) = blocking_with(&app, |app| {
        let first =
            app.wait_for_metrics("a first record processed", Duration::from_secs(180), |m| {
                m.records_processed > 0
            })?;
        let all = app.wait_for_metrics(
            "all records processed on all partitions",
            Duration::from_secs(300),
            |m| {
                m.records_processed >= records
                    && m.partitions_assigned == partitions as u64
                    && m.transactions_committed >= partitions as u64
            },
        )?;
        Ok::<_, anyhow::Error>((first, all))
    })
    .await?;
    let processing = all_processed
        .saturating_sub(first_record)
        .as_secs_f64()
        .max(1e-3);
    let records_per_s = records as f64 / processing;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let threads = status_field(&status, "Threads:")?;
    let rss_kib = status_field(&status, "VmRSS:")?;
    println!(
        "{REPORT} partitions={partitions} threads={threads} rss_kib={rss_kib} records_per_s={records_per_s:.0} first_record_ms={}",
        first_record.as_millis()
    );
    app.stop().await?;
    Ok(())
}

/// One footprint measurement to make.
#[derive(Debug, Clone)]
pub struct FootprintCase<'a> {
    /// The benchmark binary (run with `footprint-child`).
    pub bench_exe: &'a Path,
    /// Bootstrap servers.
    pub bootstrap: &'a str,
    /// The measured app's id.
    pub app_id: &'a str,
    /// Its input topic, with `partitions` partitions holding `records` records.
    pub topic: &'a str,
    /// Its output topic.
    pub output: &'a str,
    /// Partitions of `topic` (all assigned to the one process).
    pub partitions: i32,
    /// Records in `topic`.
    pub records: u64,
    /// Where the child's log goes.
    pub log_dir: &'a Path,
}

/// The parent's side: runs the benchmark binary's `footprint-child` command for `case` and
/// returns what it reported.
pub async fn measure(case: &FootprintCase<'_>) -> anyhow::Result<Footprint> {
    let FootprintCase {
        bench_exe,
        bootstrap,
        app_id,
        topic,
        output,
        partitions,
        records,
        log_dir,
    } = *case;
    let spec = ProcessSpec::new(bench_exe)
        .arg("footprint-child")
        .args(["--brokers", bootstrap, "--app-id", app_id, "--topic", topic])
        .args(["--output", output])
        .args(["--partitions", &partitions.to_string()])
        .args(["--records", &records.to_string()])
        .env("RUST_LOG", "warn")
        .log_file(log_dir.join(format!("footprint-{partitions}.log")));
    let mut child = ChildProcess::spawn(format!("footprint-{partitions}"), spec)
        .context("starting the footprint child")?;
    let line = child
        .wait_for_log(REPORT, Duration::from_secs(540))
        .await
        .map_err(|e| anyhow!("{e}; its log ends with:\n{}", child.log_tail(20)))?;
    // It stops by itself after reporting (a graceful shutdown: commit, final snapshots).
    let status = child
        .wait_exit(Duration::from_secs(120))
        .await
        .context("waiting for the footprint child to stop")?;
    if !status.success() {
        bail!(
            "the footprint child exited with {status}; its log ends with:\n{}",
            child.log_tail(20)
        );
    }
    let field = |name: &str| -> anyhow::Result<u64> {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in the footprint child's line {line:?}"))
    };
    Ok(Footprint {
        partitions,
        threads: field("threads=")?,
        rss_kib: field("rss_kib=")?,
        records_per_s: field("records_per_s=")? as f64,
        first_record_ms: field("first_record_ms=")?,
    })
}

/// The number in a `/proc/self/status` line such as `VmRSS:   12345 kB`.
fn status_field(status: &str, name: &str) -> anyhow::Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no {name} in /proc/self/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_status_fields() {
        let status = "Name:\tbench\nThreads:\t17\nVmRSS:\t   52344 kB\n";
        assert_eq!(status_field(status, "Threads:").unwrap(), 17);
        assert_eq!(status_field(status, "VmRSS:").unwrap(), 52344);
        assert!(status_field(status, "VmSwap:").is_err());
    }
}

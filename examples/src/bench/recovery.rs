//! Restore time: a partition with a large state is stopped and started again, once with full
//! snapshots (restore = load the latest full snapshot, replay what followed it) and once
//! without (restore = replay the partition from its first record).

use std::time::Duration;

use exactly::AppConfig;

use super::engine::{blocking_with, run_to_end, RunningApp};
use super::workload::CountProcessor;

/// What one restore measured.
#[derive(Debug, Clone)]
pub struct RestoreRun {
    /// How long building the state took (processing the whole input once).
    pub build: Duration,
    /// The restore itself, as the framework measures it (from the start of recovery until
    /// the partition is live).
    pub restore: Duration,
    /// From the restarted app's start (group join included) until the partition was live.
    pub live_after_start: Duration,
    /// Input records the restore replayed.
    pub replayed: u64,
    /// Size of the full snapshot written at shutdown (0 without full snapshots).
    pub snapshot_bytes: u64,
    /// Mean time to write one full snapshot, serialization included (zero without).
    pub snapshot_write: Duration,
}

/// Builds the state of `app_id` from the 1-partition topic `input` (`records` records, all
/// keys distinct), stops the app gracefully, starts it again and measures the restore.
pub async fn measure_restore(
    bootstrap: &str,
    input: &str,
    output: &str,
    records: u64,
    app_id: &str,
    full_snapshots: bool,
    limit: Duration,
) -> anyhow::Result<RestoreRun> {
    let config = || {
        AppConfig::new(app_id, bootstrap)
            .input_topic(input)
            .full_snapshots(full_snapshots)
    };
    let processor = || CountProcessor {
        output_topic: output.to_owned(),
    };
    let built = run_to_end(config(), processor(), bootstrap, input, 1, records, limit).await?;
    let snapshots = built.metrics.full_snapshots_written;
    let snapshot_write = if snapshots == 0 {
        Duration::ZERO
    } else {
        built.metrics.full_snapshot_time_total / snapshots as u32
    };

    let restarted = RunningApp::start(config(), processor())?;
    let live_after_start = blocking_with(&restarted, |app| {
        app.wait_for_metrics("the partition's recovery", limit, |m| m.recoveries >= 1)
    })
    .await?;
    let metrics = restarted.stop().await?;
    Ok(RestoreRun {
        build: built.elapsed,
        restore: metrics.last_recovery_time,
        live_after_start,
        replayed: metrics.last_recovery_replayed_records,
        snapshot_bytes: built.metrics.last_full_snapshot_bytes,
        snapshot_write,
    })
}

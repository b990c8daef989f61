//! Counters of a running application, readable at any time through a cheap, cloneable handle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod exporter;
mod latency;
mod partition;

pub(crate) use exporter::MetricsEndpoint;
pub(crate) use partition::{AbortCause, PartitionMetrics};

/// Live counters of an application (all partitions of this instance together).
///
/// Cloning is cheap and every clone sees the same counters. The runtime updates them;
/// read them with [`snapshot`](Self::snapshot).
///
/// ```no_run
/// # async fn example(app: exactly::App<impl exactly::Processor>) {
/// let metrics = app.metrics();
/// // ... later, e.g. from a health endpoint:
/// let m = metrics.snapshot();
/// println!("{} records, {} transactions", m.records_processed, m.transactions_committed);
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Counters>,
    /// Per-partition series and histograms (the Prometheus endpoint's).
    families: Arc<partition::Families>,
}

#[derive(Debug, Default)]
struct Counters {
    records_processed: AtomicU64,
    records_skipped: AtomicU64,
    records_dead_lettered: AtomicU64,
    timers_fired: AtomicU64,
    wall_clock_ticks: AtomicU64,
    record_errors: AtomicU64,
    output_records: AtomicU64,
    transactions_committed: AtomicU64,
    transactions_aborted: AtomicU64,
    full_snapshots_written: AtomicU64,
    full_snapshot_bytes_total: AtomicU64,
    last_full_snapshot_bytes: AtomicU64,
    full_snapshot_nanos_total: AtomicU64,
    snapshot_trims: AtomicU64,
    snapshot_trim_failures: AtomicU64,
    recoveries: AtomicU64,
    recoveries_from_full_snapshot: AtomicU64,
    fresh_starts: AtomicU64,
    replayed_records_total: AtomicU64,
    last_recovery_replayed_records: AtomicU64,
    max_recovery_replayed_records: AtomicU64,
    recovery_nanos_total: AtomicU64,
    last_recovery_nanos: AtomicU64,
    max_recovery_nanos: AtomicU64,
    partitions_assigned: AtomicU64,
    partition_assignments_total: AtomicU64,
    partitions_fenced: AtomicU64,
    partitions_failed: AtomicU64,
    max_buffered_bytes: AtomicU64,
    stuck_input_partitions: AtomicU64,
    commit_latency: latency::LatencyHistogram,
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Input records processed live (not counting replays), including skipped and
    /// dead-lettered ones.
    pub records_processed: u64,
    /// Records dropped under [`ErrorPolicy::Skip`](crate::ErrorPolicy::Skip).
    pub records_skipped: u64,
    /// Records written to the dead-letter topic.
    pub records_dead_lettered: u64,
    /// Stream-time timers fired live (not counting replays; see [`Timers`](crate::Timers)).
    pub timers_fired: u64,
    /// Wall-clock ticks fired live (see
    /// [`Processor::on_wall_clock`](crate::Processor::on_wall_clock)).
    pub wall_clock_ticks: u64,
    /// Records that failed to decode or to process, under any policy.
    pub record_errors: u64,
    /// Records produced to output topics (dead letters excluded).
    pub output_records: u64,
    /// Committed transactions.
    pub transactions_committed: u64,
    /// Aborted transactions.
    pub transactions_aborted: u64,
    /// Full snapshots written (committed).
    pub full_snapshots_written: u64,
    /// Bytes of serialized state written in full snapshots, in total.
    pub full_snapshot_bytes_total: u64,
    /// Bytes of serialized state of the latest full snapshot.
    pub last_full_snapshot_bytes: u64,
    /// Time spent writing full snapshots (serialization included), in total.
    pub full_snapshot_time_total: Duration,
    /// Snapshot partitions trimmed: records below a committed full snapshot deleted
    /// (see [`AppConfig::snapshot_trimming`](crate::AppConfig::snapshot_trimming)).
    pub snapshot_trims: u64,
    /// Trims that failed (each logged with its cause; the next full snapshot trims again).
    pub snapshot_trim_failures: u64,
    /// Partition recoveries finished (state rebuilt from the snapshot topic).
    pub recoveries: u64,
    /// Recoveries that started from a full snapshot (the rest started from the empty state).
    pub recoveries_from_full_snapshot: u64,
    /// Partitions started with nothing to recover (no snapshot yet): not counted in
    /// `recoveries`.
    pub fresh_starts: u64,
    /// Input records replayed by recoveries, in total.
    pub replayed_records_total: u64,
    /// Records replayed by the latest recovery.
    pub last_recovery_replayed_records: u64,
    /// Most records replayed by one recovery.
    pub max_recovery_replayed_records: u64,
    /// Time spent in recoveries, in total.
    pub recovery_time_total: Duration,
    /// Duration of the latest recovery.
    pub last_recovery_time: Duration,
    /// Longest recovery.
    pub max_recovery_time: Duration,
    /// Partitions currently assigned to this instance.
    pub partitions_assigned: u64,
    /// Partition assignments since start (a measure of rebalancing).
    pub partition_assignments_total: u64,
    /// Partitions dropped because another instance fenced this one's producer.
    pub partitions_fenced: u64,
    /// Partitions stopped by an error (e.g. [`ErrorPolicy::Fail`](crate::ErrorPolicy::Fail)).
    pub partitions_failed: u64,
    /// Most bytes of input one partition had buffered between the consumer and its worker
    /// (polled, not yet processed); bounded by
    /// [`AppConfig::max_buffered_bytes`](crate::AppConfig::max_buffered_bytes) plus the
    /// records the consumer had fetched before the partition paused.
    pub max_buffered_bytes: u64,
    /// Input partitions whose last stable offset has stood below their high watermark for
    /// longer than [`AppConfig::stuck_input_after`](crate::AppConfig::stuck_input_after): a
    /// transaction left open upstream (each one is logged with how to resolve it).
    pub stuck_input_partitions: u64,
    /// The whole commit path of the transactions committed so far, median: fingerprint,
    /// incremental record, flush, offsets, commit, local store write (within about 4%).
    pub commit_latency_p50: Duration,
    /// The same, 99th percentile.
    pub commit_latency_p99: Duration,
    /// The same, longest.
    pub commit_latency_max: Duration,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Metrics {
    /// Fresh counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A consistent-enough copy of every counter (each read is atomic; the set is not).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let c = &*self.inner;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MetricsSnapshot {
            records_processed: get(&c.records_processed),
            records_skipped: get(&c.records_skipped),
            records_dead_lettered: get(&c.records_dead_lettered),
            timers_fired: get(&c.timers_fired),
            wall_clock_ticks: get(&c.wall_clock_ticks),
            record_errors: get(&c.record_errors),
            output_records: get(&c.output_records),
            transactions_committed: get(&c.transactions_committed),
            transactions_aborted: get(&c.transactions_aborted),
            full_snapshots_written: get(&c.full_snapshots_written),
            full_snapshot_bytes_total: get(&c.full_snapshot_bytes_total),
            last_full_snapshot_bytes: get(&c.last_full_snapshot_bytes),
            full_snapshot_time_total: Duration::from_nanos(get(&c.full_snapshot_nanos_total)),
            snapshot_trims: get(&c.snapshot_trims),
            snapshot_trim_failures: get(&c.snapshot_trim_failures),
            recoveries: get(&c.recoveries),
            recoveries_from_full_snapshot: get(&c.recoveries_from_full_snapshot),
            fresh_starts: get(&c.fresh_starts),
            replayed_records_total: get(&c.replayed_records_total),
            last_recovery_replayed_records: get(&c.last_recovery_replayed_records),
            max_recovery_replayed_records: get(&c.max_recovery_replayed_records),
            recovery_time_total: Duration::from_nanos(get(&c.recovery_nanos_total)),
            last_recovery_time: Duration::from_nanos(get(&c.last_recovery_nanos)),
            max_recovery_time: Duration::from_nanos(get(&c.max_recovery_nanos)),
            partitions_assigned: get(&c.partitions_assigned),
            partition_assignments_total: get(&c.partition_assignments_total),
            partitions_fenced: get(&c.partitions_fenced),
            partitions_failed: get(&c.partitions_failed),
            max_buffered_bytes: get(&c.max_buffered_bytes),
            stuck_input_partitions: get(&c.stuck_input_partitions),
            commit_latency_p50: c.commit_latency.quantile(0.5),
            commit_latency_p99: c.commit_latency.quantile(0.99),
            commit_latency_max: c.commit_latency.max(),
        }
    }

    /// A partition has `bytes` of input buffered for its worker now.
    pub(crate) fn buffered_bytes(&self, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        let max = &self.inner.max_buffered_bytes;
        // Called for every polled record: a read, and a locked update only for a new maximum.
        if bytes > max.load(Ordering::Relaxed) {
            max.fetch_max(bytes, Ordering::Relaxed);
        }
    }

    /// `n` input records were processed live.
    pub(crate) fn records_processed(&self, n: u64) {
        self.inner.records_processed.fetch_add(n, Ordering::Relaxed);
    }
    /// A failed record was skipped.
    pub(crate) fn records_skipped(&self) {
        self.inner.records_skipped.fetch_add(1, Ordering::Relaxed);
    }
    /// A failed record was written to the dead-letter topic.
    pub(crate) fn records_dead_lettered(&self) {
        self.inner
            .records_dead_lettered
            .fetch_add(1, Ordering::Relaxed);
    }
    /// Stream-time timers fired after a record.
    pub(crate) fn timers_fired(&self, fired: u64) {
        if fired > 0 {
            self.inner.timers_fired.fetch_add(fired, Ordering::Relaxed);
        }
    }
    /// A wall-clock tick fired.
    pub(crate) fn wall_clock_tick(&self) {
        self.inner.wall_clock_ticks.fetch_add(1, Ordering::Relaxed);
    }
    /// A record failed to decode or to process.
    pub(crate) fn record_error(&self) {
        self.inner.record_errors.fetch_add(1, Ordering::Relaxed);
    }
    /// `n` records were produced to output topics.
    pub(crate) fn output_records(&self, n: u64) {
        self.inner.output_records.fetch_add(n, Ordering::Relaxed);
    }
    /// A transaction committed; its commit path took `took`.
    pub(crate) fn transaction_committed(&self, took: Duration) {
        self.inner
            .transactions_committed
            .fetch_add(1, Ordering::Relaxed);
        self.inner.commit_latency.record(took);
    }
    /// A transaction was aborted.
    pub(crate) fn transaction_aborted(&self, cause: AbortCause) {
        self.inner
            .transactions_aborted
            .fetch_add(1, Ordering::Relaxed);
        self.families.aborted(cause);
    }
    /// A full snapshot of `bytes` serialized bytes committed; writing it took `took`.
    pub(crate) fn full_snapshot_written(&self, bytes: u64, took: Duration) {
        let c = &*self.inner;
        c.full_snapshots_written.fetch_add(1, Ordering::Relaxed);
        c.full_snapshot_bytes_total
            .fetch_add(bytes, Ordering::Relaxed);
        c.last_full_snapshot_bytes.store(bytes, Ordering::Relaxed);
        c.full_snapshot_nanos_total
            .fetch_add(nanos(took), Ordering::Relaxed);
    }
    /// Records below a committed full snapshot deleted from a snapshot partition.
    pub(crate) fn snapshot_trimmed(&self) {
        self.inner.snapshot_trims.fetch_add(1, Ordering::Relaxed);
    }
    /// A snapshot partition could not be trimmed (logged with the cause).
    pub(crate) fn snapshot_trim_failed(&self) {
        self.inner
            .snapshot_trim_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    /// Input partitions currently stuck behind an open transaction.
    pub(crate) fn stuck_input_partitions(&self, n: u64) {
        self.inner
            .stuck_input_partitions
            .store(n, Ordering::Relaxed);
    }
    /// A partition started with no snapshot to recover from.
    pub(crate) fn fresh_start(&self) {
        self.inner.fresh_starts.fetch_add(1, Ordering::Relaxed);
    }
    /// A partition recovery finished after `took`, replaying `replayed_records` input
    /// records, starting from a full snapshot or not.
    pub(crate) fn recovery_finished(
        &self,
        took: Duration,
        replayed_records: u64,
        from_full_snapshot: bool,
    ) {
        let c = &*self.inner;
        c.recoveries.fetch_add(1, Ordering::Relaxed);
        if from_full_snapshot {
            c.recoveries_from_full_snapshot
                .fetch_add(1, Ordering::Relaxed);
        }
        c.replayed_records_total
            .fetch_add(replayed_records, Ordering::Relaxed);
        c.last_recovery_replayed_records
            .store(replayed_records, Ordering::Relaxed);
        c.max_recovery_replayed_records
            .fetch_max(replayed_records, Ordering::Relaxed);
        c.recovery_nanos_total
            .fetch_add(nanos(took), Ordering::Relaxed);
        c.last_recovery_nanos.store(nanos(took), Ordering::Relaxed);
        c.max_recovery_nanos
            .fetch_max(nanos(took), Ordering::Relaxed);
    }
    /// A partition was assigned to this instance.
    pub(crate) fn partition_assigned(&self) {
        self.inner
            .partitions_assigned
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .partition_assignments_total
            .fetch_add(1, Ordering::Relaxed);
    }
    /// The series of `topic`/`partition`, assigned here now.
    pub(crate) fn partition(&self, topic: &str, partition: i32) -> PartitionMetrics {
        PartitionMetrics::new(Arc::clone(&self.families), topic, partition)
    }
    /// The app's metrics in the OpenMetrics text format (what the endpoint serves).
    #[cfg(test)]
    pub(crate) fn openmetrics_text(&self) -> String {
        exporter::encode(self).unwrap_or_default()
    }
    /// Drops the series of a partition no longer assigned here.
    pub(crate) fn forget_partition(&self, topic: &str, partition: i32) {
        self.families.forget(topic, partition);
    }
    /// A partition was revoked from / released by this instance: its series go.
    pub(crate) fn partition_revoked(&self, topic: &str, partition: i32) {
        self.forget_partition(topic, partition);
        // Saturating: a revoke without a matching assign must not wrap to u64::MAX.
        let _ = self.inner.partitions_assigned.fetch_update(
            Ordering::Relaxed,
            Ordering::Relaxed,
            |n| Some(n.saturating_sub(1)),
        );
    }
    /// A partition was dropped because this instance was fenced.
    pub(crate) fn partition_fenced(&self) {
        self.inner.partitions_fenced.fetch_add(1, Ordering::Relaxed);
    }
    /// A partition stopped with an error.
    pub(crate) fn partition_failed(&self) {
        self.inner.partitions_failed.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_counters() {
        let m = Metrics::new();
        let m2 = m.clone();
        m.records_processed(5);
        m2.records_processed(2);
        m.transaction_committed(Duration::from_millis(5));
        m.transaction_aborted(AbortCause::Error);
        m.records_skipped();
        m.records_dead_lettered();
        m.record_error();
        m.output_records(9);
        m.partition_fenced();
        m.partition_failed();
        let s = m2.snapshot();
        assert_eq!(s.records_processed, 7);
        assert_eq!(s.transactions_committed, 1);
        assert_eq!(s.transactions_aborted, 1);
        assert_eq!(s.records_skipped, 1);
        assert_eq!(s.records_dead_lettered, 1);
        assert_eq!(s.record_errors, 1);
        assert_eq!(s.output_records, 9);
        assert_eq!(s.partitions_fenced, 1);
        assert_eq!(s.partitions_failed, 1);
    }

    #[test]
    fn snapshot_and_recovery_aggregates() {
        let m = Metrics::new();
        m.full_snapshot_written(100, Duration::from_millis(3));
        m.full_snapshot_written(40, Duration::from_millis(1));
        m.recovery_finished(Duration::from_millis(50), 10, true);
        m.recovery_finished(Duration::from_millis(20), 30, false);
        m.fresh_start();
        let s = m.snapshot();
        assert_eq!(s.fresh_starts, 1);
        assert_eq!(s.full_snapshots_written, 2);
        assert_eq!(s.full_snapshot_bytes_total, 140);
        assert_eq!(s.last_full_snapshot_bytes, 40);
        assert_eq!(s.full_snapshot_time_total, Duration::from_millis(4));
        assert_eq!(s.recoveries, 2);
        assert_eq!(s.recoveries_from_full_snapshot, 1);
        assert_eq!(s.replayed_records_total, 40);
        assert_eq!(s.last_recovery_replayed_records, 30);
        assert_eq!(s.max_recovery_replayed_records, 30);
        assert_eq!(s.recovery_time_total, Duration::from_millis(70));
        assert_eq!(s.last_recovery_time, Duration::from_millis(20));
        assert_eq!(s.max_recovery_time, Duration::from_millis(50));
    }

    #[test]
    fn partition_gauge_never_wraps() {
        let m = Metrics::new();
        m.partition_assigned();
        m.partition_assigned();
        m.partition_revoked("t", 0);
        m.partition_revoked("t", 1);
        m.partition_revoked("t", 1);
        let s = m.snapshot();
        assert_eq!(s.partitions_assigned, 0);
        assert_eq!(s.partition_assignments_total, 2);
    }

    #[test]
    fn the_endpoint_text_has_per_partition_series_until_revoked() {
        let m = Metrics::new();
        let p = m.partition("in", 3);
        p.record_processed();
        p.record_processed();
        p.committed_position(40);
        p.input_end(100);
        p.transaction_committed(Duration::from_millis(7));
        m.transaction_aborted(AbortCause::FailedCommit);
        m.records_processed(2);
        let text = m.openmetrics_text();
        for line in [
            r#"exactly_partition_records_total{topic="in",partition="3"} 2"#,
            r#"exactly_partition_lag_records{topic="in",partition="3"} 60"#,
            r#"exactly_partition_assigned{topic="in",partition="3"} 1"#,
            r#"exactly_transactions_aborted_by_cause_total{cause="failed_commit"} 1"#,
            "exactly_transaction_commit_seconds_count 1",
            "exactly_records_processed_total 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        m.partition_revoked("in", 3);
        let text = m.openmetrics_text();
        assert!(!text.contains(r#"partition="3""#), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

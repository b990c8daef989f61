//! Per-partition series and latency histograms, for the Prometheus endpoint: what a dashboard
//! of an exactly-once service needs beyond the app-wide counters (lag, throughput, recovery
//! progress per partition; commit and snapshot latencies).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PartitionLabels {
    pub(super) topic: String,
    pub(super) partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StepLabels {
    pub(super) topic: String,
    pub(super) partition: i32,
    /// `fetch_full_snapshot` (unit: chunks) or `replay` (unit: offsets).
    pub(super) step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CauseLabels {
    pub(super) cause: String,
}

/// Why a transaction was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbortCause {
    /// A record failed (or the worker stopped with an error) while the transaction was open.
    Error,
    /// A produce, flush, offsets or commit call failed; the state is rebuilt by recovery.
    FailedCommit,
    /// A librdkafka call did not return in time; the producer was given up.
    HungCall,
    /// The transaction outlived `transaction.timeout.ms` and the coordinator aborted it.
    CoordinatorTimeout,
}

impl AbortCause {
    fn label(self) -> &'static str {
        match self {
            AbortCause::Error => "error",
            AbortCause::FailedCommit => "failed_commit",
            AbortCause::HungCall => "hung_call",
            AbortCause::CoordinatorTimeout => "coordinator_timeout",
        }
    }
}

/// The families behind the per-partition handles; registered by the exporter.
#[derive(Debug)]
pub(super) struct Families {
    pub(super) records: Family<PartitionLabels, Counter>,
    pub(super) assigned: Family<PartitionLabels, Gauge>,
    pub(super) next_offset: Family<PartitionLabels, Gauge>,
    pub(super) input_end: Family<PartitionLabels, Gauge>,
    pub(super) lag: Family<PartitionLabels, Gauge>,
    pub(super) recovering: Family<PartitionLabels, Gauge>,
    pub(super) recovery_done: Family<StepLabels, Gauge>,
    pub(super) recovery_total: Family<StepLabels, Gauge>,
    pub(super) recovery_eta: Family<PartitionLabels, Gauge>,
    pub(super) snapshot_bytes_loaded: Family<PartitionLabels, Gauge>,
    pub(super) full_snapshot_bytes: Family<PartitionLabels, Gauge>,
    pub(super) aborts: Family<CauseLabels, Counter>,
    pub(super) commit_seconds: Histogram,
    pub(super) full_snapshot_seconds: Histogram,
}

impl Default for Families {
    fn default() -> Self {
        Families {
            records: Family::default(),
            assigned: Family::default(),
            next_offset: Family::default(),
            input_end: Family::default(),
            lag: Family::default(),
            recovering: Family::default(),
            recovery_done: Family::default(),
            recovery_total: Family::default(),
            recovery_eta: Family::default(),
            snapshot_bytes_loaded: Family::default(),
            full_snapshot_bytes: Family::default(),
            aborts: Family::default(),
            // 2 ms .. 8 s: a healthy commit on a local broker takes a few ms, a loaded one
            // hundreds; seconds mean trouble.
            commit_seconds: Histogram::new(exponential_buckets(0.002, 2.0, 13)),
            // 5 ms .. 80 s.
            full_snapshot_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
        }
    }
}

impl Families {
    pub(super) fn aborted(&self, cause: AbortCause) {
        self.aborts
            .get_or_create(&CauseLabels {
                cause: cause.label().to_owned(),
            })
            .inc();
    }

    /// Drops every series of a partition no longer assigned here.
    pub(super) fn forget(&self, topic: &str, partition: i32) {
        let labels = PartitionLabels {
            topic: topic.to_owned(),
            partition,
        };
        for family in [
            &self.assigned,
            &self.next_offset,
            &self.input_end,
            &self.lag,
            &self.recovering,
            &self.recovery_eta,
            &self.snapshot_bytes_loaded,
            &self.full_snapshot_bytes,
        ] {
            family.remove(&labels);
        }
        self.records.remove(&labels);
        self.forget_steps(topic, partition);
    }

    fn forget_steps(&self, topic: &str, partition: i32) {
        for step in [STEP_FETCH, STEP_REPLAY] {
            let labels = StepLabels {
                topic: topic.to_owned(),
                partition,
                step: step.to_owned(),
            };
            self.recovery_done.remove(&labels);
            self.recovery_total.remove(&labels);
        }
    }
}

const STEP_FETCH: &str = "fetch_full_snapshot";
const STEP_REPLAY: &str = "replay";

/// The series of one assigned partition, held by its worker (and its consumer slot).
/// Every update is an atomic store or add.
#[derive(Debug, Clone)]
pub(crate) struct PartitionMetrics {
    families: Arc<Families>,
    topic: String,
    partition: i32,
    records: Counter,
    next_offset: Gauge,
    input_end: Gauge,
    lag: Gauge,
    recovering: Gauge,
    recovery_eta: Gauge,
    snapshot_bytes_loaded: Gauge,
    full_snapshot_bytes: Gauge,
}

impl PartitionMetrics {
    pub(super) fn new(families: Arc<Families>, topic: &str, partition: i32) -> Self {
        let labels = PartitionLabels {
            topic: topic.to_owned(),
            partition,
        };
        families.assigned.get_or_create(&labels).set(1);
        let gauge = |family: &Family<PartitionLabels, Gauge>| family.get_or_create(&labels).clone();
        let records = families.records.get_or_create(&labels).clone();
        PartitionMetrics {
            records,
            next_offset: gauge(&families.next_offset),
            input_end: gauge(&families.input_end),
            lag: gauge(&families.lag),
            recovering: gauge(&families.recovering),
            recovery_eta: gauge(&families.recovery_eta),
            snapshot_bytes_loaded: gauge(&families.snapshot_bytes_loaded),
            full_snapshot_bytes: gauge(&families.full_snapshot_bytes),
            topic: topic.to_owned(),
            partition,
            families,
        }
    }

    /// An input record was processed live.
    pub(crate) fn record_processed(&self) {
        self.records.inc();
    }

    /// The next offset to process, as of the last commit.
    pub(crate) fn committed_position(&self, next_offset: i64) {
        self.next_offset.set(next_offset);
        self.update_lag();
    }

    /// The input partition's end as the consumer last saw it.
    pub(crate) fn input_end(&self, end: i64) {
        self.input_end.set(end);
        self.update_lag();
    }

    fn update_lag(&self) {
        let end = self.input_end.get();
        if end > 0 {
            self.lag.set((end - self.next_offset.get()).max(0));
        }
    }

    /// A transaction committed after `took` (commit latency: flush, offsets, commit).
    pub(crate) fn transaction_committed(&self, took: Duration) {
        self.families.commit_seconds.observe(took.as_secs_f64());
    }

    /// A full snapshot of `bytes` committed; writing it took `took`.
    pub(crate) fn full_snapshot_written(&self, bytes: u64, took: Duration) {
        self.full_snapshot_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.families
            .full_snapshot_seconds
            .observe(took.as_secs_f64());
    }

    /// Recovery of this partition starts (`true`) or ended (`false`).
    pub(crate) fn recovering(&self, on: bool) {
        self.recovering.set(i64::from(on));
        if on {
            self.snapshot_bytes_loaded.set(0);
        } else {
            self.recovery_eta.set(0);
            self.families.forget_steps(&self.topic, self.partition);
        }
    }

    /// Progress of a recovery step: `done` of `total` chunks (fetching the full snapshot) or
    /// offsets (replaying), and the estimated seconds left.
    pub(crate) fn recovery_progress(&self, fetching: bool, done: u64, total: u64, eta_s: u64) {
        let labels = StepLabels {
            topic: self.topic.clone(),
            partition: self.partition,
            step: if fetching { STEP_FETCH } else { STEP_REPLAY }.to_owned(),
        };
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.families
            .recovery_done
            .get_or_create(&labels)
            .set(clamp(done));
        self.families
            .recovery_total
            .get_or_create(&labels)
            .set(clamp(total));
        self.recovery_eta.set(clamp(eta_s));
    }

    /// Bytes of the full snapshot fetched so far by the running recovery.
    pub(crate) fn snapshot_bytes_loaded(&self, bytes: u64) {
        self.snapshot_bytes_loaded
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

//! One input partition's worker: a dedicated OS thread owning the partition's transactional
//! producer (`transactional.id = <app>.<topic>.<partition>`), its state, and the transaction
//! loop.
//!
//! Life of a worker:
//! 1. create the producer and `init_transactions` — this fences any previous owner (a zombie)
//!    and aborts its open transaction *before* any state is read;
//! 2. recover the state (see [`crate::recovery`]);
//! 3. ask the consumer thread to seek the partition to offsetEND and resume it, tagging the
//!    request with a new *seek epoch*; records forwarded under an older epoch are discarded;
//! 4. batch records into transactions (outputs + snapshot records + consumer offsets) until
//!    told to stop.
//!
//! After an aborted transaction the in-memory state is ahead of what committed, so the worker
//! goes back to step 2 (never continues from it); after a fatal producer error back to step 1;
//! when fenced it drops everything and exits quietly.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, PurgeConfig};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::AppConfig;
use crate::error::Error;
use crate::metrics::{AbortCause, Metrics, PartitionMetrics};
use crate::processor::{panic_message, Output, OutputRecord, Processor, RawRecord};
use crate::proto::{FullSnapshotRef, IncrementalSnapshot, WallClockTick};
use crate::recovery::{recover, Recovered, RecoveryCost, RecoveryTarget, READ_STALL_TIMEOUT};
use crate::security::authorization_code;
use crate::snapshot::connect::connect_to_a_named_broker;
use crate::snapshot::fingerprint::Cadence;
use crate::snapshot::store::{
    destroy_in_background, flush_promptly, send_blocking, write_incremental, PartitionReader,
    TxnProducer, TxnProducerContext,
};
use crate::snapshot::trim::Trimmer;
use crate::snapshot::OutputDigest;
use crate::state::{Committed, LocalState, StoreSet};

mod full_snapshot;
mod inputs;
mod offsets;
mod steps;

use inputs::Interleave;
pub(crate) use inputs::TICK_SOURCE;
use offsets::GroupOffsets;

use full_snapshot::{NewBase, Streaming};

/// A record forwarded by the consumer thread, tagged with the seek epoch it was fetched under.
pub(crate) struct Forwarded {
    pub(crate) epoch: u64,
    pub(crate) record: RawRecord,
}

impl Forwarded {
    /// The memory the record takes while buffered: key, value, headers and the struct.
    pub(crate) fn size(&self) -> usize {
        let record = &self.record;
        let field = |bytes: &Option<Vec<u8>>| bytes.as_ref().map_or(0, Vec::len);
        let headers: usize = record
            .headers
            .iter()
            .map(|(name, value)| name.len() + field(value))
            .sum();
        field(&record.key) + field(&record.value) + headers + std::mem::size_of::<Forwarded>()
    }
}

/// Requests from workers to the consumer thread (which alone may touch the group consumer).
pub(crate) enum ConsumerRequest {
    /// Seek the partition to `offset`, tag what follows with `epoch`, and resume it.
    Seek {
        topic: Arc<str>,
        partition: i32,
        offset: i64,
        epoch: u64,
    },
}

/// The consumer's group metadata, refreshed by the consumer thread after every rebalance and
/// periodically; a worker reads the current one for every commit.
#[derive(Default)]
pub(crate) struct GroupMetadataCell(std::sync::Mutex<Option<Arc<ConsumerGroupMetadata>>>);

impl GroupMetadataCell {
    /// Takes the consumer's current metadata.
    pub(crate) fn refresh<C: rdkafka::consumer::ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<C>,
    ) {
        if let Some(metadata) = rdkafka::consumer::Consumer::group_metadata(consumer) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(metadata));
        }
    }

    /// The latest metadata, if the consumer has any yet.
    pub(crate) fn current(&self) -> Option<Arc<ConsumerGroupMetadata>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How a worker ended.
#[derive(Debug)]
pub(crate) enum WorkerOutcome {
    /// Stopped on request after committing its in-flight batch.
    Finished,
    /// Another instance owns the partition now; nothing was retried.
    Fenced,
    /// The partition cannot continue (bad record under `Fail`, non-deterministic processor,
    /// retention gap, corrupt snapshot, ...). The app stops with this error.
    Failed(Error),
}

/// Everything a worker needs; built by the runtime on assignment.
pub(crate) struct PartitionWorker<P: Processor> {
    pub(crate) processor: Arc<P>,
    pub(crate) config: Arc<AppConfig>,
    pub(crate) metrics: Metrics,
    /// This partition's series (lag, throughput, recovery progress, latencies).
    pub(crate) partition_metrics: PartitionMetrics,
    /// The unit's first input topic: it names the transactional id, the snapshot topic and
    /// the local store.
    pub(crate) topic: Arc<str>,
    /// Every input topic of the unit, `topic` first: more than one when co-partitioned
    /// (DESIGN §8).
    pub(crate) inputs: Vec<Arc<str>>,
    pub(crate) partition: i32,
    pub(crate) snapshot_topic: String,
    pub(crate) transactional_id: String,
    pub(crate) group_metadata: Arc<GroupMetadataCell>,
    pub(crate) trimmer: Option<Arc<Trimmer>>,
    pub(crate) records: Receiver<Forwarded>,
    /// Bytes of the records in `records` not received yet (the consumer adds, the worker
    /// subtracts): they count against [`AppConfig::max_buffered_bytes`].
    pub(crate) records_bytes: Arc<AtomicUsize>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) requests: Sender<ConsumerRequest>,
    pub(crate) epoch: u64,
    /// Transactions committed so far (an abort streak ends with a commit).
    pub(crate) commits: std::cell::Cell<u64>,
    /// When the state is fingerprinted (per commit while cheap); kept across recoveries.
    pub(crate) fingerprints: std::cell::RefCell<Cadence>,
    /// The partition's local store directory (for states that hold stores).
    pub(crate) local: LocalState,
}

/// Aborts in a row without a commit in between, and the error behind the first of them.
#[derive(Default)]
struct AbortStreak {
    aborts: u32,
    first_error: Option<String>,
}

impl AbortStreak {
    /// Counts one more abort; `true` once `budget` aborts happened in a row.
    fn exhausted(&mut self, error: String, budget: u32) -> bool {
        self.aborts += 1;
        self.first_error.get_or_insert(error);
        self.aborts >= budget
    }
}

/// Whether `live` needs a new full snapshot: when stopping, after enough records, after enough
/// time, or when recovering from the current one would take too long (half of
/// [`AppConfig::max_recovery_time`]).
fn full_snapshot_due<S>(config: &AppConfig, live: &Live<S>, final_snapshot: bool) -> bool {
    // Wall-clock ticks count like records: recovery replays them too.
    let since_base = live.records_since_base + live.ticks_since_base;
    if !config.full_snapshots || since_base == 0 {
        return false;
    }
    let every = config.full_snapshot_every_records;
    let interval = config.full_snapshot_interval;
    final_snapshot
        || (every > 0 && since_base >= every)
        || (!interval.is_zero() && live.last_full_snapshot.elapsed() >= interval)
        || config
            .max_recovery_time
            .is_some_and(|bound| live.recovery_cost.total() >= bound / 2)
}

/// The in-memory side of a live partition.
struct Live<S> {
    state: S,
    /// The stores `state` holds.
    stores: StoreSet,
    /// The next offset of the unit's first input ...
    next_offset: i64,
    /// ... and of the others (co-partitioned units).
    others: Vec<i64>,
    /// The base's offsets of the other inputs.
    base_others: Vec<i64>,
    /// Records waiting per input, and the open transaction's interleaving (co-partitioned
    /// units).
    interleave: Option<Interleave>,
    /// Records in the open transaction.
    batch_records: usize,
    base: Option<FullSnapshotRef>,
    base_input_offset: i64,
    digest: OutputDigest,
    records_since_base: u64,
    transaction_seq: u64,
    last_full_snapshot: Instant,
    /// What recovering from the current base would cost now.
    recovery_cost: RecoveryCost,
    /// A full snapshot streaming out with the transactions (a state with stores).
    streaming: Option<Streaming>,
    /// The open transaction's outputs, produced when it commits (see [`PartitionWorker::send_unsent`]).
    unsent: Vec<OutputRecord>,
    /// The wall-clock ticks fired in the open transaction.
    ticks: Vec<WallClockTick>,
    /// Ticks fired since the base's state was taken.
    ticks_since_base: u64,
    /// When transactions also send the consumer group's offsets.
    group_offsets: GroupOffsets,
}

impl<S> Live<S> {
    /// The next offset of input `input`.
    fn next_of(&self, input: usize) -> i64 {
        match input {
            0 => self.next_offset,
            i => self.others.get(i - 1).copied().unwrap_or(0),
        }
    }

    fn set_next(&mut self, input: usize, offset: i64) {
        match input {
            0 => self.next_offset = offset,
            i => {
                if let Some(next) = self.others.get_mut(i - 1) {
                    *next = offset;
                }
            }
        }
    }

    /// The next offset of every input, the first's first.
    fn all_next(&self) -> Vec<i64> {
        std::iter::once(self.next_offset)
            .chain(self.others.iter().copied())
            .collect()
    }
}

impl<S> From<Recovered<S>> for Live<S> {
    fn from(r: Recovered<S>) -> Self {
        Live {
            state: r.state,
            stores: r.stores,
            next_offset: r.next_offset,
            others: r.others,
            base_others: r.base_others,
            interleave: None,
            batch_records: 0,
            base: r.base,
            base_input_offset: r.base_input_offset,
            digest: r.digest,
            records_since_base: r.records_since_base,
            transaction_seq: r.transaction_seq,
            last_full_snapshot: Instant::now(),
            recovery_cost: r.cost,
            streaming: None,
            unsent: Vec::new(),
            ticks: Vec::new(),
            ticks_since_base: r.ticks_since_base,
            group_offsets: GroupOffsets::new(Duration::ZERO, false),
        }
    }
}

/// What a transaction's incremental record counts from: its base (a new one when the
/// transaction completes a full snapshot), and what happened since.
struct Since {
    base: Option<FullSnapshotRef>,
    base_input_offset: i64,
    /// The base's offsets of the other inputs (co-partitioned units).
    base_others: Vec<i64>,
    digest: OutputDigest,
    records: u64,
    ticks: u64,
}

/// Why the live loop ended.
enum LiveExit {
    /// Stop requested; the in-flight batch committed.
    Stopped,
    /// The open transaction must be aborted; then recover.
    Abort(KafkaError),
    /// The producer is unusable; recreate it.
    FatalProducer(KafkaError),
    Fenced,
    /// The coordinator aborted the open transaction because it outlived the transaction
    /// timeout (and bumped the epoch): recreate the producer and recover at once.
    TimedOut {
        /// How long the transaction had been open.
        age: Duration,
    },
    /// A librdkafka call did not return within its bound: give this producer up (the call
    /// keeps its thread) and recover with a new one, which fences it.
    Hung {
        /// The librdkafka call.
        call: &'static str,
        /// How long the worker waited for it.
        waited: Duration,
    },
    /// Stop the partition (after aborting the open transaction).
    Failed(Error),
}

/// What an rdkafka transactional error means for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnErrorClass {
    Fenced,
    Fatal,
    Retriable,
    Abortable,
}

/// Error codes that mean a newer producer owns the transactional id.
fn is_fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionCoordinatorFenced
    )
}

fn classify(error: &KafkaError) -> TxnErrorClass {
    let fenced_code = is_fenced_code;
    match error {
        KafkaError::Transaction(e) if fenced_code(e.code()) => TxnErrorClass::Fenced,
        KafkaError::Transaction(e) if e.is_fatal() => TxnErrorClass::Fatal,
        KafkaError::Transaction(e) if e.txn_requires_abort() => TxnErrorClass::Abortable,
        KafkaError::Transaction(e) if e.is_retriable() => TxnErrorClass::Retriable,
        // Also `KafkaError::Flush` from commit_transaction: no transactional classification,
        // so the open transaction is abandoned (abort + recover) — DESIGN §5.
        other => match other.rdkafka_error_code() {
            Some(code) if fenced_code(code) => TxnErrorClass::Fenced,
            _ => TxnErrorClass::Abortable,
        },
    }
}

/// How often a worker without an open transaction checks its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Records processed between two servings of the producer's delivery reports.
const DELIVERY_REPORTS_EVERY: usize = 64;
/// Most records a worker takes from its channel before it looks at its clock and deadlines
/// again: about a millisecond of processing in the benchmark.
const RECEIVE_BURST: usize = 64;
/// How long recovery is retried while it fails for transient reasons (broker unreachable,
/// reads stalled) before the partition fails. Like Kafka Streams' `task.timeout.ms`.
const RECOVERY_RETRY_BUDGET: Duration = Duration::from_secs(300);
/// How long a worker whose transaction timed out waits for a revocation (see
/// [`PartitionWorker::rebalance_grace`]): a few heartbeats.
const TIMEOUT_REBALANCE_GRACE: Duration = Duration::from_secs(2);
/// Attempts of a retriable transactional call before the transaction is abandoned.
const RETRIES: u32 = 5;

impl<P: Processor> PartitionWorker<P> {
    /// Runs the worker to its end (on its own thread).
    pub(crate) fn run(mut self) -> WorkerOutcome {
        let span = tracing::info_span!(
            "partition_worker",
            topic = %self.topic,
            partition = self.partition,
            transactional_id = %self.transactional_id,
        );
        let _entered = span.enter();
        let outcome = self.run_inner();
        match &outcome {
            WorkerOutcome::Finished => tracing::info!("partition worker stopped"),
            WorkerOutcome::Fenced => {
                self.metrics.partition_fenced();
                tracing::info!(
                    "fenced: another instance owns this partition now; dropping its state"
                )
            }
            WorkerOutcome::Failed(error) => {
                self.metrics.partition_failed();
                tracing::error!(error = %error, "partition failed")
            }
        }
        outcome
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn run_inner(&mut self) -> WorkerOutcome {
        let mut backoff = Duration::from_millis(100);
        // Set while recovery keeps failing for transient reasons.
        let mut recovery_retry_deadline: Option<Instant> = None;
        let mut streak = AbortStreak::default();
        'producer: loop {
            if self.stopping() {
                return WorkerOutcome::Finished;
            }
            let producer = match self.create_producer() {
                Ok(p) => p,
                Err(ProducerStart::Fenced) => return WorkerOutcome::Fenced,
                Err(ProducerStart::Stopped) => return WorkerOutcome::Finished,
                Err(ProducerStart::Failed(e)) => return WorkerOutcome::Failed(e),
            };
            loop {
                if self.stopping() {
                    return WorkerOutcome::Finished;
                }
                let barrier = self.advance_snapshot_partition_end(&producer);
                let producer_stuck = matches!(barrier, Err(BarrierError::Unfinished(_)));
                let recovered = match barrier.map_err(BarrierError::into_kafka) {
                    Ok(()) => self.recover(),
                    Err(e)
                        if producer.context().take_refused_topic().is_some()
                            || authorization_code(&e).is_some() =>
                    {
                        return WorkerOutcome::Failed(Error::NotAuthorized {
                            context: format!(
                                "writing to snapshot topic {} (needs WRITE on it)",
                                self.snapshot_topic
                            ),
                            source: Box::new(e),
                        })
                    }
                    Err(e) => match classify(&e) {
                        TxnErrorClass::Fenced => return WorkerOutcome::Fenced,
                        TxnErrorClass::Fatal => {
                            if streak.exhausted(e.to_string(), self.config.max_consecutive_aborts) {
                                return self.abort_budget_exhausted(streak);
                            }
                            tracing::warn!(error = %e, "fatal producer error before recovery; recreating the producer");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue 'producer;
                        }
                        _ if producer_stuck => {
                            // librdkafka refuses every other transactional call on this
                            // producer until the unfinished one completes ("Conflicting
                            // abort_transaction API call is already in progress"): a new
                            // producer's init_transactions aborts what this one left open.
                            let deadline = *recovery_retry_deadline
                                .get_or_insert_with(|| Instant::now() + RECOVERY_RETRY_BUDGET);
                            if Instant::now() >= deadline {
                                return WorkerOutcome::Failed(self.barrier_error(e));
                            }
                            tracing::warn!(error = %e, retry_until_secs = deadline.saturating_duration_since(Instant::now()).as_secs(), "the barrier transaction before recovery could not be begun or aborted; recreating the producer");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue 'producer;
                        }
                        _ => Err(self.barrier_error(e)),
                    },
                };
                let live = match recovered {
                    Ok(Some(live)) => live,
                    Ok(None) => return WorkerOutcome::Finished,
                    Err(e)
                        if e.is_transient()
                            && recovery_retry_deadline.is_none_or(|d| Instant::now() < d) =>
                    {
                        // Broker trouble: keep the (fenced-in) producer and try again; a
                        // successor that fences this one meanwhile makes the next commit fail
                        // as fenced.
                        let deadline = *recovery_retry_deadline
                            .get_or_insert_with(|| Instant::now() + RECOVERY_RETRY_BUDGET);
                        tracing::warn!(error = %e, retry_until_secs = deadline.saturating_duration_since(Instant::now()).as_secs(), "recovery failed; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    Err(e) => return WorkerOutcome::Failed(e),
                };
                recovery_retry_deadline = None;
                self.epoch += 1;
                tracing::debug!(
                    next_offset = live.next_offset,
                    epoch = self.epoch,
                    "going live"
                );
                let seeks = self.inputs.iter().enumerate().map(|(i, topic)| {
                    self.requests.send(ConsumerRequest::Seek {
                        topic: Arc::clone(topic),
                        partition: self.partition,
                        offset: live.next_of(i),
                        epoch: self.epoch,
                    })
                });
                if seeks.collect::<Result<Vec<()>, _>>().is_err() {
                    // The consumer thread is gone: the app is shutting down.
                    return WorkerOutcome::Finished;
                }
                let live_since = Instant::now();
                let commits_before = self.commits.get();
                let exit = self.live_loop(&producer, live);
                if self.commits.get() > commits_before {
                    streak = AbortStreak::default();
                }
                if live_since.elapsed() > Duration::from_secs(30) {
                    // A long healthy run: the next failure is not part of a crash loop.
                    backoff = Duration::from_millis(100);
                }
                match exit {
                    LiveExit::Stopped => return WorkerOutcome::Finished,
                    LiveExit::Fenced => return WorkerOutcome::Fenced,
                    LiveExit::Failed(error) => {
                        let _ = abort(&producer, self.txn_timeout());
                        self.metrics.transaction_aborted(AbortCause::Error);
                        return WorkerOutcome::Failed(error);
                    }
                    LiveExit::TimedOut { age } => {
                        let cause = format!(
                            "a transaction stayed open {age:?}, past transaction_timeout {:?}, and the transaction coordinator aborted it: make process() faster per batch, lower max_batch_records or raise transaction_timeout",
                            self.txn_timeout()
                        );
                        self.metrics
                            .transaction_aborted(AbortCause::CoordinatorTimeout);
                        tracing::warn!(age_ms = age.as_millis() as u64, transaction_timeout_ms = self.txn_timeout().as_millis() as u64, "the transaction coordinator aborted a transaction that outlived the transaction timeout (not a zombie); recovering now");
                        if streak.exhausted(cause, self.config.max_consecutive_aborts) {
                            return self.abort_budget_exhausted(streak);
                        }
                        if self.rebalance_grace() {
                            return WorkerOutcome::Finished;
                        }
                        continue 'producer;
                    }
                    LiveExit::Hung { call, waited } => {
                        let cause = format!(
                            "librdkafka's {call} did not return within {waited:?}; the producer was given up and a new one fenced it"
                        );
                        tracing::error!(call, waited_ms = waited.as_millis() as u64, "a librdkafka call hung; giving up this producer and recovering with a new one");
                        self.metrics.transaction_aborted(AbortCause::HungCall);
                        if self.stopping() {
                            return WorkerOutcome::Finished;
                        }
                        if streak.exhausted(cause, self.config.max_consecutive_aborts) {
                            return self.abort_budget_exhausted(streak);
                        }
                        continue 'producer;
                    }
                    LiveExit::FatalProducer(error) => {
                        if streak.exhausted(error.to_string(), self.config.max_consecutive_aborts) {
                            return self.abort_budget_exhausted(streak);
                        }
                        tracing::warn!(error = %error, "fatal producer error; recreating the producer");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue 'producer;
                    }
                    LiveExit::Abort(reason) => {
                        // The record the broker refused says more than the failed commit.
                        let delivery = producer.context().take_first_error();
                        // The topic whose AddPartitionsToTxn the broker refused, if any.
                        let refused_topic = producer.context().take_refused_topic();
                        let refused = self
                            .not_authorized(delivery.as_ref(), refused_topic.as_deref(), &reason)
                            .or_else(|| {
                                self.refused_transaction(
                                    &producer,
                                    refused_topic.as_deref(),
                                    &reason,
                                )
                            });
                        if let Some(error) = refused {
                            let _ = abort(&producer, self.txn_timeout());
                            self.metrics.transaction_aborted(AbortCause::Error);
                            return WorkerOutcome::Failed(error);
                        }
                        let cause = match delivery {
                            Some((topic, delivery)) => {
                                format!("producing to {topic}: {delivery} (then: {reason})")
                            }
                            None => reason.to_string(),
                        };
                        tracing::warn!(error = %cause, aborts_in_a_row = streak.aborts + 1, "aborting the transaction; rebuilding state through recovery");
                        producer.context().reset();
                        if streak.exhausted(cause, self.config.max_consecutive_aborts) {
                            let _ = abort(&producer, self.txn_timeout());
                            self.metrics.transaction_aborted(AbortCause::FailedCommit);
                            return self.abort_budget_exhausted(streak);
                        }
                        match abort(&producer, self.txn_timeout()) {
                            Ok(()) => self.metrics.transaction_aborted(AbortCause::FailedCommit),
                            Err(e) => match classify(&e) {
                                TxnErrorClass::Fenced => return WorkerOutcome::Fenced,
                                _ if producer
                                    .client()
                                    .fatal_error()
                                    .is_some_and(|(code, _)| is_fenced_code(code)) =>
                                {
                                    return WorkerOutcome::Fenced
                                }
                                _ => {
                                    tracing::warn!(error = %e, "abort failed; recreating the producer");
                                    continue 'producer;
                                }
                            },
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
    }

    fn txn_timeout(&self) -> Duration {
        self.config.transaction_timeout
    }

    /// After a timed-out transaction the producer's epoch was bumped, as it would be by a
    /// successor: an instance that was paused so long (a zombie) is told by its consumer within
    /// a heartbeat that the partition moved on. Wait that long before initializing a new
    /// producer, which would fence the new owner. `true`: the partition was revoked meanwhile.
    fn rebalance_grace(&self) -> bool {
        let until = Instant::now() + TIMEOUT_REBALANCE_GRACE;
        while Instant::now() < until {
            if self.stopping() {
                return true;
            }
            std::thread::sleep(IDLE_POLL);
        }
        self.stopping()
    }

    fn abort_budget_exhausted(&self, streak: AbortStreak) -> WorkerOutcome {
        WorkerOutcome::Failed(Error::AbortBudgetExhausted {
            topic: self.topic.to_string(),
            partition: self.partition,
            transactional_id: self.transactional_id.clone(),
            aborts: streak.aborts,
            first_error: streak.first_error.unwrap_or_default(),
        })
    }

    fn create_producer(&self) -> Result<Arc<TxnProducer>, ProducerStart> {
        let producer: TxnProducer = self
            .config
            .producer_config(&self.transactional_id)
            .create_with_context(TxnProducerContext::default())
            .map_err(|source| {
                ProducerStart::Failed(Error::kafka(
                    format!("creating the producer {}", self.transactional_id),
                    source,
                ))
            })?;
        // The snapshot topic, which this producer writes anyway: a producer's metadata request
        // may create a missing topic (librdkafka's producer default), and the input is the
        // user's.
        connect_to_a_named_broker(producer.client(), &self.snapshot_topic);
        let mut attempt = 0;
        loop {
            // Fencing first, then reading state.
            match producer.init_transactions(self.txn_timeout()) {
                Ok(()) => {
                    TxnProducerContext::attach_wakeup(&producer);
                    return Ok(Arc::new(producer));
                }
                // No retry can grant an ACL.
                Err(e) if authorization_code(&e).is_some() => {
                    return Err(ProducerStart::Failed(Error::kafka(
                        format!(
                            "init_transactions of transactional id {} (needs WRITE and DESCRIBE on it)",
                            self.transactional_id
                        ),
                        e,
                    )))
                }
                Err(e) => match classify(&e) {
                    TxnErrorClass::Fenced => return Err(ProducerStart::Fenced),
                    TxnErrorClass::Retriable | TxnErrorClass::Abortable
                        if attempt < RETRIES * 4 && !self.stopping() =>
                    {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "init_transactions failed; retrying");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    _ if self.stopping() => return Err(ProducerStart::Stopped),
                    _ => {
                        return Err(ProducerStart::Failed(Error::kafka(
                            format!("init_transactions of {}", self.transactional_id),
                            e,
                        )))
                    }
                },
            }
        }
    }

    /// When librdkafka refused a call because the open transaction failed underneath
    /// ("erroneous state"), the failure behind it if that is an authorization failure (e.g. no
    /// WRITE on an output topic). librdkafka hands that error out from `commit_transaction`,
    /// which commits nothing once the transaction failed.
    fn refused_transaction(
        &self,
        producer: &TxnProducer,
        refused_topic: Option<&str>,
        reason: &KafkaError,
    ) -> Option<Error> {
        if reason.rdkafka_error_code() != Some(RDKafkaErrorCode::State) {
            return None;
        }
        let cause = producer.commit_transaction(Duration::from_secs(5)).err()?;
        authorization_code(&cause)?;
        let refused_topic = refused_topic
            .map(str::to_owned)
            .or_else(|| producer.context().take_refused_topic());
        let context = match refused_topic {
            Some(topic) => format!(
                "adding topic {topic} to the transaction of {} (needs WRITE on it)",
                self.transactional_id
            ),
            None => format!("the transaction of {}", self.transactional_id),
        };
        Some(Error::kafka(context, cause))
    }

    /// An authorization failure behind an aborted transaction, as the error that stops the
    /// partition: aborting and recovering would only meet it again.
    fn not_authorized(
        &self,
        delivery: Option<&(String, KafkaError)>,
        refused_topic: Option<&str>,
        reason: &KafkaError,
    ) -> Option<Error> {
        if let Some((topic, error)) = delivery.filter(|(_, e)| authorization_code(e).is_some()) {
            return Some(Error::kafka(
                format!("producing to topic {topic} (needs WRITE on it)"),
                error.clone(),
            ));
        }
        authorization_code(reason).map(|code| {
            let needs = match code {
                rdkafka::error::RDKafkaErrorCode::GroupAuthorizationFailed => {
                    format!("READ on group {}", self.config.app_id)
                }
                rdkafka::error::RDKafkaErrorCode::TransactionalIdAuthorizationFailed => {
                    format!("WRITE on transactional id {}", self.transactional_id)
                }
                _ => {
                    if let Some(topic) = refused_topic {
                        return Error::kafka(
                            format!(
                                "adding topic {topic} to the transaction of {} (needs WRITE on it)",
                                self.transactional_id
                            ),
                            reason.clone(),
                        );
                    }
                    format!(
                        "WRITE on the output topics and on snapshot topic {}",
                        self.snapshot_topic
                    )
                }
            };
            Error::kafka(
                format!(
                    "committing the transaction of {} (needs {needs})",
                    self.transactional_id
                ),
                reason.clone(),
            )
        })
    }

    fn recover(&self) -> Result<Option<Live<P::State>>, Error> {
        let mut reader_config = self.config.consumer_config(false);
        // librdkafka's assign() needs a group handle; this group is never joined and nothing
        // is committed to it.
        reader_config.set("group.id", format!("{}.recovery", self.config.app_id));
        let reader = PartitionReader::new(reader_config, READ_STALL_TIMEOUT)?;
        reader.connect(&self.snapshot_topic);
        let committed_offset = || self.group_committed_offset();
        let target = RecoveryTarget {
            input_topic: &self.topic,
            inputs: &self.inputs,
            partition: self.partition,
            snapshot_topic: &self.snapshot_topic,
            start_from: self.config.auto_offset_reset,
            fingerprint_enabled: self.config.state_fingerprint,
            error_policy: &self.config.error_policy,
            stop: &self.stop,
            group: &self.config.app_id,
            committed_offset: &committed_offset,
            progress: Some(&self.partition_metrics),
            local: &self.local,
        };
        self.partition_metrics.recovering(true);
        let recovered =
            recover(&*self.processor, &target, &reader, &self.metrics).map(|r| r.map(Live::from));
        destroy_in_background(reader);
        self.partition_metrics.recovering(false);
        if let Ok(Some(live)) = &recovered {
            self.partition_metrics.committed_position(live.next_offset);
        }
        recovered
    }

    /// Makes every committed record of the snapshot partition visible before recovery reads
    /// its end: a partition leader that restarted (a broker crash) keeps its high watermark at
    /// its last checkpoint until a record is written in its new leader epoch, so readers would
    /// see an old incremental record as the latest and recover stale state (duplicates
    /// downstream). One record, written and aborted (never visible to read_committed readers),
    /// moves the high watermark to the log end. This worker is the partition's only writer.
    fn advance_snapshot_partition_end(&self, producer: &TxnProducer) -> Result<(), BarrierError> {
        producer.context().reset();
        producer
            .begin_transaction()
            .map_err(BarrierError::Unfinished)?;
        let headers = OwnedHeaders::new().insert(Header {
            key: "exactly.barrier",
            value: Some(&b""[..]),
        });
        let record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.snapshot_topic, 0)
                .partition(self.partition)
                .headers(headers);
        let written = send_blocking(producer, record)
            .and_then(|()| flush_promptly(producer, self.txn_timeout()));
        abort(producer, self.txn_timeout()).map_err(BarrierError::Unfinished)?;
        written.map_err(BarrierError::Write)
    }

    fn barrier_error(&self, source: KafkaError) -> Error {
        Error::kafka(
            format!(
                "writing an aborted barrier record to {}/{} before recovery",
                self.snapshot_topic, self.partition
            ),
            source,
        )
    }

    /// The offset the app's consumer group has committed for this partition of the unit's
    /// inputs (the first found), if any (read without joining the group).
    fn group_committed_offset(&self) -> Result<Option<i64>, Error> {
        let context = || {
            format!(
                "reading group {}'s committed offsets of partition {} of {:?}",
                self.config.app_id, self.partition, self.inputs
            )
        };
        // A plain reader with the group's id: it never joins (and so never takes part in the
        // group protocol), it only asks the coordinator for the committed offset.
        let mut config = self.config.consumer_config(false);
        config.set("group.id", &self.config.app_id);
        let consumer: rdkafka::consumer::BaseConsumer = config
            .create()
            .map_err(|source| Error::kafka(context(), source))?;
        let mut tpl = TopicPartitionList::new();
        for topic in &self.inputs {
            tpl.add_partition(topic, self.partition);
        }
        let committed =
            rdkafka::consumer::Consumer::committed_offsets(&consumer, tpl, READ_STALL_TIMEOUT);
        destroy_in_background(consumer);
        let committed = committed.map_err(|source| Error::kafka(context(), source))?;
        Ok(self.inputs.iter().find_map(|topic| {
            committed
                .find_partition(topic, self.partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) if offset >= 0 => Some(offset),
                    _ => None,
                })
        }))
    }

    /// Processes records in transactions until told to stop or a transaction fails. A
    /// "fenced" failure of a transaction older than the transaction timeout is the
    /// coordinator's timeout abort (it bumps the epoch, which librdkafka reports as fenced),
    /// not a zombie: [`LiveExit::TimedOut`].
    fn live_loop(&mut self, producer: &Arc<TxnProducer>, live: Live<P::State>) -> LiveExit {
        // Some(since) while a transaction is open: since its first record, and once it
        // commits since the coordinator learned of it (see `commit`).
        let mut open: Option<Instant> = None;
        let exit = self.run_transactions(producer, live, &mut open);
        match (exit, open) {
            (LiveExit::Fenced, Some(since)) if since.elapsed() >= self.txn_timeout() => {
                LiveExit::TimedOut {
                    age: since.elapsed(),
                }
            }
            (exit, _) => exit,
        }
    }

    fn run_transactions(
        &mut self,
        producer: &Arc<TxnProducer>,
        mut live: Live<P::State>,
        open: &mut Option<Instant>,
    ) -> LiveExit {
        let commit_interval = self.config.commit_interval;
        let commit_when_idle = self.config.commit_when_idle;
        let max_batch = self.config.max_batch_records.max(1);
        let tick_every = self
            .processor
            .wall_clock_interval()
            .filter(|every| !every.is_zero());
        let mut next_tick = tick_every.map(|every| Instant::now() + every);
        let mut out = Output::new();
        if self.inputs.len() > 1 {
            live.interleave = Some(Interleave::new(
                self.inputs.len(),
                self.config.max_input_idle,
            ));
        }
        // Recovered (committed transactions before): the group may trail the snapshots.
        live.group_offsets =
            GroupOffsets::new(self.config.group_offsets_interval, live.transaction_seq > 0);
        let mut since_reports = 0;
        loop {
            if self.stopping() {
                // The group's offsets are brought up to date before the partition goes.
                if open.is_none() && live.group_offsets.behind() {
                    if let Err(exit) = begin(producer, open) {
                        return exit;
                    }
                    live.batch_records = 0;
                }
                if open.is_some() {
                    if let Err(exit) = self.commit(producer, &mut live, true, open) {
                        return exit;
                    }
                } else if let Err(exit) = self.final_snapshot(producer, &mut live) {
                    return exit;
                }
                return LiveExit::Stopped;
            }
            let now = Instant::now();
            let wait = match *open {
                Some(started) => {
                    // Until the next moment the transaction may commit: idle, or due.
                    let age = now.saturating_duration_since(started);
                    let next = if age < commit_when_idle {
                        commit_when_idle.min(commit_interval)
                    } else {
                        commit_interval
                    };
                    next.saturating_sub(age).min(IDLE_POLL)
                }
                None => IDLE_POLL,
            };
            let catch_up = open
                .is_none()
                .then(|| live.group_offsets.catch_up_at(commit_interval))
                .flatten();
            let wait = [next_tick, catch_up]
                .into_iter()
                .flatten()
                .fold(wait, |wait, at| wait.min(at.saturating_duration_since(now)));
            let wait = live
                .interleave
                .as_ref()
                .and_then(|waiting| waiting.until_due(now))
                .map_or(wait, |due| wait.min(due));
            let received = self.records.recv_timeout(wait);
            match received {
                Ok(forwarded) => {
                    let taken = self.take_burst(producer, &mut live, forwarded, open, &mut out);
                    match taken {
                        Ok(records) => since_reports += records,
                        Err(exit) => return exit,
                    }
                }
                Err(RecvTimeoutError::Timeout) => since_reports = DELIVERY_REPORTS_EVERY,
                Err(RecvTimeoutError::Disconnected) => {
                    // The consumer thread dropped us without a stop request: treat as stop.
                    self.stop.store(true, Ordering::Release);
                    continue;
                }
            }
            if let Err(exit) = self.process_waiting(producer, &mut live, open, &mut out) {
                return exit;
            }
            if let (Some(at), Some(every)) = (next_tick, tick_every) {
                if Instant::now() >= at {
                    if open.is_none() {
                        if let Err(exit) = begin(producer, open) {
                            return exit;
                        }
                        live.batch_records = 0;
                    }
                    if let Err(exit) = self.tick(&mut live, &mut out) {
                        return exit;
                    }
                    next_tick = Some(Instant::now() + every);
                }
            }
            if let Err(exit) = self.catch_up_group_offsets(producer, &mut live, open) {
                return exit;
            }
            if open.is_none() && live.streaming.is_some() {
                // A full snapshot streams with the transactions: keep them coming while no
                // input arrives.
                if let Err(exit) = begin(producer, open) {
                    return exit;
                }
                live.batch_records = 0;
            }
            // Serve delivery reports now and then so librdkafka's queue does not grow with
            // them (every record: measurable CPU for nothing; commits serve the rest).
            if since_reports >= DELIVERY_REPORTS_EVERY {
                producer.poll(Duration::ZERO);
                since_reports = 0;
            }
            if let Some(started) = *open {
                let age = started.elapsed();
                // Idle: nothing of this partition is waiting (the bytes forwarded and not yet
                // taken are none, and no record waits for the other inputs).
                let idle = age >= commit_when_idle
                    && self.records_bytes.load(Ordering::Acquire) == 0
                    && live.interleave.as_ref().is_none_or(Interleave::is_empty);
                if live.batch_records >= max_batch || age >= commit_interval || idle {
                    if let Err(exit) = self.commit(producer, &mut live, false, open) {
                        return exit;
                    }
                    *open = None;
                }
            }
        }
    }

    /// Takes `first` and then, without waiting, what else the consumer has forwarded, up to
    /// [`RECEIVE_BURST`] records and the transaction's record limit; returns how many it took.
    /// A co-partitioned unit takes one record at a time, as its records wait in
    /// [`Interleave`] before they are processed (and counted against the limit).
    ///
    /// The loop's housekeeping (its clock reads, deadlines and checks) then runs once per
    /// burst: per record it cost more than the channel itself (profiled: reading the clock
    /// was an eighth of a worker's CPU).
    fn take_burst(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
        first: Forwarded,
        open: &mut Option<Instant>,
        out: &mut Output,
    ) -> Result<usize, LiveExit> {
        let started = Instant::now();
        let max_batch = self.config.max_batch_records.max(1);
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(forwarded) = next.take() {
            self.records_bytes
                .fetch_sub(forwarded.size(), Ordering::AcqRel);
            self.take_record(producer, live, forwarded, open, out)?;
            taken += 1;
            if taken < RECEIVE_BURST && live.batch_records < max_batch && live.interleave.is_none()
            {
                next = self.records.try_recv().ok();
            }
        }
        // Replaying these records would cost about as much again.
        live.recovery_cost.replay += started.elapsed();
        Ok(taken)
    }

    /// Takes a record the consumer forwarded: drops it if it is stale (an older seek epoch, or
    /// below the input's next offset), else processes it, or, in a co-partitioned unit,
    /// queues it for [`Self::process_waiting`].
    fn take_record(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
        forwarded: Forwarded,
        open: &mut Option<Instant>,
        out: &mut Output,
    ) -> Result<(), LiveExit> {
        // The consumer forwards the unit's own names: the pointers match (names only if not).
        let topic = &forwarded.record.topic;
        let Some(input) = self
            .inputs
            .iter()
            .position(|t| Arc::ptr_eq(t, topic) || t == topic)
        else {
            return Ok(());
        };
        if forwarded.epoch != self.epoch || forwarded.record.offset < live.next_of(input) {
            return Ok(());
        }
        if let Some(waiting) = &mut live.interleave {
            waiting.push(input, forwarded.record);
            return Ok(());
        }
        self.process_in_transaction(producer, live, input, &forwarded.record, open, out)
    }

    /// Processes the records of a co-partitioned unit that may go now (see [`Interleave`]),
    /// noting their order for the transaction's incremental record.
    fn process_waiting(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
        open: &mut Option<Instant>,
        out: &mut Output,
    ) -> Result<(), LiveExit> {
        if live.interleave.is_none() {
            return Ok(());
        }
        loop {
            let now = Instant::now();
            let Some((input, record)) = live.interleave.as_mut().and_then(|w| w.next(now)) else {
                return Ok(());
            };
            self.process_in_transaction(producer, live, input, &record, open, out)?;
            // Replaying the record would cost about as much again.
            live.recovery_cost.replay += now.elapsed();
            if let Some(waiting) = &mut live.interleave {
                waiting.record_step(input as u32);
            }
        }
    }

    /// Processes a record of input `input`, in the open transaction or a new one.
    fn process_in_transaction(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
        input: usize,
        record: &RawRecord,
        open: &mut Option<Instant>,
        out: &mut Output,
    ) -> Result<(), LiveExit> {
        if open.is_none() {
            begin(producer, open)?;
            live.batch_records = 0;
        }
        self.process_one(live, input, record, out)?;
        live.batch_records += 1;
        Ok(())
    }

    /// A partition whose last transaction went without the group's offsets and that has been
    /// quiet for a commit interval since commits one more transaction to send them (see
    /// [`AppConfig::group_offsets_interval`]).
    fn catch_up_group_offsets(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
        open: &mut Option<Instant>,
    ) -> Result<(), LiveExit> {
        let due = live
            .group_offsets
            .catch_up_at(self.config.commit_interval)
            .is_some_and(|at| Instant::now() >= at);
        if open.is_some() || !due {
            return Ok(());
        }
        live.group_offsets.catch_up();
        begin(producer, open)?;
        live.batch_records = 0;
        self.commit(producer, live, false, open)?;
        *open = None;
        Ok(())
    }

    /// Produces the open transaction's outputs, all at once when it commits.
    ///
    /// Nobody reads them earlier (read_committed readers see them after the commit), and
    /// produced together they cost the broker one AddPartitionsToTxn and a few produce
    /// requests per transaction; produced as `process` returns them, each new output
    /// partition cost a request of its own while the transaction was open (about five of
    /// each per transaction in the latency case, on a broker whose CPU they saturated).
    fn send_unsent(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
    ) -> Result<(), LiveExit> {
        for record in std::mem::take(&mut live.unsent) {
            self.send_output(producer, &record)?;
        }
        Ok(())
    }

    fn send_output(&self, producer: &TxnProducer, record: &OutputRecord) -> Result<(), LiveExit> {
        let mut base: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&record.topic, 0);
        // No header list for a record without headers: librdkafka would allocate it, and free
        // it with the record.
        if !record.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (name, value) in &record.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            base = base.headers(headers);
        }
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            base = base.payload(value.as_slice());
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(timestamp) = record.timestamp {
            base = base.timestamp(timestamp);
        }
        send_blocking(producer, base).map_err(|source| self.send_failure(producer, record, source))
    }

    /// What a refused `send` means. The producer's transaction may have failed underneath
    /// (fenced by a newer producer, an abortable produce error: librdkafka then refuses every
    /// send with an "erroneous state" error): that is the transaction's fate, not the
    /// record's. Only a refusal of the record itself stops the partition.
    fn send_failure(
        &self,
        producer: &TxnProducer,
        record: &OutputRecord,
        source: KafkaError,
    ) -> LiveExit {
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::debug!(code = ?code, reason = %reason, "the producer has a fatal error");
            return if is_fenced_code(code) {
                LiveExit::Fenced
            } else {
                LiveExit::FatalProducer(source)
            };
        }
        match source.rdkafka_error_code() {
            Some(code) if is_fenced_code(code) => LiveExit::Fenced,
            Some(RDKafkaErrorCode::State) => LiveExit::Abort(source),
            // A local refusal of this record (larger than message.max.bytes, an unknown
            // topic or partition, ...) would fail again after recovery: stop the partition.
            _ => LiveExit::Failed(Error::Produce {
                topic: record.topic.clone(),
                transactional_id: self.transactional_id.clone(),
                source: Box::new(source),
            }),
        }
    }

    fn full_snapshot_due(&self, live: &Live<P::State>, final_snapshot: bool) -> bool {
        full_snapshot_due(&self.config, live, final_snapshot)
    }

    /// On stop with no open transaction: still leave a full snapshot behind when there is
    /// state not covered by one, so the next owner recovers without a long replay.
    fn final_snapshot(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
    ) -> Result<(), LiveExit> {
        if live.streaming.is_some() {
            return self.finish_streaming(producer, live);
        }
        if !self.full_snapshot_due(live, true) {
            return Ok(());
        }
        self.take_full_snapshot(producer, live, true)
    }

    /// Commits the open transaction (its outputs, the pieces of a streaming full snapshot
    /// ready by now, its incremental snapshot record and the consumer offsets), then takes a
    /// full snapshot if one is due. A plain state's full snapshot goes in transactions of its
    /// own, after the batch's: serializing and writing a large state must never stretch a
    /// transaction toward `transaction.timeout.ms`. A state with stores streams it with the
    /// next transactions (see `full_snapshot`).
    ///
    /// `open` (when the batch's transaction started) is cleared as soon as that transaction
    /// committed: a failure while writing the full snapshot is not the batch's, and must not
    /// be judged by the batch's age (see [`Self::live_loop`]).
    fn commit(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
        final_snapshot: bool,
        open: &mut Option<Instant>,
    ) -> Result<(), LiveExit> {
        // The coordinator learns of the transaction only now (its first AddPartitionsToTxn
        // goes with the first record sent): its age, which the coordinator's timeout judges,
        // starts here, however long `process` took before.
        *open = Some(Instant::now());
        self.send_unsent(producer, live)?;
        let new_base = self.stream_pieces(producer, live)?;
        let streamed = new_base.is_some();
        self.commit_open_transaction(producer, live, new_base)?;
        *open = None;
        if streamed {
            self.streaming_committed(live);
        }
        if live.streaming.is_some() {
            if final_snapshot {
                self.finish_streaming(producer, live)?;
            }
        } else if self.full_snapshot_due(live, final_snapshot) {
            self.take_full_snapshot(producer, live, final_snapshot)?;
        }
        Ok(())
    }

    /// Writes the open transaction's incremental snapshot record (pointing at `new_base` when
    /// it completes a full snapshot) and the consumer offsets, and commits it.
    fn commit_open_transaction(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
        new_base: Option<NewBase>,
    ) -> Result<(), LiveExit> {
        let path_started = Instant::now();
        let txn_timeout = self.txn_timeout();
        let seq = live.transaction_seq + 1;
        let rebased = new_base.is_some();
        let next = match new_base {
            Some(NewBase {
                reference,
                digest,
                records,
                ticks,
            }) => Since {
                base_others: reference.input_offsets.iter().skip(1).copied().collect(),
                base_input_offset: reference.input_offset,
                base: Some(reference),
                digest,
                records,
                ticks,
            },
            None => Since {
                base: live.base.clone(),
                base_input_offset: live.base_input_offset,
                base_others: live.base_others.clone(),
                digest: live.digest,
                records: live.records_since_base,
                ticks: live.ticks_since_base,
            },
        };
        let fingerprint = if self.config.state_fingerprint {
            self.fingerprints.borrow_mut().take(&live.state, rebased)
        } else {
            None
        };
        let incremental = self.incremental_record(live, seq, &next, fingerprint);
        write_incremental(producer, &self.snapshot_topic, self.partition, incremental)
            .map_err(exit_for)?;
        let commit_started = Instant::now();
        // Flushed here (promptly) so that commit_transaction's own flush finds nothing left.
        retry(|| flush_promptly(producer, txn_timeout))?;
        let flushed = commit_started.elapsed();
        let send_offsets = self.stopping() || live.group_offsets.due(Instant::now());
        if send_offsets {
            self.send_group_offsets(producer, live, txn_timeout)?;
        }
        let offsets_sent = commit_started.elapsed();
        retry(|| producer.commit_transaction(txn_timeout))?;
        live.group_offsets.committed(send_offsets, Instant::now());
        if let Some((topic, error)) = producer.context().take_first_error() {
            // Cannot happen after a successful commit (librdkafka fails the commit), but a
            // failed output delivery must never pass silently.
            tracing::error!(topic, error = %error, "an output delivery failed in a committed transaction");
        }
        tracing::debug!(
            next_offset = live.next_offset,
            transaction_seq = seq,
            full_snapshot = rebased,
            group_offsets = send_offsets,
            flush_ms = flushed.as_millis() as u64,
            offsets_ms = (offsets_sent - flushed).as_millis() as u64,
            end_ms = (commit_started.elapsed() - offsets_sent).as_millis() as u64,
            "transaction committed"
        );
        self.commit_local(
            live,
            seq,
            &next.base,
            next.base_input_offset,
            next.digest,
            next.records,
        )?;
        self.metrics.transaction_committed(path_started.elapsed());
        self.partition_metrics
            .transaction_committed(commit_started.elapsed());
        self.partition_metrics.committed_position(live.next_offset);
        self.commits.set(self.commits.get() + 1);
        live.transaction_seq = seq;
        live.base = next.base;
        live.base_input_offset = next.base_input_offset;
        live.base_others = next.base_others;
        live.digest = next.digest;
        live.records_since_base = next.records;
        live.ticks_since_base = next.ticks;
        Ok(())
    }

    /// Adds the consumed offsets to the open transaction, with the consumer's current group
    /// metadata.
    fn send_group_offsets(
        &self,
        producer: &Arc<TxnProducer>,
        live: &Live<P::State>,
        txn_timeout: Duration,
    ) -> Result<(), LiveExit> {
        let offsets = self.consumed_offsets(live)?;
        // The current generation / member epoch: a rebalance that kept this partition here
        // changed it, and the broker rejects offsets sent with an old one.
        // (None only before the consumer's first rebalance, which started this worker.)
        let group_metadata =
            self.group_metadata
                .current()
                .ok_or(LiveExit::Abort(KafkaError::ConsumerCommit(
                    RDKafkaErrorCode::State,
                )))?;
        // After the flush, not beside it: the coordinator refuses a second request for the
        // same transaction while it logs the first (CONCURRENT_TRANSACTIONS), and librdkafka
        // retries AddOffsetsToTxn only after 100 ms; sent beside the outputs'
        // AddPartitionsToTxn, most commits paid that (the state-at-scale case's commit p50
        // went from 7 to 89 ms).
        send_offsets_bounded(producer, offsets, group_metadata, txn_timeout)
    }

    /// The incremental record of the open transaction (sequence `seq`).
    fn incremental_record(
        &self,
        live: &mut Live<P::State>,
        seq: u64,
        since: &Since,
        fingerprint: Option<u64>,
    ) -> IncrementalSnapshot {
        let co_partitioned = self.inputs.len() > 1;
        IncrementalSnapshot {
            input_topic: self.topic.to_string(),
            input_partition: self.partition,
            next_input_offset: live.next_offset,
            base: since.base.clone(),
            base_input_offset: since.base_input_offset,
            state_fingerprint: fingerprint.unwrap_or(0),
            state_fingerprint_enabled: fingerprint.is_some(),
            output_digest: since.digest.value(),
            records_since_base: since.records,
            transaction_seq: seq,
            processor_version: self.processor.version(),
            wall_clock_ticks: std::mem::take(&mut live.ticks),
            ticks_since_base: since.ticks,
            input_topics: if co_partitioned {
                self.inputs.iter().map(|t| t.to_string()).collect()
            } else {
                Vec::new()
            },
            next_input_offsets: if co_partitioned {
                live.all_next()
            } else {
                Vec::new()
            },
            base_input_offsets: if co_partitioned {
                std::iter::once(since.base_input_offset)
                    .chain(since.base_others.iter().copied())
                    .collect()
            } else {
                Vec::new()
            },
            interleaving: live
                .interleave
                .as_mut()
                .map(Interleave::take_order)
                .unwrap_or_default(),
        }
    }

    /// The offsets the open transaction consumed up to: every input's next offset.
    fn consumed_offsets(&self, live: &Live<P::State>) -> Result<TopicPartitionList, LiveExit> {
        let mut offsets = TopicPartitionList::new();
        for (i, topic) in self.inputs.iter().enumerate() {
            offsets
                .add_partition_offset(topic, self.partition, Offset::Offset(live.next_of(i)))
                .map_err(LiveExit::Abort)?;
        }
        Ok(offsets)
    }
}

impl<P: Processor> PartitionWorker<P> {
    /// After the Kafka transaction committed: its store changes and position go to the local
    /// store. A failure stops the partition (the transaction stands; the local store stays at
    /// its previous position, which a restart replays from).
    fn commit_local(
        &self,
        live: &Live<P::State>,
        seq: u64,
        base: &Option<FullSnapshotRef>,
        base_input_offset: i64,
        digest: OutputDigest,
        records_since_base: u64,
    ) -> Result<(), LiveExit> {
        let at = Committed {
            input_topic: &self.topic,
            input_partition: self.partition,
            transaction_seq: seq,
            next_offset: live.next_offset,
            base_snapshot_id: base.as_ref().map_or("", |b| b.snapshot_id.as_str()),
            base_input_offset,
            output_digest: digest.value(),
            records_since_base,
            processor_version: self.processor.version(),
        };
        self.local
            .commit(&live.stores, at, &live.state)
            .map_err(|source| {
                LiveExit::Failed(Error::LocalState {
                    topic: self.topic.to_string(),
                    partition: self.partition,
                    source,
                })
            })
    }

    fn local_failure(&self, what: &'static str, reason: String) -> Error {
        Error::LocalState {
            topic: self.topic.to_string(),
            partition: self.partition,
            source: crate::state::StoreError::Local {
                dir: self.local.dir().to_owned(),
                what,
                reason,
            },
        }
    }
}

/// Snapshot chunks sent between two checks of a chunk transaction's age.
const CHUNKS_PER_WRITE: usize = 16;

/// Begins a transaction; `open` says since when.
fn begin(producer: &TxnProducer, open: &mut Option<Instant>) -> Result<(), LiveExit> {
    producer.context().reset();
    producer.begin_transaction().map_err(exit_for)?;
    *open = Some(Instant::now());
    Ok(())
}

/// Aborts the open transaction. librdkafka's abort waits until every outstanding message has
/// its delivery report, and a `BaseProducer` only serves those when polled: purge what is
/// queued or in flight (it is being aborted anyway) and serve the reports first, or the abort
/// times out on any transaction that failed with messages outstanding.
fn abort(producer: &TxnProducer, timeout: Duration) -> Result<(), KafkaError> {
    producer.purge(PurgeConfig::default().queue().inflight());
    if let Err(error) = flush_promptly(producer, PURGED_REPORTS_TIMEOUT) {
        tracing::debug!(error = %error, "serving the purged messages' delivery reports");
    }
    producer.abort_transaction(timeout)
}

/// How long serving the delivery reports of purged messages may take before aborting anyway.
const PURGED_REPORTS_TIMEOUT: Duration = Duration::from_secs(2);

enum ProducerStart {
    Fenced,
    Stopped,
    Failed(Error),
}

fn exit_for(error: KafkaError) -> LiveExit {
    match classify(&error) {
        TxnErrorClass::Fenced => LiveExit::Fenced,
        TxnErrorClass::Fatal => LiveExit::FatalProducer(error),
        TxnErrorClass::Retriable | TxnErrorClass::Abortable => LiveExit::Abort(error),
    }
}

/// Runs `send_offsets_to_transaction` on a thread of its own and waits for it at most a
/// quarter of the transaction timeout plus [`HUNG_CALL_MARGIN`].
///
/// librdkafka 2.12 can block in this call forever: the group-coordinator request behind it
/// never checks its deadline, so when the coordinator's connection is not up and no broker
/// changes state, nothing wakes it (seen in the 3-node chaos run after dropped connections;
/// fixed upstream after librdkafka 2.15.0, "Txn: fix rd_kafka_send_offsets_to_transaction()
/// ignoring timeout"). A worker stuck there never commits and never stops. Past the bound the
/// worker gives this producer up ([`LiveExit::Hung`]): the call keeps its thread and the
/// producer, and the next producer's `init_transactions` fences both.
fn send_offsets_bounded(
    producer: &Arc<TxnProducer>,
    offsets: TopicPartitionList,
    group_metadata: Arc<ConsumerGroupMetadata>,
    txn_timeout: Duration,
) -> Result<(), LiveExit> {
    let call_timeout = txn_timeout / 4;
    let bound = call_timeout + HUNG_CALL_MARGIN;
    let (done, outcome) = std::sync::mpsc::sync_channel(1);
    let caller = Arc::clone(producer);
    let spawned = std::thread::Builder::new()
        .name("exactly-offsets".into())
        .spawn(move || {
            let result = retry(|| {
                caller.send_offsets_to_transaction(&offsets, &group_metadata, call_timeout)
            });
            let _ = done.send(result);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread for send_offsets_to_transaction");
        return Err(LiveExit::Abort(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::Fail,
        )));
    }
    match outcome.recv_timeout(bound) {
        Ok(result) => result,
        Err(_) => Err(LiveExit::Hung {
            call: "send_offsets_to_transaction",
            waited: bound,
        }),
    }
}

/// How much longer than its own timeout a librdkafka call may take before the worker gives
/// its producer up.
const HUNG_CALL_MARGIN: Duration = Duration::from_secs(5);

/// How the barrier transaction before a recovery failed.
enum BarrierError {
    /// Writing the record failed; the transaction was aborted and the producer can begin
    /// another.
    Write(KafkaError),
    /// Beginning or aborting the transaction failed (an abort timed out behind a broker
    /// outage, or an earlier call did and was never completed): the producer is left inside
    /// an unfinished transactional call.
    Unfinished(KafkaError),
}

impl BarrierError {
    fn into_kafka(self) -> KafkaError {
        match self {
            BarrierError::Write(e) | BarrierError::Unfinished(e) => e,
        }
    }
}

/// Runs a transactional call, retrying it while librdkafka says it is retriable.
fn retry(mut call: impl FnMut() -> Result<(), KafkaError>) -> Result<(), LiveExit> {
    let mut attempt = 0;
    loop {
        match call() {
            Ok(()) => return Ok(()),
            Err(e) if classify(&e) == TxnErrorClass::Retriable && attempt < RETRIES => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "retrying a transactional call");
                std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
            }
            Err(e) => return Err(exit_for(e)),
        }
    }
}

/// Starts a worker on its own thread. Returns the sender for its records, its stop flag and
/// the receiver of its outcome.
pub(crate) fn spawn<P: Processor>(
    worker: PartitionWorker<P>,
    outcome: SyncSender<WorkerOutcome>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let name = format!("exactly-{}-{}", worker.topic, worker.partition);
    let (topic, partition) = (worker.topic.to_string(), worker.partition);
    std::thread::Builder::new().name(name).spawn(move || {
        // A panic (in the processor, a format, a Default impl, or the framework) fails the
        // partition with an error the app reports; it never leaves it assigned but dead.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()))
            .unwrap_or_else(|panic| {
                let message = panic_message(&*panic);
                tracing::error!(topic = %topic, partition, panic = %message, "partition worker panicked");
                WorkerOutcome::Failed(Error::WorkerPanicked {
                    topic,
                    partition,
                    message,
                })
            });
        let _ = outcome.send(result);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(records_since_base: u64, replay: Duration) -> Live<()> {
        Live {
            state: (),
            stores: StoreSet::in_memory(),
            next_offset: 0,
            base: None,
            base_input_offset: 0,
            digest: OutputDigest::new(0),
            records_since_base,
            transaction_seq: 0,
            last_full_snapshot: Instant::now(),
            recovery_cost: RecoveryCost {
                base: Duration::from_millis(200),
                replay,
            },
            streaming: None,
            unsent: Vec::new(),
            ticks: Vec::new(),
            ticks_since_base: 0,
            group_offsets: GroupOffsets::new(Duration::ZERO, false),
            others: Vec::new(),
            base_others: Vec::new(),
            interleave: None,
            batch_records: 0,
        }
    }

    fn config() -> AppConfig {
        AppConfig::new("app", "localhost:9092")
            .input_topic("in")
            .full_snapshot_every_records(1000)
    }

    #[test]
    fn full_snapshots_come_by_count_or_on_stop() {
        let c = config();
        assert!(!full_snapshot_due(&c, &live(999, Duration::ZERO), false));
        assert!(full_snapshot_due(&c, &live(1000, Duration::ZERO), false));
        assert!(full_snapshot_due(&c, &live(1, Duration::ZERO), true));
        // Nothing new since the last one: nothing to write, even on stop.
        assert!(!full_snapshot_due(&c, &live(0, Duration::ZERO), true));
    }

    #[test]
    fn a_zero_interval_means_never_by_time() {
        let c = config().full_snapshot_interval(Duration::ZERO);
        assert!(!full_snapshot_due(&c, &live(1, Duration::ZERO), false));
    }

    #[test]
    fn full_snapshots_come_when_recovery_would_take_half_the_bound() {
        let c = config().max_recovery_time(Duration::from_secs(4));
        // 0.2 s to load the base + 1.7 s of replay: below 2 s.
        assert!(!full_snapshot_due(
            &c,
            &live(10, Duration::from_millis(1700)),
            false
        ));
        assert!(full_snapshot_due(
            &c,
            &live(10, Duration::from_millis(1800)),
            false
        ));
        // Without a bound, only the count and the interval count.
        assert!(!full_snapshot_due(
            &config(),
            &live(10, Duration::from_secs(60)),
            false
        ));
    }

    #[test]
    fn flush_errors_are_abortable() {
        let e = KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut);
        assert_eq!(classify(&e), TxnErrorClass::Abortable);
    }

    #[test]
    fn an_abort_streak_ends_at_its_budget_and_keeps_the_first_error() {
        let mut streak = AbortStreak::default();
        assert!(!streak.exhausted("record too large".into(), 3));
        assert!(!streak.exhausted("then something else".into(), 3));
        assert!(streak.exhausted("and more".into(), 3));
        assert_eq!(streak.first_error.as_deref(), Some("record too large"));
    }

    #[test]
    fn panic_messages_are_text() {
        let from_str = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        assert_eq!(panic_message(&*from_str), "boom");
        let from_string = std::panic::catch_unwind(|| panic!("{} {}", "formatted", 7)).unwrap_err();
        assert_eq!(panic_message(&*from_string), "formatted 7");
    }

    #[test]
    fn fenced_codes_are_fenced() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(classify(&e), TxnErrorClass::Fenced);
    }
}

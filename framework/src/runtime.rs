//! [`App`]: runs a [`Processor`] on Kafka with exactly-once semantics.
//!
//! Threads, not the reactor: librdkafka's transactional calls block, so the runtime runs on
//! plain OS threads and the async API only waits for them.
//!
//! - One **consumer thread** owns the group consumer (read_committed, manual offsets) and
//!   polls it; rebalance callbacks run on it. On assignment it pauses the new partitions and
//!   starts a [`PartitionWorker`](crate::partition) per partition; the worker fences, recovers,
//!   then asks (through a channel drained between polls) for its partition to be seeked to
//!   offsetEND and resumed. Records of live partitions are forwarded to the worker's bounded
//!   channel; when it is full the partition is paused until the worker catches up (bounded
//!   memory, no blocking of the poll loop).
//! - On revocation the consumer thread asks the affected workers to commit their in-flight
//!   batch and waits for them (bounded by the transaction timeout) before the rebalance
//!   proceeds.
//! - The app stops on the **first** fatal partition error (a bad record under
//!   [`ErrorPolicy::Fail`](crate::ErrorPolicy), a non-deterministic processor, a retention
//!   gap, a corrupt snapshot): the other partitions commit and shut down gracefully, and
//!   [`App::run`] returns that error. Continuing with the healthy partitions would hide the
//!   failure behind a growing lag on one partition.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::admin;
use crate::config::{AppConfig, GroupProtocol};
use crate::continuity::{cached_log_start, cached_watermarks, Continuity, FetchPosition};
use crate::error::Error;
use crate::metrics::{Metrics, MetricsEndpoint, PartitionMetrics};
use crate::partition::{
    self, ConsumerRequest, Forwarded, GroupMetadataCell, PartitionWorker, WorkerOutcome,
};
use crate::processor::Processor;
use crate::recovery::raw_record;
use crate::snapshot::fingerprint::Cadence;
use crate::snapshot::store::destroy_in_background;
use crate::snapshot::trim::Trimmer;
use crate::stuck::{self, Watched};

/// Records buffered per partition between the consumer thread and its worker.
const WORKER_CHANNEL_CAPACITY: usize = 2048;
/// Records the consumer thread holds for a partition whose worker's channel is full before
/// it pauses the partition (or fewer: [`AppConfig::max_buffered_bytes`] bounds their bytes
/// together with the bytes in the worker's channel). A worker's channel fills on every commit (the worker does not
/// read while it commits); pausing at once made librdkafka drop the partition's prefetched
/// records and fetch them again on resume, over and over. Held records cost memory only:
/// at most this many per partition (plus what librdkafka has prefetched).
const HELD_BEFORE_PAUSE: usize = 16_384;
/// Records the consumer thread forwards between two rounds of its housekeeping (worker
/// requests, backpressure, ended workers).
const FORWARD_BURST: usize = 256;
/// The longest the consumer thread waits for new records while it holds records for a
/// worker: held records move to the worker only between two polls. Waiting the idle 100 ms
/// instead starved a lone partition: its worker got one channel's worth (2 048 records)
/// every 100 ms, 20 000 records/s, while librdkafka had nothing more to hand out.
const HOLDING_POLL: Duration = Duration::from_millis(1);
/// The least time between two rejoins after group coordinator timeouts.
const REJOIN_COOLDOWN: Duration = Duration::from_secs(30);
/// How long the consumer thread waits for librdkafka to start a seek.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the consumer thread refreshes the group metadata the workers send with their
/// offsets (besides after every rebalance): KIP-848 bumps a member's epoch without a rebalance
/// callback when its own assignment does not change.
const GROUP_METADATA_REFRESH: Duration = Duration::from_millis(100);
/// How often the consumer thread publishes each partition's input end (for the lag metric).
const INPUT_END_REFRESH: Duration = Duration::from_secs(1);

/// A stream-processing application: a [`Processor`] run with exactly-once semantics.
///
/// ```no_run
/// # use exactly::{App, AppConfig};
/// # async fn example<P: exactly::Processor>(processor: P) -> Result<(), exactly::Error> {
/// let config = AppConfig::new("word-count", "localhost:9092").input_topic("words");
/// let app = App::new(config, processor)?;
/// let metrics = app.metrics(); // readable while the app runs
/// app.run().await?; // until SIGTERM or ctrl-c, then a graceful shutdown
/// # let _ = metrics; Ok(()) }
/// ```
pub struct App<P: Processor> {
    config: Arc<AppConfig>,
    processor: Arc<P>,
    metrics: Metrics,
    /// Bound when [`AppConfig::metrics_addr`] is set; serves while the app runs.
    endpoint: Option<MetricsEndpoint>,
}

impl<P: Processor> App<P> {
    /// Validates `config` and prepares the app; nothing connects to Kafka yet. With
    /// [`AppConfig::metrics_addr`] set, the metrics endpoint's port is bound here (a taken
    /// port fails now), and served from [`run`](Self::run) on.
    pub fn new(config: AppConfig, processor: P) -> Result<Self, Error> {
        config.validate()?;
        let endpoint = config.metrics_addr.map(MetricsEndpoint::bind).transpose()?;
        Ok(App {
            config: Arc::new(config),
            processor: Arc::new(processor),
            metrics: Metrics::new(),
            endpoint,
        })
    }

    /// Where the Prometheus endpoint listens (`GET /metrics`), when
    /// [`AppConfig::metrics_addr`] is set: with port 0, the port the system chose.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.as_ref().map(MetricsEndpoint::local_addr)
    }

    /// The app's metrics handle (cheap to clone; readable while the app runs).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Runs until SIGTERM or ctrl-c, then shuts down gracefully: every partition commits its
    /// in-flight batch and writes a final full snapshot, then the consumer leaves the group.
    ///
    /// Returns the first fatal partition error, if any (the app stops on it).
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(shutdown_signal()).await
    }

    /// Like [`run`](Self::run), with a caller-provided shutdown trigger.
    ///
    /// Dropping the returned future also stops the app: its partitions commit, write their
    /// final snapshots and leave the group in the background (the threads are not waited for).
    pub async fn run_until<F: Future<Output = ()>>(mut self, shutdown: F) -> Result<(), Error> {
        let _serving = match self.endpoint.take() {
            Some(endpoint) => Some(AbortOnDrop(endpoint.serve(self.metrics.clone())?)),
            None => None,
        };
        admin::prepare_topics(&self.config).await?;
        let stop = Arc::new(AtomicBool::new(false));
        // Dropping this future (a cancelled task, a select! that went the other way) stops
        // the app gracefully instead of leaving its threads running unowned.
        let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let consumer_loop = ConsumerLoop {
            config: Arc::clone(&self.config),
            processor: Arc::clone(&self.processor),
            metrics: self.metrics.clone(),
            stop: Arc::clone(&stop),
        };
        std::thread::Builder::new()
            .name("exactly-consumer".into())
            .spawn(move || {
                let _ = done_tx.send(consumer_loop.run());
            })
            .map_err(|source| Error::Io {
                context: "starting the consumer thread".into(),
                source,
            })?;
        tokio::pin!(shutdown);
        tokio::pin!(done_rx);
        tokio::select! {
            () = &mut shutdown => {
                tracing::info!("shutdown requested");
                stop.store(true, Ordering::Release);
            }
            result = &mut done_rx => {
                return result.unwrap_or_else(|_| Err(Error::RuntimeStopped));
            }
        }
        done_rx.await.unwrap_or_else(|_| Err(Error::RuntimeStopped))
    }
}

/// Stops a task when dropped (the metrics endpoint ends with the app).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sets the stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot listen for SIGTERM; only ctrl-c stops the app");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

type PartitionKey = (Arc<str>, i32);

/// The consumer thread's view of one assigned partition.
struct Slot {
    records: SyncSender<Forwarded>,
    stop: Arc<AtomicBool>,
    /// How the worker ended: in the slot of its unit's first input only (the other inputs of a
    /// co-partitioned unit share the worker, its channel and its stop flag).
    outcome: Option<Receiver<WorkerOutcome>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Seek epoch of the live phase; None while the worker recovers (records are dropped).
    live_epoch: Option<u64>,
    /// Where the next polled record must be in the live phase.
    fetch_position: Option<FetchPosition>,
    /// Records polled while the worker's channel was full; the partition is paused meanwhile.
    held: Held,
    /// The unit's series (in its first input's slot); the consumer keeps its input end
    /// current.
    metrics: Option<PartitionMetrics>,
    paused_for_backpressure: bool,
    /// Bytes in `records` the worker has not received yet.
    records_bytes: Arc<AtomicUsize>,
}

impl Slot {
    /// Hands `forwarded` to the worker if its channel has room in records and in bytes (an
    /// empty channel takes any one record, however large); gives it back otherwise.
    fn offer(&self, forwarded: Forwarded, max_bytes: usize) -> Offered {
        let size = forwarded.size();
        // Counted before the send: the worker may receive it (and subtract) at once.
        let before = self.records_bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > max_bytes {
            self.records_bytes.fetch_sub(size, Ordering::AcqRel);
            return Offered::Full(forwarded);
        }
        match self.records.try_send(forwarded) {
            Ok(()) => Offered::Sent,
            Err(TrySendError::Full(f)) => {
                self.records_bytes.fetch_sub(size, Ordering::AcqRel);
                Offered::Full(f)
            }
            Err(TrySendError::Disconnected(_)) => {
                self.records_bytes.fetch_sub(size, Ordering::AcqRel);
                Offered::Gone
            }
        }
    }

    /// Bytes buffered for the worker: held here and in its channel.
    fn buffered_bytes(&self) -> usize {
        self.held.bytes + self.records_bytes.load(Ordering::Acquire)
    }

    fn must_pause(&self, max_bytes: usize) -> bool {
        self.held
            .full(self.records_bytes.load(Ordering::Acquire), max_bytes)
    }
}

/// What [`Slot::offer`] did with a record.
enum Offered {
    /// The worker has it.
    Sent,
    /// The channel is full (records or bytes): hold the record.
    Full(Forwarded),
    /// The worker is gone.
    Gone,
}

/// Records held for a worker whose channel is full, and their size.
#[derive(Default)]
struct Held {
    records: VecDeque<Forwarded>,
    bytes: usize,
}

impl Held {
    fn push_back(&mut self, forwarded: Forwarded) {
        self.bytes += forwarded.size();
        self.records.push_back(forwarded);
    }

    fn push_front(&mut self, forwarded: Forwarded) {
        self.bytes += forwarded.size();
        self.records.push_front(forwarded);
    }

    fn pop_front(&mut self) -> Option<Forwarded> {
        let forwarded = self.records.pop_front()?;
        self.bytes = self.bytes.saturating_sub(forwarded.size());
        Some(forwarded)
    }

    fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }

    fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether the partition must pause: too many records held, or too many bytes held and
    /// in the worker's channel together.
    fn full(&self, in_channel: usize, max_bytes: usize) -> bool {
        self.records.len() >= HELD_BEFORE_PAUSE || self.bytes + in_channel >= max_bytes
    }
}

/// State shared by the consumer loop and its rebalance callbacks (same thread; the mutex is
/// never contended, it only satisfies `ConsumerContext: Sync`).
struct Registry {
    slots: HashMap<PartitionKey, Slot>,
    /// Partitions still assigned to this consumer whose worker was fenced, with the time at
    /// which a new worker takes them over again.
    ///
    /// A fenced worker means another producer initialised its transactional id. Either this
    /// instance is a zombie (its group membership is gone: the consumer learns it within a
    /// session timeout and revokes the partition, which removes it from here), or a zombie
    /// elsewhere fenced the rightful owner (this instance): then nobody would process the
    /// partition until some unrelated rebalance. After a session timeout without a revoke the
    /// partition is ours, so a new worker fences the zombie back (fencing first, then reading
    /// state: safe whichever instance wins).
    dormant: HashMap<PartitionKey, Instant>,
    /// First fatal partition error.
    failure: Option<Error>,
    /// Since when librdkafka's report of a fetch position out of range awaits
    /// [`check_positions_in_range`] (see [`check_reported_ranges`]).
    range_check: Option<Instant>,
}

struct Shared<P: Processor> {
    config: Arc<AppConfig>,
    processor: Arc<P>,
    metrics: Metrics,
    requests: Sender<ConsumerRequest>,
    registry: Mutex<Registry>,
    /// How long a fenced partition that is still assigned stays without a worker (see
    /// [`Registry::dormant`]): a session timeout plus a margin.
    readopt_after: Duration,
    topics: Vec<Arc<str>>,
    /// The consumer's current group metadata (generation / member epoch), which every
    /// worker sends with its offsets: a stale one is rejected by the broker.
    group_metadata: Arc<GroupMetadataCell>,
    /// Trims snapshot partitions below committed full snapshots (unless turned off).
    trimmer: Option<Arc<Trimmer>>,
    /// The partitions with a worker, for the stuck-input watch.
    watched: Arc<Watched>,
}

struct RebalanceContext<P: Processor> {
    shared: Arc<Shared<P>>,
    /// Set when a request to the group coordinator timed out (see [`rejoin_if_needed`]).
    coordinator_timed_out: AtomicBool,
    /// Set before the consumer closes (see [`close_consumer`]).
    closing: AtomicBool,
}

impl<P: Processor> ClientContext for RebalanceContext<P> {
    /// Logs like rdkafka's default, and notes group coordinator request timeouts, which
    /// librdkafka reports only in its log.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "REQTMOUT" && log_message.contains("GroupCoordinator") {
            self.coordinator_timed_out.store(true, Ordering::Release);
        }
        log_librdkafka(level, fac, log_message);
    }
}

impl<P: Processor> ConsumerContext for RebalanceContext<P> {
    /// rdkafka's default rebalance, except that assigned partitions start at their beginning
    /// (a logical offset) instead of the group's committed offset: the worker seeks after
    /// recovery anyway, and a partition without a committed offset would otherwise go through
    /// `auto.offset.reset`, which is `error` here (see [`AppConfig`]). Never at their end:
    /// should that start win over the worker's seek, records between the two would be
    /// skipped; records before the seek offset are only read and dropped.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // The generation (member epoch) changed before this callback: hand the new one to the
        // partitions that keep running now, not after the revoked ones have stopped (which
        // blocks this thread for up to a commit each), or their commits meanwhile are
        // rejected as ILLEGAL_GENERATION and have to recover.
        self.refresh_group_metadata(consumer);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(error) = tpl.set_all_offsets(Offset::Beginning) {
                    tracing::warn!(error = %error, "setting the start of assigned partitions failed");
                }
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                let revoked = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
                revoked
            }
            other => {
                let error = KafkaError::Rebalance(other.into());
                tracing::warn!(error = %error, "rebalance error");
                Ok(())
            }
        };
        if let Err(error) = result {
            tracing::error!(error = %error, "applying a rebalance failed");
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let keys: Vec<PartitionKey> = tpl
                    .elements()
                    .iter()
                    .map(|e| (self.shared.topic_arc(e.topic()), e.partition()))
                    .collect();
                tracing::info!(
                    partitions = %partition_list(tpl),
                    "partitions revoked; stopping their workers"
                );
                self.shared.stop_workers(&keys);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => tracing::warn!(error = %error, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Every rebalance changes the generation (classic) or the member epoch (KIP-848): the
        // partitions that stay keep running and must send the new one with their offsets.
        self.refresh_group_metadata(consumer);
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            tracing::info!(
                partitions = %partition_list(tpl),
                "partitions assigned; starting their workers"
            );
            // Nothing is consumed until the worker has fenced, recovered and asked for a seek.
            if let Err(error) = consumer.pause(tpl) {
                tracing::warn!(error = %error, "pausing newly assigned partitions failed");
            }
            let assignment = consumer.assignment().unwrap_or_else(|_| (*tpl).clone());
            let mut units: Vec<PartitionKey> = Vec::new();
            for element in tpl.elements() {
                let key = (self.shared.topic_arc(element.topic()), element.partition());
                let unit = self.shared.unit_of(&key);
                if !units.contains(&unit[0]) {
                    units.push(unit[0].clone());
                }
            }
            for unit in units {
                self.shared.start_unit_if_assigned(unit, &assignment);
            }
        }
    }
}

impl<P: Processor> RebalanceContext<P> {
    /// Hands the consumer's current group metadata to the workers, unless the consumer is
    /// closing: then no partition keeps running, and the call could block for good (see
    /// [`close_consumer`]).
    fn refresh_group_metadata(&self, consumer: &BaseConsumer<Self>) {
        if !self.closing.load(Ordering::Acquire) {
            self.shared.group_metadata.refresh(consumer);
        }
    }
}

impl<P: Processor> Shared<P> {
    /// The shared name of input `topic`, looked up for every polled record: an app has a few
    /// inputs, and comparing their names costs less than hashing one (profiled).
    fn topic_arc(&self, topic: &str) -> Arc<str> {
        self.topics
            .iter()
            .find(|known| ***known == *topic)
            .cloned()
            .unwrap_or_else(|| Arc::from(topic))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the registry half-updated in a way that
        // matters more than stopping; keep going with the inner value.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The input partitions of `key`'s unit of work, its first input's first: `key` alone,
    /// or partition p of every co-partitioned input (DESIGN §8).
    fn unit_of(&self, key: &PartitionKey) -> Vec<PartitionKey> {
        self.config
            .unit_inputs(&key.0)
            .iter()
            .map(|topic| (self.topic_arc(topic), key.1))
            .collect()
    }

    /// Starts the worker of the unit named by `unit` once every input partition of it is in
    /// `assignment` (the range assignor assigns them together; until then they stay paused).
    fn start_unit_if_assigned(&self, unit: PartitionKey, assignment: &TopicPartitionList) {
        let members = self.unit_of(&unit);
        let missing: Vec<&PartitionKey> = members
            .iter()
            .filter(|(topic, p)| assignment.find_partition(topic, *p).is_none())
            .collect();
        if !missing.is_empty() {
            tracing::warn!(topic = %unit.0, partition = unit.1, missing = ?missing, "a co-partitioned unit waits for the rest of its input partitions to be assigned here (does the group use the range assignor?)");
            return;
        }
        if self.lock().slots.contains_key(&unit) {
            return;
        }
        self.start_worker(unit.0, unit.1);
    }

    fn start_worker(&self, topic: Arc<str>, partition: i32) {
        self.lock().dormant.remove(&(Arc::clone(&topic), partition));
        let members = self.unit_of(&(Arc::clone(&topic), partition));
        let (records_tx, records_rx) = mpsc::sync_channel(WORKER_CHANNEL_CAPACITY);
        let records_bytes = Arc::new(AtomicUsize::new(0));
        let (outcome_tx, outcome_rx) = mpsc::sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let partition_metrics = self.metrics.partition(&topic, partition);
        let worker = PartitionWorker {
            processor: Arc::clone(&self.processor),
            config: Arc::clone(&self.config),
            metrics: self.metrics.clone(),
            partition_metrics: partition_metrics.clone(),
            snapshot_topic: self.config.snapshot_topic(&topic),
            transactional_id: self.config.transactional_id(&topic, partition),
            topic: Arc::clone(&topic),
            inputs: members.iter().map(|(t, _)| Arc::clone(t)).collect(),
            partition,
            group_metadata: Arc::clone(&self.group_metadata),
            trimmer: self.trimmer.clone(),
            records: records_rx,
            records_bytes: Arc::clone(&records_bytes),
            stop: Arc::clone(&stop),
            requests: self.requests.clone(),
            epoch: 0,
            commits: Default::default(),
            fingerprints: RefCell::new(Cadence::new(self.config.commit_interval)),
            local: crate::state::LocalState::new(
                &self.config.state_dir,
                &self.config.app_id,
                &topic,
                partition,
            ),
        };
        match partition::spawn(worker, outcome_tx) {
            Ok(thread) => {
                self.metrics.partition_assigned();
                let mut outcome = Some(outcome_rx);
                let mut thread = Some(thread);
                let mut metrics = Some(partition_metrics);
                let mut registry = self.lock();
                for key in members {
                    self.watched.add(&key.0, key.1);
                    let slot = Slot {
                        records: records_tx.clone(),
                        stop: Arc::clone(&stop),
                        outcome: outcome.take(),
                        thread: thread.take(),
                        live_epoch: None,
                        fetch_position: None,
                        held: Held::default(),
                        paused_for_backpressure: false,
                        records_bytes: Arc::clone(&records_bytes),
                        metrics: metrics.take(),
                    };
                    registry.slots.insert(key, slot);
                }
            }
            Err(source) => {
                self.metrics.forget_partition(&topic, partition);
                let mut registry = self.lock();
                registry.failure.get_or_insert(Error::Io {
                    context: format!("starting the worker thread of {topic}/{partition}"),
                    source,
                });
            }
        }
    }

    /// Asks the workers of `keys` to commit and stop, and waits for them (bounded).
    fn stop_all_workers(&self) {
        let keys: Vec<PartitionKey> = self.lock().slots.keys().cloned().collect();
        self.stop_workers(&keys);
    }

    /// What [`App::run`] returns once the consumer stopped: the first failure, if any.
    fn outcome(&self) -> Result<(), Error> {
        match self.lock().failure.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn stop_workers(&self, keys: &[PartitionKey]) {
        // A unit stops as a whole: every input partition of it.
        let mut all: Vec<PartitionKey> = Vec::new();
        for key in keys {
            for member in self.unit_of(key) {
                if !all.contains(&member) {
                    all.push(member);
                }
            }
        }
        let mut slots: Vec<(PartitionKey, Slot)> = {
            let mut registry = self.lock();
            for key in &all {
                registry.dormant.remove(key);
            }
            all.iter()
                .filter_map(|k| registry.slots.remove_entry(k))
                .collect()
        };
        for ((topic, partition), _) in &slots {
            self.watched.remove(topic, *partition);
        }
        for (_, slot) in &slots {
            slot.stop.store(true, Ordering::Release);
        }
        // A commit may take up to the transaction timeout; then the worker is abandoned (its
        // transaction will be aborted by the next owner's init_transactions).
        let deadline = Instant::now() + self.config.transaction_timeout + Duration::from_secs(5);
        for ((topic, partition), slot) in &mut slots {
            let Some(outcome) = &slot.outcome else {
                continue; // another input of a unit: its first input's slot waits
            };
            let outcome = outcome.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            match outcome {
                Ok(WorkerOutcome::Failed(error)) => {
                    self.lock().failure.get_or_insert(error);
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(topic = %topic, partition = *partition, "partition worker did not stop in time; abandoning it");
                    slot.thread.take();
                }
            }
            if let Some(thread) = slot.thread.take() {
                let _ = thread.join();
            }
            self.metrics.partition_revoked(topic, *partition);
        }
    }
}

struct ConsumerLoop<P: Processor> {
    config: Arc<AppConfig>,
    processor: Arc<P>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
}

impl<P: Processor> ConsumerLoop<P> {
    fn run(self) -> Result<(), Error> {
        let (requests_tx, requests_rx) = mpsc::channel();
        let topics = self
            .config
            .input_topics
            .iter()
            .map(|t| Arc::<str>::from(t.as_str()))
            .collect();
        let watched = Arc::new(Watched::default());
        if !self.config.stuck_input_after.is_zero() {
            stuck::start(&self.config, Arc::clone(&watched), self.metrics.clone())?;
        }
        let trimmer = if self.config.snapshot_trimming {
            Some(Arc::new(Trimmer::start(
                &self.config,
                self.metrics.clone(),
            )?))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            readopt_after: self.config.session_timeout() + Duration::from_secs(2),
            config: Arc::clone(&self.config),
            processor: Arc::clone(&self.processor),
            metrics: self.metrics.clone(),
            requests: requests_tx,
            registry: Mutex::new(Registry {
                slots: HashMap::new(),
                dormant: HashMap::new(),
                failure: None,
                range_check: None,
            }),
            topics,
            group_metadata: Arc::new(GroupMetadataCell::default()),
            trimmer,
            watched: Arc::clone(&watched),
        });
        let topic_names: Vec<&str> = self
            .config
            .input_topics
            .iter()
            .map(String::as_str)
            .collect();
        let mut consumer = join_group(&shared, &topic_names)?;
        tracing::info!(app_id = %self.config.app_id, topics = ?topic_names, "consumer started");

        let mut pending_seeks: Vec<ConsumerRequest> = Vec::new();
        let mut metadata_refreshed = Instant::now();
        let mut input_ends_published = Instant::now();
        let mut rejoined: Option<Instant> = None;
        let mut instance_id_wait = InstanceIdWait::default();
        while !self.stop.load(Ordering::Acquire) {
            let recovering = {
                let registry = shared.lock();
                if registry.failure.is_some() {
                    break;
                }
                if !registry.slots.is_empty() {
                    instance_id_wait.joined();
                }
                registry
                    .slots
                    .values()
                    .any(|slot| slot.live_epoch.is_none())
            };
            if instance_id_wait.must_rejoin {
                // librdkafka made the consumer unusable (the error is fatal to it): a new one.
                close_consumer(consumer);
                if !instance_id_wait.back_off(&self.stop) {
                    shared.stop_all_workers();
                    return shared.outcome();
                }
                consumer = join_group(&shared, &topic_names)?;
                shared.group_metadata.refresh(&consumer);
                metadata_refreshed = Instant::now();
                continue;
            }
            rejoin_if_needed(&consumer, &shared, &topic_names, &mut rejoined);
            if metadata_refreshed.elapsed() >= GROUP_METADATA_REFRESH {
                shared.group_metadata.refresh(&consumer);
                metadata_refreshed = Instant::now();
            }
            if input_ends_published.elapsed() >= INPUT_END_REFRESH {
                publish_input_ends(&consumer, &shared);
                input_ends_published = Instant::now();
            }
            pending_seeks.extend(requests_rx.try_iter());
            pending_seeks.retain(|request| !serve_request(&consumer, &shared, request));
            let holding = service_slots(&consumer, &shared);
            check_reported_ranges(&consumer, &shared);
            readopt_fenced(&consumer, &shared);
            // A worker that is recovering soon asks for its seek, which waits for this poll.
            let timeout = if holding {
                HOLDING_POLL
            } else if pending_seeks.is_empty() && !recovering {
                Duration::from_millis(100)
            } else {
                Duration::from_millis(10)
            };
            // Up to a burst of records per round of housekeeping above: it costs as much as
            // forwarding a record.
            let mut wait = timeout;
            for _ in 0..FORWARD_BURST {
                match consumer.poll(wait) {
                    None => break,
                    Some(Ok(message)) => {
                        let key = (shared.topic_arc(message.topic()), message.partition());
                        forward(&consumer, &shared, key, &message);
                    }
                    Some(Err(error)) => {
                        if !instance_id_wait.waits_for(&error, &shared.config) {
                            handle_consumer_error(&shared, error);
                        }
                        break;
                    }
                }
                wait = Duration::ZERO;
            }
        }

        // Graceful stop: every worker commits its in-flight batch (and a final full
        // snapshot); then the consumer closes and leaves the group.
        shared.stop_all_workers();
        close_consumer(consumer);
        tracing::info!("consumer stopped");
        shared.outcome()
    }
}

/// Creates the group consumer and subscribes it to the input topics.
fn join_group<P: Processor>(
    shared: &Arc<Shared<P>>,
    topics: &[&str],
) -> Result<BaseConsumer<RebalanceContext<P>>, Error> {
    let consumer: BaseConsumer<RebalanceContext<P>> = shared
        .config
        .consumer_config(true)
        .create_with_context(RebalanceContext {
            shared: Arc::clone(shared),
            coordinator_timed_out: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        })
        .map_err(|source| Error::kafka("creating the group consumer", source))?;
    consumer
        .subscribe(topics)
        .map_err(|source| Error::kafka("subscribing to the input topics", source))?;
    Ok(consumer)
}

/// Leaves the group and closes the consumer; the revocation this causes runs in the callbacks
/// meanwhile.
///
/// librdkafka (2.12, and its master branch) discards requests that reach a consumer group that
/// has terminated without answering them, and `rd_kafka_consumer_group_metadata` waits for its
/// answer without a timeout: called from a revocation callback that runs after the group
/// terminated, it never returns, and the app hangs in its shutdown (seen with a gdb backtrace).
/// So the callbacks stop asking once closing starts.
fn close_consumer<P: Processor>(consumer: BaseConsumer<RebalanceContext<P>>) {
    consumer.context().closing.store(true, Ordering::Release);
    consumer.unsubscribe();
    drop(consumer);
}

/// Waits for a crashed predecessor's `group.instance.id` to be released.
///
/// Under the consumer protocol (KIP-848) a static member that died without leaving keeps its
/// instance id until the group's session timeout ends; an instance restarted sooner with the
/// same id is refused with `UNRELEASED_INSTANCE_ID`, which librdkafka makes fatal. Within one
/// session timeout (plus a margin) that is most likely the predecessor, so the instance joins
/// again with a new consumer; after it, the id is held by a live instance: an error.
#[derive(Default)]
struct InstanceIdWait {
    /// When the first refusal in a row came.
    since: Option<Instant>,
    /// The consumer was refused and must be replaced.
    must_rejoin: bool,
}

impl InstanceIdWait {
    /// Rejoins this often while the id is held.
    const BACKOFF: Duration = Duration::from_secs(2);
    /// Waits this much longer than the session timeout (the broker's expiry check is periodic).
    const MARGIN: Duration = Duration::from_secs(5);

    /// True when `error` is a refusal of the instance id within the wait: the consumer is to be
    /// replaced (see [`back_off`](Self::back_off)) instead of the error stopping the app.
    fn waits_for(&mut self, error: &KafkaError, config: &AppConfig) -> bool {
        if config.group_protocol != GroupProtocol::Consumer
            || error.rdkafka_error_code() != Some(RDKafkaErrorCode::UnreleasedInstanceId)
        {
            return false;
        }
        let budget = config.session_timeout() + Self::MARGIN;
        let since = *self.since.get_or_insert_with(|| {
            tracing::warn!(
                instance_id = config.instance_id.as_deref().unwrap_or_default(),
                wait_s = budget.as_secs(),
                "the group still holds this group.instance.id for another member, most likely \
                 this instance before a crash: rejoining until the broker's session timeout \
                 (group.consumer.session.timeout.ms) releases it"
            );
            Instant::now()
        });
        self.must_rejoin = since.elapsed() < budget;
        self.must_rejoin
    }

    /// Partitions were assigned: the id is ours.
    fn joined(&mut self) {
        if self.since.take().is_some() {
            tracing::info!("joined the group with the released group.instance.id");
        }
    }

    /// Waits before the next join; false when the app is stopping instead.
    fn back_off(&mut self, stop: &AtomicBool) -> bool {
        self.must_rejoin = false;
        let until = Instant::now() + Self::BACKOFF;
        while Instant::now() < until {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

/// Rejoins the group after a request to its coordinator timed out, at most once per
/// [`REJOIN_COOLDOWN`].
///
/// librdkafka 2.12 (up to its master branch) retries a timed-out ConsumerGroupHeartbeat as it
/// was, while Kafka resends a member's assignment only in answer to a full heartbeat (which the
/// Java client sends after any error). When the lost answer carried a change — a partition to
/// give up — the member never learns it: the coordinator waits the rebalance timeout
/// (`max.poll.interval.ms`, 5 minutes by default) before fencing it, and the partition, and the
/// member waiting for it, stand still. A rejoin is a full heartbeat; it moves this instance's
/// partitions, but only after a coordinator failure.
fn rejoin_if_needed<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
    topics: &[&str],
    rejoined: &mut Option<Instant>,
) {
    // The classic protocol's heartbeat answers carry no assignment: nothing is lost there.
    if shared.config.group_protocol != GroupProtocol::Consumer
        || rejoined.is_some_and(|at| at.elapsed() < REJOIN_COOLDOWN)
        || !consumer
            .context()
            .coordinator_timed_out
            .swap(false, Ordering::AcqRel)
    {
        return;
    }
    tracing::warn!(
        "a request to the group coordinator timed out; rejoining the group (librdkafka does not \
         resend a full heartbeat after a timeout, so a partition change in the lost answer would \
         wait for max.poll.interval.ms)"
    );
    consumer.unsubscribe();
    if let Err(source) = consumer.subscribe(topics) {
        shared.lock().failure.get_or_insert(Error::kafka(
            "subscribing again after a coordinator timeout",
            source,
        ));
    }
    *rejoined = Some(Instant::now());
}

/// Serves a worker's request; false when it must be retried later (e.g. the partition's
/// fetcher has not started yet, librdkafka's "Erroneous state" right after an assignment).
fn serve_request<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
    request: &ConsumerRequest,
) -> bool {
    let ConsumerRequest::Seek {
        topic,
        partition,
        offset,
        epoch,
    } = request;
    let mut registry = shared.lock();
    let Some(slot) = registry.slots.get_mut(&(Arc::clone(topic), *partition)) else {
        return true; // revoked meanwhile
    };
    // Resumed before the seek, which wakes librdkafka's fetcher (see `resume_fetching`). No
    // record fetched in between reaches the worker: the seek discards what was not polled, and
    // nothing is polled before it.
    if let Err(error) = consumer.resume(&single(topic, *partition)) {
        tracing::warn!(topic = %topic, partition, error = %error, "resuming a partition failed");
        return false;
    }
    if let Err(error) = consumer.seek(topic, *partition, Offset::Offset(*offset), SEEK_TIMEOUT) {
        tracing::debug!(topic = %topic, partition, offset, error = %error, "seek not possible yet; retrying");
        let _ = consumer.pause(&single(topic, *partition));
        return false;
    }
    slot.live_epoch = Some(*epoch);
    slot.fetch_position = Some(FetchPosition::new(*offset));
    slot.held.clear();
    slot.paused_for_backpressure = false;
    tracing::debug!(topic = %topic, partition, offset, epoch, "partition live");
    true
}

/// Resumes a partition paused for backpressure where its records stopped, and makes
/// librdkafka fetch it now.
///
/// A resume alone does not wake the consumer's broker thread (librdkafka 2.12): when it had
/// nothing else to fetch, it sleeps up to its fixed 1 s before it notices, and a lone
/// partition fetched nothing for about a second after every pause (measured: 100k records
/// took 2.2–3.2 s, one stall per 28k). A seek to the next expected record does wake it (the
/// fetch state passes through validation back to active), and moves nothing: the partition was
/// paused right after that record, and nothing of it was queued.
fn resume_fetching<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    key: &PartitionKey,
    position: Option<FetchPosition>,
) {
    if let Err(error) = consumer.resume(&single(&key.0, key.1)) {
        tracing::warn!(topic = %key.0, partition = key.1, error = %error, "resuming a partition failed");
        return;
    }
    let Some(next) = position.map(|p| p.next()) else {
        return;
    };
    if let Err(error) = consumer.seek(&key.0, key.1, Offset::Offset(next), SEEK_TIMEOUT) {
        tracing::debug!(topic = %key.0, partition = key.1, offset = next, error = %error, "seeking a resumed partition failed; librdkafka fetches it within a second");
    }
}

/// `topic/p, topic/q, ...` for log lines.
fn partition_list(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

/// Starts a new worker for each fenced partition that is still assigned to this consumer
/// after [`Shared::readopt_after`] (see [`Registry::dormant`]).
fn readopt_fenced<P: Processor>(consumer: &BaseConsumer<RebalanceContext<P>>, shared: &Shared<P>) {
    let now = Instant::now();
    let due: Vec<PartitionKey> = {
        let mut registry = shared.lock();
        let due: Vec<PartitionKey> = registry
            .dormant
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &due {
            registry.dormant.remove(key);
        }
        due
    };
    if due.is_empty() {
        return;
    }
    let assignment = match consumer.assignment() {
        Ok(assignment) => assignment,
        Err(error) => {
            tracing::warn!(error = %error, "reading the assignment failed; fenced partitions wait for a rebalance");
            return;
        }
    };
    for key in due {
        let members = shared.unit_of(&key);
        if members
            .iter()
            .all(|(t, p)| assignment.find_partition(t, *p).is_some())
        {
            tracing::info!(topic = %key.0, partition = key.1, "fenced partition still assigned after a session timeout: taking it over again");
            shared.start_worker(key.0, key.1);
        }
    }
}

/// Delivers held records, notices workers that ended on their own; returns whether records
/// are still held for a worker.
fn service_slots<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
) -> bool {
    let mut registry = shared.lock();
    let mut ended: Vec<(PartitionKey, WorkerOutcome)> = Vec::new();
    let mut holding = false;
    for (key, slot) in registry.slots.iter_mut() {
        while let Some(front) = slot.held.pop_front() {
            match slot.offer(front, shared.config.max_buffered_bytes) {
                Offered::Sent => {}
                Offered::Full(f) => {
                    slot.held.push_front(f);
                    break;
                }
                Offered::Gone => slot.held.clear(),
            }
        }
        holding |= !slot.held.is_empty();
        // Resumed only once the worker has taken half of what is buffered: resuming at the
        // byte bound would pause again at the next record and refetch, over and over.
        if slot.held.is_empty()
            && slot.paused_for_backpressure
            && slot.buffered_bytes() <= shared.config.max_buffered_bytes / 2
        {
            slot.paused_for_backpressure = false;
            resume_fetching(consumer, key, slot.fetch_position);
        }
        let Some(outcome) = &slot.outcome else {
            continue;
        };
        match outcome.try_recv() {
            Ok(outcome) => ended.push((key.clone(), outcome)),
            Err(TryRecvError::Empty) => {}
            // The worker's thread ended without a word: never "finished", or the partition
            // would stay assigned with nobody processing it.
            Err(TryRecvError::Disconnected) => ended.push((
                key.clone(),
                WorkerOutcome::Failed(Error::WorkerLost {
                    topic: key.0.to_string(),
                    partition: key.1,
                }),
            )),
        }
    }
    for (key, outcome) in ended {
        for member in shared.unit_of(&key) {
            if let Some(mut slot) = registry.slots.remove(&member) {
                shared.watched.remove(&member.0, member.1);
                if let Some(thread) = slot.thread.take() {
                    let _ = thread.join();
                }
            }
            // Stop fetching a partition nobody processes; a rebalance will hand it over.
            let _ = consumer.pause(&single(&member.0, member.1));
        }
        shared.metrics.partition_revoked(&key.0, key.1);
        match outcome {
            WorkerOutcome::Failed(error) => {
                registry.failure.get_or_insert(error);
            }
            WorkerOutcome::Fenced => {
                let at = Instant::now() + shared.readopt_after;
                registry.dormant.insert(key, at);
            }
            WorkerOutcome::Finished => {}
        }
    }
    holding
}

/// A librdkafka log line, as rdkafka's default context logs it (through `tracing`).
pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, log_message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}")
        }
    }
}

/// Each assigned partition's end as the consumer last fetched it (cached: no request), for
/// the lag metric.
fn publish_input_ends<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
) {
    let registry = shared.lock();
    for ((topic, partition), slot) in &registry.slots {
        let Some(metrics) = &slot.metrics else {
            continue;
        };
        if let Some((_, high)) = cached_watermarks(consumer, topic, *partition) {
            metrics.input_end(high);
        }
    }
}

/// What an error from the group consumer means: most are passing (the client retries); an
/// offset reset may mean input this app has not processed is gone (or the log was replaced),
/// which [`check_reported_ranges`] finds out next;
/// authorization failures, a fenced static member and fatal errors stop the app.
fn handle_consumer_error<P: Processor>(shared: &Shared<P>, error: KafkaError) {
    let code = error.rdkafka_error_code();
    let fatal = matches!(error, KafkaError::MessageConsumptionFatal(_));
    let fix = match code {
        Some(RDKafkaErrorCode::AutoOffsetReset) => {
            let mut registry = shared.lock();
            registry.range_check.get_or_insert_with(Instant::now);
            return;
        }
        Some(RDKafkaErrorCode::FencedInstanceId | RDKafkaErrorCode::UnreleasedInstanceId) => {
            "another instance uses the same group.instance.id: give every instance its own"
                .to_owned()
        }
        _ if fatal => {
            "librdkafka reported it as fatal: the consumer cannot be used any more".to_owned()
        }
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => format!(
            "not authorized: the app's principal lacks READ (and DESCRIBE) on an input topic ({}): grant the ACL",
            shared.config.input_topics.join(", ")
        ),
        Some(RDKafkaErrorCode::GroupAuthorizationFailed) => format!(
            "not authorized: the app's principal lacks READ on its consumer group {}: grant the ACL",
            shared.config.app_id
        ),
        _ => {
            tracing::warn!(error = %error, "consumer error");
            return;
        }
    };
    tracing::error!(error = %error, fix, "the group consumer cannot go on; stopping the app");
    shared.lock().failure.get_or_insert(Error::ConsumerFailed {
        group: shared.config.app_id.clone(),
        source: Box::new(error),
        fix,
    });
}

/// How long the log bounds may stay unreadable after librdkafka reported a fetch position out
/// of range before the app stops: the partition fetches nothing until then.
const RANGE_CHECK_BUDGET: Duration = Duration::from_secs(60);

/// Runs [`check_positions_in_range`] after librdkafka reported a fetch position out of range
/// (`auto.offset.reset=error`), and again on later rounds while log bounds could not be read:
/// librdkafka stops fetching such a partition and reports it once, so a check that failed is
/// retried, and past [`RANGE_CHECK_BUDGET`] it stops the app rather than leave the partition
/// silently still.
fn check_reported_ranges<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
) {
    let Some(since) = shared.lock().range_check.take() else {
        return;
    };
    let Err(unread) = check_positions_in_range(consumer, shared) else {
        return;
    };
    let mut registry = shared.lock();
    if since.elapsed() < RANGE_CHECK_BUDGET {
        registry.range_check.get_or_insert(since);
        return;
    }
    let UnreadBounds {
        topic,
        partition,
        position,
        source,
    } = unread;
    registry.failure.get_or_insert(Error::kafka(
        format!(
            "the broker reported the fetch position {position} of {topic}/{partition} out of range, and its log bounds could not be read for {}s to tell deleted input from a replaced log",
            RANGE_CHECK_BUDGET.as_secs()
        ),
        source,
    ));
}

/// A live partition whose log bounds could not be read.
struct UnreadBounds {
    topic: Arc<str>,
    partition: i32,
    position: i64,
    source: KafkaError,
}

/// Finds the live partitions whose position is outside their log and fails them: below the
/// log start, unprocessed input was deleted; above the end, the log was replaced. A partition
/// still recovering has no position yet (its worker seeks): librdkafka's complaint about it is
/// harmless and ignored. Err: a partition whose bounds could not be read (the others were
/// checked).
///
/// The position is the record the partition needs next as the consumer thread tracks it:
/// librdkafka forgets its own at every seek until a record arrives, and a partition sought to
/// deleted input never gets one. The bounds are read by a group-less client of their own: the
/// group consumer's requests may wait behind the lookup that went wrong.
fn check_positions_in_range<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
) -> Result<(), UnreadBounds> {
    let live: Vec<(PartitionKey, Option<i64>)> = shared
        .lock()
        .slots
        .iter()
        .filter(|(_, slot)| slot.live_epoch.is_some())
        .map(|(key, slot)| (key.clone(), slot.fetch_position.map(|p| p.next())))
        .collect();
    let librdkafka_positions = consumer.position().ok();
    let reader: Result<BaseConsumer, KafkaError> = shared.config.consumer_config(false).create();
    let mut unread = None;
    for ((topic, partition), tracked) in live {
        let reported = || match librdkafka_positions
            .as_ref()?
            .find_partition(&topic, partition)?
            .offset()
        {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        };
        let Some(position) = tracked.or_else(reported) else {
            continue;
        };
        let bounds = reader
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|reader| reader.fetch_watermarks(&topic, partition, Duration::from_secs(10)));
        let (low, high) = match bounds {
            Ok(bounds) => bounds,
            Err(source) => {
                tracing::warn!(topic = %topic, partition, error = %source, "cannot read the log bounds after an offset-out-of-range report; retrying");
                unread = Some(UnreadBounds {
                    topic,
                    partition,
                    position,
                    source,
                });
                continue;
            }
        };
        let failure = if position < low {
            Error::InputDeleted {
                topic: topic.to_string(),
                partition,
                position,
                log_start_offset: low,
            }
        } else if position > high {
            Error::InputTruncated {
                topic: topic.to_string(),
                partition,
                needed_offset: position,
                log_end_offset: high,
            }
        } else {
            continue;
        };
        tracing::error!(topic = %topic, partition, position, log_start_offset = low, log_end_offset = high, "input position out of range");
        let _ = consumer.pause(&single(&topic, partition));
        shared.lock().failure.get_or_insert(failure);
    }
    if let Ok(reader) = reader {
        destroy_in_background(reader);
    }
    unread.map_or(Ok(()), Err)
}

fn forward<P: Processor>(
    consumer: &BaseConsumer<RebalanceContext<P>>,
    shared: &Shared<P>,
    key: PartitionKey,
    message: &rdkafka::message::BorrowedMessage<'_>,
) {
    let mut registry = shared.lock();
    let Some(slot) = registry.slots.get_mut(&key) else {
        return;
    };
    let Some(epoch) = slot.live_epoch else {
        return; // still recovering: the worker will seek
    };
    let offset = message.offset();
    let continuity = match slot.fetch_position.as_mut() {
        Some(position) => position.check(offset, || cached_log_start(consumer, &key.0, key.1)),
        None => Continuity::InOrder,
    };
    match continuity {
        Continuity::InOrder => {}
        Continuity::Rewound { expected } => {
            tracing::warn!(topic = %key.0, partition = key.1, offset, expected, "the consumer's fetch position went back on its own (a librdkafka offset lookup raced with a seek); seeking again");
            if let Err(error) = consumer.seek(&key.0, key.1, Offset::Offset(expected), SEEK_TIMEOUT)
            {
                tracing::warn!(topic = %key.0, partition = key.1, error = %error, "seeking a rewound partition failed; retrying on its next record");
            }
            return;
        }
        Continuity::Deleted {
            expected,
            log_start,
        } => {
            tracing::error!(topic = %key.0, partition = key.1, offset, position = expected, log_start_offset = log_start, "the consumer jumped over input deleted before it was read");
            slot.live_epoch = None;
            let _ = consumer.pause(&single(&key.0, key.1));
            registry.failure.get_or_insert(Error::InputDeleted {
                topic: key.0.to_string(),
                partition: key.1,
                position: expected,
                log_start_offset: log_start,
            });
            return;
        }
    }
    let forwarded = Forwarded {
        epoch,
        record: raw_record(&key.0, message),
    };
    let max_bytes = shared.config.max_buffered_bytes;
    if slot.held.is_empty() {
        match slot.offer(forwarded, max_bytes) {
            Offered::Sent | Offered::Gone => {}
            Offered::Full(f) => slot.held.push_back(f),
        }
    } else {
        slot.held.push_back(forwarded);
    }
    shared.metrics.buffered_bytes(slot.buffered_bytes());
    if slot.must_pause(max_bytes) && !slot.paused_for_backpressure {
        slot.paused_for_backpressure = true;
        if let Err(error) = consumer.pause(&single(&key.0, key.1)) {
            tracing::warn!(error = %error, "pausing a partition for backpressure failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> KafkaError {
        KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::UnreleasedInstanceId)
    }

    fn config(protocol: GroupProtocol) -> AppConfig {
        AppConfig::new("app", "localhost:9092")
            .input_topic("in")
            .group_protocol(protocol)
            .instance_id("app-0")
    }

    #[test]
    fn a_refused_instance_id_is_waited_for_one_session_timeout() {
        let config = config(GroupProtocol::Consumer);
        let mut wait = InstanceIdWait::default();
        assert!(wait.waits_for(&refused(), &config));
        assert!(wait.must_rejoin);
        // Still refused after a session timeout and the margin: a live instance holds the id.
        wait.since = Some(Instant::now() - config.session_timeout() - InstanceIdWait::MARGIN);
        assert!(!wait.waits_for(&refused(), &config));
        // Once partitions came, a later refusal starts a new wait.
        wait.joined();
        assert!(wait.waits_for(&refused(), &config));
    }

    #[test]
    fn only_a_refused_instance_id_under_the_consumer_protocol_is_waited_for() {
        let mut wait = InstanceIdWait::default();
        // The classic protocol replaces a static member instead of refusing the newcomer.
        assert!(!wait.waits_for(&refused(), &config(GroupProtocol::CooperativeSticky)));
        let fenced = KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::FencedInstanceId);
        assert!(!wait.waits_for(&fenced, &config(GroupProtocol::Consumer)));
        assert!(!wait.must_rejoin);
    }

    #[test]
    fn backing_off_ends_early_when_the_app_stops() {
        let mut wait = InstanceIdWait {
            must_rejoin: true,
            ..InstanceIdWait::default()
        };
        assert!(!wait.back_off(&AtomicBool::new(true)));
        assert!(!wait.must_rejoin);
    }
}

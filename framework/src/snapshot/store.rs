//! Snapshot records on Kafka: reading a partition (the recovery side) and writing snapshot
//! records inside a partition worker's transaction (the commit side).
//!
//! Reading uses a plain `assign()`ed, read_committed consumer with `enable.partition.eof`:
//! the end of a partition is learnt from librdkafka's end-of-partition event, never from
//! "no message arrived for a while" (a slow broker would then look like an empty partition).
//! A read that makes no progress for `stall_timeout` fails with an error instead.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::error::Error;
use crate::metrics::PartitionMetrics;
use crate::progress::Progress;
use crate::proto::{snapshot_record, FullSnapshotChunk, FullSnapshotRef, IncrementalSnapshot};
use crate::snapshot::connect::connect_to_a_named_broker;
use crate::snapshot::wakeup::DeliveryWakeup;
use crate::snapshot::{
    assemble_chunks, chunk_record, decode_record, encode_record, incremental_record, SnapshotError,
};

/// What a [`PartitionReader::read`] callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// Client context of the reader: end-of-partition is how a read ends, not an error worth a
/// log line at error level (librdkafka also reports it as a global error event).
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(_) => {}
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => {}
            // The reader only assigns, and librdkafka looks up its (never joined) group's
            // coordinator anyway: an app whose principal has no ACL on that group loses
            // nothing.
            KafkaError::Global(RDKafkaErrorCode::GroupAuthorizationFailed) => {
                tracing::debug!(
                    reason,
                    "the recovery reader's group lookup was not authorized (not needed)"
                )
            }
            other => tracing::warn!(error = %other, reason, "recovery consumer error"),
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Reads one partition at a time from a given offset up to its (read_committed) end.
pub(crate) struct PartitionReader {
    consumer: BaseConsumer<ReaderContext>,
    /// A read_uncommitted twin used only for [`PartitionReader::bounds`]: the high watermark
    /// is an upper bound of the last stable offset, which is all a tail window needs (the
    /// read itself stops at the read_committed end-of-partition event).
    bounds_client: BaseConsumer<ReaderContext>,
    stall_timeout: Duration,
}

impl PartitionReader {
    /// `config` is a non-group consumer configuration (read_committed).
    pub(crate) fn new(mut config: ClientConfig, stall_timeout: Duration) -> Result<Self, Error> {
        config
            .set("enable.partition.eof", "true")
            // An offset below the log start must surface as an error, never as a silent jump.
            .set("auto.offset.reset", "error")
            .set("enable.auto.commit", "false")
            // A read ends at the end of the partition: do not let the broker hold the last,
            // empty fetch for the default 500 ms (three reads per recovery).
            .set("fetch.wait.max.ms", "20")
            // Full snapshots come in chunks of up to 512 KiB: fetch many per round trip
            // (with the default 1 MiB per partition, 13 MB took 13 round trips, 117 ms).
            .set("max.partition.fetch.bytes", "16777216")
            .set("fetch.max.bytes", "67108864");
        let consumer = config
            .create_with_context(ReaderContext)
            .map_err(|source| Error::kafka("creating the recovery consumer", source))?;
        config.set("isolation.level", "read_uncommitted");
        let bounds_client = config
            .create_with_context(ReaderContext)
            .map_err(|source| Error::kafka("creating the recovery consumer", source))?;
        Ok(PartitionReader {
            consumer,
            bounds_client,
            stall_timeout,
        })
    }

    /// Brings both clients' first broker connections up (side by side), so that the first
    /// read does not lose librdkafka's connection race (see [`connect_to_a_named_broker`]).
    pub(crate) fn connect(&self, topic: &str) {
        std::thread::scope(|scope| {
            let twin = std::thread::Builder::new()
                .name("exactly-connect".into())
                .spawn_scoped(scope, || {
                    connect_to_a_named_broker(self.bounds_client.client(), topic)
                });
            connect_to_a_named_broker(self.consumer.client(), topic);
            if twin.is_err() {
                connect_to_a_named_broker(self.bounds_client.client(), topic);
            }
        });
    }

    /// (log start offset, high watermark) of a partition. The high watermark may exceed the
    /// last stable offset (open transactions); use [`Self::stable_end`] where that matters.
    pub(crate) fn bounds(&self, topic: &str, partition: i32) -> Result<(i64, i64), Error> {
        self.watermarks_of(&self.bounds_client, topic, partition)
    }

    /// The end of a partition as a read_committed consumer sees it: the last stable offset.
    pub(crate) fn stable_end(&self, topic: &str, partition: i32) -> Result<i64, Error> {
        self.watermarks_of(&self.consumer, topic, partition)
            .map(|(_, end)| end)
    }

    /// Whether a read of `topic/partition` (from `from`) that got librdkafka's end-of-partition
    /// event is at the partition's end.
    ///
    /// librdkafka signals the end when its fetch position reaches the end the *fetch response*
    /// named. A leader elected a moment ago answers with its own high watermark, which can
    /// trail the records its predecessor already served as committed: Kafka keeps ListOffsets
    /// from going backwards across a leader change (KIP-207), not Fetch. Trusted, such an end
    /// makes the latest snapshot record look older than it is, or missing (recovery would
    /// then start from an older state, or refuse to start). So the consumer's position, which
    /// moves past control records too, is compared with the ends from ListOffsets; below the
    /// last stable offset, the read goes on (librdkafka signals the end again once it gets
    /// there). The high watermark is asked first, by the bounds client: the reader's own
    /// connection is busy with the fetch the broker holds for `fetch.wait.max.ms` at the end of
    /// a partition, and a ListOffsets behind it waited for that (20 ms more per recovery).
    fn at_stable_end(&self, topic: &str, partition: i32, from: i64) -> Result<bool, Error> {
        let position = self
            .consumer
            .position()
            .ok()
            .and_then(|positions| {
                positions
                    .find_partition(topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    })
            })
            .unwrap_or(from);
        if position >= self.bounds(topic, partition)?.1 {
            return Ok(true);
        }
        // Below the high watermark: an open transaction ends the committed part, or the end
        // was stale.
        let end = self.stable_end(topic, partition)?;
        if position >= end {
            return Ok(true);
        }
        tracing::debug!(
            topic,
            partition,
            position,
            last_stable_offset = end,
            "end-of-partition event below the last stable offset (a new leader's lagging high watermark?); reading on"
        );
        Ok(false)
    }

    fn watermarks_of(
        &self,
        client: &BaseConsumer<ReaderContext>,
        topic: &str,
        partition: i32,
    ) -> Result<(i64, i64), Error> {
        let deadline = Instant::now() + self.stall_timeout;
        loop {
            match client.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
                Ok(w) => return Ok(w),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(topic, partition, error = %e, "fetching watermarks failed; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(source) => {
                    return Err(Error::kafka(
                        format!("fetching the watermarks of {topic}/{partition}"),
                        source,
                    ))
                }
            }
        }
    }

    /// Reads `topic/partition` from offset `from` and hands each record to `on_record` until
    /// it returns [`Flow::Stop`] or the end of the partition is reached.
    pub(crate) fn read(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        mut on_record: impl FnMut(&BorrowedMessage<'_>) -> Result<Flow, Error>,
    ) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))
            .map_err(|source| Error::kafka(format!("assigning {topic}/{partition}"), source))?;
        self.consumer
            .assign(&tpl)
            .map_err(|source| Error::kafka(format!("assigning {topic}/{partition}"), source))?;
        let result = self.read_assigned(topic, partition, from, &mut on_record);
        let _ = self.consumer.unassign();
        result
    }

    /// Reads several partitions side by side, each `(topic, partition, from)`, handing each
    /// record to `on_record` with the index of its partition, until it returns
    /// [`Flow::Stop`]. The caller knows what it needs: records past it are handed over too,
    /// and a read that gets nothing for the stall timeout fails.
    pub(crate) fn read_many(
        &self,
        parts: &[(&str, i32, i64)],
        mut on_record: impl FnMut(usize, &BorrowedMessage<'_>) -> Result<Flow, Error>,
    ) -> Result<(), Error> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, from) in parts {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*from))
                .map_err(|source| Error::kafka(format!("assigning {topic}/{partition}"), source))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|source| Error::kafka("assigning the partitions to replay", source))?;
        let result = self.read_assigned_many(parts, &mut on_record);
        let _ = self.consumer.unassign();
        result
    }

    fn read_assigned_many(
        &self,
        parts: &[(&str, i32, i64)],
        on_record: &mut impl FnMut(usize, &BorrowedMessage<'_>) -> Result<Flow, Error>,
    ) -> Result<(), Error> {
        let mut last_progress = Instant::now();
        let mut positions: Vec<i64> = parts.iter().map(|(_, _, from)| *from).collect();
        loop {
            match self.consumer.poll(Duration::from_millis(100)) {
                None | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Ok(message)) => {
                    let found = parts
                        .iter()
                        .position(|(t, p, _)| *t == message.topic() && *p == message.partition());
                    let Some(i) = found else {
                        continue;
                    };
                    if message.offset() < parts[i].2 {
                        continue;
                    }
                    last_progress = Instant::now();
                    positions[i] = message.offset() + 1;
                    if on_record(i, &message)? == Flow::Stop {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    let (topic, partition, _) = parts[0];
                    return Err(Error::OffsetOutOfRange {
                        topic: topic.to_owned(),
                        partition,
                        offset: positions[0],
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "transient consumer error while replaying");
                }
            }
            if last_progress.elapsed() > self.stall_timeout {
                let (topic, partition, _) = parts[0];
                return Err(Error::ReadStalled {
                    topic: topic.to_owned(),
                    partition,
                    offset: positions[0],
                    waited: self.stall_timeout,
                });
            }
        }
    }

    fn read_assigned(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        on_record: &mut impl FnMut(&BorrowedMessage<'_>) -> Result<Flow, Error>,
    ) -> Result<(), Error> {
        let mut last_progress = Instant::now();
        let mut position = from;
        loop {
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(message)) => {
                    if message.topic() != topic
                        || message.partition() != partition
                        || message.offset() < from
                    {
                        continue;
                    }
                    last_progress = Instant::now();
                    position = message.offset() + 1;
                    if on_record(&message)? == Flow::Stop {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p)))
                    if p == partition && self.at_stable_end(topic, partition, from)? =>
                {
                    return Ok(());
                }
                // Another partition's, or below the last stable offset: read on.
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err(Error::OffsetOutOfRange {
                        topic: topic.to_owned(),
                        partition,
                        offset: position,
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(topic, partition, error = %e, "transient consumer error while reading");
                }
            }
            if last_progress.elapsed() > self.stall_timeout {
                return Err(Error::ReadStalled {
                    topic: topic.to_owned(),
                    partition,
                    offset: position,
                    waited: self.stall_timeout,
                });
            }
        }
    }
}

/// The last committed incremental snapshot record of a snapshot partition.
#[derive(Debug, Clone)]
pub(crate) struct LatestIncremental {
    pub(crate) offset: i64,
    /// When it was written (producer time, ms since the epoch), if the record carries one
    /// (shown by `exactly inspect`).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) timestamp: Option<i64>,
    pub(crate) record: IncrementalSnapshot,
}

/// Destroys `client` (a consumer, or a reader holding some) on a thread of its own.
///
/// Destroying a librdkafka consumer that has a group id takes about 100 ms (measured on each
/// of the three a recovery uses): 0.2–0.3 s of every partition's start and recovery that
/// nothing needs to wait for.
pub(crate) fn destroy_in_background<T: Send + 'static>(client: T) {
    // Without a thread, the closure, and with it the client, is dropped here.
    let _ = std::thread::Builder::new()
        .name("exactly-client-drop".into())
        .spawn(move || drop(client));
}

/// How often [`find_latest_incremental`] reads the tail again after a trim moved the log start
/// past it; each trim needs a full snapshot committed, so more in one find means something else.
const MAX_TRIMS_DURING_FIND: u32 = 3;

/// Finds the last committed incremental record on `snapshot_topic/partition`.
///
/// Reads a tail window up to the end of the partition and keeps the last incremental record;
/// widens the window when the tail holds none (full snapshot chunks and transaction markers
/// occupy offsets too).
pub(crate) fn find_latest_incremental(
    reader: &PartitionReader,
    snapshot_topic: &str,
    partition: i32,
) -> Result<Option<LatestIncremental>, Error> {
    // The watermarks only size the first window. Whether a record exists is decided by
    // reading to the end of the partition, never by the watermarks alone: a broker answering
    // a stale or wrong high watermark must not make a partition with snapshots look empty
    // (that would restart it from the default state and reprocess its input).
    let (mut low, high) = reader.bounds(snapshot_topic, partition)?;
    let high = high.max(low);
    let mut trims_met = 0;
    // The last transaction ends with its incremental record and its commit marker, so a
    // small window usually holds it. Not a wide one: when that transaction wrote a full
    // snapshot, every chunk in the window is read too (measured: 0.6 s of a 2.3 s restore of
    // a 26 MB snapshot with a first window of 64).
    let mut window: i64 = 4;
    loop {
        let start = (high - window).max(low);
        let mut latest: Option<LatestIncremental> = None;
        let read = reader.read(snapshot_topic, partition, start, |message| {
            if let Some(payload) = message.payload() {
                let record = decode_record(payload).map_err(|source| Error::PartitionSnapshot {
                    topic: snapshot_topic.to_owned(),
                    partition,
                    source,
                })?;
                if let Some(snapshot_record::Kind::Incremental(inc)) = record.kind {
                    latest = Some(LatestIncremental {
                        offset: message.offset(),
                        timestamp: message.timestamp().to_millis(),
                        record: inc,
                    });
                }
            }
            Ok(Flow::Continue)
        });
        match read {
            // A trim moved the log start past the window while it was read: this partition's
            // own trim of a full snapshot that committed just before a failed transaction, run
            // late by the trimming thread (the chaos suite met it after broker outages), or a
            // new owner's. A trim never deletes the latest record: read the bounds again.
            Err(Error::OffsetOutOfRange { .. }) if trims_met < MAX_TRIMS_DURING_FIND => {
                trims_met += 1;
                let (new_low, _) = reader.bounds(snapshot_topic, partition)?;
                tracing::debug!(
                    snapshot_topic,
                    partition,
                    start,
                    log_start_offset = new_low,
                    "the snapshot partition was trimmed while its tail was read; reading it again"
                );
                low = new_low;
                continue;
            }
            read => read?,
        }
        if latest.is_some() {
            return Ok(latest);
        }
        if start == low {
            if low > 0 {
                // Retention removed records and nothing usable is left: starting from an empty
                // state would silently reprocess (or skip) input.
                return Err(Error::SnapshotTruncated {
                    topic: snapshot_topic.to_owned(),
                    partition,
                    log_start_offset: low,
                });
            }
            return Ok(None);
        }
        window = window.saturating_mul(8);
    }
}

/// A full snapshot's data, verified, and its encoding (`FullSnapshotChunk.encoding`).
pub(crate) struct LoadedSnapshot {
    pub(crate) encoding: String,
    pub(crate) data: Vec<u8>,
}

/// Loads the encoded state of the full snapshot `reference` points to, verifying every chunk.
pub(crate) fn load_full_snapshot(
    reader: &PartitionReader,
    snapshot_topic: &str,
    partition: i32,
    reference: &FullSnapshotRef,
    progress_metrics: Option<&PartitionMetrics>,
) -> Result<LoadedSnapshot, Error> {
    let mut chunks: Vec<FullSnapshotChunk> = Vec::with_capacity(reference.chunk_count as usize);
    let snapshot_error = |source| Error::PartitionSnapshot {
        topic: snapshot_topic.to_owned(),
        partition,
        source,
    };
    if reference.first_chunk_offset < 0 {
        return Err(snapshot_error(SnapshotError::corrupt(
            &reference.snapshot_id,
            None,
            format!(
                "the reference points to offset {} (written by a version that committed unknown chunk offsets)",
                reference.first_chunk_offset
            ),
        )));
    }
    let mut progress = Progress::new(
        "fetch full snapshot",
        "chunks",
        snapshot_topic,
        partition,
        u64::from(reference.chunk_count),
    )
    .publish_to(progress_metrics, true);
    let mut bytes_loaded = 0u64;
    reader.read(
        snapshot_topic,
        partition,
        reference.first_chunk_offset,
        |message| {
            progress.update(chunks.len() as u64);
            if let Some(payload) = message.payload() {
                let record = decode_record(payload).map_err(snapshot_error)?;
                if let Some(snapshot_record::Kind::Chunk(chunk)) = record.kind {
                    if chunk.snapshot_id == reference.snapshot_id {
                        bytes_loaded += chunk.data.len() as u64;
                        if let Some(metrics) = progress_metrics {
                            metrics.snapshot_bytes_loaded(bytes_loaded);
                        }
                        chunks.push(chunk);
                    }
                }
            }
            Ok(if chunks.len() >= reference.chunk_count as usize {
                Flow::Stop
            } else {
                Flow::Continue
            })
        },
    )?;
    let encoding = chunks
        .first()
        .map(|c| c.encoding.clone())
        .unwrap_or_default();
    // Missing, duplicated or damaged chunks, mixed encodings, are all reported by the assembly.
    let data = assemble_chunks(reference, chunks).map_err(snapshot_error)?;
    Ok(LoadedSnapshot { encoding, data })
}

/// Producer context of a partition worker's transactional producer: records delivery
/// reports so the offsets of snapshot chunks are known inside the open transaction.
#[derive(Default)]
pub(crate) struct TxnProducerContext {
    /// Delivery opaque (> 0) -> offset or error, for records sent with a tracking id.
    tracked: Mutex<HashMap<usize, Result<i64, KafkaError>>>,
    /// First delivery error of an untracked record (an output) since the last reset, with
    /// the record's topic.
    first_error: Mutex<Option<(String, KafkaError)>>,
    /// A topic librdkafka could not add to the open transaction for lack of an ACL. Only its
    /// ADDPARTS log line names it; the error it reports does not.
    refused_topic: Mutex<Option<String>>,
    /// Signalled by librdkafka when a delivery report is queued (set once the producer
    /// exists); waits for reports sleep on it.
    wakeup: OnceLock<DeliveryWakeup>,
}

impl ClientContext for TxnProducerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        if fac == "ADDPARTS" && log_message.contains("authorization failed") {
            // `... Failed to add partition "TOPIC" [P] to transaction: Broker: Topic authorization failed`
            if let Some(topic) = log_message.split('"').nth(1) {
                if let Ok(mut refused) = self.refused_topic.lock() {
                    *refused = Some(topic.to_owned());
                }
            }
        }
        crate::runtime::log_librdkafka(level, fac, log_message);
    }
}

impl ProducerContext for TxnProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        let outcome = match result {
            Ok(message) => Ok(message.offset()),
            Err((error, _)) => Err(error.clone()),
        };
        let topic = || match result {
            Ok(message) => message.topic().to_owned(),
            Err((_, message)) => message.topic().to_owned(),
        };
        if id > 0 {
            if let Ok(mut tracked) = self.tracked.lock() {
                tracked.insert(id, outcome);
            }
        } else if let Err(error) = outcome {
            // A purge is the abort cleaning up after the real failure, never the cause.
            let purged = matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
            );
            if !purged {
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert_with(|| (topic(), error));
                }
            }
        }
    }
}

impl TxnProducerContext {
    /// Lets waits for `producer`'s delivery reports sleep until one arrives (see
    /// [`DeliveryWakeup`]); without it they sleep in short steps.
    pub(crate) fn attach_wakeup(producer: &TxnProducer) {
        if let Some(wakeup) = DeliveryWakeup::attach(producer.client()) {
            let _ = producer.context().wakeup.set(wakeup);
        }
    }

    fn take_tracked(&self, id: usize) -> Option<Result<i64, KafkaError>> {
        self.tracked.lock().ok().and_then(|mut t| t.remove(&id))
    }

    /// Forgets delivery state of an aborted or committed transaction.
    pub(crate) fn reset(&self) {
        if let Ok(mut t) = self.tracked.lock() {
            t.clear();
        }
        if let Ok(mut f) = self.first_error.lock() {
            f.take();
        }
    }

    /// The first failed delivery of an output since the last reset.
    /// The topic librdkafka could not add to the transaction for lack of an ACL, if any.
    pub(crate) fn take_refused_topic(&self) -> Option<String> {
        self.refused_topic.lock().ok().and_then(|mut t| t.take())
    }

    /// The first failed output delivery since the last reset: (topic, error).
    pub(crate) fn take_first_error(&self) -> Option<(String, KafkaError)> {
        self.first_error.lock().ok().and_then(|mut f| f.take())
    }
}

/// The transactional producer of a partition worker.
pub(crate) type TxnProducer = BaseProducer<TxnProducerContext>;

/// How long to wait before looking again for delivery reports when none was ready and the
/// producer has no [`DeliveryWakeup`].
const DELIVERY_REPORT_PAUSE: Duration = Duration::from_micros(200);

/// Serves the delivery reports ready now; when there was none, waits for the next (on the
/// producer's [`DeliveryWakeup`], else for [`DELIVERY_REPORT_PAUSE`]).
///
/// Not `BaseProducer::poll(d)` with a short `d`: rdkafka 0.39's poll runs until its deadline
/// and truncates what is left of it to whole milliseconds, so a poll of less than a few ms
/// spins on the clock (measured: a quarter of the process's CPU) and a longer one makes
/// every wait last at least that long.
fn serve_delivery_reports(producer: &TxnProducer) {
    let before = rdkafka::producer::Producer::in_flight_count(producer);
    producer.poll(Duration::ZERO);
    if rdkafka::producer::Producer::in_flight_count(producer) == before {
        match producer.context().wakeup.get() {
            Some(wakeup) => wakeup.wait(),
            None => std::thread::sleep(DELIVERY_REPORT_PAUSE),
        }
    }
}

/// Waits until every queued record has its delivery report (serving the reports), or fails
/// with a flush timeout after `timeout`.
///
/// Instead of `Producer::flush`, which with rdkafka 0.39 waits in 100 ms polls that always
/// run to their end: every commit took at least 100 ms in flush (measured), which bounded a
/// partition's throughput.
pub(crate) fn flush_promptly(producer: &TxnProducer, timeout: Duration) -> Result<(), KafkaError> {
    let deadline = Instant::now() + timeout;
    loop {
        if rdkafka::producer::Producer::in_flight_count(producer) == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        serve_delivery_reports(producer);
    }
}

/// Sends one record, waiting (serving delivery reports) while librdkafka's queue is full.
pub(crate) fn send_blocking(
    producer: &TxnProducer,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                serve_delivery_reports(producer);
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Sends snapshot chunks in the open transaction, waits for their delivery, and returns the
/// first one's offset. A delivery without a usable offset fails (the caller aborts).
pub(crate) fn write_snapshot_chunks(
    producer: &TxnProducer,
    snapshot_topic: &str,
    partition: i32,
    chunks: Vec<FullSnapshotChunk>,
    flush_timeout: Duration,
) -> Result<i64, KafkaError> {
    let count = chunks.len();
    for (index, chunk) in chunks.into_iter().enumerate() {
        let bytes = encode_record(&chunk_record(chunk));
        let record = BaseRecord::with_opaque_to(snapshot_topic, index + 1)
            .partition(partition)
            .payload(bytes.as_slice());
        send_blocking(producer, record)?;
    }
    flush_promptly(producer, flush_timeout)?;
    let context = rdkafka::producer::Producer::context(producer);
    let mut offsets = Vec::with_capacity(count);
    for index in 0..count {
        match context.take_tracked(index + 1) {
            Some(Ok(offset)) => offsets.push(offset),
            Some(Err(error)) => return Err(error),
            None => return Err(KafkaError::Flush(RDKafkaErrorCode::MessageTimedOut)),
        }
    }
    // A delivery can succeed without an offset: a retried batch the broker had already
    // written is reported as a duplicate, and librdkafka delivers it with offset -1. A
    // reference to an unknown or non-increasing location must never commit (recovery could
    // not find the snapshot): fail the transaction, which is aborted and rebuilt.
    if offsets.first().is_none_or(|&first| first < 0) || offsets.windows(2).any(|w| w[1] <= w[0]) {
        tracing::warn!(
            snapshot_topic,
            partition,
            offsets = ?offsets,
            "a full snapshot chunk was delivered without a usable offset; aborting the transaction"
        );
        return Err(KafkaError::MessageProduction(RDKafkaErrorCode::Fail));
    }
    Ok(offsets[0])
}

/// Queues the incremental snapshot record of a transaction.
pub(crate) fn write_incremental(
    producer: &TxnProducer,
    snapshot_topic: &str,
    partition: i32,
    record: IncrementalSnapshot,
) -> Result<(), KafkaError> {
    let bytes = encode_record(&incremental_record(record));
    let record = BaseRecord::with_opaque_to(snapshot_topic, 0)
        .partition(partition)
        .payload(bytes.as_slice());
    send_blocking(producer, record)
}

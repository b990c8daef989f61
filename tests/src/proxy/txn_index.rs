//! The proxy's transaction index: which transactions of a partition were aborted, where they
//! started and where their abort marker lies, derived from the log itself.
//!
//! Kafka keeps a transaction index per log segment and answers read_committed fetches with
//! the aborted transactions that overlap the fetched range. nisshi keeps none, so the proxy
//! builds one: it reads each partition *uncommitted* from the broker over its own connection
//! and parses the v2 record batch headers (producer id, base offset, last offset delta,
//! the transactional and control attributes) and the control record's type (abort/commit).
//! Per producer id it tracks the first offset of the open transaction; a marker closes it.
//! Nothing here decompresses: control batches are never compressed, and data batches are
//! only needed for their header.
//!
//! It also answers what a partition's offsets are now ([`TxnIndex`]'s `offsets`): one
//! uncommitted Fetch above the end of the log, which nisshi answers at once with the high
//! watermark and log start offset its Fetch responses carry (right, unlike its ListOffsets
//! answers), plus the last stable offset the index computes at that high watermark.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::messages::{ApiKey, FetchRequest, MetadataRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use uuid::Uuid;

use super::client::KafkaConnection;
use super::Counters;
use crate::error::HarnessError;

/// Bytes of a v2 record batch header up to and including the record count.
const BATCH_HEADER_V2: usize = 61;
/// Bytes before a batch's `batchLength` field ends (base offset + batch length).
const LOG_OVERHEAD: usize = 12;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;
/// Kafka error codes the scanner handles.
const OFFSET_OUT_OF_RANGE: i16 = 1;
/// Bytes the scanner asks for per fetch.
const SCAN_FETCH_BYTES: i32 = 8 * 1024 * 1024;
/// Consecutive fetches without progress before the scanner gives up.
const MAX_STALLS: u32 = 50;
/// The fetch offset of an offsets probe: above any log's end.
const PROBE_OFFSET: i64 = i64::MAX;
/// A scan fetch's `max_wait_ms`. Not 0: nisshi 0.7.0 answers max_wait_ms=0 with no
/// partitions at all (its fetch loop runs only while max_wait has time left). min_bytes=0
/// still makes it answer after one read round.
const SCAN_MAX_WAIT_MS: i32 = 500;
/// A probe's `max_wait_ms`: nisshi waits all of it above the log end, and every ListOffsets
/// answer waits for a probe.
const PROBE_MAX_WAIT_MS: i32 = 10;

/// The header fields of one record batch that matter for transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Offset of the first record in the batch.
    pub base_offset: i64,
    /// Offset of the last record in the batch.
    pub last_offset: i64,
    /// Producer id (-1 for non-idempotent producers).
    pub producer_id: i64,
    /// Size of the whole batch in the record set, in bytes.
    pub byte_len: usize,
    /// Part of a transaction.
    pub transactional: bool,
    /// For control batches: the marker type (`Some(true)` abort, `Some(false)` commit);
    /// `None` for data batches and unknown control types.
    pub control: Option<ControlMarker>,
}

/// The kind of a transaction control marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMarker {
    /// Control type 0.
    Abort,
    /// Control type 1.
    Commit,
    /// Any other control record (e.g. leader change), irrelevant to transactions.
    Other,
}

/// Parses the complete record batches in `records` (a Fetch response's record set). A batch
/// cut off at the end (brokers truncate to the byte limit) is ignored.
pub fn parse_batches(records: &[u8]) -> Vec<BatchInfo> {
    let mut batches = Vec::new();
    let mut rest = records;
    while rest.len() >= LOG_OVERHEAD {
        let base_offset = be_i64(&rest[0..8]);
        let batch_len = be_i32(&rest[8..12]);
        let Ok(batch_len) = usize::try_from(batch_len) else {
            break;
        };
        let total = LOG_OVERHEAD + batch_len;
        if rest.len() < total {
            break;
        }
        let batch = &rest[..total];
        rest = &rest[total..];
        // magic lives at byte 16 in v0/v1 message sets and v2 batches alike.
        let magic = batch.get(16).copied().unwrap_or(0);
        if magic < 2 || batch.len() < BATCH_HEADER_V2 {
            // Legacy message sets carry no transactions; their offset is the last one.
            batches.push(BatchInfo {
                base_offset,
                last_offset: base_offset,
                byte_len: total,
                producer_id: -1,
                transactional: false,
                control: None,
            });
            continue;
        }
        let attributes = be_i16(&batch[21..23]);
        let last_offset_delta = be_i32(&batch[23..27]);
        let producer_id = be_i64(&batch[43..51]);
        let transactional = attributes & ATTR_TRANSACTIONAL != 0;
        let control =
            (attributes & ATTR_CONTROL != 0).then(|| control_marker(&batch[BATCH_HEADER_V2..]));
        batches.push(BatchInfo {
            base_offset,
            last_offset: base_offset + i64::from(last_offset_delta),
            byte_len: total,
            producer_id,
            transactional,
            control,
        });
    }
    batches
}

/// The marker type in the first record of a control batch (uncompressed by definition).
fn control_marker(records: &[u8]) -> ControlMarker {
    let mut cursor = records;
    let parse = |cursor: &mut &[u8]| -> Option<i16> {
        let _length = read_varint(cursor)?;
        let _attributes = take(cursor, 1)?;
        let _timestamp_delta = read_varint(cursor)?;
        let _offset_delta = read_varint(cursor)?;
        let key_length = read_varint(cursor)?;
        if key_length < 4 {
            return None;
        }
        let key = take(cursor, 4)?;
        Some(be_i16(&key[2..4]))
    };
    match parse(&mut cursor) {
        Some(0) => ControlMarker::Abort,
        Some(1) => ControlMarker::Commit,
        _ => ControlMarker::Other,
    }
}

fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if cursor.len() < n {
        return None;
    }
    let (head, tail) = cursor.split_at(n);
    *cursor = tail;
    Some(head)
}

/// A zigzag-encoded varint (Kafka's record fields).
fn read_varint(cursor: &mut &[u8]) -> Option<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *take(cursor, 1)?.first()?;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

fn be_i16(b: &[u8]) -> i16 {
    i16::from_be_bytes([b[0], b[1]])
}
fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_i64(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    i64::from_be_bytes(a)
}

/// One transaction that ended in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedTxn {
    /// The producer id that wrote it.
    pub producer_id: i64,
    /// Offset of its first record in this partition.
    pub first_offset: i64,
    /// Offset of its commit or abort marker.
    pub marker_offset: i64,
    /// True when the marker was an abort marker.
    pub aborted: bool,
}

/// The transaction state of one partition, built from its log up to `next_offset`.
#[derive(Debug, Default)]
pub struct PartitionTxns {
    /// Every offset below this has been indexed.
    next_offset: i64,
    /// The high watermark of the latest scan.
    high_watermark: i64,
    /// Producer id -> first offset of its transaction that has no marker yet.
    open: HashMap<i64, i64>,
    /// Transactions with a marker, in marker order.
    ended: Vec<EndedTxn>,
}

impl PartitionTxns {
    /// Applies the batches of a fetch of this partition (from any offset; batches entirely
    /// below `next_offset` are skipped). Returns the number of new offsets indexed.
    pub fn apply(&mut self, batches: &[BatchInfo]) -> i64 {
        let before = self.next_offset;
        for batch in batches {
            if batch.last_offset < self.next_offset {
                continue;
            }
            match batch.control {
                Some(ControlMarker::Abort) | Some(ControlMarker::Commit) => {
                    // A marker for a producer that wrote nothing here (e.g. it only added
                    // the partition) has nothing to abort.
                    if let Some(first_offset) = self.open.remove(&batch.producer_id) {
                        self.ended.push(EndedTxn {
                            producer_id: batch.producer_id,
                            first_offset,
                            marker_offset: batch.base_offset,
                            aborted: batch.control == Some(ControlMarker::Abort),
                        });
                    }
                }
                Some(ControlMarker::Other) => {}
                None if batch.transactional && batch.producer_id >= 0 => {
                    self.open
                        .entry(batch.producer_id)
                        .or_insert(batch.base_offset);
                }
                None => {}
            }
            self.next_offset = batch.last_offset + 1;
        }
        self.next_offset - before
    }

    /// The offset below which everything has been indexed.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The high watermark seen by the latest scan.
    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    /// The last stable offset at high watermark `hw`: the first offset of the earliest
    /// transaction still open at `hw`, else `hw`. Requires the index to cover `hw`.
    ///
    /// Kafka never answers an LSO below the log start (it moves a first unstable offset that
    /// retention or DeleteRecords removed up to the log start): callers clamp with the log
    /// start seen together with `hw`, see [`clamp_to_log_start`].
    pub fn last_stable_offset(&self, hw: i64) -> i64 {
        let open_now = self.open.values().copied().filter(|first| *first < hw);
        let open_then = self
            .ended
            .iter()
            .filter(|t| t.first_offset < hw && t.marker_offset >= hw)
            .map(|t| t.first_offset);
        open_now.chain(open_then).fold(hw, i64::min)
    }

    /// Kafka's rule for a read_committed fetch from `fetch_offset` whose records end at
    /// `last_offset`: every aborted transaction whose marker is at or after `fetch_offset`
    /// and whose first offset is at or before `last_offset`, ordered by first offset.
    ///
    /// A transaction without a marker yet is never included (it might still commit), nor one
    /// whose marker lies before the fetch offset (librdkafka would then wait for a marker that
    /// never comes and skip that producer's later committed data).
    pub fn aborted_between(&self, fetch_offset: i64, last_offset: i64) -> Vec<(i64, i64)> {
        let start = self
            .ended
            .partition_point(|t| t.marker_offset < fetch_offset);
        let mut aborted: Vec<(i64, i64)> = self.ended[start..]
            .iter()
            .filter(|t| t.aborted && t.first_offset <= last_offset)
            .map(|t| (t.producer_id, t.first_offset))
            .collect();
        aborted.sort_by_key(|(_, first)| *first);
        aborted
    }

    /// Every transaction that ended so far (for tests and diagnostics).
    pub fn ended(&self) -> &[EndedTxn] {
        &self.ended
    }

    fn restart_at(&mut self, offset: i64) {
        *self = PartitionTxns {
            next_offset: offset,
            ..PartitionTxns::default()
        };
    }
}

/// The per-partition index plus the connection its scans use.
#[derive(Debug, Default)]
pub struct PartitionIndex {
    txns: PartitionTxns,
    connection: Option<(KafkaConnection, i16)>,
}

impl PartitionIndex {
    /// The transaction state indexed so far.
    pub fn txns(&self) -> &PartitionTxns {
        &self.txns
    }
}

/// How far [`TxnIndex::scan`] must index a partition.
#[derive(Debug, Clone, Copy)]
pub enum ScanTarget {
    /// At least up to this offset (a high watermark the broker reported).
    UpTo(i64),
    /// Up to the partition's current high watermark (fetch at least once).
    CurrentEnd,
}

type PartitionKey = (String, i32);

/// Transaction indexes for every partition the proxy has seen a read_committed request for.
///
/// Scans of one partition are serialised by a per-partition async mutex; different
/// partitions scan concurrently, each over its own connection to the broker.
#[derive(Debug)]
pub struct TxnIndex {
    upstream: SocketAddr,
    partitions: std::sync::Mutex<HashMap<PartitionKey, Arc<AsyncMutex<PartitionIndex>>>>,
    topic_names: std::sync::Mutex<HashMap<Uuid, String>>,
}

impl TxnIndex {
    /// An empty index for the broker at `upstream`.
    pub fn new(upstream: SocketAddr) -> TxnIndex {
        TxnIndex {
            upstream,
            partitions: Default::default(),
            topic_names: Default::default(),
        }
    }

    /// Forgets everything (after a broker restart that lost all data).
    pub fn reset(&self) {
        lock(&self.partitions).clear();
        lock(&self.topic_names).clear();
    }

    /// Records a topic id -> name mapping seen in a Metadata response.
    pub fn learn_topic(&self, id: Uuid, name: &str) {
        if !id.is_nil() && !name.is_empty() {
            lock(&self.topic_names).insert(id, name.to_string());
        }
    }

    /// The name of the topic with this id, asking the broker if no Metadata response
    /// showed it yet.
    pub async fn topic_name(&self, id: Uuid) -> Result<String, HarnessError> {
        if let Some(name) = lock(&self.topic_names).get(&id) {
            return Ok(name.clone());
        }
        let mut connection = KafkaConnection::connect(self.upstream).await?;
        let versions = connection.api_versions().await?;
        let version = supported_version(&versions, ApiKey::Metadata, 10, 12).ok_or_else(|| {
            HarnessError::protocol("resolving topic ids", "broker supports no Metadata v10..12")
        })?;
        let response = connection
            .send(version, &MetadataRequest::default().with_topics(None))
            .await?;
        for topic in &response.topics {
            if let Some(name) = &topic.name {
                self.learn_topic(topic.topic_id, name.0.as_str());
            }
        }
        lock(&self.topic_names).get(&id).cloned().ok_or_else(|| {
            HarnessError::protocol(
                "resolving topic ids",
                format!("the broker's metadata has no topic with id {id}"),
            )
        })
    }

    /// The partition's index, locked: one scan or probe of a partition at a time.
    async fn lock_partition(&self, topic: &str, partition: i32) -> OwnedMutexGuard<PartitionIndex> {
        let entry = lock(&self.partitions)
            .entry((topic.to_string(), partition))
            .or_default()
            .clone();
        entry.lock_owned().await
    }

    /// Indexes `topic`/`partition` up to `target` and returns the locked partition index.
    /// While the guard lives, no other scan of this partition runs.
    pub(crate) async fn scan(
        &self,
        topic: &str,
        partition: i32,
        target: ScanTarget,
        counters: &Counters,
    ) -> Result<OwnedMutexGuard<PartitionIndex>, HarnessError> {
        let mut index = self.lock_partition(topic, partition).await;
        let result = self
            .scan_locked(&mut index, topic, partition, target, counters)
            .await;
        if result.is_err() {
            // The connection may be in an unknown state; a later scan reconnects.
            index.connection = None;
        }
        result.map(|()| index)
    }

    /// The partition's offsets now, as Kafka's ListOffsets gives them: log start, high
    /// watermark and (with `with_last_stable`) the last stable offset, all at the instant
    /// of one probe Fetch the broker answers after this call began.
    pub(crate) async fn offsets(
        &self,
        topic: &str,
        partition: i32,
        with_last_stable: bool,
        counters: &Counters,
    ) -> Result<PartitionOffsets, HarnessError> {
        let mut index = self.lock_partition(topic, partition).await;
        let result = self
            .offsets_locked(&mut index, topic, partition, with_last_stable, counters)
            .await;
        if result.is_err() {
            index.connection = None;
        }
        result
    }

    async fn offsets_locked(
        &self,
        index: &mut PartitionIndex,
        topic: &str,
        partition: i32,
        with_last_stable: bool,
        counters: &Counters,
    ) -> Result<PartitionOffsets, HarnessError> {
        let (log_start, high_watermark) = self.probe(index, topic, partition, counters).await?;
        let last_stable = if with_last_stable {
            if high_watermark < index.txns.next_offset {
                // The log was replaced since the last scan (see `scan_locked`).
                index.txns.restart_at(log_start);
            }
            self.scan_locked(
                index,
                topic,
                partition,
                ScanTarget::UpTo(high_watermark),
                counters,
            )
            .await?;
            clamp_to_log_start(
                index.txns.last_stable_offset(high_watermark),
                log_start,
                high_watermark,
            )
        } else {
            high_watermark
        };
        Ok(PartitionOffsets {
            log_start,
            high_watermark,
            last_stable,
        })
    }

    /// (log start offset, high watermark) from one Fetch above the end of the log: nisshi
    /// 0.7.0 answers it at once, without records and without an error, with the offsets
    /// its Fetch responses carry (which, unlike its ListOffsets answers, are right). A
    /// broker that answers it with an error (Kafka: OFFSET_OUT_OF_RANGE) fails the probe.
    async fn probe(
        &self,
        index: &mut PartitionIndex,
        topic: &str,
        partition: i32,
        counters: &Counters,
    ) -> Result<(i64, i64), HarnessError> {
        let data = self
            .fetch(index, topic, partition, PROBE_OFFSET, counters)
            .await?;
        let offsets = (data.log_start_offset, data.high_watermark);
        if data.error_code != 0 || offsets.0 < 0 || offsets.1 < offsets.0 {
            return Err(HarnessError::protocol(
                format!("probing the offsets of {topic}/{partition}"),
                format!(
                    "error code {}, log start offset {}, high watermark {} in a Fetch above \
                     the end of the log",
                    data.error_code, offsets.0, offsets.1
                ),
            ));
        }
        Ok(offsets)
    }

    /// One uncommitted Fetch of `topic`/`partition` from `offset` over the partition's own
    /// connection (opened if needed). `Ok(None)`: the response left the partition out.
    async fn fetch_partition(
        &self,
        index: &mut PartitionIndex,
        topic: &str,
        partition: i32,
        offset: i64,
        counters: &Counters,
    ) -> Result<Option<PartitionData>, HarnessError> {
        // The connection is taken out for the request and put back only after its response
        // was read: if this future is dropped half-way (the client that asked went away), the
        // connection goes with it instead of handing the next request a stale response.
        let (mut connection, version) = match index.connection.take() {
            Some(open) => open,
            None => {
                let mut connection = KafkaConnection::connect(self.upstream).await?;
                let versions = connection.api_versions().await?;
                let version =
                    supported_version(&versions, ApiKey::Fetch, 4, 12).ok_or_else(|| {
                        HarnessError::protocol(
                            format!("indexing {topic}/{partition}: connecting"),
                            "broker supports no Fetch v4..12",
                        )
                    })?;
                (connection, version)
            }
        };
        let request = FetchRequest::default()
            .with_replica_id((-1).into())
            .with_max_wait_ms(if offset == PROBE_OFFSET {
                PROBE_MAX_WAIT_MS
            } else {
                SCAN_MAX_WAIT_MS
            })
            .with_min_bytes(0)
            .with_max_bytes(SCAN_FETCH_BYTES)
            .with_isolation_level(0)
            .with_session_id(0)
            .with_session_epoch(-1)
            .with_topics(vec![FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(vec![FetchPartition::default()
                    .with_partition(partition)
                    .with_current_leader_epoch(-1)
                    .with_fetch_offset(offset)
                    .with_last_fetched_epoch(-1)
                    .with_log_start_offset(-1)
                    .with_partition_max_bytes(SCAN_FETCH_BYTES)])]);
        let response = connection.send(version, &request).await?;
        index.connection = Some((connection, version));
        Counters::add(&counters.index_fetches, 1);
        Ok(response
            .responses
            .into_iter()
            .flat_map(|t| t.partitions)
            .find(|p| p.partition_index == partition))
    }

    /// [`Self::fetch_partition`], asking again (a bounded number of times) while the
    /// broker leaves the partition out of its responses.
    async fn fetch(
        &self,
        index: &mut PartitionIndex,
        topic: &str,
        partition: i32,
        offset: i64,
        counters: &Counters,
    ) -> Result<PartitionData, HarnessError> {
        for _ in 0..MAX_STALLS {
            if let Some(data) = self
                .fetch_partition(index, topic, partition, offset, counters)
                .await?
            {
                return Ok(data);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(HarnessError::protocol(
            format!("indexing {topic}/{partition}: fetch"),
            format!("{MAX_STALLS} responses in a row lacked the partition"),
        ))
    }

    async fn scan_locked(
        &self,
        index: &mut PartitionIndex,
        topic: &str,
        partition: i32,
        target: ScanTarget,
        counters: &Counters,
    ) -> Result<(), HarnessError> {
        let context = |what: &str| format!("indexing {topic}/{partition}: {what}");
        let mut fetched_once = false;
        let mut stalls = 0;
        loop {
            let done = match target {
                ScanTarget::UpTo(offset) => index.txns.next_offset >= offset,
                ScanTarget::CurrentEnd => {
                    fetched_once && index.txns.next_offset >= index.txns.high_watermark
                }
            };
            if done {
                return Ok(());
            }
            let offset = index.txns.next_offset;
            let data = self
                .fetch(index, topic, partition, offset, counters)
                .await?;
            fetched_once = true;
            if data.error_code == OFFSET_OUT_OF_RANGE {
                // Retention or DeleteRecords removed the start. The error carries no offsets
                // (Kafka and nisshi send -1), so ask for the log start; index from there
                // (transactions that began before it cannot be delivered anyway).
                let (log_start, _) = self.probe(index, topic, partition, counters).await?;
                if log_start <= offset {
                    stalls += 1;
                    if stalls > MAX_STALLS {
                        return Err(HarnessError::protocol(
                            context("fetch"),
                            format!(
                                "offset {offset} is out of range, but the log starts at \
                                 {log_start}"
                            ),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
                tracing::info!(
                    topic,
                    partition,
                    log_start,
                    indexed = offset,
                    "log start moved past the index; indexing from the log start"
                );
                index.txns.restart_at(log_start);
                continue;
            }
            if data.error_code != 0 {
                return Err(HarnessError::protocol(
                    context("fetch"),
                    format!("error code {} from offset {offset}", data.error_code),
                ));
            }
            if data.high_watermark < index.txns.next_offset {
                // The log was replaced (broker restart with memory storage, topic recreated).
                tracing::info!(
                    topic,
                    partition,
                    hw = data.high_watermark,
                    indexed = index.txns.next_offset,
                    "log shrank; re-indexing"
                );
                index.txns.restart_at(data.log_start_offset.max(0));
                continue;
            }
            index.txns.high_watermark = data.high_watermark;
            let batches = data
                .records
                .as_deref()
                .map(parse_batches)
                .unwrap_or_default();
            let progress = index.txns.apply(&batches);
            if progress == 0 && index.txns.next_offset < data.high_watermark {
                stalls += 1;
                if stalls > MAX_STALLS {
                    return Err(HarnessError::protocol(
                        context("fetch"),
                        format!(
                            "no progress at offset {} below high watermark {}",
                            index.txns.next_offset, data.high_watermark
                        ),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            } else {
                stalls = 0;
            }
            if let ScanTarget::UpTo(offset) = target {
                // The broker cannot be asked beyond its high watermark.
                if index.txns.next_offset >= data.high_watermark && data.high_watermark < offset {
                    return Err(HarnessError::protocol(
                        context("fetch"),
                        format!(
                            "high watermark {} is below the {offset} a client was told",
                            data.high_watermark
                        ),
                    ));
                }
            }
        }
    }
}

/// A partition's offsets as ListOffsets answers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    /// The log start offset (ListOffsets "earliest").
    pub log_start: i64,
    /// The high watermark (ListOffsets "latest", read_uncommitted).
    pub high_watermark: i64,
    /// The last stable offset (ListOffsets "latest", read_committed); the high watermark
    /// when it was not asked for.
    pub last_stable: i64,
}

/// A last stable offset computed by [`PartitionTxns::last_stable_offset`] at `hw`, moved up
/// to `log_start` (seen together with `hw`; unknown when negative) as Kafka does.
pub fn clamp_to_log_start(last_stable: i64, log_start: i64, hw: i64) -> i64 {
    last_stable.max(log_start.min(hw))
}

/// The highest version of `key` in `[min, max]` that the broker supports.
pub fn supported_version(
    versions: &kafka_protocol::messages::ApiVersionsResponse,
    key: ApiKey,
    min: i16,
    max: i16,
) -> Option<i16> {
    let supported = versions.api_keys.iter().find(|k| k.api_key == key as i16)?;
    let best = supported.max_version.min(max);
    (best >= min && best >= supported.min_version).then_some(best)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a v2 batch header (+ one control record when `control` is set), enough for
    /// the parser: lengths, attributes, offsets and producer id are real; CRC is not.
    pub(crate) fn batch(
        base: i64,
        count: i32,
        pid: i64,
        transactional: bool,
        control: Option<i16>,
    ) -> Vec<u8> {
        let mut attributes: i16 = 0;
        if transactional {
            attributes |= ATTR_TRANSACTIONAL;
        }
        if control.is_some() {
            attributes |= ATTR_CONTROL;
        }
        let mut body = Vec::new();
        body.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
        body.push(2); // magic
        body.extend_from_slice(&0u32.to_be_bytes()); // crc
        body.extend_from_slice(&attributes.to_be_bytes());
        body.extend_from_slice(&(count - 1).to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.extend_from_slice(&pid.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        body.extend_from_slice(&count.to_be_bytes());
        match control {
            Some(kind) => {
                // length, attributes, ts delta 0, offset delta 0, key length 4, key, value -1
                let mut record = vec![0u8, 0, 0, 8];
                record.extend_from_slice(&0i16.to_be_bytes());
                record.extend_from_slice(&kind.to_be_bytes());
                record.push(1); // value length -1 (zigzag)
                record.push(0); // headers
                let mut with_len = vec![(record.len() as u8) << 1];
                with_len.extend_from_slice(&record);
                body.extend_from_slice(&with_len);
            }
            None => body.extend_from_slice(&vec![0u8; count as usize * 8]),
        }
        let mut out = Vec::new();
        out.extend_from_slice(&base.to_be_bytes());
        out.extend_from_slice(&(body.len() as i32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_data_and_control_batches_and_ignores_a_truncated_tail() {
        let mut log = batch(0, 3, 7, true, None);
        log.extend(batch(3, 1, 7, true, Some(0)));
        log.extend(batch(4, 1, 8, true, Some(1)));
        let full = log.len();
        log.extend(&batch(5, 2, 9, false, None)[..20]);
        let parsed = parse_batches(&log);
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].last_offset, 2);
        assert_eq!(parsed[0].control, None);
        assert_eq!(parsed[1].control, Some(ControlMarker::Abort));
        assert_eq!(parsed[2].control, Some(ControlMarker::Commit));
        assert_eq!(parse_batches(&log[..full]).len(), 3);
    }

    fn index_of(batches: &[Vec<u8>]) -> PartitionTxns {
        let log: Vec<u8> = batches.concat();
        let mut txns = PartitionTxns::default();
        txns.apply(&parse_batches(&log));
        txns
    }

    #[test]
    fn kafka_rule_for_aborted_transactions() {
        // pid 1: aborted [0..=1] marker 4; pid 2: committed [2..=3] marker 5;
        // pid 1 again: committed [6] marker 7; pid 3: open from 8.
        let txns = index_of(&[
            batch(0, 2, 1, true, None),
            batch(2, 2, 2, true, None),
            batch(4, 1, 1, true, Some(0)),
            batch(5, 1, 2, true, Some(1)),
            batch(6, 1, 1, true, None),
            batch(7, 1, 1, true, Some(1)),
            batch(8, 1, 3, true, None),
        ]);
        assert_eq!(txns.next_offset(), 9);
        assert_eq!(txns.aborted_between(0, 8), vec![(1, 0)]);
        // The marker at 4 is at the fetch offset: still needed.
        assert_eq!(txns.aborted_between(4, 8), vec![(1, 0)]);
        // Marker before the fetch offset: must not be listed (it would hide offset 6).
        assert_eq!(txns.aborted_between(5, 8), vec![]);
        // The returned records end before the txn starts: not needed.
        let late = index_of(&[
            batch(0, 2, 9, false, None),
            batch(2, 1, 1, true, None),
            batch(3, 1, 1, true, Some(0)),
        ]);
        assert_eq!(late.aborted_between(0, 1), vec![]);
        assert_eq!(late.aborted_between(0, 2), vec![(1, 2)]);
        // LSO: the open txn at 8 holds it at 8; at hw 5 the committed txn of pid 2 was open.
        assert_eq!(txns.last_stable_offset(9), 8);
        assert_eq!(txns.last_stable_offset(5), 2);
        assert_eq!(txns.last_stable_offset(8), 8);
        assert_eq!(txns.last_stable_offset(2), 0);
    }

    #[test]
    fn last_stable_offset_is_never_below_the_log_start() {
        // pid 1 open from 2; the log start moved to 5 (DeleteRecords), the end is at 9.
        let txns = index_of(&[batch(0, 2, 9, false, None), batch(2, 7, 1, true, None)]);
        let lso = txns.last_stable_offset(9);
        assert_eq!(lso, 2);
        assert_eq!(clamp_to_log_start(lso, 5, 9), 5);
        assert_eq!(clamp_to_log_start(lso, 0, 9), 2);
        // Unknown log start (-1), and a log start at the high watermark.
        assert_eq!(clamp_to_log_start(lso, -1, 9), 2);
        assert_eq!(clamp_to_log_start(lso, 9, 9), 9);
    }

    #[test]
    fn open_transactions_are_never_listed_as_aborted() {
        let txns = index_of(&[batch(0, 3, 5, true, None)]);
        assert_eq!(txns.aborted_between(0, 100), vec![]);
        assert_eq!(txns.last_stable_offset(3), 0);
    }

    #[test]
    fn applying_overlapping_fetches_is_idempotent() {
        let log = [batch(0, 2, 1, true, None), batch(2, 1, 1, true, Some(0))].concat();
        let mut txns = PartitionTxns::default();
        let batches = parse_batches(&log);
        txns.apply(&batches[..1]);
        txns.apply(&batches);
        txns.apply(&batches);
        assert_eq!(txns.ended().len(), 1);
        assert_eq!(txns.aborted_between(0, 2), vec![(1, 0)]);
    }

    #[test]
    fn varints_decode_zigzag() {
        for (bytes, value) in [
            (&[0u8][..], 0i64),
            (&[1], -1),
            (&[2], 1),
            (&[0xac, 0x02], 150),
        ] {
            let mut cursor = bytes;
            assert_eq!(read_varint(&mut cursor), Some(value));
        }
    }
}

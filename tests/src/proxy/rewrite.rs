//! Which requests need their response rewritten, and the rewrites themselves.
//!
//! Everything not listed here passes through as raw bytes. Rewritten: ApiVersions (cap the
//! versions of the APIs rewritten here to what `kafka-protocol` decodes), Metadata /
//! FindCoordinator / DescribeCluster (advertise the proxy), read_committed Fetch (aborted
//! transactions, last stable offset) and ListOffsets "latest"/"earliest" for both isolation
//! levels (high watermark, last stable offset, log start offset; see [`super`] for why these
//! are safe to replace).
//! InitProducerId responses are read (not changed) to learn producer epochs for
//! [`fencing`](super::fencing); a fenced request's placeholder answer is replaced.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::AbortedTransaction;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DescribeClusterResponse, FetchRequest, FetchResponse,
    FindCoordinatorResponse, InitProducerIdRequest, InitProducerIdResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use uuid::Uuid;

use super::fencing::{fenced_response, FencedRequest};
use super::framing::request_key_version_correlation;
use super::txn_index::{clamp_to_log_start, parse_batches, ScanTarget};
use super::{Counters, Shared};
use crate::error::HarnessError;

/// The longest pause before answering a read_committed fetch whose records all lie above the
/// last stable offset (Kafka waits up to the fetch's `max_wait_ms` for more).
const EMPTY_FETCH_PAUSE_MS: u64 = 100;
/// Kafka's `isolation_level` for read_committed.
const READ_COMMITTED: i8 = 1;
/// ListOffsets timestamp meaning "latest".
const LATEST_TIMESTAMP: i64 = -1;
/// ListOffsets timestamp meaning "earliest".
const EARLIEST_TIMESTAMP: i64 = -2;

/// APIs whose responses (or requests) the proxy decodes; clients must not use versions
/// `kafka-protocol` cannot decode.
const DECODED_APIS: [ApiKey; 6] = [
    ApiKey::ApiVersions,
    ApiKey::Metadata,
    ApiKey::FindCoordinator,
    ApiKey::DescribeCluster,
    ApiKey::Fetch,
    ApiKey::ListOffsets,
];

/// A topic as a Fetch request names it: by name before v13, by id from v13.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum TopicKey {
    Name(String),
    Id(Uuid),
}

/// Per client connection state needed to rewrite responses.
#[derive(Debug, Default)]
pub(crate) struct ConnectionState {
    /// The fetch offset and byte limit last requested per partition. Incremental fetch
    /// sessions leave out partitions whose offset did not change, so the latest value is the
    /// session's.
    fetch_positions: HashMap<(TopicKey, i32), FetchPosition>,
}

/// Where a client fetches a partition from, and how many bytes it accepts per response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchPosition {
    fetch_offset: i64,
    max_bytes: i32,
}

/// What to do with the response to one request.
#[derive(Debug)]
pub(crate) enum Pending {
    ApiVersions,
    Metadata,
    FindCoordinator,
    DescribeCluster,
    /// A read_committed fetch, with the fetch offset of every partition in its session.
    ReadCommittedFetch {
        positions: HashMap<(TopicKey, i32), FetchPosition>,
        max_wait_ms: i32,
    },
    /// ListOffsets partitions asked for the latest or earliest offset (the timestamp
    /// asked, per partition).
    ListOffsets {
        read_committed: bool,
        positions: HashMap<(String, i32), i64>,
    },
    /// May be held back by [`Faults::delay_end_txn_response`](super::Faults::delay_end_txn_response).
    EndTxn,
    /// A transactional producer's InitProducerId: its answer is the id's newest epoch.
    InitProducerId {
        transactional_id: String,
    },
    /// The placeholder of a request the proxy answers as fenced; its answer is replaced.
    Fenced(FencedRequest),
}

/// A response the connection waits for, keyed by correlation id.
#[derive(Debug)]
pub(crate) struct PendingResponse {
    pub api_key: ApiKey,
    pub version: i16,
    pub pending: Pending,
}

/// Turns a read_committed Fetch request frame into the same request at read_uncommitted,
/// in place; false (frame unchanged) if it is not one or its layout is not understood.
///
/// nisshi 0.7.0 withholds from read_committed fetches records Kafka would return: it keeps
/// a committed transaction pending while any transaction that overlaps it on the partition
/// is still open, so its read_committed end lags behind commit markers already in the log
/// (measured: `committed_transaction_below_an_abandoned_one_is_visible` in
/// `tests/tests/proxy.rs`). The proxy therefore reads uncommitted and cuts each partition at
/// its own last stable offset ([`rewrite_fetch`]).
///
/// Only the one-byte `isolation_level` field changes, so the frame is patched rather than
/// re-encoded: it sits after the request header and `[replica_id (before v15),] max_wait_ms,
/// min_bytes, max_bytes`.
pub(crate) fn fetch_read_uncommitted(frame: &mut [u8]) -> bool {
    let Some((key, version, _)) = request_key_version_correlation(frame) else {
        return false;
    };
    if key != ApiKey::Fetch as i16 || version < 4 {
        return false;
    }
    let mut rest = Bytes::copy_from_slice(frame);
    let header_version = ApiKey::Fetch.request_header_version(version);
    if RequestHeader::decode(&mut rest, header_version).is_err() {
        return false;
    }
    let header_len = frame.len() - rest.len();
    let replica_id_len = if version < 15 { 4 } else { 0 };
    let at = header_len + replica_id_len + 12;
    match frame.get_mut(at) {
        Some(level) if *level as i8 == READ_COMMITTED => {
            *level = 0;
            true
        }
        _ => false,
    }
}

/// Decides from a client request what its response needs. `None`: pass it through.
pub(crate) fn classify_request(
    frame: &[u8],
    state: &mut ConnectionState,
) -> Option<(i32, PendingResponse)> {
    let (key, version, correlation_id) = request_key_version_correlation(frame)?;
    let api_key = ApiKey::try_from(key).ok()?;
    let pending = match api_key {
        ApiKey::ApiVersions => Pending::ApiVersions,
        ApiKey::Metadata => Pending::Metadata,
        ApiKey::FindCoordinator => Pending::FindCoordinator,
        ApiKey::DescribeCluster => Pending::DescribeCluster,
        ApiKey::EndTxn => Pending::EndTxn,
        ApiKey::InitProducerId => {
            let request: InitProducerIdRequest = decode_request(frame, version)?;
            let transactional_id = request.transactional_id?.0.to_string();
            Pending::InitProducerId { transactional_id }
        }
        ApiKey::Fetch => {
            let request: FetchRequest = decode_request(frame, version)?;
            track_fetch_positions(&request, version, state);
            if request.isolation_level != READ_COMMITTED {
                return None;
            }
            Pending::ReadCommittedFetch {
                positions: state.fetch_positions.clone(),
                max_wait_ms: request.max_wait_ms,
            }
        }
        ApiKey::ListOffsets => {
            if version < 1 {
                return None; // v0 answers with a list of offsets; no client here uses it
            }
            let request: ListOffsetsRequest = decode_request(frame, version)?;
            // No isolation level before v2: read_uncommitted.
            let read_committed = version >= 2 && request.isolation_level == READ_COMMITTED;
            let positions: HashMap<(String, i32), i64> = request
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .filter(|p| matches!(p.timestamp, LATEST_TIMESTAMP | EARLIEST_TIMESTAMP))
                        .map(|p| ((t.name.0.to_string(), p.partition_index), p.timestamp))
                })
                .collect();
            if positions.is_empty() {
                return None;
            }
            Pending::ListOffsets {
                read_committed,
                positions,
            }
        }
        _ => return None,
    };
    Some((
        correlation_id,
        PendingResponse {
            api_key,
            version,
            pending,
        },
    ))
}

/// Decodes a request frame (header and body); `None` (with a warning) if it cannot be.
pub(crate) fn decode_request<R: Decodable>(frame: &[u8], version: i16) -> Option<R> {
    let mut bytes = Bytes::copy_from_slice(frame);
    let decoded = kafka_protocol::protocol::decode_request_header_from_buffer(&mut bytes)
        .and_then(|_: RequestHeader| R::decode(&mut bytes, version));
    match decoded {
        Ok(request) => Some(request),
        Err(error) => {
            tracing::warn!(%error, version, "proxy could not decode a request; passing it through");
            None
        }
    }
}

fn track_fetch_positions(request: &FetchRequest, version: i16, state: &mut ConnectionState) {
    let key = |name: &StrBytes, id: Uuid| {
        if version >= 13 {
            TopicKey::Id(id)
        } else {
            TopicKey::Name(name.to_string())
        }
    };
    // A full fetch request (new session or no session) lists every partition.
    if request.session_epoch <= 0 {
        state.fetch_positions.clear();
    }
    for topic in &request.topics {
        for partition in &topic.partitions {
            state.fetch_positions.insert(
                (key(&topic.topic.0, topic.topic_id), partition.partition),
                FetchPosition {
                    fetch_offset: partition.fetch_offset,
                    max_bytes: partition.partition_max_bytes,
                },
            );
        }
    }
    for forgotten in &request.forgotten_topics_data {
        for partition in &forgotten.partitions {
            state
                .fetch_positions
                .remove(&(key(&forgotten.topic.0, forgotten.topic_id), *partition));
        }
    }
}

/// Rewrites one response frame (correlation id first). `Ok(None)`: pass the original on.
pub(crate) async fn rewrite_response(
    frame: &Bytes,
    pending: PendingResponse,
    shared: &Shared,
) -> Result<Option<BytesMut>, HarnessError> {
    let PendingResponse {
        api_key,
        version,
        pending,
    } = pending;
    match pending {
        Pending::EndTxn => return Ok(None), // only tracked for the delay fault
        // The frame answers the placeholder (an ApiVersions request): replace it whole.
        Pending::Fenced(request) => {
            Counters::add(&shared.counters.fences_synthesized, 1);
            tracing::info!(
                transactional_id = %request.transactional_id,
                producer_id = request.producer_id,
                producer_epoch = request.producer_epoch,
                api_key = ?request.api_key,
                version = request.version,
                error_code = request.error_code(),
                "proxy answered a fenced producer's request"
            );
            return fenced_response(&request).map(Some);
        }
        _ => {}
    }
    let context = || format!("rewriting a {api_key:?} v{version} response");
    let mut body = frame.clone();
    let header = ResponseHeader::decode(&mut body, api_key.response_header_version(version))
        .map_err(|e| HarnessError::protocol(context(), e))?;
    let correlation_id = header.correlation_id;
    let encode = |message: &dyn Fn(&mut BytesMut) -> anyhow::Result<()>| -> Result<Option<BytesMut>, HarnessError> {
        let mut buf = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(correlation_id)
            .encode(&mut buf, api_key.response_header_version(version))
            .map_err(|e| HarnessError::protocol(context(), e))?;
        message(&mut buf).map_err(|e| HarnessError::protocol(context(), e))?;
        Ok(Some(buf))
    };
    match pending {
        Pending::EndTxn | Pending::Fenced(_) => Ok(None),
        Pending::InitProducerId { transactional_id } => {
            // Only read: a response that cannot be decoded records nothing, which only
            // means the broker alone judges this id's zombies.
            match InitProducerIdResponse::decode(&mut body, version) {
                Ok(response) if response.error_code == 0 => shared.producer_epochs.record(
                    &transactional_id,
                    response.producer_id.0,
                    response.producer_epoch,
                ),
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, version, "proxy could not decode an InitProducerId response");
                }
            }
            Ok(None)
        }
        Pending::ApiVersions => {
            let Ok(mut response) = ApiVersionsResponse::decode(&mut body, version) else {
                // An UNSUPPORTED_VERSION answer is encoded as v0; the client retries lower.
                return Ok(None);
            };
            cap_api_versions(&mut response);
            encode(&|buf| response.encode(buf, version))
        }
        Pending::Metadata => {
            let mut response = MetadataResponse::decode(&mut body, version)
                .map_err(|e| HarnessError::protocol(context(), e))?;
            for broker in &mut response.brokers {
                advertise(&mut broker.host, &mut broker.port, shared.advertised);
            }
            for topic in &response.topics {
                if let Some(name) = &topic.name {
                    shared.index.learn_topic(topic.topic_id, name.0.as_str());
                }
            }
            encode(&|buf| response.encode(buf, version))
        }
        Pending::FindCoordinator => {
            let mut response = FindCoordinatorResponse::decode(&mut body, version)
                .map_err(|e| HarnessError::protocol(context(), e))?;
            if version < 4 {
                if response.error_code == 0 {
                    advertise(&mut response.host, &mut response.port, shared.advertised);
                }
            } else {
                for coordinator in &mut response.coordinators {
                    if coordinator.error_code == 0 {
                        advertise(
                            &mut coordinator.host,
                            &mut coordinator.port,
                            shared.advertised,
                        );
                    }
                }
            }
            encode(&|buf| response.encode(buf, version))
        }
        Pending::DescribeCluster => {
            let mut response = DescribeClusterResponse::decode(&mut body, version)
                .map_err(|e| HarnessError::protocol(context(), e))?;
            for broker in &mut response.brokers {
                advertise(&mut broker.host, &mut broker.port, shared.advertised);
            }
            encode(&|buf| response.encode(buf, version))
        }
        Pending::ReadCommittedFetch {
            positions,
            max_wait_ms,
        } => {
            let mut response = FetchResponse::decode(&mut body, version)
                .map_err(|e| HarnessError::protocol(context(), e))?;
            let withheld_everything =
                rewrite_fetch(&mut response, version, &positions, shared).await?;
            if withheld_everything {
                // Kafka would have waited up to max_wait_ms for records below the LSO; the
                // broker answered at once because records exist above it. Without a pause
                // the client would refetch in a tight loop while a transaction stays open.
                let wait = u64::try_from(max_wait_ms).unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(
                    wait.min(EMPTY_FETCH_PAUSE_MS),
                ))
                .await;
            }
            Counters::add(&shared.counters.fetches_rewritten, 1);
            encode(&|buf| response.encode(buf, version))
        }
        Pending::ListOffsets {
            read_committed,
            positions,
        } => {
            let mut response = ListOffsetsResponse::decode(&mut body, version)
                .map_err(|e| HarnessError::protocol(context(), e))?;
            for topic in &mut response.topics {
                let name = topic.name.0.to_string();
                for partition in &mut topic.partitions {
                    let key = (name.clone(), partition.partition_index);
                    let Some(&timestamp) = positions.get(&key) else {
                        continue;
                    };
                    if partition.error_code != 0 {
                        continue;
                    }
                    let offsets = shared
                        .index
                        .offsets(
                            &name,
                            partition.partition_index,
                            read_committed && timestamp == LATEST_TIMESTAMP,
                            &shared.counters,
                        )
                        .await?;
                    let offset = match (timestamp, read_committed) {
                        (EARLIEST_TIMESTAMP, _) => offsets.log_start,
                        (_, true) => offsets.last_stable,
                        (_, false) => offsets.high_watermark,
                    };
                    if partition.offset != offset {
                        tracing::debug!(
                            topic = %name,
                            partition = partition.partition_index,
                            timestamp,
                            read_committed,
                            broker = partition.offset,
                            proxy = offset,
                            "corrected a ListOffsets answer"
                        );
                        Counters::add(&shared.counters.list_offsets_corrected, 1);
                    }
                    partition.offset = offset;
                    // Kafka sends no timestamp with these answers.
                    partition.timestamp = -1;
                    Counters::add(&shared.counters.list_offsets_rewritten, 1);
                }
            }
            encode(&|buf| response.encode(buf, version))
        }
    }
}

/// Caps the versions of the APIs the proxy decodes to what `kafka-protocol` supports.
fn cap_api_versions(response: &mut ApiVersionsResponse) {
    for api in &mut response.api_keys {
        let Ok(key) = ApiKey::try_from(api.api_key) else {
            continue;
        };
        if DECODED_APIS.contains(&key) {
            let decodable = key.valid_versions();
            api.max_version = api.max_version.min(decodable.max);
            api.min_version = api.min_version.max(decodable.min).min(api.max_version);
        }
    }
}

fn advertise(host: &mut StrBytes, port: &mut i32, proxy: SocketAddr) {
    *host = StrBytes::from_string(proxy.ip().to_string());
    *port = i32::from(proxy.port());
}

/// Makes the answer to a read_committed fetch (sent upstream read_uncommitted) Kafka's: cuts
/// each partition's records at the last stable offset, fills aborted transactions and the
/// last stable offset. Returns true when records were cut and none are left in any partition.
async fn rewrite_fetch(
    response: &mut FetchResponse,
    version: i16,
    positions: &HashMap<(TopicKey, i32), FetchPosition>,
    shared: &Shared,
) -> Result<bool, HarnessError> {
    let mut cut_any = false;
    let mut kept_any = false;
    for endpoint in &mut response.node_endpoints {
        advertise(&mut endpoint.host, &mut endpoint.port, shared.advertised);
    }
    for topic in &mut response.responses {
        let (name, key) = if version >= 13 {
            (
                shared.index.topic_name(topic.topic_id).await?,
                TopicKey::Id(topic.topic_id),
            )
        } else {
            let name = topic.topic.0.to_string();
            (name.clone(), TopicKey::Name(name))
        };
        for partition in &mut topic.partitions {
            if partition.error_code != 0 {
                continue;
            }
            let high_watermark = partition.high_watermark;
            // Every marker of a transaction that is visible below the LSO lies below the
            // high watermark: index up to it before answering.
            let index = shared
                .index
                .scan(
                    &name,
                    partition.partition_index,
                    ScanTarget::UpTo(high_watermark),
                    &shared.counters,
                )
                .await?;
            let txns = index.txns();
            // Clamped with this response's own log start: one seen later (by a scan) could
            // lie above records this response still carries.
            let lso = clamp_to_log_start(
                txns.last_stable_offset(high_watermark),
                partition.log_start_offset,
                high_watermark,
            );
            if partition.last_stable_offset != lso {
                partition.last_stable_offset = lso;
                Counters::add(&shared.counters.lso_adjusted, 1);
            }
            let position = positions
                .get(&(key.clone(), partition.partition_index))
                .copied();
            let mut batches = partition
                .records
                .as_deref()
                .map(parse_batches)
                .unwrap_or_default();
            // The request went upstream read_uncommitted: keep only what Kafka's
            // read_committed fetch returns, the whole batches below the LSO. A batch never
            // straddles it (the LSO is the base offset of an open transaction's first batch,
            // and every batch's offsets are contiguous), but a batch that did is left out.
            let parsed = batches.len();
            batches.truncate(batches.partition_point(|b| b.last_offset < lso));
            if batches.len() < parsed {
                cut_any = true;
                Counters::add(&shared.counters.fetch_partitions_cut_at_lso, 1);
            }
            let below_lso = batches.len();
            let max_bytes = position.map_or(i32::MAX, |p| p.max_bytes);
            let kept_bytes = limit_to_max_bytes(&mut batches, max_bytes);
            if batches.len() < below_lso {
                Counters::add(&shared.counters.fetch_partitions_truncated, 1);
            }
            if let Some(records) = partition.records.as_ref() {
                if kept_bytes < records.len() {
                    partition.records = Some(records.slice(..kept_bytes));
                }
            }
            kept_any |= kept_bytes > 0;
            let aborted = match (batches.first(), batches.last()) {
                (Some(first), Some(last)) => {
                    let fetch_offset = position.map_or(first.base_offset, |p| p.fetch_offset);
                    txns.aborted_between(fetch_offset, last.last_offset)
                }
                _ => Vec::new(),
            };
            tracing::debug!(
                topic = %name,
                partition = partition.partition_index,
                version,
                high_watermark,
                lso,
                batches = batches.len(),
                aborted = aborted.len(),
                "rewrote a read_committed fetch partition"
            );
            Counters::add(&shared.counters.aborted_entries_added, aborted.len() as u64);
            partition.aborted_transactions = Some(
                aborted
                    .into_iter()
                    .map(|(producer_id, first_offset)| {
                        AbortedTransaction::default()
                            .with_producer_id(producer_id.into())
                            .with_first_offset(first_offset)
                    })
                    .collect(),
            );
        }
    }
    Ok(cut_any && !kept_any)
}

/// Keeps the longest prefix of whole batches within `max_bytes` (at least one batch, as
/// Kafka does since KIP-74) and returns its size in bytes. nisshi ignores a fetch's
/// per-partition byte limit; honouring it makes small-fetch tests meaningful. The records
/// left out are not lost: the client fetches them next, from the following offset.
fn limit_to_max_bytes(batches: &mut Vec<super::txn_index::BatchInfo>, max_bytes: i32) -> usize {
    let limit = usize::try_from(max_bytes).unwrap_or(0);
    let mut kept = 0;
    let mut bytes = 0;
    for batch in batches.iter() {
        if kept > 0 && bytes + batch.byte_len > limit {
            break;
        }
        bytes += batch.byte_len;
        kept += 1;
    }
    batches.truncate(kept);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::ApiVersion;

    #[test]
    fn read_committed_fetches_become_read_uncommitted_and_nothing_else_changes() {
        let versions = ApiKey::Fetch.valid_versions();
        for version in 4.max(versions.min)..=versions.max {
            let request = FetchRequest::default()
                .with_max_wait_ms(500)
                .with_min_bytes(1)
                .with_max_bytes(52_428_800)
                .with_isolation_level(READ_COMMITTED)
                .with_session_id(3)
                .with_session_epoch(2);
            let header = RequestHeader::default()
                .with_request_api_key(ApiKey::Fetch as i16)
                .with_request_api_version(version)
                .with_correlation_id(7)
                .with_client_id(Some(StrBytes::from_static_str("rdkafka")));
            let mut frame = BytesMut::new();
            header
                .encode(&mut frame, ApiKey::Fetch.request_header_version(version))
                .unwrap();
            request.encode(&mut frame, version).unwrap();
            let mut frame = frame.to_vec();
            // Fields a version lacks decode as defaults: compare with the original as decoded.
            let original: FetchRequest = decode_request(&frame, version).unwrap();
            assert_eq!(original.isolation_level, READ_COMMITTED, "v{version}");
            assert!(fetch_read_uncommitted(&mut frame), "v{version}");
            let decoded: FetchRequest = decode_request(&frame, version).unwrap();
            assert_eq!(decoded, original.with_isolation_level(0), "v{version}");
            // Already read_uncommitted: left alone.
            assert!(!fetch_read_uncommitted(&mut frame), "v{version}");
        }
    }

    #[test]
    fn api_versions_are_capped_for_decoded_apis_only() {
        let mut response = ApiVersionsResponse::default().with_api_keys(vec![
            ApiVersion::default()
                .with_api_key(ApiKey::Fetch as i16)
                .with_min_version(0)
                .with_max_version(99),
            ApiVersion::default()
                .with_api_key(ApiKey::Produce as i16)
                .with_min_version(0)
                .with_max_version(99),
        ]);
        cap_api_versions(&mut response);
        assert_eq!(
            response.api_keys[0].max_version,
            ApiKey::Fetch.valid_versions().max
        );
        assert_eq!(
            response.api_keys[0].min_version,
            ApiKey::Fetch.valid_versions().min
        );
        assert_eq!(response.api_keys[1].max_version, 99);
    }
}

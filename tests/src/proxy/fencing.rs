//! Fencing of zombie transactional producers, which nisshi 0.7.0 does not report.
//!
//! When a new producer initialises a `transactional.id`, the broker bumps the id's producer
//! epoch, and the previous instance (a "zombie") must be told it is fenced the next time it
//! talks to the transaction coordinator. Kafka answers the zombie's EndTxn,
//! AddPartitionsToTxn, AddOffsetsToTxn and TxnOffsetCommit with `PRODUCER_FENCED` (or, to
//! clients using versions older than KIP-588, `INVALID_PRODUCER_EPOCH`). nisshi 0.7.0 detects
//! the stale epoch of an EndTxn but closes the connection instead of answering; librdkafka
//! sees a transport error and retries until its commit times out, so the zombie never learns
//! it was fenced and a framework's "fenced: give the partitions up" path is never taken.
//!
//! The proxy therefore remembers, for every `transactional.id`, the newest (producer id,
//! epoch) that a successful InitProducerId response handed out (librdkafka's own epoch bumps
//! are InitProducerId requests too), shared by all connections. A transactional request
//! carrying the **same producer id with a lower epoch** is not forwarded; the proxy answers it
//! with the fenced error itself.
//!
//! # Why this is safe
//!
//! - The proxy only ever *withholds* a request and answers it with an error. A withheld
//!   EndTxn commits nothing, a withheld AddPartitionsToTxn/AddOffsetsToTxn/TxnOffsetCommit
//!   adds nothing to a transaction: it cannot make a stale producer's records or offsets
//!   visible, nor hide a duplicate. The worst a wrong decision can do is fail a healthy
//!   producer (a false failure), whose open transaction the broker then aborts.
//! - The rule is Kafka's own: the coordinator rejects a request whose epoch is not the
//!   transactional id's current epoch, and the epoch the proxy compares against was handed
//!   out by the broker after the request's epoch (the broker only ever raises the epoch of a
//!   producer id). The new epoch is recorded before its response reaches any client, so a
//!   request with it is never mistaken for a stale one.
//! - A request with a *different* producer id is forwarded untouched: a new producer id
//!   (epoch exhaustion, an expired transactional id, a broker restart that reused ids, an
//!   InitProducerId that did not pass through this proxy) cannot be ordered against the
//!   recorded one from what the proxy sees, so it leaves that judgement to the broker.
//! - Out-of-order recording of concurrent InitProducerId responses for one id keeps the
//!   higher epoch of the same producer id, so a late, older response cannot un-fence a
//!   zombie or fence the newer producer.
//! - The table is forgotten with the transaction index ([`Proxy::reset_index`]) after a
//!   broker restart that lost all state.
//!
//! # Response order
//!
//! Kafka answers the requests of one connection in order, and clients rely on it. The proxy
//! keeps that order without tracking every request: in place of the withheld request it
//! sends the broker a placeholder ApiVersions request with the same correlation id, and when
//! the placeholder's answer comes back (in order, after every earlier response) it replaces
//! it with the fenced response, encoded in the version the client asked for.
//!
//! [`Proxy::reset_index`]: super::Proxy::reset_index

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::BytesMut;
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, ApiKey, ApiVersionsRequest, EndTxnRequest, EndTxnResponse,
    RequestHeader, ResponseHeader, TopicName, TxnOffsetCommitRequest, TxnOffsetCommitResponse,
};
use kafka_protocol::protocol::{Encodable, StrBytes};

use super::framing::request_key_version_correlation;
use super::rewrite::decode_request;
use crate::error::HarnessError;

/// Kafka error code for a stale epoch, understood by every client version.
pub(crate) const INVALID_PRODUCER_EPOCH: i16 = 47;
/// Kafka error code for a fenced producer (KIP-588), for the versions that may receive it.
pub(crate) const PRODUCER_FENCED: i16 = 90;

/// Client id of the placeholder requests (visible in broker logs).
const PLACEHOLDER_CLIENT_ID: &str = "exactly-test-proxy-fence";

/// The newest (producer id, epoch) per transactional id, from InitProducerId responses.
#[derive(Debug, Default)]
pub(crate) struct ProducerEpochs {
    newest: Mutex<HashMap<String, (i64, i16)>>,
}

impl ProducerEpochs {
    /// Records what a successful InitProducerId response for `transactional_id` handed out.
    pub fn record(&self, transactional_id: &str, producer_id: i64, epoch: i16) {
        let mut newest = self.lock();
        match newest.get_mut(transactional_id) {
            // A late response for the same producer id must not lower the epoch.
            Some((known_id, known_epoch)) if *known_id == producer_id => {
                *known_epoch = (*known_epoch).max(epoch);
            }
            Some(known) => *known = (producer_id, epoch),
            None => {
                newest.insert(transactional_id.to_string(), (producer_id, epoch));
            }
        }
    }

    /// True when a newer epoch of the same producer id was handed out for `transactional_id`.
    pub fn is_fenced(&self, transactional_id: &str, producer_id: i64, epoch: i16) -> bool {
        self.lock()
            .get(transactional_id)
            .is_some_and(|(known_id, known_epoch)| *known_id == producer_id && epoch < *known_epoch)
    }

    /// Forgets everything (after a broker restart that lost all state).
    pub fn reset(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, i16)>> {
        // Every update is a single insert or store: the map is consistent after a panic.
        self.newest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A transactional request from a fenced producer, to be answered by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FencedRequest {
    pub api_key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// The partitions named by the request (AddPartitionsToTxn, TxnOffsetCommit), each of
    /// which gets the error in the response.
    pub partitions: Vec<(String, Vec<i32>)>,
}

impl FencedRequest {
    /// The error code Kafka gives a fenced producer for this request and version.
    pub fn error_code(&self) -> i16 {
        match self.api_key {
            // KIP-588: PRODUCER_FENCED from v2; older versions get INVALID_PRODUCER_EPOCH.
            ApiKey::EndTxn | ApiKey::AddPartitionsToTxn | ApiKey::AddOffsetsToTxn
                if self.version >= 2 =>
            {
                PRODUCER_FENCED
            }
            // librdkafka treats only INVALID_PRODUCER_EPOCH as fatal (fenced) for
            // TxnOffsetCommit; the Java client treats both alike.
            _ => INVALID_PRODUCER_EPOCH,
        }
    }
}

/// Returns the request in `frame` if it is a transactional request of a fenced producer.
/// Requests that cannot be decoded are not fenced (the broker judges them).
pub(crate) fn fenced_request(frame: &[u8], epochs: &ProducerEpochs) -> Option<FencedRequest> {
    let (key, version, correlation_id) = request_key_version_correlation(frame)?;
    let api_key = ApiKey::try_from(key).ok()?;
    let (transactional_id, producer_id, producer_epoch, partitions) = match api_key {
        ApiKey::EndTxn => {
            let r: EndTxnRequest = decode_request(frame, version)?;
            (
                r.transactional_id.0,
                r.producer_id.0,
                r.producer_epoch,
                vec![],
            )
        }
        ApiKey::AddOffsetsToTxn => {
            let r: AddOffsetsToTxnRequest = decode_request(frame, version)?;
            (
                r.transactional_id.0,
                r.producer_id.0,
                r.producer_epoch,
                vec![],
            )
        }
        // v4+ is the broker-to-broker batch form (KIP-890), never sent by clients.
        ApiKey::AddPartitionsToTxn if version <= 3 => {
            let r: AddPartitionsToTxnRequest = decode_request(frame, version)?;
            let partitions = r
                .v3_and_below_topics
                .into_iter()
                .map(|t| (t.name.0.to_string(), t.partitions))
                .collect();
            (
                r.v3_and_below_transactional_id.0,
                r.v3_and_below_producer_id.0,
                r.v3_and_below_producer_epoch,
                partitions,
            )
        }
        ApiKey::TxnOffsetCommit => {
            let r: TxnOffsetCommitRequest = decode_request(frame, version)?;
            let partitions = r
                .topics
                .into_iter()
                .map(|t| {
                    let indexes = t.partitions.iter().map(|p| p.partition_index).collect();
                    (t.name.0.to_string(), indexes)
                })
                .collect();
            (
                r.transactional_id.0,
                r.producer_id.0,
                r.producer_epoch,
                partitions,
            )
        }
        _ => return None,
    };
    let transactional_id = transactional_id.to_string();
    if !epochs.is_fenced(&transactional_id, producer_id, producer_epoch) {
        return None;
    }
    Some(FencedRequest {
        api_key,
        version,
        correlation_id,
        transactional_id,
        producer_id,
        producer_epoch,
        partitions,
    })
}

/// The placeholder sent to the broker in place of a fenced request: ApiVersions v0 (valid at
/// any point of a connection, answered by every broker) with the same correlation id.
pub(crate) fn placeholder_request(correlation_id: i32) -> Result<BytesMut, HarnessError> {
    let context = || "encoding the placeholder for a fenced request".to_string();
    let header = RequestHeader::default()
        .with_request_api_key(ApiKey::ApiVersions as i16)
        .with_request_api_version(0)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(PLACEHOLDER_CLIENT_ID)));
    let mut buf = BytesMut::new();
    header
        .encode(&mut buf, ApiKey::ApiVersions.request_header_version(0))
        .map_err(|e| HarnessError::protocol(context(), e))?;
    ApiVersionsRequest::default()
        .encode(&mut buf, 0)
        .map_err(|e| HarnessError::protocol(context(), e))?;
    Ok(buf)
}

/// The complete response frame (header and body) answering `request` as fenced.
pub(crate) fn fenced_response(request: &FencedRequest) -> Result<BytesMut, HarnessError> {
    let FencedRequest {
        api_key, version, ..
    } = request;
    let (api_key, version) = (*api_key, *version);
    let context = || format!("encoding a fenced {api_key:?} v{version} response");
    let error_code = request.error_code();
    let mut buf = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(request.correlation_id)
        .encode(&mut buf, api_key.response_header_version(version))
        .map_err(|e| HarnessError::protocol(context(), e))?;
    let encoded = match api_key {
        ApiKey::EndTxn => EndTxnResponse::default()
            .with_error_code(error_code)
            .encode(&mut buf, version),
        ApiKey::AddOffsetsToTxn => AddOffsetsToTxnResponse::default()
            .with_error_code(error_code)
            .encode(&mut buf, version),
        ApiKey::AddPartitionsToTxn => AddPartitionsToTxnResponse::default()
            .with_results_by_topic_v3_and_below(
                request
                    .partitions
                    .iter()
                    .map(|(topic, partitions)| {
                        AddPartitionsToTxnTopicResult::default()
                            .with_name(TopicName(StrBytes::from_string(topic.clone())))
                            .with_results_by_partition(
                                partitions
                                    .iter()
                                    .map(|p| {
                                        AddPartitionsToTxnPartitionResult::default()
                                            .with_partition_index(*p)
                                            .with_partition_error_code(error_code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
            .encode(&mut buf, version),
        ApiKey::TxnOffsetCommit => TxnOffsetCommitResponse::default()
            .with_topics(
                request
                    .partitions
                    .iter()
                    .map(|(topic, partitions)| {
                        TxnOffsetCommitResponseTopic::default()
                            .with_name(TopicName(StrBytes::from_string(topic.clone())))
                            .with_partitions(
                                partitions
                                    .iter()
                                    .map(|p| {
                                        TxnOffsetCommitResponsePartition::default()
                                            .with_partition_index(*p)
                                            .with_error_code(error_code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            )
            .encode(&mut buf, version),
        other => {
            return Err(HarnessError::protocol(
                context(),
                format!("{other:?} is not a transactional request"),
            ))
        }
    };
    encoded.map_err(|e| HarnessError::protocol(context(), e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
    use kafka_protocol::messages::{ProducerId, TransactionalId};
    use kafka_protocol::protocol::Decodable;

    fn request_frame<R: Encodable>(
        api_key: ApiKey,
        version: i16,
        correlation: i32,
        r: &R,
    ) -> Vec<u8> {
        let mut buf = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("test")))
            .encode(&mut buf, api_key.request_header_version(version))
            .unwrap();
        r.encode(&mut buf, version).unwrap();
        buf.to_vec()
    }

    fn end_txn(version: i16, producer_id: i64, epoch: i16) -> Vec<u8> {
        let request = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("t")))
            .with_producer_id(ProducerId(producer_id))
            .with_producer_epoch(epoch)
            .with_committed(true);
        request_frame(ApiKey::EndTxn, version, 42, &request)
    }

    #[test]
    fn only_a_lower_epoch_of_the_same_producer_id_is_fenced() {
        let epochs = ProducerEpochs::default();
        assert!(!epochs.is_fenced("t", 7, 0), "unknown ids are never fenced");
        epochs.record("t", 7, 0);
        epochs.record("t", 7, 2);
        epochs.record("t", 7, 1); // late response: must not lower the epoch
        assert!(epochs.is_fenced("t", 7, 0));
        assert!(epochs.is_fenced("t", 7, 1));
        assert!(!epochs.is_fenced("t", 7, 2));
        assert!(
            !epochs.is_fenced("t", 7, 3),
            "a newer epoch is the broker's to judge"
        );
        assert!(
            !epochs.is_fenced("t", 8, 0),
            "another producer id is the broker's to judge"
        );
        assert!(!epochs.is_fenced("u", 7, 0));
        epochs.record("t", 9, 0);
        assert!(
            !epochs.is_fenced("t", 7, 0),
            "a new producer id replaces the old one"
        );
        epochs.reset();
        epochs.record("t", 7, 0);
        assert!(!epochs.is_fenced("t", 7, 0));
    }

    #[test]
    fn stale_end_txn_is_answered_with_the_versions_fenced_code() {
        let epochs = ProducerEpochs::default();
        epochs.record("t", 7, 1);
        assert_eq!(fenced_request(&end_txn(1, 7, 1), &epochs), None);
        for (version, code) in [
            (0, INVALID_PRODUCER_EPOCH),
            (1, INVALID_PRODUCER_EPOCH),
            (2, PRODUCER_FENCED),
            (3, PRODUCER_FENCED),
        ] {
            let fenced = fenced_request(&end_txn(version, 7, 0), &epochs).expect("fenced");
            assert_eq!((fenced.correlation_id, fenced.error_code()), (42, code));
            let mut frame = Bytes::from(fenced_response(&fenced).unwrap().to_vec());
            let header =
                ResponseHeader::decode(&mut frame, ApiKey::EndTxn.response_header_version(version))
                    .unwrap();
            assert_eq!(header.correlation_id, 42);
            let response = EndTxnResponse::decode(&mut frame, version).unwrap();
            assert_eq!(response.error_code, code);
            assert!(frame.is_empty(), "v{version}: trailing bytes");
        }
    }

    #[test]
    fn stale_add_partitions_gets_the_error_for_every_partition() {
        let epochs = ProducerEpochs::default();
        epochs.record("t", 7, 1);
        let request = AddPartitionsToTxnRequest::default()
            .with_v3_and_below_transactional_id(TransactionalId(StrBytes::from_static_str("t")))
            .with_v3_and_below_producer_id(ProducerId(7))
            .with_v3_and_below_producer_epoch(0)
            .with_v3_and_below_topics(vec![AddPartitionsToTxnTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("topic")))
                .with_partitions(vec![0, 3])]);
        let frame = request_frame(ApiKey::AddPartitionsToTxn, 0, 5, &request);
        let fenced = fenced_request(&frame, &epochs).expect("fenced");
        let mut bytes = Bytes::from(fenced_response(&fenced).unwrap().to_vec());
        ResponseHeader::decode(&mut bytes, 0).unwrap();
        let response = AddPartitionsToTxnResponse::decode(&mut bytes, 0).unwrap();
        let codes: Vec<(i32, i16)> = response.results_by_topic_v3_and_below[0]
            .results_by_partition
            .iter()
            .map(|p| (p.partition_index, p.partition_error_code))
            .collect();
        assert_eq!(
            codes,
            [(0, INVALID_PRODUCER_EPOCH), (3, INVALID_PRODUCER_EPOCH)]
        );
    }

    #[test]
    fn stale_txn_offset_commit_and_add_offsets_get_their_codes() {
        use kafka_protocol::messages::txn_offset_commit_request::{
            TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
        };
        let epochs = ProducerEpochs::default();
        epochs.record("t", 7, 1);
        let commit = TxnOffsetCommitRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("t")))
            .with_producer_id(ProducerId(7))
            .with_producer_epoch(0)
            .with_topics(vec![TxnOffsetCommitRequestTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("topic")))
                .with_partitions(vec![
                    TxnOffsetCommitRequestPartition::default().with_partition_index(2)
                ])]);
        // v3 is a flexible version (tagged fields in header and body).
        let frame = request_frame(ApiKey::TxnOffsetCommit, 3, 8, &commit);
        let fenced = fenced_request(&frame, &epochs).expect("fenced");
        let mut bytes = Bytes::from(fenced_response(&fenced).unwrap().to_vec());
        let header = ResponseHeader::decode(
            &mut bytes,
            ApiKey::TxnOffsetCommit.response_header_version(3),
        )
        .unwrap();
        assert_eq!(header.correlation_id, 8);
        let response = TxnOffsetCommitResponse::decode(&mut bytes, 3).unwrap();
        let partition = &response.topics[0].partitions[0];
        assert_eq!(
            (partition.partition_index, partition.error_code),
            (2, INVALID_PRODUCER_EPOCH)
        );

        let add = AddOffsetsToTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_static_str("t")))
            .with_producer_id(ProducerId(7))
            .with_producer_epoch(0);
        for (version, code) in [(0, INVALID_PRODUCER_EPOCH), (2, PRODUCER_FENCED)] {
            let frame = request_frame(ApiKey::AddOffsetsToTxn, version, 9, &add);
            let fenced = fenced_request(&frame, &epochs).expect("fenced");
            assert_eq!(fenced.error_code(), code, "AddOffsetsToTxn v{version}");
        }
    }

    #[test]
    fn placeholder_is_an_api_versions_request_with_the_same_correlation_id() {
        let frame = placeholder_request(99).unwrap();
        assert_eq!(
            request_key_version_correlation(&frame),
            Some((ApiKey::ApiVersions as i16, 0, 99))
        );
    }
}

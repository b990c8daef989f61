//! The broker addresses in Kafka's responses, rewritten to the proxy's listeners.
//!
//! Kafka tells clients where its brokers are in Metadata, FindCoordinator and
//! DescribeCluster responses, and (KIP-951, when a partition's leader moved) in the
//! `node_endpoints` of Fetch (v16+) and Produce (v10+) responses. Each advertised
//! `host:port` that belongs to an upstream broker of the proxy is replaced by the proxy's
//! listener in front of that broker ([`AddressMap`]), so clients never connect around the
//! proxy. Nothing else in those responses changes; a response with no address to rewrite is
//! passed on as Kafka sent it, byte for byte. Every other response passes through unread.
//!
//! ApiVersions answers are the one other change: the version ranges of the APIs decoded here
//! are capped at what `kafka-protocol` can decode, so a client never picks a version whose
//! responses the proxy could not rewrite.

use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, DescribeClusterResponse, FetchResponse, FindCoordinatorResponse,
    MetadataResponse, ProduceResponse, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::framing::request_key_version_correlation;
use super::Counters;
use crate::error::HarnessError;

/// The first Fetch version whose responses carry `node_endpoints` (KIP-951).
const FETCH_NODE_ENDPOINTS_VERSION: i16 = 16;
/// The first Produce version whose responses carry `node_endpoints` (KIP-951).
const PRODUCE_NODE_ENDPOINTS_VERSION: i16 = 10;
/// The first Produce version with flexible (compact) encodings.
const PRODUCE_FLEXIBLE_VERSION: i16 = 9;

/// APIs whose responses the proxy decodes; clients must not use versions `kafka-protocol`
/// cannot decode.
const DECODED_APIS: [ApiKey; 6] = [
    ApiKey::ApiVersions,
    ApiKey::Metadata,
    ApiKey::FindCoordinator,
    ApiKey::DescribeCluster,
    ApiKey::Fetch,
    ApiKey::Produce,
];

/// One upstream broker and the proxy listener in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    /// The broker's address, as the proxy connects to it.
    pub upstream: SocketAddr,
    /// The proxy's listener for it, as clients are told.
    pub advertised: SocketAddr,
}

/// Which listener stands for which broker.
#[derive(Debug)]
pub(crate) struct AddressMap {
    routes: Vec<Route>,
}

/// What became of one advertised address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapped {
    /// Replaced by the listener of its broker.
    Rewritten,
    /// It matches no upstream broker: left as it is.
    Unmapped,
}

impl AddressMap {
    pub fn new(routes: Vec<Route>) -> AddressMap {
        AddressMap { routes }
    }

    /// Every route, in the order the brokers were given.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The listener for the broker that advertises itself as `host:port`, if it is one of
    /// the upstream brokers. `localhost` matches a loopback upstream.
    pub fn listener_for(&self, host: &str, port: i32) -> Option<SocketAddr> {
        self.routes
            .iter()
            .find(|route| {
                i32::from(route.upstream.port()) == port && same_host(host, route.upstream.ip())
            })
            .map(|route| route.advertised)
    }

    /// Replaces `host`/`port` by the listener of their broker; an address of no upstream
    /// broker is left unchanged (with a warning).
    fn rewrite(
        &self,
        host: &mut StrBytes,
        port: &mut i32,
        api_key: ApiKey,
        counters: &Counters,
    ) -> Mapped {
        match self.listener_for(host.as_str(), *port) {
            Some(listener) => {
                *host = StrBytes::from_string(listener.ip().to_string());
                *port = i32::from(listener.port());
                Mapped::Rewritten
            }
            None => {
                Counters::add(&counters.addresses_unmapped, 1);
                tracing::warn!(
                    host = host.as_str(),
                    port = *port,
                    ?api_key,
                    upstreams = ?self.routes.iter().map(|r| r.upstream).collect::<Vec<_>>(),
                    "Kafka advertises an address that is none of the proxy's brokers; passing it on unchanged"
                );
                Mapped::Unmapped
            }
        }
    }
}

/// True when the advertised `host` names `ip`: the same IP literal, or `localhost` for a
/// loopback IP.
fn same_host(host: &str, ip: IpAddr) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return ip.is_loopback();
    }
    match host.parse::<IpAddr>() {
        Ok(advertised) => canonical(advertised) == canonical(ip),
        Err(_) => false,
    }
}

/// An IPv4-mapped IPv6 address as IPv4, every other address as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A response the connection waits for to rewrite it, keyed by correlation id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PendingResponse {
    pub api_key: ApiKey,
    pub version: i16,
    /// A ConsumerGroupHeartbeat response to lose if it carries an assignment (a fault).
    pub lose_assignment: bool,
}

impl PendingResponse {
    /// A response to rewrite (or delay), with no fault of its own.
    pub(crate) fn new(api_key: ApiKey, version: i16) -> Self {
        PendingResponse {
            api_key,
            version,
            lose_assignment: false,
        }
    }
}

/// Decides from a client request whether its response may need rewriting (or, for EndTxn, may
/// be delayed by a fault). `None`: pass the response through unread.
pub(crate) fn classify_request(frame: &[u8]) -> Option<(i32, PendingResponse)> {
    let (key, version, correlation_id) = request_key_version_correlation(frame)?;
    let api_key = ApiKey::try_from(key).ok()?;
    let watched = match api_key {
        ApiKey::ApiVersions
        | ApiKey::Metadata
        | ApiKey::FindCoordinator
        | ApiKey::DescribeCluster
        | ApiKey::EndTxn => true,
        ApiKey::Fetch => version >= FETCH_NODE_ENDPOINTS_VERSION,
        ApiKey::Produce => {
            version >= PRODUCE_NODE_ENDPOINTS_VERSION && produce_expects_response(frame, version)
        }
        _ => false,
    };
    watched.then_some((correlation_id, PendingResponse::new(api_key, version)))
}

/// False for a Produce request with `acks=0`, which Kafka does not answer (so a pending
/// entry for it would never be removed). True when in doubt.
fn produce_expects_response(frame: &[u8], version: i16) -> bool {
    produce_acks(frame, version) != Some(0)
}

/// The `acks` of a Produce request frame (v3+), read without decoding its records: it
/// follows the request header and the nullable `transactional_id`.
fn produce_acks(frame: &[u8], version: i16) -> Option<i16> {
    let mut rest = frame;
    kafka_protocol::protocol::decode_request_header_from_buffer(&mut rest).ok()?;
    let id_len = if version >= PRODUCE_FLEXIBLE_VERSION {
        // Compact nullable string: unsigned varint length + 1, 0 for null.
        let mut value: u64 = 0;
        let mut shift = 0;
        loop {
            let (&byte, tail) = rest.split_first()?;
            rest = tail;
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return None;
            }
        }
        usize::try_from(value.saturating_sub(1)).ok()?
    } else {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        rest = tail;
        // -1: null.
        usize::try_from(i16::from_be_bytes(*len)).unwrap_or(0)
    };
    let acks = rest.get(id_len..)?.first_chunk::<2>()?;
    Some(i16::from_be_bytes(*acks))
}

/// Rewrites the advertised addresses in one response frame (correlation id first).
/// `Ok(None)`: nothing to change, pass the original on. `Err`: the response should have been
/// rewritten but could not be decoded or encoded.
pub(crate) fn rewrite_response(
    frame: &Bytes,
    pending: PendingResponse,
    addresses: &AddressMap,
    counters: &Counters,
) -> Result<Option<BytesMut>, HarnessError> {
    let PendingResponse {
        api_key, version, ..
    } = pending;
    let context = || format!("rewriting the addresses in a {api_key:?} v{version} response");
    let mut body = frame.clone();
    let header_version = api_key.response_header_version(version);
    let header = ResponseHeader::decode(&mut body, header_version)
        .map_err(|e| HarnessError::protocol(context(), e))?;
    let rewrite = |host: &mut StrBytes, port: &mut i32| {
        addresses.rewrite(host, port, api_key, counters) == Mapped::Rewritten
    };
    // Each arm decodes the body and returns it re-encoded when something changed.
    let encoded: Option<BytesMut> = match api_key {
        ApiKey::ApiVersions => {
            let Ok(mut response) = ApiVersionsResponse::decode(&mut body, version) else {
                // An UNSUPPORTED_VERSION answer is encoded as v0; the client retries lower.
                return Ok(None);
            };
            cap_api_versions(&mut response)
                .then(|| encode(&header, header_version, &response, version))
                .transpose()
        }
        ApiKey::Metadata => reencode_if(
            &mut body,
            &header,
            header_version,
            version,
            |r: &mut MetadataResponse| {
                r.brokers.iter_mut().fold(false, |changed, b| {
                    rewrite(&mut b.host, &mut b.port) | changed
                })
            },
        ),
        ApiKey::FindCoordinator => {
            reencode_if(
                &mut body,
                &header,
                header_version,
                version,
                |r: &mut FindCoordinatorResponse| {
                    // An error answer carries no address (an empty host, port -1).
                    if version < 4 {
                        r.error_code == 0 && rewrite(&mut r.host, &mut r.port)
                    } else {
                        r.coordinators
                            .iter_mut()
                            .filter(|c| c.error_code == 0)
                            .fold(false, |changed, c| {
                                rewrite(&mut c.host, &mut c.port) | changed
                            })
                    }
                },
            )
        }
        ApiKey::DescribeCluster => reencode_if(
            &mut body,
            &header,
            header_version,
            version,
            |r: &mut DescribeClusterResponse| {
                r.brokers.iter_mut().fold(false, |changed, b| {
                    rewrite(&mut b.host, &mut b.port) | changed
                })
            },
        ),
        ApiKey::Fetch => reencode_if(
            &mut body,
            &header,
            header_version,
            version,
            |r: &mut FetchResponse| {
                r.node_endpoints.iter_mut().fold(false, |changed, e| {
                    rewrite(&mut e.host, &mut e.port) | changed
                })
            },
        ),
        ApiKey::Produce => reencode_if(
            &mut body,
            &header,
            header_version,
            version,
            |r: &mut ProduceResponse| {
                r.node_endpoints.iter_mut().fold(false, |changed, e| {
                    rewrite(&mut e.host, &mut e.port) | changed
                })
            },
        ),
        // EndTxn is only watched for the delay fault; nothing else is registered.
        _ => Ok(None),
    }
    .map_err(|e| HarnessError::protocol(context(), e))?;
    if encoded.is_some() && matches!(api_key, ApiKey::Fetch | ApiKey::Produce) {
        tracing::debug!(
            ?api_key,
            version,
            "rewrote the leader endpoints of a response"
        );
    }
    Ok(encoded)
}

/// Decodes the body as `M`, lets `change` rewrite it, and re-encodes it (with `header`) only
/// when `change` says something changed.
fn reencode_if<M: Decodable + Encodable>(
    body: &mut Bytes,
    header: &ResponseHeader,
    header_version: i16,
    version: i16,
    change: impl FnOnce(&mut M) -> bool,
) -> anyhow::Result<Option<BytesMut>> {
    let mut response = M::decode(body, version)?;
    change(&mut response)
        .then(|| encode(header, header_version, &response, version))
        .transpose()
}

/// Encodes `header` and `response` into one frame body.
fn encode<M: Encodable>(
    header: &ResponseHeader,
    header_version: i16,
    response: &M,
    version: i16,
) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::new();
    header.encode(&mut buf, header_version)?;
    response.encode(&mut buf, version)?;
    Ok(buf)
}

/// Caps the versions of the APIs the proxy decodes to what `kafka-protocol` supports; true
/// if that changed anything.
fn cap_api_versions(response: &mut ApiVersionsResponse) -> bool {
    let mut changed = false;
    for api in &mut response.api_keys {
        let Ok(key) = ApiKey::try_from(api.api_key) else {
            continue;
        };
        if DECODED_APIS.contains(&key) {
            let decodable = key.valid_versions();
            let max_version = api.max_version.min(decodable.max);
            let min_version = api.min_version.max(decodable.min).min(max_version);
            changed |= (min_version, max_version) != (api.min_version, api.max_version);
            api.min_version = min_version;
            api.max_version = max_version;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::api_versions_response::ApiVersion;
    use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, NodeEndpoint};
    use kafka_protocol::messages::find_coordinator_response::Coordinator;
    use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
    use kafka_protocol::messages::{BrokerId, ProduceRequest, RequestHeader, TransactionalId};

    /// Three brokers on 127.0.0.1:19092..19094 behind listeners on 127.0.0.1:40001..40003.
    fn three_brokers() -> AddressMap {
        AddressMap::new(
            (0..3)
                .map(|i| Route {
                    upstream: SocketAddr::from(([127, 0, 0, 1], 19092 + i)),
                    advertised: SocketAddr::from(([127, 0, 0, 1], 40001 + i)),
                })
                .collect(),
        )
    }

    fn str(s: &str) -> StrBytes {
        StrBytes::from_string(s.to_string())
    }

    /// A response frame as a broker sends it: header then body.
    fn response_frame<M: Encodable>(api_key: ApiKey, version: i16, response: &M) -> Bytes {
        let header = ResponseHeader::default().with_correlation_id(42);
        encode(
            &header,
            api_key.response_header_version(version),
            response,
            version,
        )
        .unwrap()
        .freeze()
    }

    /// Rewrites `frame` and decodes the result (or the original, if unchanged).
    fn rewritten<M: Decodable>(
        frame: &Bytes,
        api_key: ApiKey,
        version: i16,
        addresses: &AddressMap,
        counters: &Counters,
    ) -> (M, bool) {
        let pending = PendingResponse::new(api_key, version);
        let out = rewrite_response(frame, pending, addresses, counters).unwrap();
        let changed = out.is_some();
        let mut body = out.map_or_else(|| frame.clone(), BytesMut::freeze);
        let header =
            ResponseHeader::decode(&mut body, api_key.response_header_version(version)).unwrap();
        assert_eq!(header.correlation_id, 42);
        (M::decode(&mut body, version).unwrap(), changed)
    }

    fn unmapped(counters: &Counters) -> u64 {
        counters.snapshot().addresses_unmapped
    }

    #[test]
    fn hosts_match_by_ip_and_localhost_is_loopback() {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        assert!(same_host("127.0.0.1", loopback));
        assert!(same_host("localhost", loopback));
        assert!(same_host("LOCALHOST", loopback));
        assert!(same_host(
            "localhost",
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        ));
        assert!(same_host("::ffff:127.0.0.1", loopback));
        assert!(same_host(
            "[::1]",
            IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])
        ));
        assert!(!same_host("127.0.0.2", loopback));
        assert!(!same_host("kafka-1", loopback));
        assert!(!same_host("localhost", IpAddr::from([10, 0, 0, 1])));

        let map = three_brokers();
        assert_eq!(
            map.listener_for("localhost", 19093),
            Some(SocketAddr::from(([127, 0, 0, 1], 40002)))
        );
        assert_eq!(map.listener_for("127.0.0.1", 19095), None);
        assert_eq!(map.listener_for("10.0.0.1", 19092), None);
    }

    #[test]
    fn metadata_brokers_map_to_their_own_listener_and_strangers_stay() {
        let (map, counters) = (three_brokers(), Counters::default());
        let broker = |id: i32, host: &str, port: i32| {
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(id))
                .with_host(str(host))
                .with_port(port)
                .with_rack(Some(str("rack-a")))
        };
        for version in ApiKey::Metadata.valid_versions().min..=ApiKey::Metadata.valid_versions().max
        {
            let mut original = MetadataResponse::default().with_brokers(vec![
                broker(3, "127.0.0.1", 19094),
                broker(1, "127.0.0.1", 19092),
                broker(2, "localhost", 19093),
                broker(9, "127.0.0.1", 9092),
            ]);
            if version >= 2 {
                original = original.with_cluster_id(Some(str("cluster")));
            }
            if version >= 1 {
                original = original.with_controller_id(BrokerId(2));
            }
            let frame = response_frame(ApiKey::Metadata, version, &original);
            let (response, changed): (MetadataResponse, _) =
                rewritten(&frame, ApiKey::Metadata, version, &map, &counters);
            assert!(changed, "v{version}");
            let addresses: Vec<(i32, &str, i32)> = response
                .brokers
                .iter()
                .map(|b| (b.node_id.0, b.host.as_str(), b.port))
                .collect();
            assert_eq!(
                addresses,
                [
                    (3, "127.0.0.1", 40003),
                    (1, "127.0.0.1", 40001),
                    (2, "127.0.0.1", 40002),
                    (9, "127.0.0.1", 9092),
                ],
                "v{version}"
            );
            // Nothing but the addresses changed.
            let mut expected = original.clone();
            for (broker, port) in expected.brokers.iter_mut().zip([40003, 40001, 40002, 9092]) {
                broker.host = str("127.0.0.1");
                broker.port = port;
            }
            let mut decoded_expected = response_frame(ApiKey::Metadata, version, &expected);
            ResponseHeader::decode(
                &mut decoded_expected,
                ApiKey::Metadata.response_header_version(version),
            )
            .unwrap();
            assert_eq!(
                response,
                MetadataResponse::decode(&mut decoded_expected, version).unwrap(),
                "v{version}"
            );
        }
        let versions = ApiKey::Metadata.valid_versions();
        assert_eq!(
            unmapped(&counters),
            u64::try_from(versions.max - versions.min + 1).unwrap()
        );
    }

    /// Asserts the proxy passes `frame` on as it is.
    fn assert_passed_unchanged(
        frame: &bytes::Bytes,
        api_key: ApiKey,
        version: i16,
        map: &AddressMap,
        counters: &Counters,
    ) {
        let pending = PendingResponse::new(api_key, version);
        assert!(rewrite_response(frame, pending, map, counters)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_response_with_nothing_to_map_passes_unchanged() {
        let (map, counters) = (three_brokers(), Counters::default());
        let original =
            MetadataResponse::default().with_brokers(vec![MetadataResponseBroker::default()
                .with_node_id(BrokerId(7))
                .with_host(str("elsewhere"))
                .with_port(19092)]);
        let frame = response_frame(ApiKey::Metadata, 12, &original);
        assert_passed_unchanged(&frame, ApiKey::Metadata, 12, &map, &counters);
        assert_eq!(unmapped(&counters), 1);
    }

    #[test]
    fn find_coordinator_maps_the_coordinator_of_every_version() {
        let (map, counters) = (three_brokers(), Counters::default());
        let versions = ApiKey::FindCoordinator.valid_versions();
        for version in versions.min..=versions.max {
            let original = if version < 4 {
                FindCoordinatorResponse::default()
                    .with_node_id(BrokerId(2))
                    .with_host(str("localhost"))
                    .with_port(19093)
            } else {
                FindCoordinatorResponse::default().with_coordinators(vec![
                    Coordinator::default()
                        .with_key(str("txn-a"))
                        .with_node_id(BrokerId(2))
                        .with_host(str("localhost"))
                        .with_port(19093),
                    // An error answer carries no address and is left alone.
                    Coordinator::default()
                        .with_key(str("txn-b"))
                        .with_node_id(BrokerId(-1))
                        .with_host(str(""))
                        .with_port(-1)
                        .with_error_code(15),
                ])
            };
            let frame = response_frame(ApiKey::FindCoordinator, version, &original);
            let (response, changed): (FindCoordinatorResponse, _) =
                rewritten(&frame, ApiKey::FindCoordinator, version, &map, &counters);
            assert!(changed, "v{version}");
            if version < 4 {
                assert_eq!(
                    (response.host.as_str(), response.port),
                    ("127.0.0.1", 40002)
                );
            } else {
                let coordinators: Vec<(&str, i32)> = response
                    .coordinators
                    .iter()
                    .map(|c| (c.host.as_str(), c.port))
                    .collect();
                assert_eq!(coordinators, [("127.0.0.1", 40002), ("", -1)]);
            }
        }
        assert_eq!(unmapped(&counters), 0);

        // A v0-v3 error answer is passed on as it is.
        let error = FindCoordinatorResponse::default()
            .with_error_code(15)
            .with_node_id(BrokerId(-1))
            .with_port(-1);
        let frame = response_frame(ApiKey::FindCoordinator, 2, &error);
        assert_passed_unchanged(&frame, ApiKey::FindCoordinator, 2, &map, &counters);
        assert_eq!(unmapped(&counters), 0);
    }

    #[test]
    fn describe_cluster_brokers_are_mapped() {
        let (map, counters) = (three_brokers(), Counters::default());
        let versions = ApiKey::DescribeCluster.valid_versions();
        for version in versions.min..=versions.max {
            let original = DescribeClusterResponse::default()
                .with_cluster_id(str("cluster"))
                .with_controller_id(BrokerId(1))
                .with_brokers(vec![
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(1))
                        .with_host(str("127.0.0.1"))
                        .with_port(19092),
                    DescribeClusterBroker::default()
                        .with_broker_id(BrokerId(3))
                        .with_host(str("127.0.0.1"))
                        .with_port(19094),
                ]);
            let frame = response_frame(ApiKey::DescribeCluster, version, &original);
            let (response, changed): (DescribeClusterResponse, _) =
                rewritten(&frame, ApiKey::DescribeCluster, version, &map, &counters);
            assert!(changed);
            let ports: Vec<i32> = response.brokers.iter().map(|b| b.port).collect();
            assert_eq!(ports, [40001, 40003], "v{version}");
            assert_eq!(response.cluster_id.as_str(), "cluster");
        }
    }

    #[test]
    fn fetch_node_endpoints_are_mapped_and_records_kept() {
        let (map, counters) = (three_brokers(), Counters::default());
        let records = Bytes::from_static(b"not parsed by the proxy");
        let topics = vec![FetchableTopicResponse::default().with_partitions(vec![
            kafka_protocol::messages::fetch_response::PartitionData::default()
                .with_partition_index(0)
                .with_error_code(6)
                .with_high_watermark(10)
                .with_records(Some(records.clone())),
        ])];
        let with_endpoints = FetchResponse::default()
            .with_responses(topics.clone())
            .with_node_endpoints(vec![NodeEndpoint::default()
                .with_node_id(BrokerId(2))
                .with_host(str("127.0.0.1"))
                .with_port(19093)]);
        let version = FETCH_NODE_ENDPOINTS_VERSION;
        let frame = response_frame(ApiKey::Fetch, version, &with_endpoints);
        let (response, changed): (FetchResponse, _) =
            rewritten(&frame, ApiKey::Fetch, version, &map, &counters);
        assert!(changed);
        assert_eq!(
            (
                response.node_endpoints[0].host.as_str(),
                response.node_endpoints[0].port
            ),
            ("127.0.0.1", 40002)
        );
        assert_eq!(
            response.responses[0].partitions[0].records,
            Some(records.clone())
        );

        // Without endpoints (the usual case) the frame passes as Kafka sent it.
        let plain = FetchResponse::default().with_responses(topics);
        let frame = response_frame(ApiKey::Fetch, version, &plain);
        let pending = PendingResponse::new(ApiKey::Fetch, version);
        assert!(rewrite_response(&frame, pending, &map, &counters)
            .unwrap()
            .is_none());
    }

    #[test]
    fn produce_node_endpoints_are_mapped() {
        let (map, counters) = (three_brokers(), Counters::default());
        let version = PRODUCE_NODE_ENDPOINTS_VERSION;
        let original = ProduceResponse::default().with_node_endpoints(vec![
            kafka_protocol::messages::produce_response::NodeEndpoint::default()
                .with_node_id(BrokerId(1))
                .with_host(str("localhost"))
                .with_port(19092),
        ]);
        let frame = response_frame(ApiKey::Produce, version, &original);
        let (response, changed): (ProduceResponse, _) =
            rewritten(&frame, ApiKey::Produce, version, &map, &counters);
        assert!(changed);
        assert_eq!(response.node_endpoints[0].port, 40001);
    }

    #[test]
    fn undecodable_responses_are_errors() {
        let (map, counters) = (three_brokers(), Counters::default());
        let frame = Bytes::from_static(&[0, 0, 0, 42, 0xff]);
        let pending = PendingResponse::new(ApiKey::Metadata, 12);
        assert!(rewrite_response(&frame, pending, &map, &counters).is_err());
    }

    fn request_frame<R: Encodable>(api_key: ApiKey, version: i16, request: &R) -> Vec<u8> {
        let mut frame = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api_key as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(str("rdkafka")))
            .encode(&mut frame, api_key.request_header_version(version))
            .unwrap();
        request.encode(&mut frame, version).unwrap();
        frame.to_vec()
    }

    #[test]
    fn produce_acks_are_read_in_every_version() {
        let versions = ApiKey::Produce.valid_versions();
        for version in versions.min..=versions.max {
            for transactional_id in [None, Some("txn-with-a-longer-id".repeat(8))] {
                for acks in [-1, 0, 1] {
                    let request = ProduceRequest::default()
                        .with_transactional_id(
                            transactional_id.clone().map(|id| TransactionalId(str(&id))),
                        )
                        .with_acks(acks)
                        .with_timeout_ms(30_000);
                    let frame = request_frame(ApiKey::Produce, version, &request);
                    assert_eq!(
                        produce_acks(&frame, version),
                        Some(acks),
                        "v{version} {transactional_id:?}"
                    );
                    let classified = classify_request(&frame);
                    let watched = version >= PRODUCE_NODE_ENDPOINTS_VERSION && acks != 0;
                    assert_eq!(classified.is_some(), watched, "v{version} acks={acks}");
                }
            }
        }
    }

    #[test]
    fn only_responses_that_can_carry_addresses_are_watched() {
        let fetch = |version: i16| {
            request_frame(
                ApiKey::Fetch,
                version,
                &kafka_protocol::messages::FetchRequest::default(),
            )
        };
        assert!(classify_request(&fetch(15)).is_none());
        assert_eq!(
            classify_request(&fetch(16)),
            Some((7, PendingResponse::new(ApiKey::Fetch, 16)))
        );
        let metadata = request_frame(
            ApiKey::Metadata,
            12,
            &kafka_protocol::messages::MetadataRequest::default(),
        );
        assert!(classify_request(&metadata).is_some());
        let heartbeat = request_frame(
            ApiKey::Heartbeat,
            4,
            &kafka_protocol::messages::HeartbeatRequest::default(),
        );
        assert!(classify_request(&heartbeat).is_none());
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
                .with_min_version(3)
                .with_max_version(99),
            ApiVersion::default()
                .with_api_key(ApiKey::EndTxn as i16)
                .with_min_version(0)
                .with_max_version(99),
        ]);
        assert!(cap_api_versions(&mut response));
        assert_eq!(
            (
                response.api_keys[0].min_version,
                response.api_keys[0].max_version
            ),
            (
                ApiKey::Fetch.valid_versions().min,
                ApiKey::Fetch.valid_versions().max
            )
        );
        assert_eq!(
            response.api_keys[1].max_version,
            ApiKey::Produce.valid_versions().max
        );
        assert_eq!(response.api_keys[2].max_version, 99);
        // Already within range: nothing changes, and the frame would pass unchanged.
        assert!(!cap_api_versions(&mut response));
    }
}

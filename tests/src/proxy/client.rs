//! A minimal Kafka client connection: one request at a time, typed with `kafka-protocol`.
//!
//! For tests that speak the protocol to a broker (or through the proxy) directly, and for
//! readiness probes. The proxy itself sends no requests of its own.

use std::net::SocketAddr;

use bytes::BytesMut;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, Encodable, Request, StrBytes};
use tokio::net::TcpStream;

use super::framing::{read_frame, write_frame};
use crate::error::HarnessError;

/// The client id these requests carry (visible in broker logs).
const CLIENT_ID: &str = "exactly-test-client";

/// One TCP connection to a Kafka broker on which requests are sent one at a time.
#[derive(Debug)]
pub struct KafkaConnection {
    address: SocketAddr,
    stream: TcpStream,
    next_correlation_id: i32,
}

impl KafkaConnection {
    /// Connects to `address`.
    pub async fn connect(address: SocketAddr) -> Result<KafkaConnection, HarnessError> {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| HarnessError::io(format!("connecting to Kafka broker {address}"), e))?;
        let _ = stream.set_nodelay(true);
        Ok(KafkaConnection {
            address,
            stream,
            next_correlation_id: 1,
        })
    }

    /// Sends `request` with API version `version` and decodes its response.
    pub async fn send<R: Request>(
        &mut self,
        version: i16,
        request: &R,
    ) -> Result<R::Response, HarnessError> {
        let api_key = ApiKey::try_from(R::KEY).map_err(|_| {
            HarnessError::protocol("encoding a request", format!("unknown api key {}", R::KEY))
        })?;
        let context = || format!("{api_key:?} v{version} to {}", self.address);
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        let mut buf = BytesMut::new();
        header
            .encode(&mut buf, api_key.request_header_version(version))
            .map_err(|e| HarnessError::protocol(context(), e))?;
        request
            .encode(&mut buf, version)
            .map_err(|e| HarnessError::protocol(context(), e))?;
        write_frame(&mut self.stream, &buf)
            .await
            .map_err(|e| HarnessError::io(context(), e))?;
        let frame = read_frame(&mut self.stream)
            .await
            .map_err(|e| HarnessError::io(context(), e))?
            .ok_or_else(|| {
                HarnessError::io(
                    context(),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "connection closed by the broker",
                    ),
                )
            })?;
        let mut body = frame.freeze();
        let response_header =
            ResponseHeader::decode(&mut body, api_key.response_header_version(version))
                .map_err(|e| HarnessError::protocol(context(), e))?;
        if response_header.correlation_id != correlation_id {
            return Err(HarnessError::protocol(
                context(),
                format!(
                    "correlation id {} in the response, expected {correlation_id}",
                    response_header.correlation_id
                ),
            ));
        }
        R::Response::decode(&mut body, version).map_err(|e| HarnessError::protocol(context(), e))
    }

    /// ApiVersions v0 (understood by every broker); fails unless its error code is 0.
    pub async fn api_versions(&mut self) -> Result<ApiVersionsResponse, HarnessError> {
        let response = self.send(0, &ApiVersionsRequest::default()).await?;
        if response.error_code != 0 {
            return Err(HarnessError::protocol(
                format!("ApiVersions to {}", self.address),
                format!("error code {}", response.error_code),
            ));
        }
        Ok(response)
    }
}

//! One proxied client connection: a client socket, its own upstream socket to one broker, and
//! two loops (requests up, responses down) that run until either side closes or a fault drops
//! them.
//!
//! Requests are read from the client by their own loop into a short queue and forwarded from
//! there in order. The split lets a connection that holds a request back (an EndTxn under
//! [`Faults::hold_end_txn_requests`](super::Faults::hold_end_txn_requests)) still notice that
//! its client went away, and discard the held request instead of forwarding it later.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ConsumerGroupHeartbeatResponse, ResponseHeader};
use kafka_protocol::protocol::Decodable;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use super::faults::EndTxnHold;
use super::framing::{
    read_frame, request_client_id, request_key_version_correlation, response_correlation_id,
    write_frame,
};
use super::rewrite::{classify_request, rewrite_response, PendingResponse};
use super::{Counters, Shared};

/// How long the proxy waits to connect to the broker for a new client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests read from the client ahead of forwarding (beyond it, the client's socket buffers
/// them: the usual backpressure).
const REQUEST_QUEUE: usize = 32;

/// Responses the proxy may have to rewrite, by correlation id.
type PendingMap = Arc<Mutex<HashMap<i32, PendingResponse>>>;

/// What the client-reading loop passes on: a request frame, `Ok(None)` at a clean end of the
/// client's stream, or the read error that ended it.
type ClientRead = Result<Option<BytesMut>, String>;

/// Serves one client against the broker at `upstream` until either side disconnects or
/// `kill` changes.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut kill: watch::Receiver<u64>,
) {
    let connected = tokio::select! {
        connected = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)) => connected,
        _ = kill.changed() => return,
    };
    let upstream_stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::info!(%peer, %upstream, %error, "proxy cannot reach the broker; closing the client");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %upstream, "proxy timed out connecting to the broker; closing the client");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream_stream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream_stream.into_split();
    let pending: PendingMap = Arc::default();
    let requests = forward_requests(client_read, upstream_write, pending.clone(), shared.clone());
    let responses = forward_responses(upstream_read, client_write, pending, shared.clone());
    let outcome = tokio::select! {
        outcome = requests => outcome.map_err(|e| format!("client side: {e}")),
        outcome = responses => outcome.map_err(|e| format!("broker side: {e}")),
        _ = kill.changed() => Err("dropped by fault injection".to_string()),
    };
    match outcome {
        Ok(()) => tracing::debug!(%peer, %upstream, "proxy connection closed"),
        Err(reason) => tracing::debug!(%peer, %upstream, %reason, "proxy connection ended"),
    }
    // Both sockets close here, with the futures that own their halves.
}

/// Forwards the client's requests upstream until the client's stream ends (`Ok`) or either
/// socket fails.
async fn forward_requests(
    client: OwnedReadHalf,
    upstream: OwnedWriteHalf,
    pending: PendingMap,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let (reads_tx, reads) = mpsc::channel(REQUEST_QUEUE);
    // The reader's end is reported through the queue, after every request it read; the
    // forwarder decides when the connection is done.
    let reader = async move {
        read_frames(client, reads_tx).await;
        std::future::pending::<Result<(), String>>().await
    };
    tokio::select! {
        outcome = reader => outcome,
        outcome = forward_queued_requests(reads, upstream, pending, shared) => outcome,
    }
}

/// Reads frames from `socket` into `queue` until its stream ends or fails.
async fn read_frames(mut socket: OwnedReadHalf, queue: mpsc::Sender<ClientRead>) {
    loop {
        let read = read_frame(&mut socket).await.map_err(|e| e.to_string());
        let last = !matches!(read, Ok(Some(_)));
        if queue.send(read).await.is_err() || last {
            return;
        }
    }
}

async fn forward_queued_requests(
    mut reads: mpsc::Receiver<ClientRead>,
    mut upstream: OwnedWriteHalf,
    pending: PendingMap,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let mut hold = shared.faults.end_txn_hold();
    // Requests read while an EndTxn was held, to forward after it.
    let mut backlog: VecDeque<ClientRead> = VecDeque::new();
    loop {
        let read = match backlog.pop_front() {
            Some(read) => read,
            None => reads.recv().await.unwrap_or(Ok(None)),
        };
        let Some(frame) = read? else {
            return Ok(());
        };
        let Some((api_key, _, _)) = request_key_version_correlation(&frame) else {
            return Err(format!(
                "request frame of {} bytes is too short",
                frame.len()
            ));
        };
        if let Some(latency) = shared.faults.latency(api_key, request_client_id(&frame)) {
            tokio::time::sleep(latency).await;
        }
        if shared.faults.outage_on_request(api_key) {
            // Lost with the connection: the broker never sees it.
            return Ok(());
        }
        if api_key == ApiKey::EndTxn as i16 {
            let held_under = *hold.borrow_and_update();
            if held_under.holding
                && !wait_for_end_txn_release(
                    held_under,
                    &mut hold,
                    &mut reads,
                    &mut backlog,
                    &shared,
                )
                .await?
            {
                // The client went away: the held EndTxn (and anything behind it) is never
                // forwarded, as if the client had died before sending it.
                return Ok(());
            }
        }
        let classified = classify_request(&frame).or_else(|| {
            let (_, version, correlation_id) = request_key_version_correlation(&frame)?;
            (api_key == ApiKey::ConsumerGroupHeartbeat as i16
                && shared
                    .faults
                    .assignment_loss_armed_for(request_client_id(&frame)))
            .then_some((
                correlation_id,
                PendingResponse {
                    api_key: ApiKey::ConsumerGroupHeartbeat,
                    version,
                    lose_assignment: true,
                },
            ))
        });
        if let Some((correlation_id, expected)) = classified {
            // Registered before forwarding, so the response cannot overtake it.
            lock(&pending).insert(correlation_id, expected);
        }
        write_frame(&mut upstream, &frame)
            .await
            .map_err(|e| e.to_string())?;
    }
}

/// Holds an EndTxn request until the hold is released (`Ok(true)`: forward it) or the client's
/// stream ends (`Ok(false)`: discard it). Requests the client sends meanwhile go to `backlog`.
async fn wait_for_end_txn_release(
    held_under: EndTxnHold,
    hold: &mut watch::Receiver<EndTxnHold>,
    reads: &mut mpsc::Receiver<ClientRead>,
    backlog: &mut VecDeque<ClientRead>,
    shared: &Shared,
) -> Result<bool, String> {
    let held = HeldRequest::start(&shared.counters);
    tracing::info!("proxy holds an EndTxn request");
    loop {
        tokio::select! {
            released = hold.wait_for(|now| now.releases_request_held_under(held_under)) => {
                released.map_err(|_| "the proxy's fault settings are gone".to_string())?;
                held.released();
                tracing::info!("proxy releases a held EndTxn request");
                return Ok(true);
            }
            read = reads.recv() => match read {
                Some(Ok(Some(frame))) => backlog.push_back(Ok(Some(frame))),
                Some(Ok(None)) | None => {
                    tracing::info!("client closed its connection; discarding its held EndTxn request");
                    return Ok(false);
                }
                // Dropping `held` counts the request as discarded.
                Some(Err(error)) => return Err(error),
            },
        }
    }
}

/// Counts one held EndTxn request: released, or (when dropped unreleased: the client closed,
/// a read failed, a fault dropped the connection) discarded.
struct HeldRequest<'a> {
    counters: &'a Counters,
    released: bool,
}

impl<'a> HeldRequest<'a> {
    fn start(counters: &'a Counters) -> Self {
        Counters::add(&counters.end_txn_held, 1);
        HeldRequest {
            counters,
            released: false,
        }
    }

    fn released(mut self) {
        self.released = true;
        Counters::add(&self.counters.end_txn_released, 1);
    }
}

impl Drop for HeldRequest<'_> {
    fn drop(&mut self) {
        if !self.released {
            Counters::add(&self.counters.end_txn_discarded, 1);
        }
    }
}

/// Passes the broker's responses to the client, with advertised addresses rewritten, until
/// the broker's stream ends (`Ok`) or either side fails.
async fn forward_responses(
    mut upstream: OwnedReadHalf,
    mut client: OwnedWriteHalf,
    pending: PendingMap,
    shared: Arc<Shared>,
) -> Result<(), String> {
    while let Some(frame) = read_frame(&mut upstream).await.map_err(|e| e.to_string())? {
        let frame = frame.freeze();
        let expected = response_correlation_id(&frame).and_then(|id| lock(&pending).remove(&id));
        let Some(expected) = expected else {
            write_frame(&mut client, &frame)
                .await
                .map_err(|e| e.to_string())?;
            continue;
        };
        if expected.api_key == ApiKey::EndTxn {
            if let Some(delay) = shared.faults.end_txn_response_delay() {
                tracing::info!(?delay, "proxy holds an EndTxn response");
                tokio::time::sleep(delay).await;
            }
        }
        if expected.lose_assignment
            && carries_assignment(&frame, expected.version)
            && shared.faults.take_assignment_loss()
        {
            tracing::info!("proxy loses a ConsumerGroupHeartbeat response with an assignment");
            continue;
        }
        let api_key = expected.api_key;
        match rewrite_response(&frame, expected, &shared.addresses, &shared.counters) {
            Ok(Some(rewritten)) => write_frame(&mut client, &rewritten).await,
            Ok(None) => write_frame(&mut client, &frame).await,
            Err(error) => {
                // Never pass on a response whose addresses should have been rewritten: the
                // client would connect to the broker around the proxy. Closing makes it retry.
                Counters::add(&shared.counters.rewrite_failures, 1);
                tracing::warn!(?api_key, %error, "proxy could not rewrite a response; closing the connection");
                return Err(error.to_string());
            }
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// True for a successful ConsumerGroupHeartbeat response that carries an assignment.
fn carries_assignment(frame: &Bytes, version: i16) -> bool {
    let mut body = frame.clone();
    let header_version = ApiKey::ConsumerGroupHeartbeat.response_header_version(version);
    if ResponseHeader::decode(&mut body, header_version).is_err() {
        return false;
    }
    ConsumerGroupHeartbeatResponse::decode(&mut body, version)
        .is_ok_and(|r| r.error_code == 0 && r.assignment.is_some())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

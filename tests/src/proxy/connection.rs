//! One proxied client connection: a client socket, its own upstream socket, and two loops
//! (requests up, responses down) that run until either side closes or a fault drops them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kafka_protocol::messages::ApiKey;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::fencing::{fenced_request, placeholder_request};
use super::framing::{
    read_frame, request_key_version_correlation, response_correlation_id, write_frame,
};
use super::rewrite::{
    classify_request, rewrite_response, ConnectionState, Pending, PendingResponse,
};
use super::{Counters, Shared};

/// How long the proxy waits to connect to the broker for a new client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type PendingMap = Arc<Mutex<HashMap<i32, PendingResponse>>>;

/// Serves one client until it disconnects, the broker disconnects, or `kill` changes.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut kill: watch::Receiver<u64>,
) {
    let upstream = match tokio::time::timeout(
        UPSTREAM_CONNECT_TIMEOUT,
        TcpStream::connect(shared.upstream),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::warn!(%peer, upstream = %shared.upstream, %error, "proxy cannot reach the broker; closing the client");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, upstream = %shared.upstream, "proxy timed out connecting to the broker; closing the client");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let pending: PendingMap = Arc::default();
    let requests = forward_requests(client_read, upstream_write, pending.clone(), shared.clone());
    let responses = forward_responses(upstream_read, client_write, pending, shared.clone());
    let outcome = tokio::select! {
        outcome = requests => outcome.map_err(|e| format!("client side: {e}")),
        outcome = responses => outcome.map_err(|e| format!("broker side: {e}")),
        _ = kill.changed() => Err("dropped by fault injection".to_string()),
    };
    match outcome {
        Ok(()) => tracing::debug!(%peer, "proxy connection closed"),
        Err(reason) => tracing::debug!(%peer, %reason, "proxy connection ended"),
    }
    // Dropping both halves of both sockets closes them.
}

async fn forward_requests(
    mut client: OwnedReadHalf,
    mut upstream: OwnedWriteHalf,
    pending: PendingMap,
    shared: Arc<Shared>,
) -> Result<(), String> {
    let mut state = ConnectionState::default();
    while let Some(frame) = read_frame(&mut client).await.map_err(|e| e.to_string())? {
        let Some((api_key, _, _)) = request_key_version_correlation(&frame) else {
            return Err(format!(
                "request frame of {} bytes is too short",
                frame.len()
            ));
        };
        if let Some(latency) = shared.faults.latency(api_key) {
            tokio::time::sleep(latency).await;
        }
        if let Some(fenced) = fenced_request(&frame, &shared.producer_epochs) {
            // Withheld; the placeholder keeps its answer in order (see `fencing`).
            let placeholder =
                placeholder_request(fenced.correlation_id).map_err(|e| e.to_string())?;
            let correlation_id = fenced.correlation_id;
            let expected = PendingResponse {
                api_key: fenced.api_key,
                version: fenced.version,
                pending: Pending::Fenced(fenced),
            };
            lock(&pending).insert(correlation_id, expected);
            write_frame(&mut upstream, &placeholder)
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        if let Some((correlation_id, expected)) = classify_request(&frame, &mut state) {
            // Registered before forwarding, so the response cannot overtake it.
            lock(&pending).insert(correlation_id, expected);
        }
        write_frame(&mut upstream, &frame)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

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
        if matches!(expected.pending, Pending::EndTxn) {
            if let Some(delay) = shared.faults.end_txn_response_delay() {
                tracing::info!(?delay, "proxy holds an EndTxn response");
                tokio::time::sleep(delay).await;
            }
        }
        let api_key: ApiKey = expected.api_key;
        match rewrite_response(&frame, expected, &shared).await {
            Ok(Some(rewritten)) => write_frame(&mut client, &rewritten).await,
            Ok(None) => write_frame(&mut client, &frame).await,
            Err(error) => {
                // Never pass on a response that should have been rewritten: the client would
                // see aborted data. Closing makes it retry.
                Counters::add(&shared.counters.rewrite_failures, 1);
                tracing::warn!(?api_key, %error, "proxy could not rewrite a response; closing the connection");
                return Err(error.to_string());
            }
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

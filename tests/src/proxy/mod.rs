//! A fault-injecting Kafka-protocol proxy in front of a real Apache Kafka cluster.
//!
//! The proxy listens on one loopback port per broker and forwards every connection to its
//! broker, byte for byte, in both directions. It exists so that tests can put faults into the
//! path between the clients and Kafka ([`Faults`]):
//!
//! - latency per request kind ([`Proxy::set_latency`]);
//! - every connection dropped at once ([`Proxy::drop_connections`]);
//! - an outage: connections refused for a while ([`Proxy::refuse_connections_for`]);
//! - late EndTxn responses ([`Proxy::delay_end_txn_response`]), and EndTxn requests held
//!   back ([`Proxy::hold_end_txn_requests`]): a transaction left open with its records, whose
//!   commit a killed client never sends.
//!
//! To stay in the path, the proxy rewrites the broker addresses Kafka advertises (Metadata,
//! FindCoordinator, DescribeCluster, and the leader endpoints of Fetch and Produce responses)
//! to its own listeners, each broker's to the listener in front of it ([`rewrite`]). It
//! changes nothing else Kafka answers; a response whose addresses it cannot rewrite is not
//! passed on (the connection is closed, the client retries), so a client never learns a
//! broker's own address from Kafka. The only other change is to ApiVersions answers, whose
//! version ranges for those few APIs are capped at what the proxy can decode.
//!
//! Faults only delay, withhold or cut what flows: a held EndTxn request looks to the broker
//! like a client that has not sent it yet, a discarded one like a client that died before
//! sending it, a dropped connection like a network failure. So a fault can make a test fail
//! falsely (e.g. a commit that times out) but cannot hide a duplicate or let a stale producer
//! commit: every answer a client gets is Kafka's own.

pub mod client;
mod connection;
mod faults;
pub mod framing;
mod rewrite;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::HarnessError;
pub use faults::Faults;
use rewrite::{AddressMap, Route};

/// Counters of what the proxy did, for tests that want to show a code path was exercised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted and forwarded.
    pub connections: u64,
    /// Client connections closed at once because of an outage.
    pub connections_refused: u64,
    /// Responses whose advertised addresses could not be rewritten because they could not be
    /// decoded or encoded (the connection is closed instead, so the client retries).
    pub rewrite_failures: u64,
    /// Advertised broker addresses that matched no upstream broker of the proxy and were
    /// passed on unchanged: a client may connect to them directly, around the faults.
    pub addresses_unmapped: u64,
    /// EndTxn requests held by [`Faults::hold_end_txn_requests`] (each counted once, when
    /// the hold starts).
    pub end_txn_held: u64,
    /// Held EndTxn requests forwarded to the broker after a release.
    pub end_txn_released: u64,
    /// Held EndTxn requests discarded, never forwarded, because their client connection
    /// closed (or was dropped by a fault) while they were held.
    pub end_txn_discarded: u64,
}

impl ProxyStats {
    /// EndTxn requests held right now.
    pub fn end_txn_holding(&self) -> u64 {
        self.end_txn_held
            .saturating_sub(self.end_txn_released + self.end_txn_discarded)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub rewrite_failures: AtomicU64,
    pub addresses_unmapped: AtomicU64,
    pub end_txn_held: AtomicU64,
    pub end_txn_released: AtomicU64,
    pub end_txn_discarded: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ProxyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&self.connections),
            connections_refused: get(&self.connections_refused),
            rewrite_failures: get(&self.rewrite_failures),
            addresses_unmapped: get(&self.addresses_unmapped),
            end_txn_held: get(&self.end_txn_held),
            end_txn_released: get(&self.end_txn_released),
            end_txn_discarded: get(&self.end_txn_discarded),
        }
    }
}

/// State shared by the accept loops and every connection of one proxy.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Each upstream broker and the listener in front of it, in the order given to
    /// [`Proxy::start_cluster`].
    pub addresses: AddressMap,
    pub faults: Faults,
    pub counters: Counters,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    accept_tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    /// Starts a proxy for the single broker at `upstream`, listening on a free 127.0.0.1
    /// port: [`Proxy::start_cluster`] with one broker.
    pub async fn start(upstream: SocketAddr) -> Result<Proxy, HarnessError> {
        Proxy::start_cluster(&[upstream]).await
    }

    /// Starts a proxy for the brokers of one cluster: one listener on a free 127.0.0.1 port
    /// per broker in `upstreams`, each forwarding to its broker. Addresses the brokers
    /// advertise are rewritten to the matching listener (by port and host, `localhost` and
    /// loopback IPs alike); one that matches no broker in `upstreams` is passed on unchanged
    /// with a warning (counted in [`ProxyStats::addresses_unmapped`]). Faults apply to every
    /// listener.
    pub async fn start_cluster(upstreams: &[SocketAddr]) -> Result<Proxy, HarnessError> {
        if upstreams.is_empty() {
            return Err(HarnessError::io(
                "starting the proxy",
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "no upstream broker given"),
            ));
        }
        // Every listener is bound before any connection is served, so the address map is
        // complete from the first response on.
        let mut listeners = Vec::with_capacity(upstreams.len());
        let mut routes = Vec::with_capacity(upstreams.len());
        for &upstream in upstreams {
            let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| {
                HarnessError::io(
                    format!("binding the proxy listener for broker {upstream} on 127.0.0.1:0"),
                    e,
                )
            })?;
            let advertised = listener
                .local_addr()
                .map_err(|e| HarnessError::io("reading the proxy listener's address", e))?;
            listeners.push(listener);
            routes.push(Route {
                upstream,
                advertised,
            });
        }
        let shared = Arc::new(Shared {
            addresses: AddressMap::new(routes),
            faults: Faults::default(),
            counters: Counters::default(),
        });
        let accept_tasks = listeners
            .into_iter()
            .enumerate()
            .map(|(route, listener)| tokio::spawn(accept_loop(listener, route, shared.clone())))
            .collect();
        for route in shared.addresses.routes() {
            tracing::info!(proxy = %route.advertised, upstream = %route.upstream, "fault proxy listening");
        }
        Ok(Proxy {
            shared,
            accept_tasks,
        })
    }

    /// The address of the first listener (in front of the first upstream broker): enough as
    /// `bootstrap.servers` for a single broker; see [`Proxy::bootstrap_servers`].
    pub fn address(&self) -> SocketAddr {
        self.shared.addresses.routes()[0].advertised
    }

    /// The address of every listener, in the order of the upstream brokers.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.shared
            .addresses
            .routes()
            .iter()
            .map(|route| route.advertised)
            .collect()
    }

    /// `bootstrap.servers` for clients: every listener, comma-separated.
    pub fn bootstrap_servers(&self) -> String {
        self.addresses()
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first broker behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.addresses.routes()[0].upstream
    }

    /// Every broker behind the proxy, in the order given to [`Proxy::start_cluster`].
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.shared
            .addresses
            .routes()
            .iter()
            .map(|route| route.upstream)
            .collect()
    }

    /// The fault settings; see [`Faults`].
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Delays forwarding requests of kind `api_key`; see [`Faults::set_latency`].
    pub fn set_latency(
        &self,
        api_key: kafka_protocol::messages::ApiKey,
        latency: std::time::Duration,
    ) {
        self.shared.faults.set_latency(api_key, latency);
    }

    /// Holds EndTxn responses; see [`Faults::delay_end_txn_response`].
    pub fn delay_end_txn_response(&self, delay: std::time::Duration) {
        self.shared.faults.delay_end_txn_response(delay);
    }

    /// Holds (or, with `false`, stops holding and releases) EndTxn requests; see
    /// [`Faults::hold_end_txn_requests`].
    pub fn hold_end_txn_requests(&self, hold: bool) {
        self.shared.faults.hold_end_txn_requests(hold);
    }

    /// Forwards the EndTxn requests held now; see [`Faults::release_end_txn_requests`].
    pub fn release_end_txn_requests(&self) {
        self.shared.faults.release_end_txn_requests();
    }

    /// Closes every connection now; see [`Faults::drop_connections`].
    pub fn drop_connections(&self) {
        self.shared.faults.drop_connections();
    }

    /// An outage; see [`Faults::refuse_connections_for`].
    pub fn refuse_connections_for(&self, duration: std::time::Duration) {
        self.shared.faults.refuse_connections_for(duration);
    }

    /// Removes every fault; see [`Faults::clear`].
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.accept_tasks {
            task.abort();
        }
        self.shared.faults.drop_connections();
    }
}

/// Accepts the connections of listener `route` and serves each against its broker.
async fn accept_loop(listener: TcpListener, route: usize, shared: Arc<Shared>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.faults.refusing() {
            Counters::add(&shared.counters.connections_refused, 1);
            drop(client);
            continue;
        }
        Counters::add(&shared.counters.connections, 1);
        // Subscribe before spawning so a drop_connections() right now also ends this one.
        let kill = shared.faults.kill_signal();
        let upstream = shared.addresses.routes()[route].upstream;
        tokio::spawn(connection::serve(
            client,
            peer,
            upstream,
            shared.clone(),
            kill,
        ));
    }
}

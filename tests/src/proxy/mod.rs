//! A read-committed Kafka-protocol proxy with fault injection, in front of the test broker.
//!
//! nisshi 0.7.0 never lists aborted transactions in Fetch responses and answers
//! ListOffsets(read_committed, latest) with 0 (DESIGN.md §4). Its other ListOffsets answers
//! for "latest" and "earliest" are wrong too: it answers from the batch object with the
//! newest (oldest) modification time, and "latest" is that batch's *base* offset + 1
//! (measured: 3509 for a 4000-record partition written in several batches; 1 for a
//! 100-record partition after DeleteRecords, whose earliest was right at 45). Its Fetch
//! responses carry the right high watermark and log start offset. This proxy sits between
//! the clients and the broker and
//!
//! - serves read_committed Fetch requests as Kafka does: it forwards them read_uncommitted,
//!   cuts each partition's records at the last stable offset (whole batches below it), and
//!   fills `aborted_transactions` and `last_stable_offset`, all from a transaction index it
//!   builds by reading each partition uncommitted and parsing the log's own control markers
//!   ([`txn_index`]), so librdkafka's own read_committed filter drops aborted records. (nisshi's
//!   own read_committed fetch withholds records Kafka returns: it keeps a committed
//!   transaction pending while an overlapping one is still open, e.g. one of a killed
//!   producer, so a reader told Kafka's LSO would wait for them forever; see
//!   `rewrite::fetch_read_uncommitted`);
//! - answers every ListOffsets "latest" (-1) and "earliest" (-2) as Kafka does: the high
//!   watermark (read_uncommitted), the last stable offset (read_committed) and the log start
//!   offset, taken from a Fetch the proxy sends itself while the client's request is in
//!   flight ([`txn_index::TxnIndex`]'s probe). Timestamp lookups (>= 0) and the other special
//!   timestamps pass through unchanged;
//! - rewrites advertised addresses (Metadata, FindCoordinator, DescribeCluster) to itself so
//!   clients never bypass it ([`rewrite`]);
//! - answers the transactional requests of a fenced (zombie) producer with the fenced error
//!   code Kafka gives, where nisshi closes the connection instead ([`fencing`]);
//! - keeps an idempotent producer's Produce requests on different connections apart (a
//!   retry waits until the broker answered the first copy), because nisshi writes two copies
//!   of one batch that it processes at once ([`produce_gate`]);
//! - injects faults on command ([`Faults`]): latency, dropped connections, outages, late
//!   EndTxn responses, and EndTxn requests held back (a transaction left open with its
//!   records, whose commit a killed client never sends).
//!
//! It never invents records: it adds abort information derived from markers in the log
//! itself, withholds the records at and above the last stable offset (which Kafka withholds
//! too), and withholds (never invents) requests of producers the broker already fenced. The
//! last stable offset depends only on the log's own records and markers (the first offset of
//! the earliest transaction without a marker), so read_committed visibility is Kafka's even
//! where nisshi's own differs, and Fetch and ListOffsets answers use the same LSO (a reader
//! told an end gets every record up to it). Cutting above the true LSO could only expose
//! records of a transaction that is still open: a test would see a record that was never
//! committed (an unexpected record or a duplicate), a false failure that cannot hide a real
//! duplicate. A held EndTxn request looks to the broker like a client that has not sent it yet,
//! and a discarded one like a client that died before sending it. So it can cause false
//! failures (e.g. a connection dropped by a fault) but cannot hide a duplicate or let a stale
//! producer commit.
//!
//! ListOffsets answers are replaced, never invented: each is an offset the broker itself
//! reported (in a Fetch response) at an instant after it received the client's request and
//! before the client gets the answer, so it is an answer Kafka could have given to that
//! request even with writes, commits and deletions running concurrently (these offsets only
//! grow). Readers of the framework rely on them: a "latest" too low would end a snapshot
//! tail read early (stale state, i.e. possible duplicates), an "earliest" too low would hide
//! a retention gap. When the proxy cannot derive an answer it closes the connection instead
//! of passing the broker's, so the client retries: a delay or a false failure, never a wrong
//! offset.

pub mod client;
mod connection;
mod faults;
mod fencing;
pub mod framing;
mod produce_gate;
mod rewrite;
pub mod txn_index;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::HarnessError;
pub use faults::Faults;
use fencing::ProducerEpochs;
use produce_gate::ProduceGate;
use txn_index::TxnIndex;

/// Counters of what the proxy did, for tests that want to show a code path was exercised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted and forwarded.
    pub connections: u64,
    /// Client connections closed at once because of an outage.
    pub connections_refused: u64,
    /// read_committed Fetch responses the proxy rewrote.
    pub fetches_rewritten: u64,
    /// Aborted-transaction entries added to Fetch responses, summed over partitions.
    pub aborted_entries_added: u64,
    /// Fetch partitions whose `last_stable_offset` the proxy changed.
    pub lso_adjusted: u64,
    /// read_committed Fetch partitions cut to the client's `partition_max_bytes` (at batch
    /// boundaries; nisshi ignores the limit, Kafka honours it).
    pub fetch_partitions_truncated: u64,
    /// read_committed Fetch partitions whose records (fetched upstream read_uncommitted)
    /// the proxy cut at its last stable offset, leaving out batches of open transactions.
    pub fetch_partitions_cut_at_lso: u64,
    /// ListOffsets(latest/earliest) partition answers the proxy derived itself (high
    /// watermark, last stable offset or log start), whether or not the broker's differed.
    pub list_offsets_rewritten: u64,
    /// Of those, answers where the broker's offset was wrong and the proxy changed it.
    pub list_offsets_corrected: u64,
    /// Uncommitted Fetch requests the proxy itself sent to index partitions.
    pub index_fetches: u64,
    /// Responses that should have been rewritten but could not be decoded or indexed (the
    /// connection is closed instead, so the client retries).
    pub rewrite_failures: u64,
    /// Transactional requests of fenced producers the proxy answered itself with
    /// `PRODUCER_FENCED` / `INVALID_PRODUCER_EPOCH` instead of forwarding them.
    pub fences_synthesized: u64,
    /// EndTxn requests held by [`Faults::hold_end_txn_requests`] (each counted once, when
    /// the hold starts).
    pub end_txn_held: u64,
    /// Held EndTxn requests forwarded to the broker after a release.
    pub end_txn_released: u64,
    /// Held EndTxn requests discarded, never forwarded, because their client connection
    /// closed (or was dropped by a fault) while they were held.
    pub end_txn_discarded: u64,
    /// Produce requests of an idempotent producer held back until the broker had answered
    /// that producer's requests on another connection (see [`produce_gate`]).
    pub produce_requests_delayed: u64,
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
    pub fetches_rewritten: AtomicU64,
    pub aborted_entries_added: AtomicU64,
    pub lso_adjusted: AtomicU64,
    pub fetch_partitions_truncated: AtomicU64,
    pub fetch_partitions_cut_at_lso: AtomicU64,
    pub list_offsets_rewritten: AtomicU64,
    pub list_offsets_corrected: AtomicU64,
    pub index_fetches: AtomicU64,
    pub rewrite_failures: AtomicU64,
    pub fences_synthesized: AtomicU64,
    pub end_txn_held: AtomicU64,
    pub end_txn_released: AtomicU64,
    pub end_txn_discarded: AtomicU64,
    pub produce_requests_delayed: AtomicU64,
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
            fetches_rewritten: get(&self.fetches_rewritten),
            aborted_entries_added: get(&self.aborted_entries_added),
            lso_adjusted: get(&self.lso_adjusted),
            fetch_partitions_truncated: get(&self.fetch_partitions_truncated),
            fetch_partitions_cut_at_lso: get(&self.fetch_partitions_cut_at_lso),
            list_offsets_rewritten: get(&self.list_offsets_rewritten),
            list_offsets_corrected: get(&self.list_offsets_corrected),
            index_fetches: get(&self.index_fetches),
            rewrite_failures: get(&self.rewrite_failures),
            fences_synthesized: get(&self.fences_synthesized),
            end_txn_held: get(&self.end_txn_held),
            end_txn_released: get(&self.end_txn_released),
            end_txn_discarded: get(&self.end_txn_discarded),
            produce_requests_delayed: get(&self.produce_requests_delayed),
        }
    }
}

/// State shared by the accept loop and every connection of one proxy.
#[derive(Debug)]
pub(crate) struct Shared {
    pub upstream: SocketAddr,
    pub advertised: SocketAddr,
    pub faults: Faults,
    pub counters: Counters,
    pub index: TxnIndex,
    pub producer_epochs: ProducerEpochs,
    pub produce_gate: Arc<ProduceGate>,
}

/// A running proxy. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy for the broker at `upstream`, listening on a free 127.0.0.1 port.
    pub async fn start(upstream: SocketAddr) -> Result<Proxy, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| HarnessError::io("binding the proxy listener on 127.0.0.1:0", e))?;
        let advertised = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the proxy listener's address", e))?;
        let shared = Arc::new(Shared {
            upstream,
            advertised,
            faults: Faults::default(),
            counters: Counters::default(),
            index: TxnIndex::new(upstream),
            producer_epochs: ProducerEpochs::default(),
            produce_gate: Arc::default(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(proxy = %advertised, %upstream, "read-committed proxy started");
        Ok(Proxy {
            shared,
            accept_task,
        })
    }

    /// The address clients connect to (and that the proxy advertises as the broker's).
    pub fn address(&self) -> SocketAddr {
        self.shared.advertised
    }

    /// The broker behind the proxy.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
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

    /// Forgets the transaction index and the producer epochs learnt for fencing, e.g. after a
    /// broker restart lost all data. (A partition whose high watermark drops below what was
    /// indexed is also re-indexed automatically.)
    pub fn reset_index(&self) {
        self.shared.index.reset();
        self.shared.producer_epochs.reset();
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.counters.snapshot()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.shared.faults.drop_connections();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
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
        let connection = shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        // Subscribe before spawning so a drop_connections() right now also ends this one.
        let kill = shared.faults.kill_signal();
        tokio::spawn(connection::serve(
            client,
            peer,
            shared.clone(),
            kill,
            connection,
        ));
    }
}

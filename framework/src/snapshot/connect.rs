//! Bringing a new Kafka client's first broker connection up before it is used.
//!
//! A new librdkafka (2.12) client connects to a bootstrap address, learns the cluster's
//! brokers from the first metadata answer, drops the bootstrap connection and only then
//! connects to a named broker, at least `reconnect.backoff.ms / 2` (50 ms) later. Calls made
//! in that gap find no connected broker, and several wait for a fixed timer instead of for
//! the connection: `init_transactions` looks for the transaction coordinator again after
//! 500 ms (`rd_kafka_txn_coord_query`), and a watermark query or a first fetch lost about as
//! much. Measured in the benchmark: about a third of the partitions of a starting app went
//! live 0.5–1 s after the others. Waiting for a named broker first costs one round trip
//! after that gap.

use std::time::{Duration, Instant};

use rdkafka::client::Client;
use rdkafka::ClientContext;

/// Longest a new client waits for a connection to a named broker.
const CONNECTION_WAIT: Duration = Duration::from_secs(2);

/// Waits (bounded) until `client` is connected to a broker the cluster named, not a bootstrap
/// address, by asking for `topic`'s metadata until a named broker answers
/// (`orig_broker_id` ≥ 0). A failure is only logged: the client's own calls then wait, retry
/// and report as they would have.
pub(crate) fn connect_to_a_named_broker<C: ClientContext>(client: &Client<C>, topic: &str) {
    let deadline = Instant::now() + CONNECTION_WAIT;
    // A bootstrap address answers first, then a named broker; a third for one that went away.
    for _ in 0..3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.fetch_metadata(Some(topic), left) {
            Ok(metadata) if metadata.orig_broker_id() >= 0 => return,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(topic, %error, "no connection to a named broker yet");
                return;
            }
        }
    }
}

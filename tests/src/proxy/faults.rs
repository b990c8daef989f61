//! Faults the proxy injects on command from a test.
//!
//! All settings are shared by every connection of one proxy and take effect for requests
//! and connections that arrive after the call (except [`Faults::drop_connections`] and
//! [`Faults::refuse_connections_for`], which also close connections that are open now, and
//! [`Faults::release_end_txn_requests`], which acts on requests held now).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_protocol::messages::ApiKey;
use tokio::sync::watch;

/// The fault settings of one proxy. Obtain it with [`Proxy::faults`](super::Proxy::faults).
#[derive(Debug)]
pub struct Faults {
    settings: Mutex<Settings>,
    /// Bumped to make every open connection close itself.
    kill_generation: watch::Sender<u64>,
    /// Whether EndTxn requests are held; connections wait on it (see
    /// [`Faults::hold_end_txn_requests`]).
    end_txn_hold: watch::Sender<EndTxnHold>,
}

/// The EndTxn hold as connections see it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndTxnHold {
    /// EndTxn requests arriving now are held.
    pub holding: bool,
    /// Bumped by every release: a request held under an older value may go.
    pub releases: u64,
}

impl EndTxnHold {
    /// True when a request held while the hold read `held_under` may be forwarded now.
    pub fn releases_request_held_under(&self, held_under: EndTxnHold) -> bool {
        !self.holding || self.releases != held_under.releases
    }
}

#[derive(Debug, Default, Clone)]
struct Settings {
    latency: HashMap<i16, Duration>,
    /// Latency for one client id only, ahead of `latency`.
    client_latency: HashMap<(i16, String), Duration>,
    end_txn_response_delay: Option<Duration>,
    refuse_until: Option<Instant>,
    /// An outage to start when a request of this kind arrives.
    outage_on: Option<(i16, Duration)>,
    /// The client whose next ConsumerGroupHeartbeat response with an assignment is lost.
    assignment_loss: Option<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            settings: Mutex::new(Settings::default()),
            kill_generation: watch::Sender::new(0),
            end_txn_hold: watch::Sender::new(EndTxnHold::default()),
        }
    }
}

impl Faults {
    /// Delays forwarding every request of kind `api_key` to the broker by `latency` (and with
    /// it every later request on the same connection, as Kafka connections are ordered).
    /// `Duration::ZERO` removes the latency.
    pub fn set_latency(&self, api_key: ApiKey, latency: Duration) {
        let mut settings = self.lock();
        if latency.is_zero() {
            settings.latency.remove(&(api_key as i16));
        } else {
            settings.latency.insert(api_key as i16, latency);
        }
    }

    /// Like [`Faults::set_latency`], for the requests of the client whose `client.id` is
    /// `client_id` only.
    pub fn set_client_latency(&self, api_key: ApiKey, client_id: &str, latency: Duration) {
        let key = (api_key as i16, client_id.to_owned());
        let mut settings = self.lock();
        if latency.is_zero() {
            settings.client_latency.remove(&key);
        } else {
            settings.client_latency.insert(key, latency);
        }
    }

    /// Loses the next ConsumerGroupHeartbeat response that carries an assignment to the client
    /// whose `client.id` is `client_id`: the group coordinator has applied the heartbeat (and
    /// moved the member towards its new assignment), the client only sees its request time
    /// out, as when a response is lost with a failing coordinator.
    pub fn lose_next_assignment(&self, client_id: &str) {
        self.lock().assignment_loss = Some(client_id.to_owned());
    }

    /// True while the next assignment to `client_id` is to be lost.
    pub(crate) fn assignment_loss_armed_for(&self, client_id: Option<&str>) -> bool {
        client_id.is_some() && self.lock().assignment_loss.as_deref() == client_id
    }

    /// Disarms the assignment loss; true if it was still armed (this response is the one).
    pub(crate) fn take_assignment_loss(&self) -> bool {
        self.lock().assignment_loss.take().is_some()
    }

    /// Holds every EndTxn response (commit or abort) for `delay` before passing it on: the
    /// broker has already completed the transaction, the client only learns it late (or
    /// times out). `Duration::ZERO` removes the delay.
    pub fn delay_end_txn_response(&self, delay: Duration) {
        self.lock().end_txn_response_delay = (!delay.is_zero()).then_some(delay);
    }

    /// While `hold` is true, EndTxn requests (commit or abort) from clients are not forwarded
    /// to the broker but held by the proxy: the client's transaction stays open on the broker
    /// with everything it produced, and the client waits for the answer. Each connection
    /// stops forwarding at its held request, so later requests of that client stay behind it
    /// and responses keep their order. A held request is forwarded by
    /// [`Faults::release_end_txn_requests`] (or by `hold_end_txn_requests(false)`, which also
    /// releases); if its client connection closes first (the client was killed, or
    /// [`Faults::drop_connections`]), it is discarded and never reaches the broker.
    ///
    /// Counted in [`ProxyStats`](super::ProxyStats) as `end_txn_held`, `end_txn_released` and
    /// `end_txn_discarded`.
    pub fn hold_end_txn_requests(&self, hold: bool) {
        self.end_txn_hold.send_modify(|state| {
            if !hold && state.holding {
                state.releases += 1;
            }
            state.holding = hold;
        });
    }

    /// Forwards every EndTxn request held now (in each connection's order). Holding goes on
    /// for requests that arrive later if [`Faults::hold_end_txn_requests`] is still on.
    pub fn release_end_txn_requests(&self) {
        self.end_txn_hold.send_modify(|state| state.releases += 1);
    }

    /// Closes every client connection and its upstream connection now. Clients reconnect.
    pub fn drop_connections(&self) {
        self.kill_generation.send_modify(|g| *g += 1);
    }

    /// An outage: closes every connection now, and for `duration` accepts new connections
    /// only to close them at once.
    pub fn refuse_connections_for(&self, duration: Duration) {
        self.lock().refuse_until = Some(Instant::now() + duration);
        self.drop_connections();
    }

    /// Arms an outage ([`Faults::refuse_connections_for`] `duration`) that starts when the
    /// next request of kind `api_key` arrives from a client; that request is lost with its
    /// connection (the broker never sees it). A fault that lands between two steps of a
    /// client's protocol, e.g. after AddOffsetsToTxn, at the TxnOffsetCommit that follows it.
    /// Fires once.
    pub fn outage_on_next_request(&self, api_key: ApiKey, duration: Duration) {
        self.lock().outage_on = Some((api_key as i16, duration));
    }

    /// Called for every request read from a client: starts the armed outage if it waits for
    /// this kind; true if it did (the caller then drops the request).
    pub(crate) fn outage_on_request(&self, api_key: i16) -> bool {
        let armed = {
            let mut settings = self.lock();
            match settings.outage_on {
                Some((key, duration)) if key == api_key => {
                    settings.outage_on = None;
                    Some(duration)
                }
                _ => None,
            }
        };
        match armed {
            Some(duration) => {
                tracing::info!(
                    api_key,
                    ?duration,
                    "proxy starts the outage armed for this request"
                );
                self.refuse_connections_for(duration);
                true
            }
            None => false,
        }
    }

    /// Removes every fault (latency, EndTxn delay, an ongoing or armed outage, the EndTxn
    /// hold, which releases what it holds).
    pub fn clear(&self) {
        *self.lock() = Settings::default();
        self.hold_end_txn_requests(false);
    }

    /// A receiver of the EndTxn hold state.
    pub(crate) fn end_txn_hold(&self) -> watch::Receiver<EndTxnHold> {
        self.end_txn_hold.subscribe()
    }

    /// The latency to add before forwarding a request with this api key from this client.
    pub(crate) fn latency(&self, api_key: i16, client_id: Option<&str>) -> Option<Duration> {
        let settings = self.lock();
        client_id
            .and_then(|id| settings.client_latency.get(&(api_key, id.to_owned())))
            .or_else(|| settings.latency.get(&api_key))
            .copied()
    }

    /// The delay to add before passing on an EndTxn response.
    pub(crate) fn end_txn_response_delay(&self) -> Option<Duration> {
        self.lock().end_txn_response_delay
    }

    /// True while an outage set by [`Faults::refuse_connections_for`] lasts.
    pub fn refusing(&self) -> bool {
        self.lock()
            .refuse_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// A receiver that changes whenever connections must be dropped.
    pub(crate) fn kill_signal(&self) -> watch::Receiver<u64> {
        self.kill_generation.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Settings> {
        // The settings stay consistent even if a holder panicked: every update is one store.
        self.settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_per_api_key_and_zero_clears() {
        let faults = Faults::default();
        faults.set_latency(ApiKey::Fetch, Duration::from_millis(5));
        assert_eq!(
            faults.latency(ApiKey::Fetch as i16, None),
            Some(Duration::from_millis(5))
        );
        assert_eq!(faults.latency(ApiKey::Produce as i16, None), None);
        faults.set_latency(ApiKey::Fetch, Duration::ZERO);
        assert_eq!(faults.latency(ApiKey::Fetch as i16, None), None);
    }

    #[test]
    fn an_assignment_loss_is_for_one_client_and_once() {
        let faults = Faults::default();
        assert!(!faults.assignment_loss_armed_for(Some("a")));
        faults.lose_next_assignment("a");
        assert!(faults.assignment_loss_armed_for(Some("a")));
        assert!(!faults.assignment_loss_armed_for(Some("b")));
        assert!(!faults.assignment_loss_armed_for(None));
        assert!(faults.take_assignment_loss());
        assert!(!faults.take_assignment_loss());
        assert!(!faults.assignment_loss_armed_for(Some("a")));
    }

    #[test]
    fn client_latency_applies_to_that_client_only() {
        let faults = Faults::default();
        faults.set_client_latency(ApiKey::ListOffsets, "group", Duration::from_secs(2));
        let list_offsets = ApiKey::ListOffsets as i16;
        assert_eq!(
            faults.latency(list_offsets, Some("group")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(faults.latency(list_offsets, Some("reader")), None);
        assert_eq!(faults.latency(list_offsets, None), None);
        faults.set_client_latency(ApiKey::ListOffsets, "group", Duration::ZERO);
        assert_eq!(faults.latency(list_offsets, Some("group")), None);
    }

    #[test]
    fn an_armed_outage_starts_once_at_its_request_kind() {
        let faults = Faults::default();
        faults.outage_on_next_request(ApiKey::TxnOffsetCommit, Duration::from_secs(60));
        assert!(!faults.outage_on_request(ApiKey::Produce as i16));
        assert!(!faults.refusing());
        assert!(faults.outage_on_request(ApiKey::TxnOffsetCommit as i16));
        assert!(faults.refusing());
        assert!(!faults.outage_on_request(ApiKey::TxnOffsetCommit as i16));
        faults.clear();
        assert!(!faults.refusing());
    }

    #[test]
    fn outage_refuses_then_clear_ends_it() {
        let faults = Faults::default();
        let mut kill = faults.kill_signal();
        faults.refuse_connections_for(Duration::from_secs(60));
        assert!(faults.refusing());
        assert!(kill.has_changed().unwrap());
        kill.mark_unchanged();
        faults.clear();
        assert!(!faults.refusing());
    }

    #[test]
    fn end_txn_hold_releases_what_it_holds() {
        let faults = Faults::default();
        let mut hold = faults.end_txn_hold();
        assert!(!hold.borrow_and_update().holding);

        faults.hold_end_txn_requests(true);
        let held_under = *hold.borrow_and_update();
        assert!(held_under.holding);
        assert!(!held_under.releases_request_held_under(held_under));

        // An explicit release lets the held request go, and holding goes on for later ones.
        faults.release_end_txn_requests();
        let now = *hold.borrow_and_update();
        assert!(now.holding && now.releases_request_held_under(held_under));
        assert!(!now.releases_request_held_under(now));

        // Turning the hold off releases too; turning it off twice releases nothing new.
        faults.hold_end_txn_requests(false);
        let off = *hold.borrow_and_update();
        assert!(off.releases_request_held_under(now));
        faults.hold_end_txn_requests(false);
        assert_eq!(*hold.borrow_and_update(), off);

        // clear() ends a hold as well.
        faults.hold_end_txn_requests(true);
        let held_under = *hold.borrow_and_update();
        faults.clear();
        assert!(hold
            .borrow_and_update()
            .releases_request_held_under(held_under));
    }
}

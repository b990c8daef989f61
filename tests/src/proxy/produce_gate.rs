//! Keeps the Produce requests of one idempotent producer on different connections apart,
//! because nisshi 0.7.0 would otherwise write a retried batch twice.
//!
//! An idempotent (and every transactional) producer numbers its records per partition; the
//! broker writes a batch only if its base sequence is the next one expected, and answers a
//! batch it already wrote with `DUPLICATE_SEQUENCE_NUMBER`, which clients take as success.
//! Kafka checks the sequence and appends under one partition lock. nisshi checks it, writes the
//! batch, and only then advances the sequence, in separate steps (its own source calls this a
//! "known residual"). Two copies of one batch in the broker at once therefore both pass the
//! check and both land: measured against bare nisshi, 45 extra records for 600 sent as 200
//! batches each sent on two connections at once (test
//! `concurrent_copies_of_an_idempotent_batch_are_written_once`).
//!
//! That is exactly what a client's retry looks like after a dropped connection: librdkafka
//! resends its in-flight batches on a new connection while the broker may still be working
//! through the old connection's requests (it reads every request already in its socket buffer
//! before it notices the close). The chaos suite hit it under the proxy's connection drops:
//! the same debit twice in one committed transaction.
//!
//! The proxy closes the gap the way Kafka's lock would: a Produce request that carries
//! batches of producer id P is forwarded only while no *other* connection has a Produce
//! request of P unanswered. Requests of one connection are never held back by each other
//! (the broker answers them in order anyway). And a connection that ends, by a fault or its
//! client, keeps its upstream side open until the broker has answered every Produce request
//! it forwarded (see `connection::serve`), so its copies are finished before a retry is let
//! through.
//!
//! # Why this is safe
//!
//! It only delays requests, never drops, reorders within a connection or invents one. A
//! delayed retry reaches the broker after the first copy finished, which is what Kafka's
//! lock gives. The wait is bounded by how long the other connection's requests take to be
//! answered (and a closing connection stops waiting after `DRAIN_TIMEOUT` in `connection`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::framing::request_key_version_correlation;
use super::rewrite::decode_request;
use super::txn_index::parse_batches;
use kafka_protocol::messages::{ApiKey, ProduceRequest};

/// Which connection has Produce requests of a producer id in flight, and how many.
#[derive(Debug)]
struct Owner {
    connection: u64,
    in_flight: usize,
}

/// The proxy-wide table of producer ids with Produce requests in flight.
#[derive(Debug, Default)]
pub(crate) struct ProduceGate {
    owners: Mutex<HashMap<i64, Owner>>,
    released: Notify,
}

impl ProduceGate {
    /// Waits until no connection other than `connection` has a Produce request of any of
    /// `producer_ids` in flight, then counts one more for `connection`. Returns whether it
    /// had to wait.
    pub async fn enter(&self, connection: u64, producer_ids: &BTreeSet<i64>) -> bool {
        let mut waited = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the check and the await
            // still wakes this waiter.
            released.as_mut().enable();
            {
                let mut owners = lock(&self.owners);
                let free = producer_ids.iter().all(|id| {
                    owners
                        .get(id)
                        .is_none_or(|owner| owner.connection == connection)
                });
                if free {
                    for id in producer_ids {
                        owners
                            .entry(*id)
                            .or_insert(Owner {
                                connection,
                                in_flight: 0,
                            })
                            .in_flight += 1;
                    }
                    return waited;
                }
            }
            waited = true;
            released.await;
        }
    }

    /// One Produce request of `producer_ids` from `connection` was answered (or will never
    /// be).
    pub fn leave(&self, connection: u64, producer_ids: &BTreeSet<i64>) {
        let mut freed = false;
        {
            let mut owners = lock(&self.owners);
            for id in producer_ids {
                let Some(owner) = owners.get_mut(id) else {
                    continue;
                };
                if owner.connection != connection {
                    continue;
                }
                owner.in_flight = owner.in_flight.saturating_sub(1);
                if owner.in_flight == 0 {
                    owners.remove(id);
                    freed = true;
                }
            }
        }
        if freed {
            self.released.notify_waiters();
        }
    }
}

/// The producer ids whose batches a Produce request carries, if it is one that the broker
/// answers (acks != 0) and carries batches of idempotent producers; `None` for every other
/// request.
pub(crate) fn idempotent_producer_ids(frame: &[u8]) -> Option<BTreeSet<i64>> {
    let (key, version, _) = request_key_version_correlation(frame)?;
    if key != ApiKey::Produce as i16 {
        return None;
    }
    let request: ProduceRequest = decode_request(frame, version)?;
    if request.acks == 0 {
        return None;
    }
    let ids: BTreeSet<i64> = request
        .topic_data
        .iter()
        .flat_map(|topic| &topic.partition_data)
        .filter_map(|partition| partition.records.as_ref())
        .flat_map(|records| parse_batches(records))
        .map(|batch| batch.producer_id)
        .filter(|id| *id >= 0)
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// A connection's Produce requests in the gate, by correlation id. Dropping it leaves the
/// gate for every request still counted, so a connection that ends can never block others
/// for longer than it lives.
#[derive(Debug)]
pub(crate) struct GateTickets {
    gate: Arc<ProduceGate>,
    connection: u64,
    by_correlation: Mutex<HashMap<i32, BTreeSet<i64>>>,
}

impl GateTickets {
    pub fn new(gate: Arc<ProduceGate>, connection: u64) -> Self {
        GateTickets {
            gate,
            connection,
            by_correlation: Mutex::default(),
        }
    }

    /// Enters the gate for the request `correlation_id` carrying `producer_ids`; see
    /// [`ProduceGate::enter`].
    pub async fn enter(&self, correlation_id: i32, producer_ids: BTreeSet<i64>) -> bool {
        let waited = self.gate.enter(self.connection, &producer_ids).await;
        if let Some(replaced) = lock(&self.by_correlation).insert(correlation_id, producer_ids) {
            // A client reusing a correlation id with one still in flight: the older entry's
            // answer can no longer be told apart, so it is counted as answered now.
            self.gate.leave(self.connection, &replaced);
        }
        waited
    }

    /// The broker answered the request `correlation_id` (any request; only gated ones
    /// matter).
    pub fn answered(&self, correlation_id: i32) {
        let ids = lock(&self.by_correlation).remove(&correlation_id);
        if let Some(ids) = ids {
            self.gate.leave(self.connection, &ids);
        }
    }

    /// Gated requests not answered yet.
    pub fn outstanding(&self) -> usize {
        lock(&self.by_correlation).len()
    }
}

impl Drop for GateTickets {
    fn drop(&mut self) {
        let remaining: Vec<BTreeSet<i64>> = lock(&self.by_correlation)
            .drain()
            .map(|(_, ids)| ids)
            .collect();
        for ids in remaining {
            self.gate.leave(self.connection, &ids);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ids(ids: &[i64]) -> BTreeSet<i64> {
        ids.iter().copied().collect()
    }

    #[tokio::test]
    async fn another_connection_waits_until_the_first_is_answered() {
        let gate = Arc::new(ProduceGate::default());
        let first = GateTickets::new(gate.clone(), 1);
        let second = GateTickets::new(gate.clone(), 2);
        assert!(!first.enter(10, ids(&[7])).await);
        // The same connection pipelines freely.
        assert!(!first.enter(11, ids(&[7])).await);
        let mut waiting = Box::pin(second.enter(1, ids(&[7])));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "entered while another connection had the producer in flight"
        );
        first.answered(10);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "entered with one request of the other connection still in flight"
        );
        first.answered(11);
        assert!(waiting.await, "it waited");
        assert_eq!(second.outstanding(), 1);
    }

    #[tokio::test]
    async fn other_producers_pass_and_a_dropped_connection_releases() {
        let gate = Arc::new(ProduceGate::default());
        let first = GateTickets::new(gate.clone(), 1);
        let second = GateTickets::new(gate.clone(), 2);
        first.enter(1, ids(&[7])).await;
        assert!(
            !second.enter(1, ids(&[8])).await,
            "a different producer waited"
        );
        let mut waiting = Box::pin(second.enter(2, ids(&[7, 8])));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err(),
            "entered while another connection had the producer in flight"
        );
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .expect("a dropped connection's tickets released the producer"),
            "it waited"
        );
    }

    #[test]
    fn producer_ids_only_from_produce_requests_with_acks() {
        use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
        use kafka_protocol::messages::{RequestHeader, TopicName};
        use kafka_protocol::protocol::{Encodable, StrBytes};
        use kafka_protocol::records::{
            Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
        };
        let frame = |acks: i16, producer_id: i64| {
            let record = Record {
                transactional: false,
                control: false,
                delete_horizon: false,
                partition_leader_epoch: -1,
                producer_id,
                producer_epoch: 0,
                timestamp_type: TimestampType::Creation,
                offset: 0,
                sequence: if producer_id >= 0 { 0 } else { -1 },
                timestamp: 0,
                key: None,
                value: Some(bytes::Bytes::from_static(b"v")),
                headers: Default::default(),
            };
            let mut batch = bytes::BytesMut::new();
            RecordBatchEncoder::encode(
                &mut batch,
                &[record],
                &RecordEncodeOptions {
                    version: 2,
                    compression: Compression::None,
                },
            )
            .expect("encode");
            let request = ProduceRequest::default()
                .with_acks(acks)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("t")))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(batch.freeze()))])]);
            let version = 7;
            let mut buf = bytes::BytesMut::new();
            RequestHeader::default()
                .with_request_api_key(ApiKey::Produce as i16)
                .with_request_api_version(version)
                .with_correlation_id(3)
                .encode(&mut buf, ApiKey::Produce.request_header_version(version))
                .expect("header");
            request.encode(&mut buf, version).expect("body");
            buf
        };
        assert_eq!(idempotent_producer_ids(&frame(-1, 42)), Some(ids(&[42])));
        assert_eq!(
            idempotent_producer_ids(&frame(0, 42)),
            None,
            "acks=0: no answer"
        );
        assert_eq!(
            idempotent_producer_ids(&frame(1, -1)),
            None,
            "not idempotent"
        );
    }
}

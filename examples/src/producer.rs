//! Producing the generated payment commands to Kafka: the producer and the records the demo
//! and the chaos suite's workload both use (each keeps its own pacing loop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::generator::InputCommand;
use crate::payments::PAYMENT_ID_HEADER;

/// Counts failed deliveries: a command that never arrived would look like a lost record, so
/// a producer of the input must fail instead.
#[derive(Debug, Default)]
pub struct DeliveryCounter {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl DeliveryCounter {
    /// Deliveries that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The first delivery error, empty if there was none.
    pub fn first_error(&self) -> String {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_or_insert_with(|| error.to_string());
        }
    }
}

/// An idempotent producer for the commands topic (no duplicates from its own retries),
/// counting failed deliveries.
pub fn command_producer(bootstrap: &str) -> KafkaResult<BaseProducer<DeliveryCounter>> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(DeliveryCounter::default())
}

/// The record of `command` on `topic`: keyed by its owner account, with its id in the
/// [`PAYMENT_ID_HEADER`] header (how even an undecodable command is identified downstream).
pub fn command_record<'a>(topic: &'a str, command: &'a InputCommand) -> BaseRecord<'a, str, [u8]> {
    let headers = OwnedHeaders::new().insert(Header {
        key: PAYMENT_ID_HEADER,
        value: Some(command.id.as_str()),
    });
    BaseRecord::to(topic)
        .key(command.key.as_str())
        .payload(command.value.as_slice())
        .headers(headers)
}

/// Sends `record`, serving delivery reports while librdkafka's queue is full (the producers
/// here outrun the broker on purpose); any other refusal is returned.
pub fn send_waiting<C, K, V>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, K, V, C::DeliveryOpaque>,
) -> KafkaResult<()>
where
    C: ProducerContext,
    K: ToBytes + ?Sized,
    V: ToBytes + ?Sized,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error),
        }
    }
}

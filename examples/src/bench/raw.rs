//! The ceiling: librdkafka consume → produce with no transactions and no state, tuned for
//! throughput the way a hand-written pipe would be.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::producer::{send_waiting, DeliveryCounter};

/// Copies `records` records from `input` to `output` (same key and value), then commits the
/// group's offsets; returns the time from start (group join included, as for the other
/// engines) until the offsets are committed. Blocking: run it off the reactor.
pub fn run_raw_pipe(
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
    records: u64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // As every EOS engine reads. On Kafka this costs nothing for an input written without
        // transactions.
        .set("isolation.level", "read_committed")
        // As exactly's consumer: librdkafka's 1 s default idles a partition whenever the one
        // consumer queue holds 100 000 prefetched records, which a fast pipe reaches.
        .set("fetch.queue.backoff.ms", "20")
        .create()
        .context("creating the raw pipe's consumer")?;
    let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "500000")
        .create_with_context(DeliveryCounter::default())
        .context("creating the raw pipe's producer")?;
    consumer
        .subscribe(&[input])
        .with_context(|| format!("subscribing the raw pipe to {input}"))?;
    let mut copied = 0;
    while copied < records {
        if started.elapsed() > limit {
            bail!("the raw pipe copied {copied} of {records} records within {limit:?}");
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            producer.poll(Duration::ZERO);
            continue;
        };
        let message = message.with_context(|| format!("the raw pipe reading {input}"))?;
        send_waiting(&producer, copy_to(output, &message))
            .with_context(|| format!("the raw pipe producing to {output}"))?;
        copied += 1;
    }
    producer
        .flush(Duration::from_secs(120))
        .with_context(|| format!("flushing the raw pipe's output to {output}"))?;
    if producer.context().failed() > 0 {
        bail!(
            "the raw pipe lost {} records; first error: {}",
            producer.context().failed(),
            producer.context().first_error()
        );
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .context("committing the raw pipe's offsets")?;
    Ok(started.elapsed())
}

/// A record for `topic` with `message`'s key and value: what both pipes write.
pub fn copy_to<'a>(topic: &'a str, message: &'a impl Message) -> BaseRecord<'a, [u8], [u8]> {
    let mut record = BaseRecord::<[u8], [u8]>::to(topic);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(value) = message.payload() {
        record = record.payload(value);
    }
    record
}

//! The floor of exactly-once on this design, without the framework: librdkafka consume →
//! produce in Kafka transactions, one transactional producer per input partition (as exactly
//! has), each fed by its partition's own consumer queue on a thread of its own, committing
//! its output and its input offsets every commit interval. No state, no decoding, no
//! snapshots, no checks: what is left between it and the raw pipe is the price of the
//! transactions themselves; what is left between exactly and it is the framework's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use rdkafka::client::Client;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata, DefaultConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::raw::copy_to;
use crate::producer::{send_waiting, DeliveryCounter};

/// How long a transactional call may take before the pipe gives up.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// As exactly's clients: librdkafka lets a new client connect to the broker the cluster named
/// only half of it after dropping its bootstrap connection.
const RECONNECT_BACKOFF_MS: &str = "20";

/// Waits (bounded) until `client` talks to a broker the cluster named, as exactly's new
/// producers do: `init_transactions` in the gap after the bootstrap connection is dropped
/// waits for a fixed 500 ms timer instead (measured here: three of eight producers).
fn connect_to_a_named_broker<C: ClientContext>(client: &Client<C>, topic: &str) {
    // A bootstrap address answers first, then a named broker; a third for one that went away.
    for _ in 0..3 {
        match client.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(metadata) if metadata.orig_broker_id() >= 0 => return,
            Ok(_) => {}
            // init_transactions reports it, if it lasts.
            Err(_) => return,
        }
    }
}

/// One transactional pipe run over every partition of `input` into `output`, as consumer
/// group `group`; returns the time from start until every partition's transaction
/// holding its last offset committed. Blocking: run it off the reactor.
pub fn run_txn_pipe(
    bootstrap: &str,
    input: &str,
    output: &str,
    group: &str,
    commit_interval: Duration,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let consumer: Arc<BaseConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.queue.backoff.ms", "20")
            .set("reconnect.backoff.ms", RECONNECT_BACKOFF_MS)
            .create()
            .context("creating the transactional pipe's consumer")?,
    );
    let metadata = consumer
        .fetch_metadata(Some(input), CALL_TIMEOUT)
        .with_context(|| format!("reading the metadata of {input}"))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        bail!("{input} has no partitions");
    }
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(input, partition, CALL_TIMEOUT)
            .with_context(|| format!("reading the end of {input}/{partition}"))?;
        ends.push(high);
        assignment.add_partition_offset(input, partition, Offset::Beginning)?;
    }
    // Split before assigning, so that no record reaches the consumer's main queue.
    let mut queues = Vec::new();
    for partition in 0..partitions {
        queues.push(
            consumer
                .split_partition_queue(input, partition)
                .ok_or_else(|| anyhow!("no queue for {input}/{partition}"))?,
        );
    }
    consumer
        .assign(&assignment)
        .with_context(|| format!("assigning {input}"))?;
    let group_metadata = Arc::new(
        consumer
            .group_metadata()
            .ok_or_else(|| anyhow!("the consumer of group {group} has no group metadata"))?,
    );
    let workers: Vec<_> = queues
        .into_iter()
        .zip(ends)
        .enumerate()
        .map(|(partition, (queue, end))| {
            let lane = Lane {
                bootstrap: bootstrap.to_owned(),
                input: input.to_owned(),
                output: output.to_owned(),
                transactional_id: format!("{group}-{partition}"),
                partition: partition as i32,
                end,
                group_metadata: Arc::clone(&group_metadata),
                commit_interval,
                deadline: started + limit,
            };
            std::thread::spawn(move || lane.copy(&queue))
        })
        .collect();
    while !workers.iter().all(|w| w.is_finished()) {
        // Serves the consumer's own events (errors, statistics); its records go to the queues.
        if let Some(Err(error)) = consumer.poll(Duration::from_millis(10)) {
            bail!("the transactional pipe's consumer failed: {error}");
        }
    }
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow!("a transactional pipe thread panicked"))??;
    }
    Ok(started.elapsed())
}

/// One partition's share of the pipe: its queue, its producer, its transactions.
struct Lane {
    bootstrap: String,
    input: String,
    output: String,
    transactional_id: String,
    partition: i32,
    /// The partition's end offset when the pipe started (the input is complete by then).
    end: i64,
    group_metadata: Arc<ConsumerGroupMetadata>,
    commit_interval: Duration,
    deadline: Instant,
}

impl Lane {
    /// Copies the partition up to its end offset, committing every commit interval.
    fn copy(&self, queue: &PartitionQueue<DefaultConsumerContext>) -> anyhow::Result<()> {
        let (input, output, partition) = (&self.input, &self.output, self.partition);
        let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("transactional.id", &self.transactional_id)
            // As exactly's producers; 5 and 20 ms were no faster here (1M records in
            // 1.62–2.16 s, against 1.46–1.65 s at 0).
            .set("linger.ms", "0")
            .set("reconnect.backoff.ms", RECONNECT_BACKOFF_MS)
            .create_with_context(DeliveryCounter::default())
            .context("creating a transactional producer")?;
        connect_to_a_named_broker(producer.client(), output);
        producer
            .init_transactions(CALL_TIMEOUT)
            .with_context(|| format!("initializing transactions as {}", self.transactional_id))?;
        let mut next = 0;
        // When the open transaction began.
        let mut open: Option<Instant> = None;
        while next < self.end {
            if Instant::now() > self.deadline {
                bail!(
                    "the transactional pipe reached only offset {next} of {} on {input}/{partition} within its limit",
                    self.end
                );
            }
            if let Some(message) = queue.poll(Duration::from_millis(5)) {
                let message = message.with_context(|| format!("reading {input}"))?;
                if open.is_none() {
                    producer.begin_transaction().with_context(|| {
                        format!("beginning a transaction as {}", self.transactional_id)
                    })?;
                    open = Some(Instant::now());
                }
                send_waiting(&producer, copy_to(output, &message))
                    .with_context(|| format!("producing to {output}"))?;
                next = message.offset() + 1;
            } else {
                producer.poll(Duration::ZERO);
            }
            if let Some(began) = open {
                if next >= self.end || began.elapsed() >= self.commit_interval {
                    self.commit(&producer, next).with_context(|| {
                        format!(
                            "committing {input}/{partition} up to offset {next} as {}",
                            self.transactional_id
                        )
                    })?;
                    open = None;
                }
            }
        }
        Ok(())
    }

    /// Commits the open transaction with the input offsets up to `next`.
    fn commit(&self, producer: &BaseProducer<DeliveryCounter>, next: i64) -> anyhow::Result<()> {
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&self.input, self.partition, Offset::Offset(next))?;
        producer.send_offsets_to_transaction(&offsets, &self.group_metadata, CALL_TIMEOUT)?;
        producer.commit_transaction(CALL_TIMEOUT)?;
        if producer.context().failed() > 0 {
            bail!(
                "a record was not delivered: {}",
                producer.context().first_error()
            );
        }
        Ok(())
    }
}

//! When an engine has finished: its consumer group's committed offsets cover the input.
//!
//! Every engine commits the input offsets it has processed (exactly and Quix in the same
//! transaction as the outputs, the raw pipe after flushing its outputs), so "the committed
//! offsets add up to the input's record count" means the same thing for all of them: every
//! input record's outputs are written. The benchmark's input is written without
//! transactions, so its offsets are exactly its records.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// How often the committed offsets are read while waiting.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Reads one group's committed offsets on one topic.
pub struct GroupOffsets {
    consumer: BaseConsumer,
    partitions: TopicPartitionList,
    group: String,
}

impl GroupOffsets {
    /// A reader of `group`'s offsets on the `partitions` partitions of `topic`. It never
    /// joins the group.
    pub fn new(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .with_context(|| format!("creating the offset reader of group {group}"))?;
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(topic, partition);
        }
        Ok(GroupOffsets {
            consumer,
            partitions: list,
            group: group.to_owned(),
        })
    }

    /// The sum of the committed offsets (a partition without one counts 0).
    pub fn committed_total(&self) -> anyhow::Result<u64> {
        let committed = self
            .consumer
            .committed_offsets(self.partitions.clone(), Duration::from_secs(10))
            .with_context(|| format!("reading the committed offsets of group {}", self.group))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) if o > 0 => o as u64,
                _ => 0,
            })
            .sum())
    }

    /// Blocks until the committed offsets add up to `target`, checking `alive` between reads
    /// (an engine that died fails the wait at once); fails after `limit`. Returns the time
    /// since `since`.
    pub fn wait_for(
        &self,
        target: u64,
        since: Instant,
        limit: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            // A failure to read the offsets (a slow broker) is retried until the deadline like
            // an unfinished engine, and reported if it is the last word.
            let read = self.committed_total();
            if matches!(read, Ok(done) if done >= target) {
                return Ok(since.elapsed());
            }
            alive()?;
            if Instant::now() >= deadline {
                let last = match read {
                    Ok(done) => format!("committed {done}"),
                    Err(e) => format!("last read failed: {e:#}"),
                };
                bail!(
                    "group {} did not commit {target} input records within {limit:?} ({last})",
                    self.group
                );
            }
            std::thread::sleep(POLL_EVERY);
        }
    }
}

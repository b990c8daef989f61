//! Whether a consumer group has consumed everything committed on its input: the condition a
//! chaos run waits for before it verifies (never a sleep).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

/// A consumer context that does not log the end-of-partition events the probe asks for
/// (librdkafka also reports them as client errors).
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::warn!(%error, reason, "drain probe client error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Reads one group's committed offsets on one topic and what lies after them.
pub struct GroupProbe {
    group: String,
    topic: String,
    partitions: i32,
    consumer: BaseConsumer<QuietEof>,
}

impl GroupProbe {
    /// A probe of `group` on `topic`. It only assigns partitions (never joins the group) and
    /// never commits, so it can share the service's group id to read its committed offsets.
    pub fn new(
        bootstrap: &str,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer<QuietEof> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .create_with_context(QuietEof)?;
        Ok(GroupProbe {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partitions,
            consumer,
        })
    }

    /// The group id.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The committed offset per partition (`None`: nothing committed yet).
    pub fn committed(&self) -> Result<Vec<(i32, Option<i64>)>, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => (e.partition(), Some(o)),
                _ => (e.partition(), None),
            })
            .collect())
    }

    /// True when reading from the committed offsets with read_committed reaches the end of
    /// every partition without finding a record. Blocking (call it off the reactor).
    pub fn drained(&self) -> Result<bool, KafkaError> {
        let mut assignment = TopicPartitionList::new();
        for (partition, offset) in self.committed()? {
            let offset = offset.map_or(Offset::Beginning, Offset::Offset);
            assignment.add_partition_offset(&self.topic, partition, offset)?;
        }
        self.consumer.assign(&assignment)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut at_end = BTreeSet::new();
        let result = loop {
            if at_end.len() == self.partitions as usize {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(_)) => break false,
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(_)) | None => {}
            }
        };
        self.consumer.unassign()?;
        Ok(result)
    }
}

/// The probes of a chain, checked in chain order: once the first stage has nothing left it
/// produces nothing more, so the next stage's check sees its final input.
pub struct ChainProbe {
    probes: Vec<GroupProbe>,
}

impl ChainProbe {
    /// Probes in chain order.
    pub fn new(probes: Vec<GroupProbe>) -> Self {
        ChainProbe { probes }
    }

    /// The sum of every group's committed offsets: it grows while the chain makes progress.
    pub fn progress(&self) -> Result<i64, KafkaError> {
        let mut sum = 0;
        for probe in &self.probes {
            sum += probe
                .committed()?
                .iter()
                .filter_map(|(_, offset)| *offset)
                .sum::<i64>();
        }
        Ok(sum)
    }

    /// `Ok(None)` when every group is drained, else the first group that is not.
    pub fn first_not_drained(&self) -> Result<Option<&str>, KafkaError> {
        for probe in &self.probes {
            if !probe.drained()? {
                return Ok(Some(probe.group()));
            }
        }
        Ok(None)
    }
}

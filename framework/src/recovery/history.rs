//! Step 6, before the replay: what the incremental records since the base recorded about the
//! order of the steps, which depended on the clock or on arrival (DESIGN §8): the wall-clock
//! ticks, and a co-partitioned unit's interleaving of its inputs.

use rdkafka::message::Message;

use super::RecoveryTarget;
use crate::error::Error;
use crate::proto::{snapshot_record, IncrementalSnapshot, WallClockTick};
use crate::snapshot::store::{Flow, PartitionReader};
use crate::snapshot::{decode_record, SnapshotError};

/// The steps recorded since the base, in the order they happened.
#[derive(Debug, Default)]
pub(super) struct History {
    /// Wall-clock ticks.
    pub(super) ticks: Vec<WallClockTick>,
    /// A co-partitioned unit's interleaving: (source, count) pairs (see
    /// `IncrementalSnapshot.interleaving`).
    pub(super) interleaving: Vec<u32>,
}

/// Reads the history recorded by the transactions after `base_seq` (the last one the base's
/// state includes), up to `inc`'s: only when there is any (ticks, or records of a
/// co-partitioned unit). From a full snapshot's base (`warm` false) the ticks must number what
/// `inc` counts.
pub(super) fn recorded_history(
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    inc: &IncrementalSnapshot,
    base_seq: u64,
    warm: bool,
) -> Result<History, Error> {
    let co_partitioned = target.inputs.len() > 1;
    if inc.ticks_since_base == 0 && !(co_partitioned && inc.records_since_base > 0) {
        return Ok(History::default());
    }
    let (topic, partition) = (target.snapshot_topic, target.partition);
    // Every incremental record after the base's state was taken lies after its first chunk.
    let from = match &inc.base {
        Some(base) => base.first_chunk_offset,
        None => reader.bounds(topic, partition)?.0,
    };
    let mut history = History::default();
    reader.read(topic, partition, from, |message| {
        let Some(payload) = message.payload() else {
            return Ok(Flow::Continue);
        };
        let record = decode_record(payload).map_err(|source| Error::PartitionSnapshot {
            topic: topic.to_owned(),
            partition,
            source,
        })?;
        let Some(snapshot_record::Kind::Incremental(record)) = record.kind else {
            return Ok(Flow::Continue);
        };
        let ours = *record.input_topic == **target.input_topic
            && record.input_partition == target.partition;
        if ours && record.transaction_seq > base_seq {
            history.ticks.extend(record.wall_clock_ticks);
            history.interleaving.extend(record.interleaving);
        }
        Ok(if ours && record.transaction_seq >= inc.transaction_seq {
            Flow::Stop
        } else {
            Flow::Continue
        })
    })?;
    if !warm && history.ticks.len() as u64 != inc.ticks_since_base {
        return Err(incomplete(
            target,
            inc,
            format!(
                "the incremental records since it hold {} wall-clock tick(s), the latest (transaction {}) counts {}",
                history.ticks.len(),
                inc.transaction_seq,
                inc.ticks_since_base
            ),
        ));
    }
    Ok(history)
}

fn incomplete(target: &RecoveryTarget<'_>, inc: &IncrementalSnapshot, what: String) -> Error {
    Error::PartitionSnapshot {
        topic: target.snapshot_topic.to_owned(),
        partition: target.partition,
        source: SnapshotError::Corrupt {
            snapshot_id: inc
                .base
                .as_ref()
                .map(|b| b.snapshot_id.clone())
                .unwrap_or_default(),
            chunk: None,
            what,
        },
    }
}

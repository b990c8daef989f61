//! Recovery of one input partition's state (DESIGN §2), run by its partition worker after
//! `init_transactions` has fenced any previous owner. [`recover`] is the steps, in order:
//!
//! 1. [`find_latest_incremental`]: the last committed incremental record on the snapshot
//!    partition;
//! 2. [`warm_base`]: the partition's local store, when its committed position lies on the
//!    record's history (a restart on the same machine), else
//!    [`load_base`]: the full snapshot the record points to (chunk checksums verified; its
//!    stores restored into a fresh local store), or the default state at the record's base
//!    offset;
//! 3. [`check_input_holds`]: the input still holds `[base offset, offsetEND)` (not deleted by
//!    retention, not replaced by a shorter log);
//! 4. [`replay`]: that range through the processor, outputs discarded (fed into a digest);
//! 5. [`verify_replay`]: record count, state fingerprint and output digest against the record
//!    (a warm base that fails them is discarded, and recovery starts over from Kafka);
//! 6. [`commit_local`]: the local store's position moves to the record.
//!
//! Without any incremental record the partition starts from the default state at the
//! configured reset position ([`fresh_start`]) — unless the group has committed offsets for
//! it, which means the state is missing, not new.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::config::{ErrorPolicy, StartFrom};
use crate::error::Error;
use crate::metrics::{Metrics, PartitionMetrics};
use crate::processor::{
    read_state, Output, Processor, RawRecord, RecordError, StateRead, StateReadError,
};
use crate::progress::Progress;
use crate::proto::{FullSnapshotRef, IncrementalSnapshot, WallClockTick};
use crate::snapshot::store::{
    find_latest_incremental, load_full_snapshot, Flow, LatestIncremental, PartitionReader,
};
use crate::snapshot::{fingerprint, OutputDigest};
use crate::state::{decode_image, Committed, LocalState, StoreSet};
use crate::step::{process_step, tick_step, Position, StepError};

mod history;
mod interleaved;

use history::recorded_history;

/// Which partition to recover and how.
pub(crate) struct RecoveryTarget<'a> {
    /// The unit's first input topic (it names the snapshot partition).
    pub(crate) input_topic: &'a Arc<str>,
    /// Every input topic of the unit, the first first (more than one when co-partitioned).
    pub(crate) inputs: &'a [Arc<str>],
    pub(crate) partition: i32,
    pub(crate) snapshot_topic: &'a str,
    pub(crate) start_from: StartFrom,
    pub(crate) fingerprint_enabled: bool,
    pub(crate) error_policy: &'a ErrorPolicy,
    /// Set when the partition is revoked or the app stops: a long replay is abandoned.
    pub(crate) stop: &'a AtomicBool,
    /// The app's consumer group, and how to read its committed offset for this partition.
    pub(crate) group: &'a str,
    pub(crate) committed_offset: &'a dyn Fn() -> Result<Option<i64>, Error>,
    /// Where progress is published for the metrics endpoint.
    pub(crate) progress: Option<&'a PartitionMetrics>,
    /// The partition's local state (its stores; the base of warm restarts).
    pub(crate) local: &'a LocalState,
}

/// A recovered partition: the state as of `next_offset`, plus what the next incremental
/// records must carry forward.
pub(crate) struct Recovered<S> {
    pub(crate) state: S,
    /// The stores `state` holds (none for a plain state).
    pub(crate) stores: StoreSet,
    /// offsetEND: the next input offset to process (of the unit's first input) ...
    pub(crate) next_offset: i64,
    /// ... and of its other inputs (co-partitioned units).
    pub(crate) others: Vec<i64>,
    /// The base's offsets of the other inputs.
    pub(crate) base_others: Vec<i64>,
    /// The full snapshot the state derives from (None: the default state at `base_input_offset`).
    pub(crate) base: Option<FullSnapshotRef>,
    pub(crate) base_input_offset: i64,
    pub(crate) digest: OutputDigest,
    pub(crate) records_since_base: u64,
    /// Wall-clock ticks since the base's state was taken.
    pub(crate) ticks_since_base: u64,
    pub(crate) transaction_seq: u64,
    /// What this recovery would cost again: loading its base, and replaying.
    pub(crate) cost: RecoveryCost,
}

/// What recovering a partition from its latest full snapshot costs, as measured or estimated
/// (see [`AppConfig::max_recovery_time`](crate::AppConfig::max_recovery_time)).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RecoveryCost {
    /// Fetching and decoding the full snapshot (or, live, writing it: the same work).
    pub(crate) base: Duration,
    /// Processing the records since it.
    pub(crate) replay: Duration,
}

impl RecoveryCost {
    pub(crate) fn total(&self) -> Duration {
        self.base + self.replay
    }
}

/// Converts a consumed message into the processor's input record.
pub(crate) fn raw_record(topic: &Arc<str>, message: &BorrowedMessage<'_>) -> RawRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    RawRecord {
        topic: Arc::clone(topic),
        partition: message.partition(),
        offset: message.offset(),
        timestamp: message.timestamp().to_millis(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

/// Runs the recovery algorithm for one partition. `reader` is a fresh non-group consumer.
/// `Ok(None)`: interrupted by the stop flag.
pub(crate) fn recover<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    metrics: &Metrics,
) -> Result<Option<Recovered<P::State>>, Error> {
    let started = Instant::now();
    let Some(latest) = find_latest_incremental(reader, target.snapshot_topic, target.partition)?
    else {
        let recovered = fresh_start(target, reader)?;
        metrics.fresh_start();
        return Ok(Some(recovered));
    };
    let latest_offset = latest.offset;
    recover_from_latest(processor, target, reader, metrics, latest, started)
        .map_err(|error| changed_during_recovery(target, reader, latest_offset, error))
}

/// Steps 2 to 6 from the latest incremental record.
fn recover_from_latest<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    metrics: &Metrics,
    latest: LatestIncremental,
    started: Instant,
) -> Result<Option<Recovered<P::State>>, Error> {
    let inc = latest.record;
    tracing::debug!(
        topic = %target.input_topic,
        partition = target.partition,
        record_offset = latest.offset,
        transaction_seq = inc.transaction_seq,
        next_offset = inc.next_input_offset,
        base_first_chunk = inc.base.as_ref().map(|b| b.first_chunk_offset),
        "latest incremental snapshot record found"
    );
    check_record_names_partition(target, latest.offset, &inc)?;
    check_inputs(target, &inc)?;
    // A co-partitioned unit's local position holds only its first input's offset: it
    // restores from Kafka.
    let warm = match target.inputs.len() {
        1 => warm_base(processor, target, &inc, started)?,
        _ => None,
    };
    if let Some(base) = warm {
        match recover_from(processor, target, reader, metrics, &inc, base, started) {
            Err(error @ (Error::NonDeterministic { .. } | Error::ReplayMismatch { .. })) => {
                // A local store can be damaged in ways RocksDB's checksums miss; Kafka decides.
                tracing::warn!(topic = %target.input_topic, partition = target.partition, error = %error, dir = %target.local.dir().display(), "the local state store did not pass recovery's checks; discarding it and restoring from Kafka");
                target.local.discard().map_err(|e| local_error(target, e))?;
            }
            other => return other,
        }
    }
    let base = load_base(processor, target, reader, &inc, started)?;
    recover_from(processor, target, reader, metrics, &inc, base, started)
}

/// `error` of a recovery from the record at `latest_offset`; when it was a read below the
/// snapshot partition's log start, and the partition's latest record is another one now,
/// [`Error::SnapshotChangedDuringRecovery`] (retried) instead: a new owner (this instance was
/// paused past its session timeout and lost the partition) wrote a full snapshot and trimmed
/// the one this recovery was reading.
fn changed_during_recovery(
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    latest_offset: i64,
    error: Error,
) -> Error {
    let below_log_start = matches!(
        &error,
        Error::OffsetOutOfRange { topic, .. } if topic == target.snapshot_topic
    );
    if !below_log_start {
        return error;
    }
    match find_latest_incremental(reader, target.snapshot_topic, target.partition) {
        Ok(Some(now)) if now.offset != latest_offset => Error::SnapshotChangedDuringRecovery {
            topic: target.snapshot_topic.to_owned(),
            partition: target.partition,
            what: format!(
                "its latest snapshot record was at offset {latest_offset}, now at {}, and what it pointed to was deleted",
                now.offset
            ),
        },
        _ => error,
    }
}

/// Steps 3 to 6 from `base`.
fn recover_from<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    metrics: &Metrics,
    inc: &IncrementalSnapshot,
    base: Base<P::State>,
    started: Instant,
) -> Result<Option<Recovered<P::State>>, Error> {
    let Base {
        mut state,
        stores,
        input_offset: start,
        others: others_start,
        transaction_seq: base_seq,
        since_base,
        warm,
        timing,
    } = base;
    let end = inc.next_input_offset;
    let ranges = input_ranges(inc, start, &others_start);
    for (topic, (from, to)) in target.inputs.iter().zip(&ranges) {
        check_input_holds(target, reader, topic, *from, *to)?;
    }
    let replay_started = started.elapsed();
    let history = recorded_history(target, reader, inc, base_seq, warm)?;
    let ticks = &history.ticks;
    let replayed = if target.inputs.len() > 1 {
        interleaved::replay(
            processor,
            target,
            reader,
            (&mut state, &stores),
            &ranges,
            &history,
            since_base,
        )?
    } else {
        replay(
            processor,
            target,
            reader,
            (&mut state, &stores),
            (start, end),
            ticks,
            since_base,
        )?
    };
    let Some(replayed) = replayed else {
        tracing::info!(
            topic = %target.input_topic,
            partition = target.partition,
            "recovery interrupted: the partition is being released"
        );
        return Ok(None);
    };
    verify_replay(processor, target, inc, &state, &replayed, start)?;
    commit_local(processor, target, inc, &state, &stores, &replayed)?;
    let elapsed = started.elapsed();
    let from_full_snapshot = inc.base.is_some() && !warm;
    metrics.recovery_finished(elapsed, replayed.replayed, from_full_snapshot);
    tracing::info!(
        topic = %target.input_topic,
        partition = target.partition,
        base_offset = start,
        next_offset = end,
        replayed = replayed.replayed,
        wall_clock_ticks = ticks.len(),
        from_full_snapshot,
        from_local_store = warm,
        elapsed_ms = elapsed.as_millis() as u64,
        find_latest_ms = timing.found.as_millis() as u64,
        fetch_base_ms = (timing.fetched - timing.found).as_millis() as u64,
        decode_base_ms = (timing.decoded - timing.fetched).as_millis() as u64,
        replay_ms = (elapsed - replay_started).as_millis() as u64,
        "partition recovered"
    );
    Ok(Some(Recovered {
        state,
        stores,
        next_offset: end,
        others: inc.next_input_offsets.iter().skip(1).copied().collect(),
        base_others: inc.base_input_offsets.iter().skip(1).copied().collect(),
        base: inc.base.clone(),
        base_input_offset: inc.base_input_offset,
        digest: replayed.digest,
        records_since_base: inc.records_since_base,
        ticks_since_base: inc.ticks_since_base,
        transaction_seq: inc.transaction_seq,
        cost: RecoveryCost {
            base: timing.decoded - timing.found,
            replay: elapsed - replay_started,
        },
    }))
}

fn local_error(target: &RecoveryTarget<'_>, source: crate::state::StoreError) -> Error {
    Error::LocalState {
        topic: target.input_topic.to_string(),
        partition: target.partition,
        source,
    }
}

/// No incremental record: the default state at the configured start — refused when the group
/// has committed offsets here (the state went missing; starting over would reprocess input
/// whose outputs already went out).
fn fresh_start<S: Default>(
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
) -> Result<Recovered<S>, Error> {
    let (topic, partition) = (&**target.input_topic, target.partition);
    if let Some(committed_offset) = (target.committed_offset)()? {
        // The snapshot partition was read before the group's offsets: an instance that took
        // the partition over in between (this one paused past its session timeout) may have
        // committed both since.
        if find_latest_incremental(reader, target.snapshot_topic, partition)?.is_some() {
            return Err(Error::SnapshotChangedDuringRecovery {
                topic: target.snapshot_topic.to_owned(),
                partition,
                what: format!(
                    "it held no snapshot record when read, and holds one now that the group has committed offset {committed_offset}"
                ),
            });
        }
        return Err(Error::OffsetsWithoutSnapshots {
            group: target.group.to_owned(),
            topic: topic.to_owned(),
            partition,
            committed_offset,
            snapshot_topic: target.snapshot_topic.to_owned(),
        });
    }
    let start_of = |topic: &str| match target.start_from {
        StartFrom::Earliest => Ok(reader.bounds(topic, partition)?.0),
        // The last stable offset, not the high watermark: records of a transaction open
        // right now may still commit and must not be skipped.
        StartFrom::Latest => reader.stable_end(topic, partition),
    };
    let start = start_of(topic)?;
    let others = target.inputs[1..]
        .iter()
        .map(|t| start_of(t))
        .collect::<Result<Vec<i64>, Error>>()?;
    tracing::info!(
        topic,
        partition,
        start_offset = start,
        "no snapshot yet; starting from the default state"
    );
    // A local store without any committed transaction on Kafka is not this history's.
    target.local.discard().map_err(|e| local_error(target, e))?;
    let stores = target.local.store_set();
    Ok(Recovered {
        state: stores.build(S::default),
        stores,
        next_offset: start,
        base_others: others.clone(),
        others,
        base: None,
        base_input_offset: start,
        digest: OutputDigest::new(0),
        records_since_base: 0,
        ticks_since_base: 0,
        transaction_seq: 0,
        cost: RecoveryCost::default(),
    })
}

/// The range of offsets to replay of each of the unit's inputs: from the base to `inc`.
fn input_ranges(inc: &IncrementalSnapshot, start: i64, others_start: &[i64]) -> Vec<(i64, i64)> {
    let others_end = inc.next_input_offsets.iter().skip(1);
    std::iter::once((start, inc.next_input_offset))
        .chain(others_start.iter().copied().zip(others_end.copied()))
        .collect()
}

/// The record must have been written for the unit's inputs (in order): one input topic,
/// or the same co-partitioned ones.
fn check_inputs(target: &RecoveryTarget<'_>, inc: &IncrementalSnapshot) -> Result<(), Error> {
    let configured: Vec<String> = target.inputs.iter().map(|t| t.to_string()).collect();
    let recorded = if inc.input_topics.is_empty() {
        vec![inc.input_topic.clone()]
    } else {
        inc.input_topics.clone()
    };
    let offsets_match = configured.len() == 1
        || (inc.next_input_offsets.len() == configured.len()
            && inc.base_input_offsets.len() == configured.len());
    if recorded == configured && offsets_match {
        return Ok(());
    }
    Err(Error::InputsChanged {
        snapshot_topic: target.snapshot_topic.to_owned(),
        partition: target.partition,
        recorded,
        configured,
    })
}

/// The record must describe this input partition (a snapshot topic shared between apps, or
/// a pattern that maps two inputs to one topic, would mix states).
fn check_record_names_partition(
    target: &RecoveryTarget<'_>,
    offset: i64,
    inc: &IncrementalSnapshot,
) -> Result<(), Error> {
    if inc.input_topic == **target.input_topic && inc.input_partition == target.partition {
        return Ok(());
    }
    Err(Error::SnapshotMismatch {
        topic: target.snapshot_topic.to_owned(),
        partition: target.partition,
        offset,
        found_topic: inc.input_topic.clone(),
        found_partition: inc.input_partition,
    })
}

/// When the base was found, fetched and decoded, relative to the start of recovery.
struct BaseTiming {
    found: Duration,
    fetched: Duration,
    decoded: Duration,
}

impl BaseTiming {
    /// A base that needed no fetching.
    fn at(now: Duration) -> Self {
        BaseTiming {
            found: now,
            fetched: now,
            decoded: now,
        }
    }
}

/// A state to replay from: its stores, the input offset it is at, and what it counts since
/// the incremental record's base.
struct Base<S> {
    state: S,
    stores: StoreSet,
    input_offset: i64,
    /// The offsets of the unit's other inputs (co-partitioned units).
    others: Vec<i64>,
    /// The last transaction whose effects the state includes (0: none, or not recorded).
    transaction_seq: u64,
    since_base: Replayed,
    /// From the local store.
    warm: bool,
    timing: BaseTiming,
}

/// The local store as the base, if its committed position lies on `inc`'s history. One that
/// does not, or whose state does not read, is discarded (logged): the base then comes from
/// Kafka.
fn warm_base<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    inc: &IncrementalSnapshot,
    started: Instant,
) -> Result<Option<Base<P::State>>, Error> {
    let found = started.elapsed();
    let Some(warm) = target
        .local
        .warm_base(inc)
        .map_err(|e| local_error(target, e))?
    else {
        return Ok(None);
    };
    let stores = target.local.store_set();
    let position = &warm.position;
    let from_version = position.processor_version;
    let read = stores.build(|| read_state(processor, from_version, &warm.state));
    let state = match read {
        Ok(StateRead::Read(state) | StateRead::Migrated(state)) => state,
        Err(error) => {
            let error = match error {
                StateReadError::Unreadable(e) => e.to_string(),
                StateReadError::Migration(e) => e.to_string(),
            };
            tracing::warn!(topic = %target.input_topic, partition = target.partition, error = %error, "the local store's state does not read as the State type; discarding it and restoring from Kafka");
            drop(stores);
            target.local.discard().map_err(|e| local_error(target, e))?;
            return Ok(None);
        }
    };
    tracing::info!(
        topic = %target.input_topic,
        partition = target.partition,
        local_offset = position.next_offset,
        next_offset = inc.next_input_offset,
        dir = %target.local.dir().display(),
        "resuming from the local state store"
    );
    let mut timing = BaseTiming::at(started.elapsed());
    timing.found = found;
    Ok(Some(Base {
        state,
        stores,
        input_offset: position.next_offset,
        others: Vec::new(),
        transaction_seq: position.transaction_seq,
        since_base: Replayed {
            records: position.records_since_base,
            replayed: 0,
            digest: OutputDigest::new(position.output_digest),
        },
        warm: true,
        timing,
    }))
}

/// The state the record derives from and the input offset it is at: the full snapshot it
/// points to (its stores written into a fresh local store), or the default state at its base
/// offset.
fn load_base<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    inc: &IncrementalSnapshot,
    started: Instant,
) -> Result<Base<P::State>, Error> {
    let found = started.elapsed();
    target.local.discard().map_err(|e| local_error(target, e))?;
    let stores = target.local.store_set();
    let since_base = Replayed {
        records: 0,
        replayed: 0,
        digest: OutputDigest::new(0),
    };
    let Some(reference) = &inc.base else {
        return Ok(Base {
            state: stores.build(P::State::default),
            stores,
            input_offset: inc.base_input_offset,
            others: inc.base_input_offsets.iter().skip(1).copied().collect(),
            transaction_seq: 0,
            since_base,
            warm: false,
            timing: BaseTiming::at(found),
        });
    };
    let loaded = load_full_snapshot(
        reader,
        target.snapshot_topic,
        target.partition,
        reference,
        target.progress,
    )?;
    let fetched = started.elapsed();
    let snapshot_error = |source| Error::PartitionSnapshot {
        topic: target.snapshot_topic.to_owned(),
        partition: target.partition,
        source,
    };
    let (state_bytes, imported) =
        decode_image(&loaded.encoding, &loaded.data, &stores).map_err(snapshot_error)?;
    let state = stores.build(|| decode_or_migrate(processor, target, reference, state_bytes))?;
    imported
        .check(&stores)
        .map_err(|e| snapshot_error(e.into()))?;
    Ok(Base {
        state,
        stores,
        input_offset: reference.input_offset,
        others: reference.input_offsets.iter().skip(1).copied().collect(),
        transaction_seq: reference.transaction_seq,
        since_base,
        warm: false,
        timing: BaseTiming {
            found,
            fetched,
            decoded: started.elapsed(),
        },
    })
}

/// Reads the snapshot's state as the running `State` type, or, when that fails, as the
/// processor's [`Processor::migrate_state`] converts it.
fn decode_or_migrate<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reference: &FullSnapshotRef,
    bytes: &[u8],
) -> Result<P::State, Error> {
    let from_version = reference.processor_version;
    match read_state(processor, from_version, bytes) {
        Ok(StateRead::Read(state)) => Ok(state),
        Ok(StateRead::Migrated(state)) => {
            tracing::warn!(
                topic = %target.input_topic,
                partition = target.partition,
                from_version,
                to_version = processor.version(),
                snapshot = %reference.snapshot_id,
                "state migrated: the full snapshot's state did not read as the new State type; Processor::migrate_state converted it"
            );
            Ok(state)
        }
        Err(StateReadError::Unreadable(source)) => Err(Error::PartitionSnapshot {
            topic: target.snapshot_topic.to_owned(),
            partition: target.partition,
            source,
        }),
        Err(StateReadError::Migration(source)) => Err(Error::StateMigration {
            topic: target.input_topic.to_string(),
            partition: target.partition,
            from_version,
            to_version: processor.version(),
            source,
        }),
    }
}

/// The input must still hold `[start, end)`: retention may have deleted its beginning (also
/// when nothing needs replaying: records in `[start, log_start)` were never processed), and a
/// deleted and recreated topic, or lost data, ends before `end`.
fn check_input_holds(
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    topic: &str,
    start: i64,
    end: i64,
) -> Result<(), Error> {
    let partition = target.partition;
    let (log_start, mut log_end) = reader.bounds(topic, partition)?;
    // A leader that restarted shows its last checkpointed high watermark until something is
    // written in its new epoch (upstream writes soon while it runs): give it that time before
    // calling the log truncated.
    let deadline = Instant::now() + READ_STALL_TIMEOUT;
    while log_end < end && Instant::now() < deadline && !target.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        log_end = reader.bounds(topic, partition)?.1;
    }
    if log_start > start {
        return Err(Error::RetentionGap {
            topic: topic.to_owned(),
            partition,
            needed_offset: start,
            log_start_offset: log_start,
        });
    }
    if log_end < end {
        return Err(Error::InputTruncated {
            topic: topic.to_owned(),
            partition,
            needed_offset: end,
            log_end_offset: log_end,
        });
    }
    Ok(())
}

/// What a replay saw, counted from the incremental record's base (a warm base starts at its
/// own counts).
struct Replayed {
    /// Records since the base.
    records: u64,
    /// Records this replay processed.
    replayed: u64,
    digest: OutputDigest,
}

/// Replays input `[start, end)` through the processor into `state`, with the recorded
/// wall-clock `ticks` at the places they fired, outputs into a digest. `None`: interrupted by
/// the stop flag.
fn replay<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    reader: &PartitionReader,
    (state, stores): (&mut P::State, &StoreSet),
    (start, end): (i64, i64),
    ticks: &[WallClockTick],
    since_base: Replayed,
) -> Result<Option<Replayed>, Error> {
    let mut replayed = since_base;
    let mut ticks = ticks.iter().peekable();
    if end <= start {
        replay_ticks(
            processor,
            target,
            (state, stores),
            &mut ticks,
            end,
            &mut replayed,
        )?;
        return Ok(Some(replayed));
    }
    let mut interrupted = false;
    let mut progress = Progress::new(
        "replay",
        "offsets",
        target.input_topic,
        target.partition,
        (end - start) as u64,
    )
    .clock_every(256)
    .publish_to(target.progress, false);
    reader.read(target.input_topic, target.partition, start, |message| {
        if message.offset() >= end {
            return Ok(Flow::Stop);
        }
        progress.update((message.offset() - start) as u64);
        if replayed.replayed % 1024 == 0 && target.stop.load(Ordering::Acquire) {
            interrupted = true;
            return Ok(Flow::Stop);
        }
        let offset = message.offset();
        replay_ticks(
            processor,
            target,
            (state, stores),
            &mut ticks,
            offset,
            &mut replayed,
        )?;
        let raw = raw_record(target.input_topic, message);
        replay_record(processor, target, (state, stores), &raw, &mut replayed)?;
        Ok(if offset + 1 >= end {
            Flow::Stop
        } else {
            Flow::Continue
        })
    })?;
    if interrupted {
        return Ok(None);
    }
    replay_ticks(
        processor,
        target,
        (state, stores),
        &mut ticks,
        end,
        &mut replayed,
    )?;
    Ok(Some(replayed))
}

/// Replays the ticks that fired before the record at `offset` (with the partition's next
/// input offset at or below it).
fn replay_ticks<'t, P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    (state, stores): (&mut P::State, &StoreSet),
    ticks: &mut std::iter::Peekable<impl Iterator<Item = &'t WallClockTick>>,
    offset: i64,
    replayed: &mut Replayed,
) -> Result<(), Error> {
    while let Some(tick) = ticks.next_if(|t| t.next_input_offset <= offset) {
        replay_tick(processor, target, (state, stores), tick, replayed)?;
    }
    Ok(())
}

/// Replays one record (and the timers it makes due) into `replayed`.
fn replay_record<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    (state, stores): (&mut P::State, &StoreSet),
    raw: &RawRecord,
    replayed: &mut Replayed,
) -> Result<(), Error> {
    replayed.records += 1;
    replayed.replayed += 1;
    let mut out = Output::new();
    let mut on_failure = replay_failure(target);
    match process_step(processor, state, stores, raw, &mut out, &mut on_failure) {
        Ok(_) => {}
        Err(StepError::Failed(error)) => return Err(Error::Record(error)),
        Err(StepError::Store(source)) => return Err(local_error(target, source)),
    }
    if let Some(failure) = target.local.take_failure() {
        return Err(local_error(
            target,
            crate::state::StoreError::Local {
                dir: target.local.dir().to_owned(),
                what: "replaying",
                reason: failure,
            },
        ));
    }
    for record in out.take() {
        replayed.digest.update(&record);
    }
    Ok(())
}

/// Replays one recorded wall-clock tick (and the timers it makes due) into `replayed`.
fn replay_tick<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    (state, stores): (&mut P::State, &StoreSet),
    tick: &WallClockTick,
    replayed: &mut Replayed,
) -> Result<(), Error> {
    let at = Position {
        topic: target.input_topic,
        partition: target.partition,
        offset: tick.next_input_offset,
    };
    let mut out = Output::new();
    let mut on_failure = replay_failure(target);
    let ticked = tick_step(
        processor,
        state,
        stores,
        (&at, tick.time_ms),
        &mut out,
        &mut on_failure,
    );
    match ticked {
        Ok(_) => {}
        Err(StepError::Failed(error)) => return Err(Error::Record(error)),
        Err(StepError::Store(source)) => return Err(local_error(target, source)),
    }
    for record in out.take() {
        replayed.digest.update(&record);
    }
    Ok(())
}

/// A replayed call committed before, so the policy let its failure through then: skipped or
/// dead-lettered calls are skipped again (their store writes rolled back).
fn replay_failure<'a>(
    target: &'a RecoveryTarget<'_>,
) -> impl FnMut(RecordError, &mut Output) -> Result<(), RecordError> + 'a {
    move |error, _| match target.error_policy {
        ErrorPolicy::Fail => Err(error),
        _ => Ok(()),
    }
}

/// The replay must have met as many records as were processed the first time (else the input
/// changed) and, run by the same code ([`Processor::version`]), produced the recorded state
/// fingerprint and output digest (else the processor is not deterministic, or new code was
/// deployed without a new version). Run by code of another version, differing checks are
/// reported, not fatal. With nothing replayed the state is the snapshot's as the running type
/// reads it, so its fingerprint says nothing about processing and is not compared: a
/// compatible change of the state type restarts cleanly after a graceful shutdown.
fn verify_replay<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    inc: &IncrementalSnapshot,
    state: &P::State,
    replayed: &Replayed,
    start: i64,
) -> Result<(), Error> {
    let (topic, partition) = (target.input_topic.to_string(), target.partition);
    let end = inc.next_input_offset;
    // Checked before the fingerprint: a changed input is not a non-deterministic processor.
    if replayed.records != inc.records_since_base {
        return Err(Error::ReplayMismatch {
            topic,
            partition,
            from_offset: start,
            to_offset: end,
            replayed: replayed.records,
            recorded: inc.records_since_base,
        });
    }
    let fingerprint_checked =
        target.fingerprint_enabled && inc.state_fingerprint_enabled && replayed.replayed > 0;
    let state_fingerprint = fingerprint_checked.then(|| fingerprint(state));
    let output_digest = replayed.digest.value();
    let version = processor.version();
    // A starting point (the default state at an offset, as `exactly reset` writes) has
    // nothing any version could have computed differently.
    let starting_point = inc.base.is_none() && inc.records_since_base == 0;
    if inc.processor_version != version && !starting_point {
        let verdict = |matches: Option<bool>| match matches {
            Some(true) => "matches",
            Some(false) => "differs",
            None => "not checked",
        };
        tracing::warn!(
            topic = %topic,
            partition,
            from_version = inc.processor_version,
            to_version = version,
            replayed = replayed.replayed,
            from_offset = start,
            to_offset = end,
            state_fingerprint = %verdict(state_fingerprint.map(|f| f == inc.state_fingerprint)),
            output_digest = %verdict(Some(output_digest == inc.output_digest)),
            "processor version changed: the input since the last full snapshot was replayed with the new code; its checks are reported, not enforced"
        );
        return Ok(());
    }
    let mismatch = |what, expected, actual| Error::NonDeterministic {
        topic: topic.clone(),
        partition,
        from_offset: start,
        to_offset: end,
        what,
        expected,
        actual,
        version,
    };
    if let Some(actual) = state_fingerprint.filter(|&f| f != inc.state_fingerprint) {
        return Err(mismatch("state fingerprint", inc.state_fingerprint, actual));
    }
    if output_digest != inc.output_digest {
        return Err(mismatch("output digest", inc.output_digest, output_digest));
    }
    Ok(())
}

/// Moves the local store to the recovered position: the replay's changes and the record's
/// position, in one write (nothing for a plain state).
fn commit_local<P: Processor>(
    processor: &P,
    target: &RecoveryTarget<'_>,
    inc: &IncrementalSnapshot,
    state: &P::State,
    stores: &StoreSet,
    replayed: &Replayed,
) -> Result<(), Error> {
    let at = Committed {
        input_topic: target.input_topic,
        input_partition: target.partition,
        transaction_seq: inc.transaction_seq,
        next_offset: inc.next_input_offset,
        base_snapshot_id: inc.base.as_ref().map_or("", |b| b.snapshot_id.as_str()),
        base_input_offset: inc.base_input_offset,
        output_digest: replayed.digest.value(),
        records_since_base: inc.records_since_base,
        processor_version: processor.version(),
    };
    target
        .local
        .commit(stores, at, state)
        .map_err(|e| local_error(target, e))
}

/// How long a recovery read may make no progress before failing.
pub(crate) const READ_STALL_TIMEOUT: Duration = Duration::from_secs(30);

//! Recovery of one input partition's state (DESIGN §2), run by its partition worker after
//! `init_transactions` has fenced any previous owner:
//!
//! 1. find the last committed incremental record on the snapshot partition;
//! 2. load the full snapshot it points to (chunk checksums verified) or start from the
//!    default state at the record's base offset;
//! 3. check the input still holds `[offsetSTART, offsetEND)` (retention);
//! 4. replay that range through the processor with outputs discarded (fed into a digest);
//! 5. compare the state fingerprint and output digest with the incremental record.
//!
//! Without any incremental record the partition starts from the default state at the
//! configured reset position.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::config::{ErrorPolicy, StartFrom};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::processor::{process_raw, Output, Processor, RawRecord};
use crate::proto::FullSnapshotRef;
use crate::snapshot::store::{find_latest_incremental, load_full_snapshot, Flow, PartitionReader};
use crate::snapshot::{decode_state, fingerprint, OutputDigest};

/// Which partition to recover and how.
pub(crate) struct RecoveryTarget<'a> {
    pub(crate) input_topic: &'a Arc<str>,
    pub(crate) partition: i32,
    pub(crate) snapshot_topic: &'a str,
    pub(crate) start_from: StartFrom,
    pub(crate) fingerprint_enabled: bool,
    pub(crate) error_policy: &'a ErrorPolicy,
    /// Set when the partition is revoked or the app stops: a long replay is abandoned.
    pub(crate) stop: &'a AtomicBool,
}

/// A recovered partition: the state as of `next_offset`, plus what the next incremental
/// records must carry forward.
pub(crate) struct Recovered<S> {
    pub(crate) state: S,
    /// offsetEND: the next input offset to process.
    pub(crate) next_offset: i64,
    /// The full snapshot the state derives from (None: the default state at `base_input_offset`).
    pub(crate) base: Option<FullSnapshotRef>,
    pub(crate) base_input_offset: i64,
    pub(crate) digest: OutputDigest,
    pub(crate) records_since_base: u64,
    pub(crate) transaction_seq: u64,
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
    let topic: &str = target.input_topic;
    let partition = target.partition;
    let latest = find_latest_incremental(reader, target.snapshot_topic, partition)?;
    let Some(latest) = latest else {
        let start = match target.start_from {
            StartFrom::Earliest => reader.bounds(topic, partition)?.0,
            // The last stable offset, not the high watermark: records of a transaction open
            // right now may still commit and must not be skipped.
            StartFrom::Latest => reader.stable_end(topic, partition)?,
        };
        tracing::info!(
            topic,
            partition,
            start_offset = start,
            "no snapshot yet; starting from the default state"
        );
        metrics.recovery_finished(started.elapsed(), 0, false);
        return Ok(Some(Recovered {
            state: P::State::default(),
            next_offset: start,
            base: None,
            base_input_offset: start,
            digest: OutputDigest::new(0),
            records_since_base: 0,
            transaction_seq: 0,
        }));
    };
    let found_latest = started.elapsed();
    let mut fetched_base = found_latest;
    let inc = latest.record;
    if inc.input_topic != topic || inc.input_partition != partition {
        return Err(Error::SnapshotMismatch {
            topic: target.snapshot_topic.to_owned(),
            partition,
            offset: latest.offset,
            found_topic: inc.input_topic.clone(),
            found_partition: inc.input_partition,
        });
    }
    let (mut state, start) = match &inc.base {
        Some(reference) => {
            let bytes = load_full_snapshot(reader, target.snapshot_topic, partition, reference)?;
            fetched_base = started.elapsed();
            let state: P::State =
                decode_state(&bytes).map_err(|source| Error::PartitionSnapshot {
                    topic: target.snapshot_topic.to_owned(),
                    partition,
                    source,
                })?;
            (state, reference.input_offset)
        }
        None => (P::State::default(), inc.base_input_offset),
    };
    let end = inc.next_input_offset;
    let loaded_base = started.elapsed();

    let (log_start, _) = reader.bounds(topic, partition)?;
    // Also when nothing needs replaying: records in [start, log_start) were never processed.
    if log_start > start {
        return Err(Error::RetentionGap {
            topic: topic.to_owned(),
            partition,
            needed_offset: start,
            log_start_offset: log_start,
        });
    }

    let replay_started = started.elapsed();
    let mut digest = OutputDigest::new(0);
    let mut replayed: u64 = 0;
    let mut interrupted = false;
    if end > start {
        let mut out = Output::new();
        reader.read(topic, partition, start, |message| {
            if message.offset() >= end {
                return Ok(Flow::Stop);
            }
            if replayed % 1024 == 0 && target.stop.load(Ordering::Acquire) {
                interrupted = true;
                return Ok(Flow::Stop);
            }
            replayed += 1;
            let raw = raw_record(target.input_topic, message);
            match process_raw(processor, &mut state, &raw, &mut out) {
                Ok(()) => {}
                // It committed before, so the policy let it through then: skipped or
                // dead-lettered records are skipped again.
                Err(_) if !matches!(target.error_policy, ErrorPolicy::Fail) => {}
                Err(error) => return Err(Error::Record(error)),
            }
            for record in out.take() {
                digest.update(&record);
            }
            Ok(if message.offset() + 1 >= end {
                Flow::Stop
            } else {
                Flow::Continue
            })
        })?;
    }
    if interrupted {
        tracing::info!(
            topic,
            partition,
            replayed,
            "recovery interrupted: the partition is being released"
        );
        return Ok(None);
    }
    // Checked before the fingerprint: a changed input is not a non-deterministic processor.
    if replayed != inc.records_since_base {
        return Err(Error::ReplayMismatch {
            topic: topic.to_owned(),
            partition,
            from_offset: start,
            to_offset: end,
            replayed,
            recorded: inc.records_since_base,
        });
    }

    if target.fingerprint_enabled && inc.state_fingerprint_enabled {
        let actual = fingerprint(&state);
        if actual != inc.state_fingerprint {
            return Err(Error::NonDeterministic {
                topic: topic.to_owned(),
                partition,
                from_offset: start,
                to_offset: end,
                what: "state fingerprint",
                expected: inc.state_fingerprint,
                actual,
            });
        }
    }
    if digest.value() != inc.output_digest {
        return Err(Error::NonDeterministic {
            topic: topic.to_owned(),
            partition,
            from_offset: start,
            to_offset: end,
            what: "output digest",
            expected: inc.output_digest,
            actual: digest.value(),
        });
    }
    let elapsed = started.elapsed();
    metrics.recovery_finished(elapsed, replayed, inc.base.is_some());
    tracing::info!(
        topic,
        partition,
        base_offset = start,
        next_offset = end,
        replayed,
        from_full_snapshot = inc.base.is_some(),
        elapsed_ms = elapsed.as_millis() as u64,
        find_latest_ms = found_latest.as_millis() as u64,
        fetch_base_ms = (fetched_base - found_latest).as_millis() as u64,
        decode_base_ms = (loaded_base - fetched_base).as_millis() as u64,
        replay_ms = (elapsed - replay_started).as_millis() as u64,
        "partition recovered"
    );
    Ok(Some(Recovered {
        state,
        next_offset: end,
        base: inc.base,
        base_input_offset: start,
        digest,
        records_since_base: inc.records_since_base,
        transaction_seq: inc.transaction_seq,
    }))
}

/// How long a recovery read may make no progress before failing.
pub(crate) const READ_STALL_TIMEOUT: Duration = Duration::from_secs(30);

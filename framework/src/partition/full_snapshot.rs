//! Full snapshots of a live partition (DESIGN §2).
//!
//! A plain state is serialized whole and written between two transactions
//! ([`PartitionWorker::write_full_snapshot`]): its chunks in transactions of their own, then
//! the incremental record that points at them.
//!
//! A state with stores is *streamed* ([`Streaming`]): a background thread encodes the entries
//! of a consistent view of the local store, taken right after a commit at input offset `P`,
//! and each of the partition's next transactions carries the pieces ready by then (at most
//! [`PIECES_PER_TRANSACTION`]), so processing never stops for the snapshot and no transaction
//! grows toward `transaction.timeout.ms`. The transaction that carries the last piece points at
//! the snapshot as its base: `base_input_offset = P`, with the records and the output digest
//! counted since `P` (kept beside the current base's while the snapshot streams). A partition
//! without input still commits a transaction every commit interval while a snapshot streams.
//! At a stop the rest of a streaming snapshot is written at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::Producer;

use super::{exit_for, retry, Live, LiveExit, PartitionWorker, CHUNKS_PER_WRITE};
use crate::error::Error;
use crate::processor::{OutputRecord, Processor};
use crate::proto::{FullSnapshotChunk, FullSnapshotRef};
use crate::recovery::RecoveryCost;
use crate::snapshot::store::{write_snapshot_chunks, TxnProducer};
use crate::snapshot::{encode_state, full_snapshot_ref, split_into_chunks, OutputDigest};
use crate::state::{encode_image, Image, ImageStream, Piece, STORES_ENCODING};

/// Pieces of a streaming snapshot one live transaction carries at most (with 512 KiB chunks,
/// 4 MiB): a bound on what the snapshot adds to a commit.
pub(super) const PIECES_PER_TRANSACTION: usize = 8;

/// What a transaction's incremental record points at when it completes a full snapshot.
pub(super) struct NewBase {
    pub(super) reference: FullSnapshotRef,
    /// Outputs since the snapshot's input offset.
    pub(super) digest: OutputDigest,
    /// Records since the snapshot's input offset.
    pub(super) records: u64,
    /// Wall-clock ticks since the snapshot's state was taken.
    pub(super) ticks: u64,
}

/// A full snapshot of a state with stores on its way out.
pub(super) struct Streaming {
    id: String,
    /// The input offset the snapshot is at ...
    input_offset: i64,
    /// ... and every input's, in a co-partitioned unit (else empty).
    input_offsets: Vec<i64>,
    stream: ImageStream,
    next_index: u32,
    first_chunk_offset: Option<i64>,
    bytes: u64,
    started: Instant,
    /// Time spent writing its pieces: what fetching them again would cost, about.
    sending: Duration,
    /// Outputs, records and wall-clock ticks since `input_offset`.
    digest: OutputDigest,
    records: u64,
    ticks: u64,
    /// The last transaction whose effects the snapshot's state includes.
    transaction_seq: u64,
}

impl Streaming {
    /// A record was processed after the snapshot's offset, with these outputs.
    pub(super) fn record_processed(&mut self, outputs: &[OutputRecord]) {
        for record in outputs {
            self.digest.update(record);
        }
        self.records += 1;
    }

    /// A wall-clock tick fired after the snapshot's state was taken, with these outputs.
    pub(super) fn tick_fired(&mut self, outputs: &[OutputRecord]) {
        for record in outputs {
            self.digest.update(record);
        }
        self.ticks += 1;
    }
}

/// How many pieces [`PartitionWorker::send_pieces`] sends.
#[derive(Clone, Copy)]
enum Pieces {
    /// Those ready now, at most this many.
    Ready(usize),
    /// This many, waiting for each (or until the last).
    Wait(usize),
}

impl<P: Processor> PartitionWorker<P> {
    /// Takes a full snapshot: written now for a plain state, streamed with the next
    /// transactions for a state with stores (written to its end now when `at_stop`).
    pub(super) fn take_full_snapshot(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
        at_stop: bool,
    ) -> Result<(), LiveExit> {
        if live.stores.is_empty() {
            return self.write_full_snapshot(producer, live);
        }
        self.start_streaming(live)?;
        if at_stop {
            self.finish_streaming(producer, live)?;
        }
        Ok(())
    }

    /// Unique per attempt: an attempt cut short by a crash may have committed some chunks.
    /// Every input's offset, for a co-partitioned unit's full snapshot (else none: the
    /// reference's `input_offset` says it).
    fn input_offsets(&self, live: &Live<P::State>) -> Vec<i64> {
        if self.inputs.len() > 1 {
            live.all_next()
        } else {
            Vec::new()
        }
    }

    fn snapshot_id(&self, live: &Live<P::State>) -> String {
        let attempt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!(
            "{}.{}.{attempt}",
            self.transactional_id,
            live.transaction_seq + 1
        )
    }

    fn snapshot_failed(&self, source: crate::snapshot::SnapshotError) -> LiveExit {
        LiveExit::Failed(Error::PartitionSnapshot {
            topic: self.snapshot_topic.clone(),
            partition: self.partition,
            source,
        })
    }

    fn start_streaming(&self, live: &mut Live<P::State>) -> Result<(), LiveExit> {
        let state = encode_state(&live.state).map_err(|e| self.snapshot_failed(e))?;
        let stream = ImageStream::start(state, &live.stores, self.config.max_chunk_bytes)
            .map_err(|e| self.snapshot_failed(e.into()))?;
        let id = self.snapshot_id(live);
        tracing::debug!(snapshot = %id, input_offset = live.next_offset, "full snapshot streaming");
        live.streaming = Some(Streaming {
            id,
            input_offset: live.next_offset,
            input_offsets: self.input_offsets(live),
            stream,
            next_index: 0,
            first_chunk_offset: None,
            bytes: 0,
            started: Instant::now(),
            sending: Duration::ZERO,
            digest: OutputDigest::new(0),
            records: 0,
            ticks: 0,
            transaction_seq: live.transaction_seq,
        });
        Ok(())
    }

    /// Sends pieces of the streaming snapshot in the open transaction; once the last has
    /// gone, what the transaction's incremental record must point at.
    pub(super) fn stream_pieces(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
    ) -> Result<Option<NewBase>, LiveExit> {
        self.send_pieces(producer, live, Pieces::Ready(PIECES_PER_TRANSACTION))
    }

    fn send_pieces(
        &self,
        producer: &TxnProducer,
        live: &mut Live<P::State>,
        pieces: Pieces,
    ) -> Result<Option<NewBase>, LiveExit> {
        let Some(streaming) = live.streaming.as_mut() else {
            return Ok(None);
        };
        let mut chunks = Vec::new();
        let mut done = None;
        loop {
            let piece = match pieces {
                // The first piece goes with the first transaction after the state was taken,
                // waited for: its incremental record and every later one then lie after the
                // first chunk, where recovery looks for their wall-clock ticks (and below
                // which trimming deletes).
                _ if streaming.next_index == 0 && chunks.is_empty() => {
                    Some(streaming.stream.next())
                }
                Pieces::Ready(most) if chunks.len() < most => streaming.stream.try_next(),
                Pieces::Wait(most) if chunks.len() < most => Some(streaming.stream.next()),
                _ => None,
            };
            match piece {
                None => break,
                Some(Piece::Data(data)) => {
                    chunks.push(FullSnapshotChunk {
                        snapshot_id: streaming.id.clone(),
                        index: streaming.next_index,
                        // Not known until the last piece: the reference says it.
                        count: 0,
                        input_offset: streaming.input_offset,
                        crc32c: crc32c::crc32c(&data),
                        data,
                        encoding: STORES_ENCODING.to_owned(),
                    });
                    streaming.next_index += 1;
                }
                Some(Piece::Done {
                    total_bytes,
                    crc32c,
                }) => {
                    done = Some((total_bytes, crc32c));
                    break;
                }
                Some(Piece::Failed(reason)) => {
                    return Err(LiveExit::Failed(self.local_failure("snapshotting", reason)))
                }
            }
        }
        if !chunks.is_empty() {
            let sending = Instant::now();
            let offset = write_snapshot_chunks(
                producer,
                &self.snapshot_topic,
                self.partition,
                chunks,
                self.txn_timeout(),
            )
            .map_err(exit_for)?;
            streaming.first_chunk_offset.get_or_insert(offset);
            streaming.sending += sending.elapsed();
        }
        let Some((total_bytes, crc32c)) = done else {
            return Ok(None);
        };
        streaming.bytes = total_bytes;
        let reference = FullSnapshotRef {
            first_chunk_offset: streaming.first_chunk_offset.unwrap_or(-1),
            chunk_count: streaming.next_index,
            input_offset: streaming.input_offset,
            total_bytes,
            crc32c,
            snapshot_id: streaming.id.clone(),
            processor_version: self.processor.version(),
            transaction_seq: streaming.transaction_seq,
            input_offsets: streaming.input_offsets.clone(),
        };
        Ok(Some(NewBase {
            reference,
            digest: streaming.digest,
            records: streaming.records,
            ticks: streaming.ticks,
        }))
    }

    /// The rest of the streaming snapshot, in transactions of its own (the last one points
    /// at it), waiting for each piece: at a stop.
    pub(super) fn finish_streaming(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
    ) -> Result<(), LiveExit> {
        let txn_timeout = self.txn_timeout();
        while live.streaming.is_some() {
            producer.context().reset();
            producer.begin_transaction().map_err(exit_for)?;
            match self.send_pieces(producer, live, Pieces::Wait(CHUNKS_PER_WRITE))? {
                Some(new_base) => {
                    self.commit_open_transaction(producer, live, Some(new_base))?;
                    self.streaming_committed(live);
                }
                None => retry(|| producer.commit_transaction(txn_timeout))?,
            }
        }
        Ok(())
    }

    /// After the transaction pointing at a new full snapshot committed: metrics, trimming,
    /// the recovery-cost estimate (`writing`: what writing it cost, about what reading it
    /// back costs).
    pub(super) fn full_snapshot_committed(
        &self,
        live: &mut Live<P::State>,
        bytes: u64,
        took: Duration,
        writing: Duration,
        first_chunk_offset: i64,
    ) {
        self.metrics.full_snapshot_written(bytes, took);
        self.partition_metrics.full_snapshot_written(bytes, took);
        if let Some(trimmer) = &self.trimmer {
            trimmer.trim(&self.snapshot_topic, self.partition, first_chunk_offset);
        }
        live.last_full_snapshot = Instant::now();
        live.recovery_cost = RecoveryCost {
            base: writing,
            replay: Duration::ZERO,
        };
    }

    /// The streaming snapshot, once its pointer committed: gone from `live`, and accounted.
    pub(super) fn streaming_committed(&self, live: &mut Live<P::State>) {
        if let Some(streaming) = live.streaming.take() {
            let first = streaming.first_chunk_offset.unwrap_or(-1);
            tracing::debug!(snapshot = %streaming.id, bytes = streaming.bytes, chunks = streaming.next_index, "full snapshot streamed");
            let took = streaming.started.elapsed();
            self.full_snapshot_committed(live, streaming.bytes, took, streaming.sending, first);
        }
    }

    /// Serializes the (plain) state and writes it as a full snapshot: its chunks in one or
    /// more transactions (each committed before it gets old; unreferenced chunks are
    /// harmless), then a transaction with the incremental record that points at them.
    fn write_full_snapshot(
        &self,
        producer: &Arc<TxnProducer>,
        live: &mut Live<P::State>,
    ) -> Result<(), LiveExit> {
        let started = Instant::now();
        let Image { encoding, data } =
            encode_image(&live.state, &live.stores).map_err(|source| {
                LiveExit::Failed(Error::PartitionSnapshot {
                    topic: self.snapshot_topic.clone(),
                    partition: self.partition,
                    source,
                })
            })?;
        let snapshot_id = self.snapshot_id(live);
        let chunks = split_into_chunks(
            &snapshot_id,
            live.next_offset,
            &data,
            self.config.max_chunk_bytes,
            encoding,
        );
        let chunk_count = chunks.len() as u32;
        let first_chunk_offset = self.write_chunks(producer, chunks)?;
        let mut reference = full_snapshot_ref(
            &snapshot_id,
            live.next_offset,
            &data,
            chunk_count,
            first_chunk_offset,
            self.processor.version(),
        );
        reference.transaction_seq = live.transaction_seq;
        reference.input_offsets = self.input_offsets(live);
        tracing::debug!(
            input_offset = live.next_offset,
            first_chunk_offset,
            chunks = chunk_count,
            bytes = data.len(),
            "full snapshot chunks committed"
        );
        producer.context().reset();
        producer.begin_transaction().map_err(exit_for)?;
        let new_base = NewBase {
            reference,
            digest: OutputDigest::new(0),
            records: 0,
            ticks: 0,
        };
        self.commit_open_transaction(producer, live, Some(new_base))?;
        let took = started.elapsed();
        self.full_snapshot_committed(live, data.len() as u64, took, took, first_chunk_offset);
        Ok(())
    }

    /// Writes snapshot chunks in as many transactions as it takes for none of them to stay
    /// open longer than a quarter of the transaction timeout; returns the first chunk's offset.
    fn write_chunks(
        &self,
        producer: &TxnProducer,
        chunks: Vec<crate::proto::FullSnapshotChunk>,
    ) -> Result<i64, LiveExit> {
        let txn_timeout = self.txn_timeout();
        let mut first_chunk_offset = None;
        let mut open: Option<Instant> = None;
        let mut chunks = chunks.into_iter().peekable();
        while chunks.peek().is_some() {
            let group: Vec<_> = chunks.by_ref().take(CHUNKS_PER_WRITE).collect();
            if open.is_none() {
                producer.context().reset();
                producer.begin_transaction().map_err(exit_for)?;
                open = Some(Instant::now());
            }
            let offset = write_snapshot_chunks(
                producer,
                &self.snapshot_topic,
                self.partition,
                group,
                txn_timeout,
            )
            .map_err(exit_for)?;
            first_chunk_offset.get_or_insert(offset);
            let last = chunks.peek().is_none();
            if last || open.is_some_and(|since| since.elapsed() >= txn_timeout / 4) {
                retry(|| producer.commit_transaction(txn_timeout))?;
                open = None;
            }
        }
        Ok(first_chunk_offset.unwrap_or(-1))
    }
}

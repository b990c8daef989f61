//! A state that holds stores, as the data of a full snapshot (chunk encoding
//! [`STORES_ENCODING`]): the state's own MessagePack bytes, in which each store is only its
//! descriptor, then every committed entry of its stores.
//!
//! ```text
//! image  := state_len:u64le state_bytes entry*
//! entry  := key_len:u32le key value_len:u32le value     (key = store id:u32be ++ encoded key)
//! ```
//!
//! A state without stores keeps the plain encoding ([`STATE_ENCODING`]): its snapshots read as
//! before.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use serde::Serialize;

use super::backend::{full_key, Write, META_STORE};
use super::{StoreError, StoreSet};
use crate::snapshot::fingerprint::entry_hash;
use crate::snapshot::{encode_state, SnapshotError, STATE_ENCODING};

/// Chunk encoding of a state with stores.
pub(crate) const STORES_ENCODING: &str = "exactly-stores/1";
/// Entries written to the backend per batch while importing.
const IMPORT_BATCH: usize = 16 * 1024;

/// A full snapshot's data and its chunk encoding.
pub(crate) struct Image {
    pub(crate) encoding: &'static str,
    pub(crate) data: Vec<u8>,
}

/// The full snapshot data of `state`, whose stores are `set`'s. Reads the committed entries:
/// call it right after a commit, when no transaction is open.
pub(crate) fn encode_image<S: Serialize>(
    state: &S,
    set: &StoreSet,
) -> Result<Image, SnapshotError> {
    let state_bytes = encode_state(state)?;
    if set.is_empty() {
        return Ok(Image {
            encoding: STATE_ENCODING,
            data: state_bytes,
        });
    }
    let ids: Vec<u32> = set.summaries().into_iter().map(|(id, _, _)| id).collect();
    let mut data = Vec::with_capacity(8 + state_bytes.len());
    data.extend_from_slice(&(state_bytes.len() as u64).to_le_bytes());
    data.extend_from_slice(&state_bytes);
    let end = META_STORE.to_be_bytes();
    set.backend()
        .scan(&full_key(0, &[]), Some(&end), |key, value| {
            let id = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
            if ids.contains(&id) {
                put_bytes(&mut data, key);
                put_bytes(&mut data, value);
            }
            true
        })
        .map_err(SnapshotError::Store)?;
    Ok(Image {
        encoding: STORES_ENCODING,
        data,
    })
}

/// One piece of a streamed image.
pub(crate) enum Piece {
    /// The next `piece_bytes` bytes (fewer for the last piece).
    Data(Vec<u8>),
    /// The image is complete.
    Done { total_bytes: u64, crc32c: u32 },
    /// Reading the local store failed; the snapshot is abandoned.
    Failed(String),
}

/// A state with stores being written as a full snapshot image by a background thread, from
/// the committed entries as of [`ImageStream::start`], while the partition goes on
/// processing and committing. At most a few pieces wait in memory.
pub(crate) struct ImageStream {
    pieces: Option<Receiver<Piece>>,
    thread: Option<JoinHandle<()>>,
}

/// Pieces encoded ahead of the partition worker taking them.
const PIECES_AHEAD: usize = 4;

impl ImageStream {
    /// Starts the image of `state_bytes` (the state itself, encoded now) and `set`'s
    /// committed entries, cut into pieces of `piece_bytes`. Returns once the entries' view
    /// is fixed: commits after it are not in the image.
    pub(crate) fn start(
        state_bytes: Vec<u8>,
        set: &StoreSet,
        piece_bytes: usize,
    ) -> Result<Self, StoreError> {
        let view = set.backend().view()?;
        let ids: Vec<u32> = set.summaries().into_iter().map(|(id, _, _)| id).collect();
        let (pieces_tx, pieces) = sync_channel(PIECES_AHEAD);
        let (taken_tx, taken) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("exactly-snapshot".into())
            .spawn(move || {
                let mut writer = PieceWriter::new(piece_bytes.max(1), pieces_tx);
                // Buffered, not sent: sending may wait for the worker, which waits for the view.
                writer.put(&(state_bytes.len() as u64).to_le_bytes());
                writer.put(&state_bytes);
                let end = META_STORE.to_be_bytes();
                let scanned = view.scan(
                    &full_key(0, &[]),
                    &end,
                    || {
                        let _ = taken_tx.send(());
                    },
                    |key, value| {
                        let id = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
                        if ids.contains(&id) {
                            writer.put(&(key.len() as u32).to_le_bytes());
                            writer.put(key);
                            writer.put(&(value.len() as u32).to_le_bytes());
                            writer.put(value);
                        }
                        writer.send_full_pieces()
                    },
                );
                match scanned {
                    Ok(()) => writer.finish(),
                    Err(reason) => writer.fail(reason),
                }
            })
            .map_err(|e| StoreError::Local {
                dir: std::path::PathBuf::new(),
                what: "starting the snapshot thread",
                reason: e.to_string(),
            })?;
        // Wait for the view (or for the thread to end without one).
        let _ = taken.recv();
        Ok(ImageStream {
            pieces: Some(pieces),
            thread: Some(thread),
        })
    }

    /// The next piece if one is ready.
    pub(crate) fn try_next(&self) -> Option<Piece> {
        let pieces = self.pieces.as_ref()?;
        match pieces.try_recv() {
            Ok(piece) => Some(piece),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                Some(Piece::Failed("the snapshot thread ended".into()))
            }
        }
    }

    /// The next piece, waiting for it.
    pub(crate) fn next(&self) -> Piece {
        match self.pieces.as_ref().map(Receiver::recv) {
            Some(Ok(piece)) => piece,
            _ => Piece::Failed("the snapshot thread ended".into()),
        }
    }
}

impl Drop for ImageStream {
    fn drop(&mut self) {
        // The thread stops at its next piece once nobody receives.
        drop(self.pieces.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Cuts the bytes written to it into pieces, and keeps the image's length and CRC-32C.
struct PieceWriter {
    piece_bytes: usize,
    buffer: Vec<u8>,
    total: u64,
    crc: u32,
    pieces: SyncSender<Piece>,
    receiver_gone: bool,
}

impl PieceWriter {
    fn new(piece_bytes: usize, pieces: SyncSender<Piece>) -> Self {
        PieceWriter {
            piece_bytes,
            buffer: Vec::with_capacity(piece_bytes),
            total: 0,
            crc: 0,
            pieces,
            receiver_gone: false,
        }
    }

    /// Appends to the buffer; nothing is sent until [`Self::send_full_pieces`].
    fn put(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Sends every whole piece in the buffer; `false` once nobody receives them.
    fn send_full_pieces(&mut self) -> bool {
        let mut start = 0;
        while self.buffer.len() - start >= self.piece_bytes && !self.receiver_gone {
            let piece = self.buffer[start..start + self.piece_bytes].to_vec();
            start += self.piece_bytes;
            self.send(piece);
        }
        self.buffer.drain(..start);
        !self.receiver_gone
    }

    fn send(&mut self, piece: Vec<u8>) {
        self.total += piece.len() as u64;
        self.crc = crc32c::crc32c_append(self.crc, &piece);
        self.receiver_gone = self.pieces.send(Piece::Data(piece)).is_err();
    }

    fn finish(mut self) {
        if !self.send_full_pieces() {
            return;
        }
        if !self.buffer.is_empty() {
            let rest = std::mem::take(&mut self.buffer);
            self.send(rest);
        }
        let _ = self.pieces.send(Piece::Done {
            total_bytes: self.total,
            crc32c: self.crc,
        });
    }

    fn fail(self, reason: String) {
        let _ = self.pieces.send(Piece::Failed(reason));
    }
}

fn put_bytes(data: &mut Vec<u8>, bytes: &[u8]) {
    data.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    data.extend_from_slice(bytes);
}

/// What an import wrote: entries and fingerprint per store id.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Imported(BTreeMap<u32, (u64, u64)>);

impl Imported {
    /// Checks the stores the state attached (their descriptors) against what was imported.
    pub(crate) fn check(&self, set: &StoreSet) -> Result<(), StoreError> {
        for (store, entries, fingerprint) in set.summaries() {
            let (found_entries, found_fingerprint) =
                self.0.get(&store).copied().unwrap_or_default();
            if (found_entries, found_fingerprint) != (entries, fingerprint) {
                return Err(StoreError::Mismatch {
                    store,
                    entries,
                    fingerprint,
                    found_entries,
                    found_fingerprint,
                });
            }
        }
        Ok(())
    }
}

/// Writes a full snapshot's entries into `set`'s (empty) backend; returns the state's own
/// bytes, to be read with `set` current ([`StoreSet::build`]) and checked with
/// [`Imported::check`].
pub(crate) fn decode_image<'a>(
    encoding: &str,
    data: &'a [u8],
    set: &StoreSet,
) -> Result<(&'a [u8], Imported), SnapshotError> {
    let corrupt = |what: &str| SnapshotError::Corrupt {
        snapshot_id: String::new(),
        chunk: None,
        what: what.to_owned(),
    };
    match encoding {
        STATE_ENCODING => return Ok((data, Imported::default())),
        STORES_ENCODING => {}
        other => {
            return Err(corrupt(&format!(
                "unknown state encoding {other:?} (this build reads {STATE_ENCODING:?} and {STORES_ENCODING:?})"
            )))
        }
    }
    let mut reader = Reader { data, at: 0 };
    let state_len = reader
        .take(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or_else(|| corrupt("the state's length is cut off"))?;
    let state = usize::try_from(state_len)
        .ok()
        .and_then(|len| reader.take(len))
        .ok_or_else(|| corrupt("the state's bytes are cut off"))?;
    let mut imported = Imported::default();
    let mut batch: Vec<Write> = Vec::with_capacity(IMPORT_BATCH);
    while !reader.done() {
        let (Some(key), Some(value)) = (reader.bytes(), reader.bytes()) else {
            return Err(corrupt("an entry is cut off"));
        };
        if key.len() < 4 {
            return Err(corrupt("an entry's key has no store id"));
        }
        let id = u32::from_be_bytes([key[0], key[1], key[2], key[3]]);
        let summary = imported.0.entry(id).or_default();
        summary.0 += 1;
        summary.1 = summary.1.wrapping_add(entry_hash(&key[4..], value));
        batch.push((key.to_vec(), Some(value.to_vec())));
        if batch.len() >= IMPORT_BATCH {
            set.backend()
                .write(std::mem::take(&mut batch))
                .map_err(SnapshotError::Store)?;
        }
    }
    set.backend().write(batch).map_err(SnapshotError::Store)?;
    Ok((state, imported))
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let bytes = self.data.get(self.at..end)?;
        self.at = end;
        Some(bytes)
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.take(4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        self.take(len)
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Json, Store, Utf8};
    use serde::Deserialize;

    #[derive(Default, Serialize, Deserialize)]
    struct State {
        seen: u64,
        balances: Store<Utf8, Json<i64>>,
        names: Store<Utf8, Utf8>,
    }

    fn filled(set: &StoreSet) -> State {
        let mut state: State = set.build(State::default);
        state.seen = 3;
        for i in 0..100 {
            state.balances.put(&format!("k{i}"), &i).unwrap();
        }
        state.names.put(&"a".into(), &"Ada".into()).unwrap();
        set.commit(Vec::new()).unwrap();
        state
    }

    #[test]
    fn a_state_with_stores_round_trips_through_its_image() {
        let set = StoreSet::in_memory();
        let state = filled(&set);
        let image = encode_image(&state, &set).unwrap();
        assert_eq!(image.encoding, STORES_ENCODING);
        let fresh = StoreSet::in_memory();
        let (bytes, imported) = decode_image(image.encoding, &image.data, &fresh).unwrap();
        let restored: State = fresh.build(|| rmp_serde::from_slice(bytes).unwrap());
        imported.check(&fresh).unwrap();
        assert_eq!(restored.seen, 3);
        assert_eq!(restored.balances.get(&"k42".into()).unwrap(), Some(42));
        assert_eq!(restored.balances.len(), 100);
        assert_eq!(
            restored.names.get(&"a".into()).unwrap().as_deref(),
            Some("Ada")
        );
        assert_eq!(
            crate::snapshot::fingerprint(&restored),
            crate::snapshot::fingerprint(&state)
        );
    }

    #[test]
    fn a_streamed_image_is_the_image_as_of_its_start() {
        let set = StoreSet::in_memory();
        let mut state = filled(&set);
        let whole = encode_image(&state, &set).unwrap();
        let stream = ImageStream::start(encode_state(&state).unwrap(), &set, 100).unwrap();
        // Committed after the start: not in the image.
        state.balances.put(&"late".into(), &1).unwrap();
        set.commit(Vec::new()).unwrap();
        let mut data = Vec::new();
        let (total, crc) = loop {
            match stream.next() {
                Piece::Data(piece) => {
                    assert!(piece.len() <= 100);
                    data.extend_from_slice(&piece);
                }
                Piece::Done {
                    total_bytes,
                    crc32c,
                } => break (total_bytes, crc32c),
                Piece::Failed(reason) => panic!("{reason}"),
            }
        };
        assert_eq!(data, whole.data);
        assert_eq!((total, crc), (data.len() as u64, crc32c::crc32c(&data)));
    }

    #[test]
    fn a_dropped_stream_stops_its_thread() {
        let set = StoreSet::in_memory();
        let state = filled(&set);
        let stream = ImageStream::start(encode_state(&state).unwrap(), &set, 8).unwrap();
        assert!(matches!(stream.next(), Piece::Data(_)));
        drop(stream); // joins the thread, which was blocked sending
    }

    #[test]
    fn a_state_without_stores_keeps_the_plain_encoding() {
        let image = encode_image(&7u64, &StoreSet::in_memory()).unwrap();
        assert_eq!(image.encoding, STATE_ENCODING);
        assert_eq!(image.data, encode_state(&7u64).unwrap());
    }

    #[test]
    fn missing_or_cut_entries_are_reported() {
        let set = StoreSet::in_memory();
        let state = filled(&set);
        let image = encode_image(&state, &set).unwrap();
        let cut = &image.data[..image.data.len() - 3];
        assert!(decode_image(image.encoding, cut, &StoreSet::in_memory()).is_err());
        // A whole entry less: the descriptors no longer add up.
        let mut reader = Reader {
            data: &image.data,
            at: 0,
        };
        let len = u64::from_le_bytes(reader.take(8).unwrap().try_into().unwrap()) as usize;
        reader.take(len).unwrap();
        reader.bytes().unwrap();
        reader.bytes().unwrap();
        let mut shorter = image.data[..8 + len].to_vec();
        shorter.extend_from_slice(&image.data[reader.at..]);
        let fresh = StoreSet::in_memory();
        let (bytes, imported) = decode_image(image.encoding, &shorter, &fresh).unwrap();
        let _restored: State = fresh.build(|| rmp_serde::from_slice(bytes).unwrap());
        let error = imported.check(&fresh).unwrap_err().to_string();
        assert!(error.contains("restored 99 entries"), "{error}");
        assert!(decode_image("zstd", &image.data, &fresh).is_err());
    }
}

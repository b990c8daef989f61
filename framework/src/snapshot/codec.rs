//! Byte-level snapshot formats: state encoding, chunking with CRC-32C checksums, and the
//! protobuf envelope of snapshot-topic records.

use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{SnapshotError, FORMAT_VERSION};
use crate::proto::{
    snapshot_record::Kind, FullSnapshotChunk, FullSnapshotRef, IncrementalSnapshot, SnapshotRecord,
};

/// Value of `FullSnapshotChunk.encoding` for states encoded by [`encode_state`].
pub(crate) const STATE_ENCODING: &str = "msgpack";

/// Serializes a state as MessagePack.
///
/// Structs are written as maps with field names (`rmp_serde::to_vec_named`), not as positional
/// arrays: positional encoding misreads a struct that uses `#[serde(skip_serializing_if)]`, and
/// named fields let a newer State type with `#[serde(default)]` fields read older snapshots.
/// Maps may have keys of any type (integers, tuples, enums), which MessagePack allows.
pub(crate) fn encode_state<S: Serialize + ?Sized>(state: &S) -> Result<Vec<u8>, SnapshotError> {
    rmp_serde::to_vec_named(state).map_err(SnapshotError::EncodeState)
}

/// Deserializes a state written by [`encode_state`].
/// A failure names the Rust type and the path inside it (`cards.ada.limit`) where reading
/// stopped.
pub(crate) fn decode_state<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, SnapshotError> {
    // Tracking the path costs about as much as the decoding itself (measured: 1M entries),
    // so it is only done again to explain a failure.
    if let Ok(state) = rmp_serde::from_slice(bytes) {
        return Ok(state);
    }
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        SnapshotError::DecodeState {
            state_type: std::any::type_name::<S>(),
            path: error.path().to_string(),
            bytes: bytes.len(),
            source: error.into_inner(),
        }
    })
}

/// Splits an encoded state into chunks of at most `max_chunk_bytes` data bytes, each carrying
/// the CRC-32C of its data. Always at least one chunk (an empty state is one empty chunk).
pub(crate) fn split_into_chunks(
    snapshot_id: &str,
    input_offset: i64,
    data: &[u8],
    max_chunk_bytes: usize,
    encoding: &str,
) -> Vec<FullSnapshotChunk> {
    let max = max_chunk_bytes.max(1);
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(max).collect()
    };
    let count = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
    pieces
        .into_iter()
        .enumerate()
        .map(|(index, piece)| FullSnapshotChunk {
            snapshot_id: snapshot_id.to_owned(),
            index: u32::try_from(index).unwrap_or(u32::MAX),
            count,
            input_offset,
            crc32c: crc32c::crc32c(piece),
            data: piece.to_vec(),
            encoding: encoding.to_owned(),
        })
        .collect()
}

/// The pointer an incremental record stores to a full snapshot whose chunk 0 landed at
/// `first_chunk_offset` on the snapshot partition.
pub(crate) fn full_snapshot_ref(
    snapshot_id: &str,
    input_offset: i64,
    data: &[u8],
    chunk_count: u32,
    first_chunk_offset: i64,
    processor_version: u32,
) -> FullSnapshotRef {
    FullSnapshotRef {
        processor_version,
        first_chunk_offset,
        chunk_count,
        input_offset,
        total_bytes: data.len() as u64,
        crc32c: crc32c::crc32c(data),
        snapshot_id: snapshot_id.to_owned(),
        transaction_seq: 0,
        input_offsets: Vec::new(),
    }
}

/// Verifies the chunks of the full snapshot `reference` points to and concatenates their data.
///
/// Chunks may come in any order. Checked: every chunk belongs to this snapshot (id, count,
/// input offset, encoding), each index `0..chunk_count` is present exactly once, each chunk's
/// CRC-32C, and the total length and CRC-32C of the whole. Any failure is
/// [`SnapshotError::Corrupt`]; bad data is never returned.
pub(crate) fn assemble_chunks(
    reference: &FullSnapshotRef,
    mut chunks: Vec<FullSnapshotChunk>,
) -> Result<Vec<u8>, SnapshotError> {
    let id = reference.snapshot_id.as_str();
    let count = reference.chunk_count;
    if count == 0 {
        return Err(SnapshotError::corrupt(
            id,
            None,
            "the reference says it has 0 chunks",
        ));
    }
    for chunk in &chunks {
        let at = Some(chunk.index);
        if chunk.snapshot_id != id {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!("chunk belongs to snapshot {:?}", chunk.snapshot_id),
            ));
        }
        // 0: a chunk of a streamed snapshot, written before its count was known.
        if chunk.count != count && chunk.count != 0 {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!(
                    "chunk says the snapshot has {} chunks, the reference says {count}",
                    chunk.count
                ),
            ));
        }
        if chunk.index >= count {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!("chunk index out of range (snapshot has {count} chunks)"),
            ));
        }
        if chunk.input_offset != reference.input_offset {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!(
                    "chunk is for input offset {}, the reference for {}",
                    chunk.input_offset, reference.input_offset
                ),
            ));
        }
        let known = [STATE_ENCODING, crate::state::STORES_ENCODING];
        if !known.contains(&chunk.encoding.as_str()) {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!(
                    "unknown state encoding {:?} (this build reads {known:?})",
                    chunk.encoding
                ),
            ));
        }
        if chunk.encoding != chunks[0].encoding {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!(
                    "chunk has encoding {:?}, chunk {} {:?}",
                    chunk.encoding, chunks[0].index, chunks[0].encoding
                ),
            ));
        }
        let crc = crc32c::crc32c(&chunk.data);
        if crc != chunk.crc32c {
            return Err(SnapshotError::corrupt(
                id,
                at,
                format!(
                    "CRC-32C mismatch: data has {crc:#010x}, chunk says {:#010x} ({} bytes)",
                    chunk.crc32c,
                    chunk.data.len()
                ),
            ));
        }
    }
    chunks.sort_by_key(|c| c.index);
    for (expected, chunk) in (0..count).zip(chunks.iter()) {
        if chunk.index != expected {
            let what = if chunk.index < expected {
                "chunk appears twice"
            } else {
                "chunk missing"
            };
            let at = if chunk.index < expected {
                chunk.index
            } else {
                expected
            };
            return Err(SnapshotError::corrupt(id, Some(at), what));
        }
    }
    if chunks.len() != count as usize {
        return Err(if chunks.len() < count as usize {
            SnapshotError::corrupt(id, Some(chunks.len() as u32), "chunk missing")
        } else {
            SnapshotError::corrupt(id, Some(count - 1), "chunk appears twice")
        });
    }
    let total: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
    if total != reference.total_bytes {
        return Err(SnapshotError::corrupt(
            id,
            None,
            format!(
                "chunks hold {total} bytes, the reference says {}",
                reference.total_bytes
            ),
        ));
    }
    let mut data = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for chunk in &chunks {
        data.extend_from_slice(&chunk.data);
    }
    let crc = crc32c::crc32c(&data);
    if crc != reference.crc32c {
        return Err(SnapshotError::corrupt(
            id,
            None,
            format!(
                "CRC-32C of the whole snapshot is {crc:#010x}, the reference says {:#010x}",
                reference.crc32c
            ),
        ));
    }
    Ok(data)
}

/// Wraps an incremental snapshot in a versioned record.
pub(crate) fn incremental_record(incremental: IncrementalSnapshot) -> SnapshotRecord {
    SnapshotRecord {
        format_version: FORMAT_VERSION,
        kind: Some(Kind::Incremental(incremental)),
    }
}

/// Wraps a full-snapshot chunk in a versioned record.
pub(crate) fn chunk_record(chunk: FullSnapshotChunk) -> SnapshotRecord {
    SnapshotRecord {
        format_version: FORMAT_VERSION,
        kind: Some(Kind::Chunk(chunk)),
    }
}

/// The bytes of a snapshot-topic record.
pub(crate) fn encode_record(record: &SnapshotRecord) -> Vec<u8> {
    record.encode_to_vec()
}

/// Decodes a snapshot-topic record, refusing versions newer than [`FORMAT_VERSION`].
///
/// A record whose `kind` is unset (a kind added by a newer version of the same format) decodes
/// with `kind: None`; readers skip it.
pub(crate) fn decode_record(bytes: &[u8]) -> Result<SnapshotRecord, SnapshotError> {
    let record = SnapshotRecord::decode(bytes)?;
    if record.format_version == 0 || record.format_version > FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            found: record.format_version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn round_trip<S: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(s: &S) {
        let bytes = encode_state(s).unwrap();
        let back: S = decode_state(&bytes).unwrap();
        assert_eq!(&back, s);
    }

    #[derive(Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    enum Status {
        Open,
        Frozen { since: i64 },
        Closed(String),
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize, Default)]
    struct Account {
        balance: i64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        note: Option<String>,
        tags: Vec<String>,
    }

    #[test]
    fn states_round_trip() {
        let mut by_id: HashMap<u64, Account> = HashMap::new();
        by_id.insert(
            7,
            Account {
                balance: -3,
                note: None,
                tags: vec!["a".into()],
            },
        );
        by_id.insert(
            u64::MAX,
            Account {
                balance: 9,
                note: Some("n".into()),
                tags: vec![],
            },
        );
        round_trip(&by_id);

        let mut by_name: HashMap<String, Status> = HashMap::new();
        by_name.insert("x".into(), Status::Open);
        by_name.insert("y".into(), Status::Frozen { since: 12 });
        by_name.insert("z".into(), Status::Closed("fraud".into()));
        round_trip(&by_name);

        let mut tuple_keys: BTreeMap<(i32, String), Option<u8>> = BTreeMap::new();
        tuple_keys.insert((1, "a".into()), None);
        tuple_keys.insert((-1, "b".into()), Some(2));
        round_trip(&tuple_keys);

        let mut enum_keys: HashMap<Status, u8> = HashMap::new();
        enum_keys.insert(Status::Open, 1);
        enum_keys.insert(Status::Frozen { since: 3 }, 2);
        enum_keys.insert(Status::Closed("c".into()), 3);
        round_trip(&enum_keys);

        round_trip(&Some(5u8));
        round_trip(&None::<u8>);
        round_trip(&HashSet::from([1u32, 2, 3]));
        round_trip(&());
        round_trip(&(1u8, "two".to_string(), 3.5f64));
    }

    #[test]
    fn skip_serializing_if_fields_round_trip() {
        // The reason for named encoding: positional encoding would shift fields here.
        round_trip(&vec![
            Account {
                balance: 1,
                note: None,
                tags: vec!["t".into()],
            },
            Account {
                balance: 2,
                note: Some("n".into()),
                tags: vec![],
            },
        ]);
    }

    #[test]
    fn positional_encoding_would_misread_skipped_fields() {
        // Documents why encode_state uses named fields: with rmp_serde::to_vec a skipped
        // `note` shifts `tags` into its place and the snapshot no longer decodes.
        let accounts = vec![Account {
            balance: 1,
            note: None,
            tags: vec!["t".into()],
        }];
        let positional = rmp_serde::to_vec(&accounts).unwrap();
        assert!(rmp_serde::from_slice::<Vec<Account>>(&positional).is_err());
        round_trip(&accounts);
    }

    #[test]
    fn newer_state_with_default_field_reads_older_snapshot() {
        #[derive(Serialize)]
        struct V1 {
            balance: i64,
        }
        #[derive(Deserialize, Debug)]
        struct V2 {
            balance: i64,
            #[serde(default)]
            count: u64,
        }
        let bytes = encode_state(&V1 { balance: 4 }).unwrap();
        let v2: V2 = decode_state(&bytes).unwrap();
        assert_eq!((v2.balance, v2.count), (4, 0));
    }

    #[test]
    fn decode_state_error_names_the_type_the_field_and_a_way_out() {
        let bytes = encode_state(&"text").unwrap();
        let err = decode_state::<u64>(&bytes).unwrap_err().to_string();
        assert!(err.contains("does not read as u64: at `.`"), "{err}");
        assert!(err.contains("Processor::migrate_state"), "{err}");

        #[derive(serde::Serialize)]
        struct Card {
            limit: &'static str,
        }
        #[derive(Debug, serde::Deserialize)]
        struct NewCard {
            #[allow(dead_code)]
            limit: u64,
        }
        let old = std::collections::BTreeMap::from([("ada", Card { limit: "high" })]);
        let bytes = encode_state(&old).unwrap();
        let err = decode_state::<std::collections::BTreeMap<String, NewCard>>(&bytes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("at `ada.limit`"), "{err}");
        assert!(err.contains("NewCard"), "{err}");
    }

    fn prepared(data: &[u8], max: usize) -> (FullSnapshotRef, Vec<FullSnapshotChunk>) {
        let chunks = split_into_chunks("app.t.0#9", 42, data, max, STATE_ENCODING);
        let r = full_snapshot_ref("app.t.0#9", 42, data, chunks.len() as u32, 1234, 0);
        (r, chunks)
    }

    #[test]
    fn chunk_boundaries() {
        for (len, max, expected_chunks) in [
            (0usize, 4usize, 1usize),
            (1, 4, 1),
            (4, 4, 1),
            (8, 4, 2),
            (9, 4, 3),
            (3_000_001, 65_536, 46),
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let (r, chunks) = prepared(&data, max);
            assert_eq!(chunks.len(), expected_chunks, "len {len} max {max}");
            assert!(chunks.iter().all(|c| c.data.len() <= max));
            assert!(chunks.iter().all(|c| c.count as usize == expected_chunks));
            assert_eq!(r.total_bytes, len as u64);
            assert_eq!(assemble_chunks(&r, chunks.clone()).unwrap(), data);
            // Order of arrival does not matter.
            let mut reversed = chunks;
            reversed.reverse();
            assert_eq!(assemble_chunks(&r, reversed).unwrap(), data);
        }
    }

    fn expect_corrupt(
        r: &FullSnapshotRef,
        chunks: Vec<FullSnapshotChunk>,
        chunk: Option<u32>,
        hint: &str,
    ) {
        match assemble_chunks(r, chunks) {
            Err(SnapshotError::Corrupt {
                snapshot_id,
                chunk: c,
                what,
            }) => {
                assert_eq!(snapshot_id, "app.t.0#9");
                assert_eq!(c, chunk, "{what}");
                assert!(what.contains(hint), "expected {hint:?} in {what:?}");
            }
            other => panic!("expected Corrupt({hint}), got {other:?}"),
        }
    }

    #[test]
    fn every_kind_of_corruption_is_detected() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
        let (r, chunks) = prepared(&data, 300); // 4 chunks

        let mut c = chunks.clone();
        c[2].data[17] ^= 1;
        expect_corrupt(&r, c, Some(2), "CRC-32C mismatch");

        let mut c = chunks.clone();
        c[1].crc32c ^= 1;
        expect_corrupt(&r, c, Some(1), "CRC-32C mismatch");

        let mut c = chunks.clone();
        c.remove(1);
        expect_corrupt(&r, c, Some(1), "missing");

        let mut c = chunks.clone();
        c.pop();
        expect_corrupt(&r, c, Some(3), "missing");

        let mut c = chunks.clone();
        c.push(chunks[2].clone());
        expect_corrupt(&r, c, Some(2), "twice");

        let mut c = chunks.clone();
        c[0].snapshot_id = "other".into();
        expect_corrupt(&r, c, Some(0), "belongs to snapshot \"other\"");

        let mut c = chunks.clone();
        c[3].count = 5;
        expect_corrupt(&r, c, Some(3), "5 chunks");

        let mut c = chunks.clone();
        c[3].index = 7;
        expect_corrupt(&r, c, Some(7), "out of range");

        let mut c = chunks.clone();
        c[1].input_offset = 41;
        expect_corrupt(&r, c, Some(1), "input offset 41");

        let mut c = chunks.clone();
        c[0].encoding = "json".into();
        expect_corrupt(&r, c, Some(0), "unknown state encoding");

        let mut wrong_len = r.clone();
        wrong_len.total_bytes += 1;
        expect_corrupt(&wrong_len, chunks.clone(), None, "1001");

        let mut wrong_crc = r.clone();
        wrong_crc.crc32c ^= 1;
        expect_corrupt(&wrong_crc, chunks.clone(), None, "whole snapshot");

        let mut wrong_count = r.clone();
        wrong_count.chunk_count = 3;
        expect_corrupt(&wrong_count, chunks.clone(), Some(0), "4 chunks");

        let mut zero = r.clone();
        zero.chunk_count = 0;
        expect_corrupt(&zero, chunks.clone(), None, "0 chunks");

        // A chunk whose data and CRC were both replaced consistently still fails the total CRC.
        let mut c = chunks.clone();
        c[0].data[0] ^= 0xff;
        c[0].crc32c = crc32c::crc32c(&c[0].data);
        expect_corrupt(&r, c, None, "whole snapshot");

        assert_eq!(assemble_chunks(&r, chunks).unwrap(), data);
    }

    #[test]
    fn corrupt_error_message_names_snapshot_and_chunk() {
        let (r, mut chunks) = prepared(b"abcdef", 2);
        chunks[1].data[0] = b'X';
        let msg = assemble_chunks(&r, chunks).unwrap_err().to_string();
        assert!(msg.contains("\"app.t.0#9\", chunk 1"), "{msg}");
    }

    #[test]
    fn records_round_trip_and_versions_are_checked() {
        let inc = IncrementalSnapshot {
            input_topic: "t".into(),
            input_partition: 3,
            next_input_offset: 100,
            base: Some(full_snapshot_ref("s", 50, b"xyz", 1, 7, 1)),
            base_input_offset: 50,
            state_fingerprint: 0xdead_beef,
            state_fingerprint_enabled: true,
            output_digest: 17,
            records_since_base: 49,
            transaction_seq: 5,
            processor_version: 2,
            wall_clock_ticks: vec![crate::proto::WallClockTick {
                next_input_offset: 98,
                time_ms: 1_700_000_000_000,
            }],
            ticks_since_base: 3,
            input_topics: vec!["a".into(), "b".into()],
            next_input_offsets: vec![100, 7],
            base_input_offsets: vec![50, 3],
            interleaving: vec![0, 2, 1, 1, u32::MAX, 1],
        };
        let rec = incremental_record(inc.clone());
        let back = decode_record(&encode_record(&rec)).unwrap();
        assert_eq!(back.kind, Some(Kind::Incremental(inc)));

        let chunk = split_into_chunks("s", 50, b"xyz", 10, STATE_ENCODING).remove(0);
        let back = decode_record(&encode_record(&chunk_record(chunk.clone()))).unwrap();
        assert_eq!(back.kind, Some(Kind::Chunk(chunk)));

        let newer = SnapshotRecord {
            format_version: FORMAT_VERSION + 1,
            kind: None,
        };
        let err = decode_record(&encode_record(&newer)).unwrap_err();
        assert!(matches!(
            err,
            SnapshotError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ));
        assert!(err.to_string().contains("upgrade exactly"));

        let unversioned = SnapshotRecord {
            format_version: 0,
            kind: None,
        };
        assert!(decode_record(&encode_record(&unversioned)).is_err());

        let err = decode_record(b"\xff\xff\xff").unwrap_err();
        assert!(matches!(err, SnapshotError::Record(_)), "{err}");
    }
}

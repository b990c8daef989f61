//! `exactly verify-snapshot`: reads every chunk of the latest full snapshot of each partition
//! and checks it the way recovery would, without needing the processor's code: chunk ids,
//! indices and count, each chunk's CRC-32C, the whole snapshot's length and CRC-32C, and that
//! the bytes are one well-formed MessagePack value.

use std::io::Write;
use std::time::Instant;

use serde::de::{Deserialize, IgnoredAny};

use super::topics::InputTopic;
use super::{reader, CliError};
use crate::config::AppConfig;
use crate::snapshot::store::{find_latest_incremental, load_full_snapshot, PartitionReader};

/// What was found for one partition.
enum Verdict {
    /// Its full snapshot checks out: (bytes, chunks).
    Verified(u64, u32),
    /// No full snapshot yet: recovery starts from the default state.
    NoFullSnapshot,
    /// Nothing committed yet.
    NoSnapshot,
    Failed(String),
}

/// Checks the latest full snapshot of every partition; fails when any does not check out.
pub(super) fn run(
    config: &AppConfig,
    inputs: &[InputTopic],
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let reader = reader(config)?;
    let (mut verified, mut failed) = (0usize, 0usize);
    for input in inputs {
        if input.snapshot_partitions.is_none() {
            writeln!(
                out,
                "{}: no snapshot topic {}",
                input.name, input.snapshot_topic
            )?;
            continue;
        }
        for partition in 0..input.partitions {
            let started = Instant::now();
            let verdict = verify_partition(&reader, input, partition);
            let took_ms = started.elapsed().as_millis();
            let line = match &verdict {
                Verdict::Verified(bytes, chunks) => {
                    verified += 1;
                    format!("ok: {bytes} bytes in {chunks} chunks, checksums and encoding valid ({took_ms} ms)")
                }
                Verdict::NoFullSnapshot => {
                    "no full snapshot yet (recovery starts from the default state)".to_owned()
                }
                Verdict::NoSnapshot => "nothing committed yet".to_owned(),
                Verdict::Failed(why) => {
                    failed += 1;
                    format!("FAILED: {why}")
                }
            };
            writeln!(out, "{}/{partition}: {line}", input.snapshot_topic)?;
        }
    }
    writeln!(out, "verified {verified} full snapshots, {failed} failed")?;
    if failed > 0 {
        return Err(CliError::SnapshotsFailed { failed, verified });
    }
    Ok(())
}

fn verify_partition(reader: &PartitionReader, input: &InputTopic, partition: i32) -> Verdict {
    let topic = &input.snapshot_topic;
    let latest = match find_latest_incremental(reader, topic, partition) {
        Ok(Some(latest)) => latest,
        Ok(None) => return Verdict::NoSnapshot,
        Err(error) => return Verdict::Failed(error.to_string()),
    };
    let Some(reference) = latest.record.base else {
        return Verdict::NoFullSnapshot;
    };
    let loaded = match load_full_snapshot(reader, topic, partition, &reference, None) {
        Ok(loaded) => loaded,
        Err(error) => return Verdict::Failed(error.to_string()),
    };
    // A state with stores: its entries must be whole, and the state itself MessagePack.
    let scratch = crate::state::StoreSet::in_memory();
    let state = crate::state::decode_image(&loaded.encoding, &loaded.data, &scratch)
        .map(|(state, _)| state)
        .map_err(|e| e.to_string());
    match state.and_then(check_msgpack) {
        Ok(()) => Verdict::Verified(reference.total_bytes, reference.chunk_count),
        Err(why) => Verdict::Failed(format!(
            "snapshot {} (at offset {}): {why}",
            reference.snapshot_id, reference.first_chunk_offset
        )),
    }
}

/// The state is written as exactly one MessagePack value.
fn check_msgpack(bytes: &[u8]) -> Result<(), String> {
    let mut rest = bytes;
    let mut deserializer = rmp_serde::Deserializer::new(&mut rest);
    IgnoredAny::deserialize(&mut deserializer)
        .map_err(|e| format!("the state is not valid MessagePack: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes follow the state's MessagePack value",
            rest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_whole_msgpack_value_passes() {
        let state: std::collections::BTreeMap<String, u64> =
            [("a".to_owned(), 1), ("b".to_owned(), 2)].into();
        let bytes = crate::snapshot::encode_state(&state).expect("encodes");
        assert_eq!(check_msgpack(&bytes), Ok(()));
        assert!(check_msgpack(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(check_msgpack(&longer).is_err());
    }
}

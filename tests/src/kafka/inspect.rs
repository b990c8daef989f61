//! Reading a node's log files with Kafka's own `DumpLogSegments`, for the diagnostics of a
//! failed run: who holds the transaction that keeps a partition's last stable offset back, and
//! what the transaction coordinator recorded about that producer.
//!
//! Read-only on the files, so it works on a running node as well as on a stopped one.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::HarnessError;
use crate::kafka::{installation, KafkaCluster};

/// One record batch's header as `DumpLogSegments` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchHeader {
    /// First offset of the batch.
    pub base_offset: i64,
    /// Last offset of the batch.
    pub last_offset: i64,
    /// Producer id (-1 for a non-idempotent producer).
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i32,
    /// Part of a transaction.
    pub transactional: bool,
    /// A control batch (a commit or abort marker).
    pub control: bool,
}

impl BatchHeader {
    /// Parses a `baseOffset: .. lastOffset: .. producerId: ..` line; `None` for other lines.
    fn parse(line: &str) -> Option<BatchHeader> {
        let field = |name: &str| -> Option<&str> {
            let mut words = line.split_whitespace();
            words.find(|w| *w == name)?;
            words.next()
        };
        Some(BatchHeader {
            base_offset: field("baseOffset:")?.parse().ok()?,
            last_offset: field("lastOffset:")?.parse().ok()?,
            producer_id: field("producerId:")?.parse().ok()?,
            producer_epoch: field("producerEpoch:")?.parse().ok()?,
            transactional: field("isTransactional:")? == "true",
            control: field("isControl:")? == "true",
        })
    }
}

/// Runs `DumpLogSegments` with `args` on the `.log` segments of `dir`, oldest first.
fn dump(dir: &Path, args: &[&str]) -> Result<String, HarnessError> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| HarnessError::io(format!("listing {}", dir.display()), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .collect();
    segments.sort();
    if segments.is_empty() {
        return Ok(String::new());
    }
    let files: Vec<String> = segments.iter().map(|p| p.display().to_string()).collect();
    let installation = installation()?;
    let output = Command::new(&installation.java)
        .args(["-cp", &installation.classpath])
        .arg("org.apache.kafka.tools.DumpLogSegments")
        .args(args)
        .args(["--files", &files.join(",")])
        .output()
        .map_err(|e| HarnessError::io("running DumpLogSegments", e))?;
    if !output.status.success() {
        return Err(HarnessError::KafkaUnavailable(format!(
            "DumpLogSegments on {} failed ({}): {}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The batch headers of a partition's log in `data_dir`.
pub fn batches(
    data_dir: &Path,
    topic: &str,
    partition: i32,
) -> Result<Vec<BatchHeader>, HarnessError> {
    let dir = data_dir.join(format!("{topic}-{partition}"));
    Ok(dump(&dir, &[])?
        .lines()
        .filter_map(BatchHeader::parse)
        .collect())
}

/// The transaction coordinator's records (`key payload` as JSON) that name `producer_id`,
/// from every `__transaction_state` partition in `data_dir`, oldest first per partition.
pub fn transaction_log_entries(
    data_dir: &Path,
    producer_id: i64,
) -> Result<Vec<String>, HarnessError> {
    let needle = format!("\"producerId\":{producer_id},");
    let mut entries = Vec::new();
    let dirs = std::fs::read_dir(data_dir)
        .map_err(|e| HarnessError::io(format!("listing {}", data_dir.display()), e))?;
    for dir in dirs.filter_map(|entry| entry.ok().map(|e| e.path())) {
        let is_state = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("__transaction_state-"));
        if !is_state {
            continue;
        }
        let text = dump(&dir, &["--transaction-log-decoder"])?;
        entries.extend(
            text.lines()
                .filter(|line| line.contains(&needle))
                .filter_map(|line| line.find("key:").map(|at| line[at..].to_owned())),
        );
    }
    Ok(entries)
}

/// Describes the transaction that starts at or after `stable_offset` on `topic/partition`
/// and keeps that partition's last stable offset back: its producer, that producer's batches
/// and markers from there on, and the coordinator's last records about the producer.
pub fn describe_open_transaction(
    cluster: &KafkaCluster,
    topic: &str,
    partition: i32,
    stable_offset: i64,
) -> Vec<String> {
    match describe(cluster, topic, partition, stable_offset) {
        Ok(lines) => lines,
        Err(e) => vec![format!("{topic}/{partition}: reading the logs failed: {e}")],
    }
}

/// Every node's batches of `topic/partition` that end at or after `from` and start at or
/// before `to`, one line each: `node N: data@base-last p<producer id>/e<epoch>` or
/// `marker@offset p<producer id>/e<epoch> COMMIT|ABORT`. For the diagnostics of records a
/// read_committed reader does not see: which transaction markers follow them on each replica.
pub fn log_window(
    cluster: &KafkaCluster,
    topic: &str,
    partition: i32,
    from: i64,
    to: i64,
) -> Vec<String> {
    let mut lines = Vec::new();
    for node in cluster.nodes() {
        let dir = node.data_dir().join(format!("{topic}-{partition}"));
        if !dir.is_dir() {
            lines.push(format!("node {}: no log of {topic}/{partition}", node.id()));
            continue;
        }
        match dump(&dir, &["--print-data-log"]) {
            Ok(text) => lines.extend(
                window_lines(&text, from, to)
                    .into_iter()
                    .map(|line| format!("node {}: {line}", node.id())),
            ),
            Err(e) => lines.push(format!("node {}: reading the log failed: {e}", node.id())),
        }
    }
    lines
}

/// The batches of a `--print-data-log` dump in the window, a control batch with its marker
/// type (printed on the record line after its header).
fn window_lines(dump: &str, from: i64, to: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = dump.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(b) = BatchHeader::parse(line) else {
            continue;
        };
        if b.last_offset < from || b.base_offset > to {
            continue;
        }
        let who = format!("p{}/e{}", b.producer_id, b.producer_epoch);
        if b.control {
            let marker = lines
                .peek()
                .and_then(|next| {
                    let mut words = next.split_whitespace();
                    words.find(|w| *w == "endTxnMarker:")?;
                    words.next()
                })
                .unwrap_or("?");
            out.push(format!("marker@{} {who} {marker}", b.base_offset));
        } else {
            out.push(format!("data@{}-{} {who}", b.base_offset, b.last_offset));
        }
    }
    out
}

/// How many coordinator records of the producer a description shows (the newest).
const COORDINATOR_RECORDS_SHOWN: usize = 6;

fn describe(
    cluster: &KafkaCluster,
    topic: &str,
    partition: i32,
    stable_offset: i64,
) -> Result<Vec<String>, HarnessError> {
    let Some(data_dir) = cluster
        .nodes()
        .iter()
        .map(|n| n.data_dir())
        .find(|d| d.join(format!("{topic}-{partition}")).is_dir())
    else {
        return Ok(vec![format!("{topic}/{partition}: no node holds its log")]);
    };
    let all = batches(&data_dir, topic, partition)?;
    let Some(open) = all
        .iter()
        .find(|b| b.transactional && !b.control && b.last_offset >= stable_offset)
        .cloned()
    else {
        return Ok(vec![format!(
            "{topic}/{partition}: no transactional batch at or after offset {stable_offset}"
        )]);
    };
    let of_producer: Vec<String> = all
        .iter()
        .filter(|b| b.producer_id == open.producer_id && b.last_offset >= stable_offset)
        .take(12)
        .map(|b| {
            let kind = if b.control { "marker" } else { "data" };
            format!(
                "{kind}@{}-{}/e{}",
                b.base_offset, b.last_offset, b.producer_epoch
            )
        })
        .collect();
    let mut lines = vec![format!(
        "{topic}/{partition}: open transaction from offset {} by producer id {} epoch {}; that producer's batches from there: {}",
        open.base_offset,
        open.producer_id,
        open.producer_epoch,
        of_producer.join(" ")
    )];
    let entries = transaction_log_entries(&data_dir, open.producer_id)?;
    let skip = entries.len().saturating_sub(COORDINATOR_RECORDS_SHOWN);
    lines.extend(
        entries
            .into_iter()
            .skip(skip)
            .map(|entry| format!("  coordinator: {entry}")),
    );
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lists_data_batches_and_markers_with_their_type() {
        let dump = "Dumping x.log\n\
baseOffset: 0 lastOffset: 2 count: 3 baseSequence: 0 lastSequence: 2 producerId: 7 producerEpoch: 1 partitionLeaderEpoch: 0 isTransactional: true isControl: false position: 0\n\
| offset: 0 CreateTime: 1 keySize: -1 valueSize: 1 sequence: 0 headerKeys: [] payload: a\n\
baseOffset: 3 lastOffset: 3 count: 1 baseSequence: -1 lastSequence: -1 producerId: 7 producerEpoch: 1 partitionLeaderEpoch: 0 isTransactional: true isControl: true position: 90\n\
| offset: 3 CreateTime: 1 keySize: 4 valueSize: 6 sequence: -1 headerKeys: [] endTxnMarker: ABORT coordinatorEpoch: 0\n\
baseOffset: 4 lastOffset: 5 count: 2 baseSequence: 3 lastSequence: 4 producerId: 7 producerEpoch: 1 partitionLeaderEpoch: 0 isTransactional: true isControl: false position: 160\n";
        assert_eq!(
            window_lines(dump, 1, 3),
            vec!["data@0-2 p7/e1", "marker@3 p7/e1 ABORT"]
        );
        assert_eq!(window_lines(dump, 5, 9), vec!["data@4-5 p7/e1"]);
    }

    #[test]
    fn parses_a_batch_header_line() {
        let line = "baseOffset: 53 lastOffset: 53 count: 1 baseSequence: -1 lastSequence: -1 producerId: 11 producerEpoch: 0 partitionLeaderEpoch: 0 isTransactional: true isControl: true deleteHorizonMs: OptionalLong.empty position: 8516 CreateTime: 1795859260877 size: 78 magic: 2 compresscodec: none crc: 1865632547 isvalid: true";
        assert_eq!(
            BatchHeader::parse(line),
            Some(BatchHeader {
                base_offset: 53,
                last_offset: 53,
                producer_id: 11,
                producer_epoch: 0,
                transactional: true,
                control: true,
            })
        );
        assert_eq!(BatchHeader::parse("Dumping x-0/0.log"), None);
        assert_eq!(BatchHeader::parse("| offset: 53 CreateTime: 1"), None);
    }
}

//! `exactly inspect`: per partition, what a restart would find — the latest committed
//! incremental record, the full snapshot it points to, the snapshot partition's size — and
//! how far the app is behind its input.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::message::Message;

use super::topics::InputTopic;
use super::{group_summary, reader, CliError};
use crate::config::AppConfig;
use crate::snapshot::store::{find_latest_incremental, Flow, LatestIncremental, PartitionReader};

/// What one partition looks like.
struct PartitionView {
    partition: i32,
    latest: Option<LatestIncremental>,
    /// The input's last stable offset: where a read_committed consumer ends.
    input_end: i64,
    /// (log start, high watermark) of the snapshot partition.
    snapshot_log: (i64, i64),
    /// When chunk 0 of the referenced full snapshot was written (ms since the epoch).
    full_snapshot_written: Option<i64>,
}

/// Prints the app's state per input partition; a partition that cannot be read is reported
/// on its line and does not stop the others.
pub(super) fn run(
    config: &AppConfig,
    inputs: &[InputTopic],
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let reader = reader(config)?;
    writeln!(
        out,
        "app {} on {}: {}",
        config.app_id,
        config.bootstrap_servers,
        group_summary(config)
    )?;
    let now = now_ms();
    for input in inputs {
        writeln!(
            out,
            "input {} ({} partitions), snapshot topic {}",
            input.name, input.partitions, input.snapshot_topic
        )?;
        if input.snapshot_partitions.is_none() {
            writeln!(
                out,
                "  no snapshot topic: the app has not started on this input"
            )?;
            continue;
        }
        writeln!(
            out,
            "  {:>9} {:>11} {:>9} {:>9} {:>8} {:>10} {:>11} {:>12} {:>14} {:>14} {:>6} {:>12} {:>12}",
            "partition", "next_offset", "input_end", "lag", "txn_seq", "since_base",
            "last_commit", "snapshot_at", "snapshot_input", "snapshot_bytes", "chunks",
            "snapshot_age", "kept_records"
        )?;
        let (mut lag, mut kept) = (0i64, 0i64);
        for partition in 0..input.partitions {
            match view(&reader, input, partition) {
                Ok(view) => {
                    lag += view.lag().unwrap_or(0);
                    kept += view.snapshot_log.1 - view.snapshot_log.0;
                    writeln!(out, "  {}", view.row(now))?;
                }
                Err(error) => writeln!(out, "  {partition:>9} cannot be read: {error}")?,
            }
        }
        writeln!(
            out,
            "  total: lag {lag} offsets; the snapshot topics keep {kept} offsets"
        )?;
    }
    Ok(())
}

fn view(
    reader: &PartitionReader,
    input: &InputTopic,
    partition: i32,
) -> Result<PartitionView, crate::Error> {
    let latest = find_latest_incremental(reader, &input.snapshot_topic, partition)?;
    let input_end = reader.stable_end(&input.name, partition)?;
    let snapshot_log = reader.bounds(&input.snapshot_topic, partition)?;
    let full_snapshot_written = match latest.as_ref().and_then(|l| l.record.base.as_ref()) {
        Some(base) => written_at(
            reader,
            &input.snapshot_topic,
            partition,
            base.first_chunk_offset,
        )?,
        None => None,
    };
    Ok(PartitionView {
        partition,
        latest,
        input_end,
        snapshot_log,
        full_snapshot_written,
    })
}

/// The timestamp of the record at `offset`.
fn written_at(
    reader: &PartitionReader,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<i64>, crate::Error> {
    let mut timestamp = None;
    reader.read(topic, partition, offset, |message| {
        timestamp = message.timestamp().to_millis();
        Ok(Flow::Stop)
    })?;
    Ok(timestamp)
}

impl PartitionView {
    fn lag(&self) -> Option<i64> {
        let latest = self.latest.as_ref()?;
        Some((self.input_end - latest.record.next_input_offset).max(0))
    }

    fn row(&self, now: i64) -> String {
        let dash = || "-".to_owned();
        let kept = self.snapshot_log.1 - self.snapshot_log.0;
        let Some(latest) = &self.latest else {
            return format!(
                "{:>9} {:>11} {:>9} {:>9} {:>8} {:>10} {:>11} {:>12} {:>14} {:>14} {:>6} {:>12} {:>12}",
                self.partition, "-", self.input_end, "-", "-", "-", "never", "-", "-", "-", "-", "-", kept
            );
        };
        let inc = &latest.record;
        let base = inc.base.as_ref();
        format!(
            "{:>9} {:>11} {:>9} {:>9} {:>8} {:>10} {:>11} {:>12} {:>14} {:>14} {:>6} {:>12} {:>12}",
            self.partition,
            inc.next_input_offset,
            self.input_end,
            self.lag().unwrap_or(0),
            inc.transaction_seq,
            inc.records_since_base,
            latest.timestamp.map_or_else(dash, |t| age(now, t)),
            base.map_or_else(dash, |b| b.first_chunk_offset.to_string()),
            base.map_or_else(
                || format!("({})", inc.base_input_offset),
                |b| b.input_offset.to_string()
            ),
            base.map_or_else(dash, |b| b.total_bytes.to_string()),
            base.map_or_else(dash, |b| b.chunk_count.to_string()),
            self.full_snapshot_written
                .map_or_else(dash, |t| age(now, t)),
            kept,
        )
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How long ago `then` was, in the largest whole unit: `42s ago`, `7m ago`, `3h ago`, `2d ago`.
fn age(now: i64, then: i64) -> String {
    let seconds = (now - then).max(0) / 1000;
    let (value, unit) = match seconds {
        s if s < 120 => (s, "s"),
        s if s < 2 * 3600 => (s / 60, "m"),
        s if s < 2 * 86_400 => (s / 3600, "h"),
        s => (s / 86_400, "d"),
    };
    format!("{value}{unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_in_the_largest_whole_unit() {
        assert_eq!(age(10_000, 10_000), "0s ago");
        assert_eq!(age(100_000, 10_000), "90s ago");
        assert_eq!(age(3_600_000, 0), "60m ago");
        assert_eq!(age(3 * 3_600_000, 0), "3h ago");
        assert_eq!(age(5 * 86_400_000, 0), "5d ago");
        // A clock behind the broker's is not a negative age.
        assert_eq!(age(0, 5_000), "0s ago");
    }
}

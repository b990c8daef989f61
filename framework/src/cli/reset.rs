//! `exactly reset`: points every partition of a stopped app at a chosen input offset, with
//! the default state — deliberately reprocessing (or skipping) input.
//!
//! A restart reads its position from the latest committed incremental record on the snapshot
//! partition, not from the group's offsets, so a reset writes one there: "the default state at
//! offset X, nothing processed since" (no full snapshot, no records to replay). Per partition:
//!
//! 1. `init_transactions` with the partition's transactional id: fences a zombie of the app
//!    and aborts a transaction it left open (which would otherwise hide the new record from
//!    read_committed readers until the transaction timeout);
//! 2. `DeleteRecords` up to the end: older snapshots must not be found or trimmed back to;
//! 3. the new incremental record, in a committed transaction.
//!
//! The group's committed offsets are set to the same offsets first, so lag tools agree; the
//! broker refuses that commit while the group has members, which is the last guard against
//! resetting a running app.

use std::io::Write;
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::topics::InputTopic;
use super::{group, reader, CliError};
use crate::config::AppConfig;
use crate::error::Error;
use crate::proto::IncrementalSnapshot;
use crate::snapshot::encode_record;
use crate::snapshot::incremental_record;
use crate::snapshot::store::{find_latest_incremental, PartitionReader};

/// How long each Kafka call of a reset may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the app starts again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// Each input partition's log start.
    Earliest,
    /// Each input partition's end (last stable offset): only input written from now on.
    Latest,
    /// The first record at or after this time (ms since the epoch); the end where none is.
    Timestamp(i64),
}

impl FromStr for ResetTo {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, CliError> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "earliest" => return Ok(ResetTo::Earliest),
            "latest" => return Ok(ResetTo::Latest),
            _ => {}
        }
        if let Ok(ms) = s.parse::<i64>() {
            if ms >= 0 {
                return Ok(ResetTo::Timestamp(ms));
            }
        }
        humantime::parse_rfc3339_weak(s)
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .map(ResetTo::Timestamp)
            .ok_or_else(|| CliError::ResetPosition(s.to_owned()))
    }
}

impl std::fmt::Display for ResetTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetTo::Earliest => f.write_str("earliest"),
            ResetTo::Latest => f.write_str("latest"),
            ResetTo::Timestamp(ms) => {
                write!(f, "the first record at or after {ms} ms since the epoch")
            }
        }
    }
}

/// One partition's move.
struct Move {
    topic: String,
    snapshot_topic: String,
    partition: i32,
    /// Where the app would go on now (None: nothing committed yet).
    from: Option<i64>,
    to: i64,
}

/// Prints the plan; unless `dry_run`, carries it out.
pub(super) fn run(
    config: &AppConfig,
    inputs: &[InputTopic],
    to: ResetTo,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let moves = plan(config, inputs, to)?;
    writeln!(out, "reset of app {} to {to}:", config.app_id)?;
    for m in &moves {
        let from = m.from.map_or_else(|| "-".to_owned(), |o| o.to_string());
        writeln!(
            out,
            "  {}/{}: next offset {from} -> {}",
            m.topic, m.partition, m.to
        )?;
    }
    if let Some(group) = group::describe(config)?.filter(|g| g.members > 0) {
        return Err(CliError::MembersActive {
            group: config.app_id.clone(),
            members: group.members,
        });
    }
    if dry_run {
        writeln!(
            out,
            "dry run: nothing changed; run again without --dry-run to reset"
        )?;
        return Ok(());
    }
    if inputs
        .iter()
        .any(|input| input.snapshot_partitions.is_none())
    {
        create_snapshot_topics(config)?;
    }
    commit_group_offsets(config, &moves)?;
    for m in &moves {
        rewrite_snapshot_partition(config, m)?;
    }
    writeln!(
        out,
        "reset done: {} partitions start at the offsets above with the default state",
        moves.len()
    )?;
    Ok(())
}

fn plan(config: &AppConfig, inputs: &[InputTopic], to: ResetTo) -> Result<Vec<Move>, CliError> {
    let reader = reader(config)?;
    let lookup: BaseConsumer = config
        .consumer_config(false)
        .create()
        .map_err(|source| Error::kafka("creating a consumer", source))?;
    let mut moves = Vec::new();
    for input in inputs {
        for partition in 0..input.partitions {
            let from = match input.snapshot_partitions {
                Some(_) => find_latest_incremental(&reader, &input.snapshot_topic, partition)?
                    .map(|l| l.record.next_input_offset),
                None => None,
            };
            let to = target_offset(&reader, &lookup, &input.name, partition, to)?;
            moves.push(Move {
                topic: input.name.clone(),
                snapshot_topic: input.snapshot_topic.clone(),
                partition,
                from,
                to,
            });
        }
    }
    Ok(moves)
}

fn target_offset(
    reader: &PartitionReader,
    lookup: &BaseConsumer,
    topic: &str,
    partition: i32,
    to: ResetTo,
) -> Result<i64, CliError> {
    let at = match to {
        ResetTo::Earliest => reader.bounds(topic, partition)?.0,
        ResetTo::Latest => reader.stable_end(topic, partition)?,
        ResetTo::Timestamp(ms) => {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(ms))
                .map_err(|source| Error::kafka("looking up offsets by time", source))?;
            let found = lookup
                .offsets_for_times(tpl, CALL_TIMEOUT)
                .map_err(|source| {
                    Error::kafka(format!("looking up {topic}/{partition} by time"), source)
                })?;
            match found.find_partition(topic, partition).map(|e| e.offset()) {
                Some(Offset::Offset(offset)) if offset >= 0 => offset,
                // No record that late: from the end.
                _ => reader.stable_end(topic, partition)?,
            }
        }
    };
    Ok(at)
}

/// Creates the missing snapshot topics as the app would (an app never started on an input can
/// be reset too: it then starts at the chosen offset).
fn create_snapshot_topics(config: &AppConfig) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            context: "starting a runtime to create snapshot topics".into(),
            source,
        })?;
    runtime.block_on(crate::admin::prepare_topics(config))?;
    Ok(())
}

/// Commits the new offsets for the group; the broker refuses while the group has members.
fn commit_group_offsets(config: &AppConfig, moves: &[Move]) -> Result<(), CliError> {
    let mut consumer_config = config.consumer_config(false);
    consumer_config.set("group.id", &config.app_id);
    let consumer: BaseConsumer = consumer_config
        .create()
        .map_err(|source| Error::kafka("creating a consumer", source))?;
    let mut tpl = TopicPartitionList::new();
    for m in moves {
        tpl.add_partition_offset(&m.topic, m.partition, Offset::Offset(m.to))
            .map_err(|source| Error::kafka("committing the group's offsets", source))?;
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => Ok(()),
        Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::StaleMemberEpoch,
        )) => Err(CliError::MembersActive {
            group: config.app_id.clone(),
            members: 0,
        }),
        Err(source) => Err(Error::kafka(
            format!("committing group {}'s offsets", config.app_id),
            source,
        )
        .into()),
    }
}

/// Fences the partition's producer, empties the snapshot partition and commits the record
/// "default state at `m.to`".
fn rewrite_snapshot_partition(config: &AppConfig, m: &Move) -> Result<(), CliError> {
    let transactional_id = config.transactional_id(&m.topic, m.partition);
    let context = |what: &str| {
        format!(
            "{what} ({transactional_id}, {}/{})",
            m.snapshot_topic, m.partition
        )
    };
    let producer: ThreadedProducer<_> = config
        .producer_config(&transactional_id)
        .create()
        .map_err(|source| Error::kafka(context("creating the producer"), source))?;
    producer
        .init_transactions(CALL_TIMEOUT)
        .map_err(|source| Error::kafka(context("fencing the app's producer"), source))?;
    delete_all(config, &m.snapshot_topic, m.partition)?;
    let record = incremental_record(IncrementalSnapshot {
        input_topic: m.topic.clone(),
        input_partition: m.partition,
        next_input_offset: m.to,
        base: None,
        base_input_offset: m.to,
        state_fingerprint: 0,
        state_fingerprint_enabled: false,
        output_digest: 0,
        records_since_base: 0,
        transaction_seq: 0,
        processor_version: 0,
        wall_clock_ticks: Vec::new(),
        ticks_since_base: 0,
        input_topics: Vec::new(),
        next_input_offsets: Vec::new(),
        base_input_offsets: Vec::new(),
        interleaving: Vec::new(),
    });
    let bytes = encode_record(&record);
    producer
        .begin_transaction()
        .map_err(|source| Error::kafka(context("beginning a transaction"), source))?;
    producer
        .send(
            BaseRecord::<(), _>::to(&m.snapshot_topic)
                .partition(m.partition)
                .payload(&bytes),
        )
        .map_err(|(source, _)| Error::kafka(context("writing the reset record"), source))?;
    producer
        .commit_transaction(CALL_TIMEOUT)
        .map_err(|source| Error::kafka(context("committing the reset record"), source))?;
    Ok(())
}

/// `DeleteRecords` of everything on `topic/partition`.
fn delete_all(config: &AppConfig, topic: &str, partition: i32) -> Result<(), CliError> {
    let admin: AdminClient<DefaultClientContext> = config
        .admin_config()
        .create()
        .map_err(|source| Error::kafka("creating the admin client", source))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::End)
        .map_err(|source| Error::kafka("deleting snapshot records", source))?;
    let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
    let context = || format!("deleting the records of {topic}/{partition}");
    let deleted = futures::executor::block_on(admin.delete_records(&tpl, &options))
        .map_err(|source| Error::kafka(context(), source))?;
    match deleted.find_partition(topic, partition).map(|e| e.error()) {
        Some(Ok(())) => Ok(()),
        Some(Err(source)) => Err(Error::kafka(context(), source).into()),
        None => Err(Error::kafka(context(), KafkaError::AdminOp(RDKafkaErrorCode::Fail)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_positions_parse() {
        assert_eq!("earliest".parse::<ResetTo>().ok(), Some(ResetTo::Earliest));
        assert_eq!(" LATEST ".parse::<ResetTo>().ok(), Some(ResetTo::Latest));
        assert_eq!(
            "1700000000000".parse::<ResetTo>().ok(),
            Some(ResetTo::Timestamp(1_700_000_000_000))
        );
        assert_eq!(
            "2026-11-28T12:00:00Z".parse::<ResetTo>().ok(),
            Some(ResetTo::Timestamp(1_795_867_200_000))
        );
        assert!("yesterday".parse::<ResetTo>().is_err());
        assert!("-5".parse::<ResetTo>().is_err());
    }
}

//! Trimming: snapshot topics stay bounded.
//!
//! Once the incremental record pointing at a full snapshot has committed, every record of the
//! snapshot partition below that snapshot's first chunk is garbage: older full snapshots, the
//! incremental records that point at them, chunks of attempts cut short. Recovery reads the
//! last committed incremental record, which is the pointer or a later record with the same
//! base (or a newer one), so it never needs them. They are deleted with `DeleteRecords`.
//!
//! A zombie that trims late cannot hurt its successor: it only knows snapshots it committed
//! before it was fenced, and its successor's base is one of those or a newer one.
//!
//! Trimming is housekeeping off the commit path: workers hand requests to one thread per app,
//! which merges them (the highest offset per partition wins). A failed trim is logged with
//! what to do and counted; the next full snapshot of the partition trims again, further.

use std::collections::{BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::AppConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// How long one `DeleteRecords` may take before it counts as failed.
const DELETE_TIMEOUT: Duration = Duration::from_secs(30);

/// Deletes snapshot-topic records below committed full snapshots, in the background.
pub(crate) struct Trimmer {
    requests: Mutex<Sender<Trim>>,
}

/// Delete everything below `before` on `topic/partition`.
#[derive(Debug)]
struct Trim {
    topic: String,
    partition: i32,
    before: i64,
}

impl Trimmer {
    /// Starts the trimming thread; it ends once the trimmer is dropped and its requests done.
    pub(crate) fn start(config: &AppConfig, metrics: Metrics) -> Result<Trimmer, Error> {
        let admin: AdminClient<DefaultClientContext> = config
            .admin_config()
            .create()
            .map_err(|source| Error::kafka("creating the snapshot trimming client", source))?;
        let (requests, pending) = mpsc::channel();
        std::thread::Builder::new()
            .name("exactly-trim".into())
            .spawn(move || serve(&admin, &pending, &metrics))
            .map_err(|source| Error::Io {
                context: "starting the snapshot trimming thread".into(),
                source,
            })?;
        Ok(Trimmer {
            requests: Mutex::new(requests),
        })
    }

    /// Asks for the records of `topic/partition` below `before` (the first chunk of a full
    /// snapshot whose pointer committed) to be deleted.
    pub(crate) fn trim(&self, topic: &str, partition: i32, before: i64) {
        if before <= 0 {
            return;
        }
        let request = Trim {
            topic: topic.to_owned(),
            partition,
            before,
        };
        let sender = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        // The thread only ends when the sender is gone; a send cannot fail before that.
        let _ = sender.send(request);
    }
}

/// The trimming thread: waits for a request, takes every other one queued meanwhile, and
/// deletes them all in one request.
fn serve(admin: &AdminClient<DefaultClientContext>, pending: &Receiver<Trim>, metrics: &Metrics) {
    while let Ok(first) = pending.recv() {
        let batch = merge(std::iter::once(first).chain(pending.try_iter()));
        delete(admin, &batch, metrics);
    }
}

/// The highest offset asked for per partition.
fn merge(requests: impl Iterator<Item = Trim>) -> HashMap<(String, i32), i64> {
    let mut batch: HashMap<(String, i32), i64> = HashMap::new();
    for Trim {
        topic,
        partition,
        before,
    } in requests
    {
        let offset = batch.entry((topic, partition)).or_insert(before);
        *offset = (*offset).max(before);
    }
    batch
}

/// Deletes below the offsets of `batch`. librdkafka sends DeleteRecords to the leaders in its
/// metadata cache and does not refresh it when one answers that it no longer leads, so after a
/// leader change every trim of that partition would fail until the periodic refresh (5
/// minutes): the partitions that failed are retried once, right after a metadata request for
/// their topics (which updates the cache).
fn delete(
    admin: &AdminClient<DefaultClientContext>,
    batch: &HashMap<(String, i32), i64>,
    metrics: &Metrics,
) {
    let failed = attempt(admin, batch, metrics);
    if failed.is_empty() {
        return;
    }
    let topics: BTreeSet<&str> = failed.keys().map(|(topic, _)| topic.as_str()).collect();
    for topic in topics {
        if let Err(error) = admin.inner().fetch_metadata(Some(topic), DELETE_TIMEOUT) {
            tracing::debug!(topic, %error, "metadata refresh before a trim retry failed");
        }
    }
    let retry: HashMap<(String, i32), i64> =
        failed.keys().map(|key| (key.clone(), batch[key])).collect();
    for ((topic, partition), error) in attempt(admin, &retry, metrics) {
        report_failure(
            &topic,
            partition,
            retry[&(topic.clone(), partition)],
            &error,
            metrics,
        );
    }
}

/// One DeleteRecords request for `batch`; the partitions it failed for, with their errors.
fn attempt(
    admin: &AdminClient<DefaultClientContext>,
    batch: &HashMap<(String, i32), i64>,
    metrics: &Metrics,
) -> HashMap<(String, i32), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), before) in batch {
        if let Err(error) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*before)) {
            tracing::warn!(topic = %topic, partition, before, %error, "cannot ask to trim a snapshot partition");
        }
    }
    let options = AdminOptions::new().operation_timeout(Some(DELETE_TIMEOUT));
    let deleted = match futures::executor::block_on(admin.delete_records(&tpl, &options)) {
        Ok(deleted) => deleted,
        Err(error) => {
            return batch
                .keys()
                .map(|key| (key.clone(), error.clone()))
                .collect()
        }
    };
    let mut failed = HashMap::new();
    for element in deleted.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        match element.error() {
            Ok(()) => {
                metrics.snapshot_trimmed();
                let before = batch.get(&(topic.to_owned(), partition)).copied();
                tracing::debug!(topic, partition, before, "snapshot partition trimmed");
            }
            Err(error) => {
                failed.insert((topic.to_owned(), partition), error);
            }
        }
    }
    failed
}

fn report_failure(topic: &str, partition: i32, before: i64, error: &KafkaError, metrics: &Metrics) {
    metrics.snapshot_trim_failed();
    let fix = match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
            "grant the app's principal DELETE on its snapshot topics, or turn trimming off (AppConfig::snapshot_trimming)"
        }
        _ => "the next full snapshot of the partition trims again",
    };
    tracing::warn!(topic, partition, before, %error, fix, "trimming a snapshot partition failed; the topic keeps its old snapshots for now");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trim(topic: &str, partition: i32, before: i64) -> Trim {
        Trim {
            topic: topic.to_owned(),
            partition,
            before,
        }
    }

    #[test]
    fn requests_merge_to_the_highest_offset_per_partition() {
        let batch = merge(
            [
                trim("a", 0, 40),
                trim("a", 1, 7),
                trim("a", 0, 90),
                trim("b", 0, 3),
                // A late request (a zombie's, or reordered) never moves a trim back.
                trim("a", 0, 60),
            ]
            .into_iter(),
        );
        assert_eq!(batch.len(), 3);
        assert_eq!(batch[&("a".to_owned(), 0)], 90);
        assert_eq!(batch[&("a".to_owned(), 1)], 7);
        assert_eq!(batch[&("b".to_owned(), 0)], 3);
    }
}

//! Topic checks before an app starts: the input topics must exist, and each input topic's
//! snapshot topic must have the same partition count (partition p of the snapshot topic holds
//! the snapshots of input partition p) and a configuration that keeps every snapshot record
//! (not compacted, records as large as a chunk accepted). A missing snapshot topic is created
//! with explicit configs, never the cluster's defaults.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use rdkafka::ClientConfig;

use crate::config::AppConfig;
use crate::error::Error;
use crate::security::ProblemWatch;
use crate::snapshot::store::destroy_in_background;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly created snapshot topic may take to show up in the metadata.
const CREATE_VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Partition count and replication factor of a topic; None if it does not exist.
fn describe(metadata: &Metadata, topic: &str) -> Option<(usize, usize)> {
    let t = metadata.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    let replication = t
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .max()
        .unwrap_or(1)
        .max(1);
    Some((t.partitions().len(), replication))
}

/// How long start-up retries a metadata request that fails for a reason that may pass (a
/// broker restarting or slow under load); each attempt waits up to [`METADATA_TIMEOUT`].
const METADATA_RETRY_BUDGET: Duration = Duration::from_secs(60);

/// Cluster metadata, retried with backoff for up to [`METADATA_RETRY_BUDGET`]: one slow
/// answer must not stop a service (a wrong address or credentials still fail, after the
/// budget, with the client's error and a warning per attempt meanwhile).
async fn fetch_metadata(config: &AppConfig) -> Result<Metadata, Error> {
    let deadline = Instant::now() + METADATA_RETRY_BUDGET;
    let mut backoff = Duration::from_millis(200);
    loop {
        match fetch_metadata_once(config).await {
            Err(error) if error.is_transient() && Instant::now() + backoff < deadline => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, brokers = %config.bootstrap_servers, "cluster metadata unavailable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            outcome => return outcome,
        }
    }
}

async fn fetch_metadata_once(config: &AppConfig) -> Result<Metadata, Error> {
    let client_config = config.admin_config();
    let brokers = config.bootstrap_servers.clone();
    tokio::task::spawn_blocking(move || metadata(&client_config, &brokers, METADATA_TIMEOUT))
        .await
        .map_err(|_| Error::RuntimeStopped)?
}

/// Cluster metadata through a new client of `client_config`. When the cluster refuses the
/// connection (authentication, TLS, a protocol mismatch), [`Error::Connection`] as soon as
/// the client reports it, not after `timeout`. Blocking.
pub(crate) fn metadata(
    client_config: &ClientConfig,
    brokers: &str,
    timeout: Duration,
) -> Result<Metadata, Error> {
    let consumer: BaseConsumer<ProblemWatch> = client_config
        .create_with_context(ProblemWatch::default())
        .map_err(|source| Error::kafka("creating a metadata client", source))?;
    let deadline = Instant::now() + timeout;
    loop {
        let slice = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        let failed = match consumer.fetch_metadata(None, slice) {
            Ok(metadata) => return Ok(metadata),
            Err(error) => error,
        };
        // Error events reach the context only when the client's queue is served.
        for _ in 0..64 {
            if consumer.poll(Duration::ZERO).is_none() {
                break;
            }
        }
        if let Some(problem) = consumer.context().problem() {
            return Err(Error::Connection {
                brokers: brokers.to_owned(),
                what: problem.what.to_owned(),
                detail: problem.detail,
                fix: problem.fix.to_owned(),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::kafka("fetching cluster metadata", failed));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks the input topics and creates missing snapshot topics. A step that fails for a
/// transient reason (a request timed out during a broker outage) is retried, all steps again,
/// for up to [`METADATA_RETRY_BUDGET`]; a wrong setting, a missing ACL or topic fails at once.
pub(crate) async fn prepare_topics(config: &AppConfig) -> Result<(), Error> {
    let deadline = Instant::now() + METADATA_RETRY_BUDGET;
    let mut backoff = Duration::from_millis(200);
    loop {
        match prepare_topics_once(config).await {
            Err(error) if error.is_transient() && Instant::now() + backoff < deadline => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "checking the topics failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            outcome => return outcome,
        }
    }
}

async fn prepare_topics_once(config: &AppConfig) -> Result<(), Error> {
    let metadata = fetch_metadata(config).await?;
    let mut to_create: Vec<(String, usize, usize)> = Vec::new();
    let mut to_check: Vec<String> = Vec::new();
    let mut counts = Vec::new();
    for input in &config.input_topics {
        let Some((partitions, replication)) = describe(&metadata, input) else {
            return Err(Error::TopicNotFound {
                topic: input.clone(),
            });
        };
        counts.push((input.as_str(), partitions));
        if config.unit_inputs(input).first() != Some(input) {
            // A co-partitioned input whose units are named (and snapshotted) by the first.
            continue;
        }
        let snapshot_topic = config.snapshot_topic(input);
        match describe(&metadata, &snapshot_topic) {
            Some((actual, _)) if actual != partitions => {
                return Err(Error::SnapshotTopicPartitions {
                    snapshot_topic,
                    input_topic: input.clone(),
                    expected: partitions,
                    actual,
                })
            }
            Some(_) => to_check.push(snapshot_topic),
            None => to_create.push((snapshot_topic, partitions, replication)),
        }
    }
    if config.co_partitioned && counts.iter().any(|(_, n)| *n != counts[0].1) {
        let counts = counts
            .iter()
            .map(|(topic, n)| format!("{topic}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::NotCoPartitioned { counts });
    }
    let admin: AdminClient<DefaultClientContext> = config
        .admin_config()
        .create()
        .map_err(|source| Error::kafka("creating the admin client", source))?;
    let outcome = check_and_create(config, &admin, &to_check, &to_create).await;
    // Dropping an admin client waits for its polling thread's next 100 ms poll to end.
    destroy_in_background(admin);
    outcome
}

/// Checks the existing snapshot topics' settings and creates the missing ones, until they are
/// visible with the right partition counts.
async fn check_and_create(
    config: &AppConfig,
    admin: &AdminClient<DefaultClientContext>,
    to_check: &[String],
    to_create: &[(String, usize, usize)],
) -> Result<(), Error> {
    check_snapshot_topic_configs(config, admin, to_check).await?;
    if to_create.is_empty() {
        return Ok(());
    }
    let max_message_bytes = snapshot_max_message_bytes(config).to_string();
    let new_topics: Vec<NewTopic<'_>> = to_create
        .iter()
        .map(|(name, partitions, replication)| {
            NewTopic::new(
                name,
                *partitions as i32,
                TopicReplication::Fixed(*replication as i32),
            )
            // Offsets in the snapshot records point into this topic: it must not be compacted,
            // and time/size retention must not delete the latest snapshot (see README).
            .set("cleanup.policy", "delete")
            .set("retention.ms", "-1")
            .set("retention.bytes", "-1")
            // A chunk and its envelope always fit, whatever the cluster's default.
            .set("max.message.bytes", &max_message_bytes)
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|source| Error::kafka("creating snapshot topics", source))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic = %topic, "created snapshot topic"),
            // Another instance created it first; its partition count is checked below.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::kafka(
                    format!("creating snapshot topic {topic}"),
                    rdkafka::error::KafkaError::AdminOp(code),
                ))
            }
        }
    }
    // Wait until the new topics are visible with the right partition count.
    let deadline = Instant::now() + CREATE_VISIBLE_TIMEOUT;
    loop {
        let metadata = fetch_metadata(config).await?;
        let mut all_ready = true;
        for (name, partitions, _) in to_create {
            match describe(&metadata, name) {
                Some((actual, _)) if actual == *partitions => {}
                Some((actual, _)) => {
                    let input_topic = config
                        .input_topics
                        .iter()
                        .find(|t| config.snapshot_topic(t) == *name)
                        .cloned()
                        .unwrap_or_default();
                    return Err(Error::SnapshotTopicPartitions {
                        snapshot_topic: name.clone(),
                        input_topic,
                        expected: *partitions,
                        actual,
                    });
                }
                None => all_ready = false,
            }
        }
        if all_ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::TopicNotFound {
                topic: to_create
                    .first()
                    .map(|(n, _, _)| n.clone())
                    .unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `max.message.bytes` of a created snapshot topic: Kafka's default (1 MiB + 12), or more when
/// chunks are configured larger.
fn snapshot_max_message_bytes(config: &AppConfig) -> usize {
    config
        .snapshot_record_max_bytes()
        .max(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)
}

/// Kafka's default topic `max.message.bytes`.
const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// Checks existing snapshot topics' configs: compaction would delete snapshot records that
/// later records point at, and a `max.message.bytes` below a chunk's size would refuse every
/// full snapshot (each attempt aborting its transaction).
async fn check_snapshot_topic_configs(
    config: &AppConfig,
    admin: &AdminClient<DefaultClientContext>,
    topics: &[String],
) -> Result<(), Error> {
    if topics.is_empty() {
        return Ok(());
    }
    let resources: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
    let results = admin
        .describe_configs(resources.iter(), &options)
        .await
        .map_err(|source| Error::kafka("describing the snapshot topics' configs", source))?;
    for (topic, result) in topics.iter().zip(results) {
        let resource = result.map_err(|code| {
            Error::kafka(
                format!("describing the configs of snapshot topic {topic}"),
                rdkafka::error::KafkaError::AdminOp(code),
            )
        })?;
        let value = |name: &str| {
            resource
                .get(name)
                .and_then(|entry| entry.value.clone())
                .unwrap_or_default()
        };
        check_snapshot_topic_config(
            config,
            topic,
            &value("cleanup.policy"),
            &value("max.message.bytes"),
        )?;
        let retention = value("retention.ms");
        if !retention.is_empty() && retention != "-1" {
            tracing::warn!(topic = %topic, retention_ms = %retention, "snapshot topic has a time retention: the latest full snapshot must be younger than it, or recovery fails; set retention.ms=-1 (exactly trims snapshot topics itself)");
        }
    }
    Ok(())
}

/// The rules of [`check_snapshot_topic_configs`] for one topic's values.
fn check_snapshot_topic_config(
    config: &AppConfig,
    topic: &str,
    cleanup_policy: &str,
    max_message_bytes: &str,
) -> Result<(), Error> {
    let problem = |setting: &str, value: &str, fix: String| Error::SnapshotTopicConfig {
        topic: topic.to_owned(),
        setting: setting.to_owned(),
        value: value.to_owned(),
        fix,
    };
    if cleanup_policy.split(',').any(|p| p.trim() == "compact") {
        return Err(problem(
            "cleanup.policy",
            cleanup_policy,
            format!("compaction deletes snapshot records that later records point at; set cleanup.policy=delete (kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=delete)"),
        ));
    }
    let needed = config.snapshot_record_max_bytes();
    if let Ok(bytes) = max_message_bytes.trim().parse::<usize>() {
        if bytes < needed {
            return Err(problem(
                "max.message.bytes",
                max_message_bytes,
                format!("snapshot chunks need records of up to {needed} bytes (max_chunk_bytes plus envelope); raise the topic's max.message.bytes to at least {needed}, or lower AppConfig::max_chunk_bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AppConfig {
        AppConfig::new("app", "localhost:9092").input_topic("in")
    }

    #[test]
    fn compacted_snapshot_topics_are_refused() {
        let error =
            check_snapshot_topic_config(&config(), "app.in.snapshots", "compact,delete", "1048588")
                .unwrap_err()
                .to_string();
        assert!(error.contains("cleanup.policy=compact,delete"), "{error}");
        assert!(error.contains("set cleanup.policy=delete"), "{error}");
    }

    #[test]
    fn too_small_records_are_refused_with_the_size_needed() {
        let needed = config().snapshot_record_max_bytes();
        let error =
            check_snapshot_topic_config(&config(), "t", "delete", &(needed - 1).to_string())
                .unwrap_err()
                .to_string();
        assert!(error.contains(&format!("at least {needed}")), "{error}");
        assert!(check_snapshot_topic_config(&config(), "t", "delete", &needed.to_string()).is_ok());
    }

    #[test]
    fn created_topics_take_at_least_kafkas_default_record_size() {
        assert_eq!(
            snapshot_max_message_bytes(&config()),
            KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        );
        let big = config().max_chunk_bytes(4 << 20);
        assert_eq!(
            snapshot_max_message_bytes(&big),
            big.snapshot_record_max_bytes()
        );
    }
}

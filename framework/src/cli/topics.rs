//! Which input topics an app reads, how many partitions each has, and their snapshot topics:
//! given on the command line, or found from the snapshot topics the app created.

use std::time::Duration;

use rdkafka::metadata::Metadata;

use super::CliError;
use crate::config::AppConfig;
use crate::error::Error;

/// How long the first request to the cluster may take: a tool run by hand should say "no
/// connection" within seconds, not retry for a minute like a service does.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// One input topic of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct InputTopic {
    pub(super) name: String,
    pub(super) partitions: i32,
    pub(super) snapshot_topic: String,
    /// `None`: the snapshot topic does not exist (the app never started on this input).
    pub(super) snapshot_partitions: Option<i32>,
}

/// The app's input topics: `config.input_topics` when given, else every topic whose snapshot
/// topic (by `config.snapshot_topic_pattern`) exists. Fills `config.input_topics` in.
pub(super) fn resolve(config: &mut AppConfig) -> Result<Vec<InputTopic>, CliError> {
    let metadata = fetch_metadata(config)?;
    let partitions_of = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| i32::try_from(t.partitions().len()).unwrap_or(i32::MAX))
    };
    if config.input_topics.is_empty() {
        let names = metadata.topics().iter().map(|t| t.name());
        config.input_topics = discover(&config.snapshot_topic_pattern, &config.app_id, names)
            .into_iter()
            .filter(|input| partitions_of(input).is_some())
            .collect();
        if config.input_topics.is_empty() {
            return Err(CliError::AppNotFound {
                app: config.app_id.clone(),
                brokers: config.bootstrap_servers.clone(),
                pattern: config
                    .snapshot_topic_pattern
                    .replace("{app}", &config.app_id),
            });
        }
    }
    config
        .input_topics
        .iter()
        .map(|name| {
            let partitions = partitions_of(name).ok_or_else(|| Error::TopicNotFound {
                topic: name.clone(),
            })?;
            let snapshot_topic = config.snapshot_topic(name);
            Ok(InputTopic {
                name: name.clone(),
                partitions,
                snapshot_partitions: partitions_of(&snapshot_topic),
                snapshot_topic,
            })
        })
        .collect()
}

fn fetch_metadata(config: &AppConfig) -> Result<Metadata, CliError> {
    let client_config = config.consumer_config(false);
    match crate::admin::metadata(&client_config, &config.bootstrap_servers, METADATA_TIMEOUT) {
        Ok(metadata) => Ok(metadata),
        Err(Error::Kafka { source, .. }) => Err(CliError::NoConnection {
            brokers: config.bootstrap_servers.clone(),
            source: *source,
        }),
        Err(other) => Err(other.into()),
    }
}

/// Input topic names whose snapshot topic, by `pattern` for `app`, is among `names`, sorted.
fn discover<'a>(pattern: &str, app: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let pattern = pattern.replace("{app}", app);
    let Some((prefix, suffix)) = pattern.split_once("{topic}") else {
        return Vec::new();
    };
    let mut inputs: Vec<String> = names
        .filter_map(|name| name.strip_prefix(prefix)?.strip_suffix(suffix))
        .filter(|input| !input.is_empty())
        .map(str::to_owned)
        .collect();
    inputs.sort();
    inputs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_topics_are_found_through_their_snapshot_topics() {
        let names = [
            "payments",
            "ledger.payments.snapshots",
            "ledger.refunds.snapshots",
            "other.payments.snapshots",
            "ledger..snapshots",
        ];
        let found = discover("{app}.{topic}.snapshots", "ledger", names.into_iter());
        assert_eq!(found, ["payments", "refunds"]);
        let found = discover("snap-{app}-{topic}", "a", ["snap-a-in", "x"].into_iter());
        assert_eq!(found, ["in"]);
    }
}

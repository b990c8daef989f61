//! Creating the example topics (the demo's and the benchmark's), on any cluster.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// Creates `topics` with `partitions` partitions each (replication 1) and topic `config`
/// (e.g. `retention.ms`), unless they exist, and waits until the metadata lists every
/// partition with a leader.
pub async fn create_topics(
    bootstrap: &str,
    topics: &[&str],
    partitions: i32,
    config: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating the admin client")?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            config.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(1)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("creating topic {topic} on {bootstrap}: {code}"),
        }
    }
    // Wait until metadata lists every partition with a leader.
    let bootstrap = bootstrap.to_owned();
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for topic in &topics {
            loop {
                let ready = consumer
                    .fetch_metadata(Some(topic), Duration::from_secs(5))
                    .map(|m| {
                        m.topics().iter().any(|t| {
                            t.name() == topic
                                && t.error().is_none()
                                && t.partitions().len() == partitions as usize
                                && t.partitions().iter().all(|p| p.leader() >= 0)
                        })
                    })
                    .unwrap_or(false);
                if ready {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("topic {topic} did not appear with {partitions} partitions on {bootstrap} within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    })
    .await?
}

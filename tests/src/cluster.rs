//! [`TestCluster`]: a nisshi broker with the read-committed proxy in front of it, the way
//! every integration test talks to Kafka.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::broker::Broker;
use crate::error::HarnessError;
use crate::proxy::Proxy;

/// How long [`TestCluster::create_topic`] waits for the topic to show up in metadata.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A broker and the proxy in front of it. Clients must use [`TestCluster::bootstrap_servers`]
/// (the proxy); [`Broker::address`] is for tests that want to see the bare broker.
///
/// ```no_run
/// # async fn demo() -> Result<(), exactly_tests::HarnessError> {
/// use exactly_tests::cluster::{unique_name, TestCluster};
/// let cluster = TestCluster::start().await?;
/// let topic = unique_name("input");
/// cluster.create_topic(&topic, 3).await?;
/// let config = cluster.client_config(); // bootstrap.servers = the proxy
/// # let _ = config; Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestCluster {
    /// The nisshi process.
    pub broker: Broker,
    /// The read-committed proxy in front of it.
    pub proxy: Proxy,
}

impl TestCluster {
    /// Starts a broker and a proxy for it.
    pub async fn start() -> Result<TestCluster, HarnessError> {
        let broker = Broker::start().await?;
        let proxy = Proxy::start(broker.address()).await?;
        Ok(TestCluster { broker, proxy })
    }

    /// `bootstrap.servers` for clients: the proxy's address.
    pub fn bootstrap_servers(&self) -> String {
        self.proxy.address().to_string()
    }

    /// A client config with `bootstrap.servers` set to the proxy.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap_servers());
        config
    }

    /// Creates `name` with `partitions` partitions (replication 1) and waits until the
    /// broker's metadata lists every partition.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<(), HarnessError> {
        self.create_topic_with_config(name, partitions, &[]).await
    }

    /// Like [`TestCluster::create_topic`], with topic configs (e.g. `retention.ms`).
    pub async fn create_topic_with_config(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let context = || format!("creating topic {name} with {partitions} partitions");
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .map_err(|e| HarnessError::kafka(context(), e))?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in config {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .map_err(|e| HarnessError::kafka(context(), e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(HarnessError::kafka(
                        context(),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        self.wait_for_topic(name, partitions).await
    }

    /// Polls metadata (through the proxy) until `name` has `partitions` partitions with a
    /// leader.
    pub async fn wait_for_topic(&self, name: &str, partitions: i32) -> Result<(), HarnessError> {
        let config = self.client_config();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| HarnessError::kafka(format!("metadata client for topic {name}"), e))?;
            let started = Instant::now();
            loop {
                if let Ok(metadata) = consumer.fetch_metadata(Some(&name), Duration::from_secs(5)) {
                    let ready = metadata.topics().iter().any(|t| {
                        t.name() == name
                            && t.error().is_none()
                            && t.partitions().len() == partitions as usize
                            && t.partitions().iter().all(|p| p.leader() >= 0)
                    });
                    if ready {
                        return Ok(());
                    }
                }
                if started.elapsed() > TOPIC_READY_TIMEOUT {
                    return Err(HarnessError::Timeout {
                        what: format!("topic {name} with {partitions} partitions in metadata"),
                        waited: started.elapsed(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .map_err(|e| HarnessError::Timeout {
            what: format!("metadata task failed: {e}"),
            waited: Duration::ZERO,
        })?
    }

    /// Restarts the broker on the same port and forgets the proxy's transaction index.
    /// Memory storage: **all data is lost** (topics must be created again).
    pub async fn restart_broker(&mut self) -> Result<(), HarnessError> {
        self.proxy.drop_connections();
        self.broker.restart().await?;
        self.proxy.reset_index();
        Ok(())
    }
}

/// A name unique across parallel tests and processes: `<prefix>-<pid>-<counter>-<random>`.
/// Use it for every topic, group id and transactional id a test creates.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random: u32 = rand::random();
    format!("{prefix}-{}-{counter}-{random:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("t-{}-", std::process::id())));
    }
}

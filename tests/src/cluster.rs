//! [`TestCluster`]: a local Apache Kafka with the fault-injecting proxy in front of it, the way
//! every integration test talks to Kafka.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::error::HarnessError;
use crate::kafka::{self, ClusterOptions, KafkaCluster, SharedCluster};
use crate::proxy::Proxy;

/// How long [`TestCluster::create_topic`] waits for the topic to show up in metadata.
const TOPIC_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`TestCluster::create_topic`] retries a creation that timed out: a cluster whose
/// controller was just killed needs a new one elected and the brokers re-registered, which on
/// a loaded 2-core machine took longer than 30 s.
const TOPIC_CREATE_RETRY: Duration = Duration::from_secs(120);

/// A local Kafka and a proxy in front of it. Clients use [`TestCluster::bootstrap_servers`]
/// (the proxy, so a test can inject network faults); [`TestCluster::direct_bootstrap_servers`]
/// reaches the brokers themselves.
///
/// [`TestCluster::start`] shares this process's single-node Kafka (a JVM starts in seconds) and
/// gives the test a proxy of its own; [`TestCluster::start_owned`] starts a cluster the test
/// owns, for tests that stop, kill or restart brokers.
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
    kafka: SharedCluster,
    owned: bool,
    direct_bootstrap: String,
    replication_factor: i32,
    /// The fault-injecting proxy in front of the brokers.
    pub proxy: Proxy,
}

impl TestCluster {
    /// The process's shared single-node Kafka (started on first use) behind a new proxy.
    pub async fn start() -> Result<TestCluster, HarnessError> {
        let kafka = blocking(kafka::shared).await?;
        TestCluster::with_proxy(kafka, false).await
    }

    /// A Kafka cluster of the test's own (stopped with it) behind a new proxy.
    pub async fn start_owned(options: ClusterOptions) -> Result<TestCluster, HarnessError> {
        let kafka = blocking(move || KafkaCluster::start(options)).await?;
        TestCluster::with_proxy(std::sync::Arc::new(std::sync::Mutex::new(kafka)), true).await
    }

    async fn with_proxy(kafka: SharedCluster, owned: bool) -> Result<TestCluster, HarnessError> {
        let (addresses, replication_factor) = {
            let cluster = lock(&kafka);
            let addresses: Vec<_> = cluster.nodes().iter().map(|n| n.address()).collect();
            (addresses, cluster.options().replication_factor() as i32)
        };
        let direct_bootstrap = addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let proxy = Proxy::start_cluster(&addresses).await?;
        Ok(TestCluster {
            kafka,
            owned,
            direct_bootstrap,
            replication_factor,
            proxy,
        })
    }

    /// The Kafka cluster (lock it to read node state or, when owned, to stop and start nodes).
    pub fn kafka(&self) -> &SharedCluster {
        &self.kafka
    }

    /// `bootstrap.servers` of the brokers themselves, bypassing the proxy.
    pub fn direct_bootstrap_servers(&self) -> String {
        self.direct_bootstrap.clone()
    }

    /// Replication factor of topics the harness creates: 1 on one node, 3 on three.
    pub fn replication_factor(&self) -> i32 {
        self.replication_factor
    }

    /// Runs `change` on the owned cluster off the reactor (node stops and starts block for
    /// seconds). Refused on the shared cluster, which other tests use.
    pub async fn with_owned_kafka<T: Send + 'static>(
        &self,
        change: impl FnOnce(&mut KafkaCluster) -> Result<T, HarnessError> + Send + 'static,
    ) -> Result<T, HarnessError> {
        if !self.owned {
            return Err(HarnessError::KafkaUnavailable(
                "this test shares its process's Kafka: start it with TestCluster::start_owned \
                 to stop, kill or restart brokers"
                    .into(),
            ));
        }
        let kafka = self.kafka.clone();
        blocking(move || change(&mut lock(&kafka))).await
    }

    /// `bootstrap.servers` for clients: the proxy's listeners (one per broker).
    pub fn bootstrap_servers(&self) -> String {
        self.proxy.bootstrap_servers()
    }

    /// A client config with `bootstrap.servers` set to the proxy.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", self.bootstrap_servers());
        config
    }

    /// Creates `name` with `partitions` partitions (replicated on every node, at most 3) and waits until the
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
        let mut topic = NewTopic::new(
            name,
            partitions,
            TopicReplication::Fixed(self.replication_factor),
        );
        for (key, value) in config {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(20)));
        // A cluster electing a new controller (a node was just killed) times requests out
        // for a while, the whole request (no answer in time) or the topic's operation: retry
        // those until the topic deadline, fail on anything else. Each attempt with a new
        // client: librdkafka sends CreateTopics to the controller id of its first metadata
        // answer, which can name the killed node (not fenced yet), and keeps waiting for it.
        let started = Instant::now();
        loop {
            let admin: AdminClient<DefaultClientContext> = self
                .client_config()
                .create()
                .map_err(|e| HarnessError::kafka(context(), e))?;
            let failure = match admin.create_topics([&topic], &options).await {
                Ok(results) => results.into_iter().find_map(|result| match result {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                    Err((_, code)) => Some(code),
                }),
                Err(rdkafka::error::KafkaError::AdminOp(code)) => Some(code),
                Err(e) => return Err(HarnessError::kafka(context(), e)),
            };
            match failure {
                None => break,
                Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut)
                    if started.elapsed() < TOPIC_CREATE_RETRY => {}
                Some(code) => {
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

    /// Crashes node `id` (SIGKILL) of an owned cluster; its data stays on disk.
    pub async fn kill_broker(&self, id: u32) -> Result<(), HarnessError> {
        self.with_owned_kafka(move |kafka| kafka.kill_node(id))
            .await
    }

    /// Controlled shutdown (SIGTERM) of node `id` of an owned cluster; data survives.
    pub async fn stop_broker(&self, id: u32) -> Result<(), HarnessError> {
        self.with_owned_kafka(move |kafka| kafka.stop_node(id))
            .await
    }

    /// Starts node `id` of an owned cluster again (same port, same data) and waits until it
    /// serves.
    pub async fn start_broker(&self, id: u32) -> Result<(), HarnessError> {
        self.with_owned_kafka(move |kafka| kafka.start_node(id))
            .await
    }

    /// Controlled restart of node `id` of an owned cluster; data survives.
    pub async fn restart_broker(&self, id: u32) -> Result<(), HarnessError> {
        self.with_owned_kafka(move |kafka| kafka.restart_node(id))
            .await
    }
}

/// Runs blocking harness work (JVM starts, node stops) off the reactor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, HarnessError> + Send + 'static,
) -> Result<T, HarnessError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| HarnessError::KafkaUnavailable(format!("a harness task failed: {e}")))?
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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

//! The local Apache Kafka every test, the demo, the chaos suite and the bench run against.
//!
//! [`KafkaCluster::start`] runs Apache Kafka 4.4.0 (KRaft, every node a combined broker and
//! controller) from jars that [`install`] fetches once with Maven into the cache directory.
//! One node for most tests; three ([`ClusterOptions::three_nodes`]: replication factor 3,
//! `min.insync.replicas` 2) for broker-failure chaos. Nodes can be stopped (controlled
//! shutdown), killed (SIGKILL: a crash, their data stays on disk) and started again on the same
//! ports with the same data.
//!
//! A JVM takes seconds to start, so tests of one process share one single-node cluster
//! ([`shared`]); each test still owns its topics and group ids. A test that stops, kills or
//! restarts a node starts a cluster of its own.
//!
//! The harness only ever signals the JVMs it started, and every JVM dies with the process that
//! started it (`PR_SET_PDEATHSIG`), so a killed test leaks none. Each cluster lives in
//! `$TMPDIR/exactly-kafka-*`: a node's `kafka.log` is kept (errors name it); the data of a
//! cluster whose process is gone is deleted by the next cluster that starts.
//!
//! ```no_run
//! # fn demo() -> Result<(), exactly_tests::HarnessError> {
//! use exactly_tests::kafka::{ClusterOptions, KafkaCluster};
//! let mut kafka = KafkaCluster::start(ClusterOptions::default())?;
//! println!("bootstrap.servers={}", kafka.bootstrap_servers());
//! kafka.kill_node(1)?; // crash
//! kafka.start_node(1)?; // same port, same data
//! # Ok(()) }
//! ```

pub mod acl;
pub mod inspect;
pub mod install;
mod node;
pub mod security;

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::error::HarnessError;
pub use install::{cache_dir, installation, KAFKA_VERSION};
pub use node::KafkaNode;
use node::NodePorts;

/// How long a start waits for the nodes to serve metadata.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Prefix of every cluster's directory under the temp dir.
const DIR_PREFIX: &str = "exactly-kafka-";

/// How a [`KafkaCluster`] is set up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes, each a broker and a controller (1 or 3).
    pub nodes: u32,
    /// Maximum heap of each node's JVM (`-Xmx`).
    pub heap: String,
    /// Extra `server.properties` lines, applied after the defaults (later lines win).
    pub broker_config: Vec<(String, String)>,
    /// Broker ports of the nodes in id order; empty (the default): free ports.
    pub broker_ports: Vec<u16>,
    /// Also listen with SASL, SSL and mTLS, and authorize with ACLs ([`security`]).
    pub secured: bool,
    /// The JVM settings of the nodes.
    pub jvm: Jvm,
}

/// How the nodes' JVMs are set up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Jvm {
    /// Sized for 2-core test machines that run several nodes and the tests beside them: a heap
    /// of at most [`ClusterOptions::heap`] that starts at 128 MiB, and the serial collector
    /// (no GC threads competing with the tests).
    #[default]
    Test,
    /// What Kafka's own `kafka-server-start.sh` runs a broker with: a fixed 1 GiB heap and G1
    /// with a 20 ms pause target ([`ClusterOptions::heap`] is ignored). For measurements, which
    /// should see the broker as users run it: under the benchmark's load the test settings'
    /// small young generation collected every ~0.2 s, 7 % of the broker's time, with pauses of
    /// up to 24 ms that every commit in flight waited out.
    KafkaDefaults,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 1,
            heap: "768m".into(),
            broker_config: Vec::new(),
            broker_ports: Vec::new(),
            secured: false,
            jvm: Jvm::Test,
        }
    }
}

impl ClusterOptions {
    /// Three nodes: replication factor 3 and `min.insync.replicas` 2 everywhere, so one node
    /// can die without stopping writes.
    pub fn three_nodes() -> Self {
        ClusterOptions {
            nodes: 3,
            heap: "512m".into(),
            ..ClusterOptions::default()
        }
    }

    /// Replication factor of internal and (by default) new topics.
    pub fn replication_factor(&self) -> u32 {
        self.nodes.min(3)
    }

    /// `min.insync.replicas`: a majority of the replicas.
    pub fn min_insync_replicas(&self) -> u32 {
        self.replication_factor() / 2 + 1
    }

    /// Partitions of `__consumer_offsets` and `__transaction_state`: one on a single node (all
    /// coordinators in one place, fast to create), several on a cluster so that killing a
    /// node moves some coordinators and not others.
    pub(crate) fn coordinator_partitions(&self) -> u32 {
        if self.nodes > 1 {
            6
        } else {
            1
        }
    }
}

/// A local Apache Kafka cluster of child JVMs. Dropping it kills and reaps them.
#[derive(Debug)]
pub struct KafkaCluster {
    options: ClusterOptions,
    dir: PathBuf,
    nodes: Vec<KafkaNode>,
    /// The certificates of a secured cluster.
    pki: Option<security::Pki>,
}

impl KafkaCluster {
    /// Installs Kafka if needed, starts every node and waits until all of them serve
    /// metadata. Blocking (seconds); from async code use `spawn_blocking`.
    pub fn start(options: ClusterOptions) -> Result<KafkaCluster, HarnessError> {
        if !(options.nodes == 1 || options.nodes == 3) {
            return Err(HarnessError::KafkaUnavailable(format!(
                "a local cluster has 1 or 3 nodes, not {}",
                options.nodes
            )));
        }
        let installation = installation()?;
        remove_abandoned_data();
        let dir = new_cluster_dir()?;
        let pki = if options.secured {
            Some(security::Pki::make(installation, &dir.join("pki"))?)
        } else {
            None
        };
        let mut free = FreePorts::default();
        let ports: Vec<NodePorts> = (0..options.nodes as usize)
            .map(|i| {
                Ok(NodePorts {
                    broker: match options.broker_ports.get(i) {
                        Some(port) => *port,
                        None => free.next()?,
                    },
                    controller: free.next()?,
                    secured: if options.secured {
                        Some(security::SecuredPorts {
                            sasl: free.next()?,
                            ssl: free.next()?,
                            mtls: free.next()?,
                        })
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<_, HarnessError>>()?;
        // Released just before the nodes bind them.
        drop(free);
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{}", i + 1, p.controller))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, ports) in ports.into_iter().enumerate() {
            let id = i as u32 + 1;
            let formatted = install::formatted_storage(installation, id)?;
            let node_dir = dir.join(format!("node-{id}"));
            nodes.push(KafkaNode::prepare(
                id,
                ports,
                &voters,
                node_dir,
                &formatted,
                &options,
                pki.as_ref(),
            )?);
        }
        let mut cluster = KafkaCluster {
            options,
            dir,
            nodes,
            pki,
        };
        let started = Instant::now();
        for id in cluster.node_ids() {
            cluster.spawn(id)?;
        }
        cluster.wait_until_serving(&cluster.node_ids())?;
        if cluster.pki.is_some() {
            let (user, password) = security::SCRAM_USER;
            acl::create_scram_user(&cluster.bootstrap_servers(), user, password)?;
        }
        tracing::info!(nodes = cluster.nodes.len(), bootstrap = %cluster.bootstrap_servers(), elapsed = ?started.elapsed(), "Kafka cluster ready");
        Ok(cluster)
    }

    /// The certificates of a secured cluster ([`ClusterOptions::secured`]).
    pub fn pki(&self) -> Option<&security::Pki> {
        self.pki.as_ref()
    }

    /// `bootstrap.servers` of a secured cluster's listener `kind` (`sasl`, `ssl` or `mtls`).
    pub fn secured_bootstrap(&self, kind: &str) -> Option<String> {
        let addresses: Option<Vec<String>> = self
            .nodes
            .iter()
            .map(|node| node.secured_address(kind).map(|a| a.to_string()))
            .collect();
        addresses.map(|a| a.join(","))
    }

    /// `bootstrap.servers` of the cluster: every node's broker listener.
    pub fn bootstrap_servers(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.address().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The options it was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// The cluster's directory (nodes' data, configs and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The nodes, by id order.
    pub fn nodes(&self) -> &[KafkaNode] {
        &self.nodes
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: u32) -> Option<&KafkaNode> {
        self.nodes.iter().find(|node| node.id() == id)
    }

    fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(KafkaNode::id).collect()
    }

    fn node_mut(&mut self, id: u32) -> Result<&mut KafkaNode, HarnessError> {
        let count = self.nodes.len();
        self.nodes
            .iter_mut()
            .find(|node| node.id() == id)
            .ok_or_else(|| {
                HarnessError::KafkaUnavailable(format!("no node {id} in a {count}-node cluster"))
            })
    }

    fn spawn(&mut self, id: u32) -> Result<(), HarnessError> {
        let installation = installation()?;
        let (heap, jvm) = (self.options.heap.clone(), self.options.jvm);
        self.node_mut(id)?.spawn(installation, &heap, jvm)
    }

    /// Controlled shutdown of node `id` (SIGTERM; SIGKILL if it takes over 30 s).
    pub fn stop_node(&mut self, id: u32) -> Result<(), HarnessError> {
        self.node_mut(id)?.stop()
    }

    /// Crashes node `id` (SIGKILL). Its data stays on disk for [`KafkaCluster::start_node`].
    pub fn kill_node(&mut self, id: u32) -> Result<(), HarnessError> {
        self.node_mut(id)?.kill()
    }

    /// Starts a stopped or killed node again, same ports, same data, and waits until it
    /// serves metadata again.
    pub fn start_node(&mut self, id: u32) -> Result<(), HarnessError> {
        self.spawn(id)?;
        self.wait_until_serving(&[id])
    }

    /// Stops node `id` (controlled) and starts it again.
    pub fn restart_node(&mut self, id: u32) -> Result<(), HarnessError> {
        self.stop_node(id)?;
        self.start_node(id)
    }

    /// The ids of the nodes whose JVM runs now.
    pub fn running_nodes(&mut self) -> Vec<u32> {
        self.nodes
            .iter_mut()
            .filter_map(|node| node.is_running().then(|| node.id()))
            .collect()
    }

    /// The node that leads `topic`/`partition` now (from metadata), if any.
    pub fn leader_of(&self, topic: &str, partition: i32) -> Result<Option<u32>, HarnessError> {
        let consumer = self.metadata_client()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| HarnessError::kafka(format!("metadata of {topic}"), e))?;
        let leader = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions())
            .find(|p| p.id() == partition)
            .map(|p| p.leader())
            .filter(|leader| *leader >= 0)
            .map(|leader| leader as u32);
        Ok(leader)
    }

    /// The active controller (the KRaft quorum leader with the newest epoch), read from the
    /// nodes' `quorum-state` files: clients are not told who the controller is.
    pub fn active_controller(&self) -> Option<u32> {
        self.nodes
            .iter()
            .filter_map(|node| {
                let path = node
                    .data_dir()
                    .join("__cluster_metadata-0")
                    .join("quorum-state");
                quorum_leader(&std::fs::read_to_string(path).ok()?)
            })
            .max_by_key(|(_, epoch)| *epoch)
            .map(|(leader, _)| leader)
    }

    /// A metadata client on every node (librdkafka's own logs off: connection refused while
    /// a node starts is expected).
    fn metadata_client(&self) -> Result<BaseConsumer, HarnessError> {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap_servers())
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .map_err(|e| HarnessError::kafka("creating a metadata client", e))
    }

    /// Waits until metadata lists every node of `ids` as a live broker (a real request, not a
    /// log line), failing early when one of their JVMs exits.
    fn wait_until_serving(&mut self, ids: &[u32]) -> Result<(), HarnessError> {
        let consumer = self.metadata_client()?;
        let started = Instant::now();
        loop {
            for &id in ids {
                let node = self.node_mut(id)?;
                if let Some(status) = node.exit_status() {
                    return Err(self.not_ready(id, format!("the JVM exited with {status}")));
                }
            }
            if let Ok(metadata) = consumer.fetch_metadata(None, Duration::from_secs(2)) {
                let live: Vec<u32> = metadata.brokers().iter().map(|b| b.id() as u32).collect();
                if ids.iter().all(|id| live.contains(id)) {
                    return Ok(());
                }
            }
            if started.elapsed() > READY_TIMEOUT {
                let id = ids.first().copied().unwrap_or(1);
                let error = self.not_ready(
                    id,
                    format!("metadata did not list it as a broker within {READY_TIMEOUT:?}"),
                );
                for &id in ids {
                    let _ = self.kill_node(id);
                }
                return Err(error);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn not_ready(&self, id: u32, reason: String) -> HarnessError {
        let log = self
            .node(id)
            .map(KafkaNode::log_path)
            .unwrap_or_else(|| self.dir.clone());
        HarnessError::BrokerNotReady {
            node: id,
            address: self
                .node(id)
                .map(KafkaNode::address)
                .unwrap_or(([127, 0, 0, 1], 0).into()),
            reason,
            log_tail: log_tail(&log, 40),
            log,
        }
    }

    /// Node logs, for a failing test's message: each node's log path.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(KafkaNode::log_path).collect()
    }
}

/// A cluster that several owners (tests, tasks) can reach; lock it to stop or start nodes.
pub type SharedCluster = Arc<Mutex<KafkaCluster>>;

/// The single-node cluster this process shares between its tests, started on first use.
/// Never stop, kill or restart it (that is what a cluster of one's own is for).
pub fn shared() -> Result<SharedCluster, HarnessError> {
    static SHARED: OnceLock<Result<SharedCluster, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            KafkaCluster::start(ClusterOptions::default())
                .map(|cluster| Arc::new(Mutex::new(cluster)))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| HarnessError::KafkaUnavailable(format!("the shared local Kafka: {e}")))
}

/// The (leader id, leader epoch) of a KRaft `quorum-state` file.
fn quorum_leader(json: &str) -> Option<(u32, u64)> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let leader = value.get("leaderId")?.as_i64()?;
    let epoch = value.get("leaderEpoch")?.as_u64()?;
    (leader >= 0).then_some((leader as u32, epoch))
}

/// A port on 127.0.0.1 that was free a moment ago.
/// Distinct free loopback ports: each stays bound until the picker is dropped, so the system
/// cannot hand one out twice (a node with 5 listeners got the same port for two of them).
#[derive(Default)]
struct FreePorts(Vec<TcpListener>);

impl FreePorts {
    fn next(&mut self) -> Result<u16, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| HarnessError::io("binding 127.0.0.1:0 to find a free port", e))?;
        let port = listener
            .local_addr()
            .map(|address| address.port())
            .map_err(|e| HarnessError::io("reading a free port", e))?;
        self.0.push(listener);
        Ok(port)
    }
}

/// A fresh `$TMPDIR/exactly-kafka-*` directory with an `owner.pid` naming this process.
fn new_cluster_dir() -> Result<PathBuf, HarnessError> {
    let dir = tempfile::Builder::new()
        .prefix(DIR_PREFIX)
        .tempdir()
        .map_err(|e| HarnessError::io("creating the cluster's directory", e))?
        .keep();
    let owner = dir.join("owner.pid");
    std::fs::write(&owner, std::process::id().to_string())
        .map_err(|e| HarnessError::io(format!("writing {}", owner.display()), e))?;
    Ok(dir)
}

/// Deletes the data (not the logs) of clusters whose owning process is gone, so repeated test
/// runs do not fill the disk.
fn remove_abandoned_data() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let dir = entry.path();
        let is_cluster = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(DIR_PREFIX));
        if !is_cluster || owner_alive(&dir) {
            continue;
        }
        let Ok(nodes) = std::fs::read_dir(&dir) else {
            continue;
        };
        for node in nodes.filter_map(Result::ok) {
            let _ = std::fs::remove_dir_all(node.path().join("data"));
        }
    }
}

/// True when `dir/owner.pid` names a live process (or cannot be read: leave it alone).
fn owner_alive(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("owner.pid")) else {
        return true;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return true;
    };
    // Signal 0 checks existence without signalling.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// The last `lines` lines of a log file (at most its last 64 KiB), for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    let _ = file.take(64 * 1024).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_state_leader() {
        let state = r#"{"clusterId":"","leaderId":2,"leaderEpoch":7,"votedId":-1,"appliedOffset":0,"currentVoters":[{"voterId":1}],"data_version":0}"#;
        assert_eq!(quorum_leader(state), Some((2, 7)));
        let no_leader = r#"{"leaderId":-1,"leaderEpoch":3}"#;
        assert_eq!(quorum_leader(no_leader), None);
        assert_eq!(quorum_leader("garbage"), None);
    }

    #[test]
    fn three_nodes_replicate_three_times_with_a_majority_in_sync() {
        let options = ClusterOptions::three_nodes();
        assert_eq!(options.replication_factor(), 3);
        assert_eq!(options.min_insync_replicas(), 2);
        let single = ClusterOptions::default();
        assert_eq!(single.replication_factor(), 1);
        assert_eq!(single.min_insync_replicas(), 1);
    }
}

//! One Kafka node: a JVM running `kafka.Kafka` as a combined broker and controller, with its
//! own ports, data directory, configuration and log file, all kept across restarts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::install::Installation;
use super::security::{Pki, SecuredPorts};
use super::{ClusterOptions, Jvm};
use crate::error::HarnessError;

/// How long [`KafkaNode::stop`] waits for a controlled shutdown before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Ports of one node, fixed for its whole life so a restart comes back where clients and the
/// other nodes expect it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodePorts {
    pub broker: u16,
    pub controller: u16,
    /// The SASL, SSL and mTLS listeners of a secured cluster.
    pub secured: Option<SecuredPorts>,
}

/// One node of a [`KafkaCluster`](super::KafkaCluster).
#[derive(Debug)]
pub struct KafkaNode {
    id: u32,
    ports: NodePorts,
    dir: PathBuf,
    child: Option<Child>,
}

impl KafkaNode {
    /// Prepares node `id` under `dir` (data from `formatted`, a `server.properties`); does not
    /// start it.
    pub(crate) fn prepare(
        id: u32,
        ports: NodePorts,
        voters: &str,
        dir: PathBuf,
        formatted: &Path,
        options: &ClusterOptions,
        pki: Option<&Pki>,
    ) -> Result<KafkaNode, HarnessError> {
        let node = KafkaNode {
            id,
            ports,
            dir,
            child: None,
        };
        super::install::copy_tree(formatted, &node.data_dir())?;
        let mut properties = server_properties(id, ports, voters, &node.data_dir(), options);
        if let (Some(pki), Some(secured)) = (pki, ports.secured) {
            // Later lines win: the secured listeners replace the plain ones.
            properties.push_str(&pki.listener_properties(ports.broker, ports.controller, secured));
        }
        let config = node.config_path();
        std::fs::write(&config, properties)
            .map_err(|e| HarnessError::io(format!("writing {}", config.display()), e))?;
        Ok(node)
    }

    /// The node id (1-based).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The broker listener clients use (loopback).
    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.broker))
    }

    /// A secured listener (`sasl`, `ssl` or `mtls`) of a secured cluster's node.
    pub fn secured_address(&self, kind: &str) -> Option<SocketAddr> {
        let ports = self.ports.secured?;
        let port = match kind {
            "sasl" => ports.sasl,
            "ssl" => ports.ssl,
            "mtls" => ports.mtls,
            _ => return None,
        };
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The node's log file: the JVM's output of every run, appended.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }

    /// The node's data directory (`log.dirs`); it survives stops and kills.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    /// The pid of the running JVM, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the JVM this node started has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// Starts the JVM (not waiting for it to serve: the cluster checks that with a request).
    pub(crate) fn spawn(
        &mut self,
        installation: &Installation,
        heap: &str,
        jvm: Jvm,
    ) -> Result<(), HarnessError> {
        if self.is_running() {
            return Ok(());
        }
        self.reap();
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| HarnessError::io(format!("opening {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| HarnessError::io(format!("cloning {}", log_path.display()), e))?;
        let mut command = Command::new(&installation.java);
        command
            .args(jvm_options(heap, jvm))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                installation.log4j_config.display()
            ))
            .args(["-cp", &installation.classpath, "kafka.Kafka"])
            .arg(self.config_path())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // PR_SET_PDEATHSIG: a test process that dies, however it dies, takes its JVMs along.
        let child = crate::process::spawn_with_parent_death_signal(command)
            .map_err(|e| HarnessError::io(format!("starting Kafka node {}", self.id), e))?;
        tracing::info!(node = self.id, pid = child.id(), address = %self.address(), log = %log_path.display(), "started Kafka node");
        self.child = Some(child);
        Ok(())
    }

    /// Controlled shutdown: SIGTERM, then SIGKILL after [`STOP_GRACE`]; the JVM is reaped.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(None)) {
            // Only the pid this node spawned, and only while it is not reaped.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                tracing::warn!(
                    node = self.id,
                    "Kafka node ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL"
                );
            }
        }
        self.kill()
    }

    /// SIGKILL (a crash: whatever the node had not written is lost, its data dir stays); the
    /// JVM is reaped.
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        // `Child::kill` only signals a child that has not been reaped.
        let _ = child.kill();
        child.wait().map_err(|e| HarnessError::BrokerStop {
            pid,
            reason: e.to_string(),
        })?;
        tracing::info!(node = self.id, pid, "Kafka node stopped");
        Ok(())
    }

    /// Reaps a JVM that exited on its own.
    fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status of a JVM that exited on its own, for error messages.
    pub(crate) fn exit_status(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }
}

impl Drop for KafkaNode {
    fn drop(&mut self) {
        self.reap();
    }
}

/// JVM flags of a node (see [`Jvm`]); either way a fast exit on OOM instead of a hanging
/// broker.
fn jvm_options(heap: &str, jvm: Jvm) -> Vec<String> {
    let mut options: Vec<String> = match jvm {
        Jvm::Test => vec![
            format!("-Xmx{heap}"),
            "-Xms128m".into(),
            "-XX:+UseSerialGC".into(),
        ],
        // kafka-server-start.sh's KAFKA_HEAP_OPTS and kafka-run-class.sh's
        // KAFKA_JVM_PERFORMANCE_OPTS (4.x).
        Jvm::KafkaDefaults => vec![
            "-Xmx1G".into(),
            "-Xms1G".into(),
            "-server".into(),
            "-XX:+UseG1GC".into(),
            "-XX:MaxGCPauseMillis=20".into(),
            "-XX:InitiatingHeapOccupancyPercent=35".into(),
            "-XX:+ExplicitGCInvokesConcurrent".into(),
        ],
    };
    options.extend([
        "-XX:+ExitOnOutOfMemoryError".into(),
        "-Djava.awt.headless=true".into(),
    ]);
    options
}

/// `server.properties` of one combined broker+controller node.
fn server_properties(
    id: u32,
    ports: NodePorts,
    voters: &str,
    data: &Path,
    options: &ClusterOptions,
) -> String {
    let replication = options.replication_factor();
    let min_isr = options.min_insync_replicas();
    let coordinator_partitions = options.coordinator_partitions();
    let NodePorts {
        broker, controller, ..
    } = ports;
    let mut properties = format!(
        "\
process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{broker}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
auto.create.topics.enable=false
num.partitions=1
default.replication.factor={replication}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions={coordinator_partitions}
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions={coordinator_partitions}
share.coordinator.state.topic.replication.factor={replication}
share.coordinator.state.topic.min.isr={min_isr}
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=500
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=100
group.consumer.heartbeat.interval.ms=500
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
log.cleaner.dedupe.buffer.size=2097152
num.recovery.threads.per.data.dir=1
num.network.threads=2
num.io.threads=4
background.threads=4
server.max.startup.time.ms=60000
",
        data = data.display()
    );
    for (key, value) in &options.broker_config {
        properties.push_str(&format!("{key}={value}\n"));
    }
    properties
}

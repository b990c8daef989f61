//! The one error type of the test harness.

use std::path::PathBuf;

/// Everything that can go wrong while setting up or driving the test infrastructure.
///
/// Each variant carries enough context (paths, addresses, log tails) to act on the failure
/// without re-running the test.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Apache Kafka cannot be run here: Java 17+ or Maven missing, a broken installation.
    #[error("the local Apache Kafka is not available: {0}")]
    KafkaUnavailable(String),

    /// Fetching Kafka's jars with Maven failed.
    #[error("fetching Apache Kafka's jars into {root} with Maven failed ({status}); see {log}:\n{log_tail}")]
    KafkaInstall {
        /// The installation directory.
        root: PathBuf,
        /// Exit status of Maven.
        status: String,
        /// File holding Maven's output.
        log: PathBuf,
        /// Last lines of that file.
        log_tail: String,
    },

    /// A Kafka node exited or never served metadata.
    #[error(
        "Kafka node {node} on {address} did not become ready: {reason}; log {log}:\n{log_tail}"
    )]
    BrokerNotReady {
        /// The node id.
        node: u32,
        /// The node's broker listener.
        address: std::net::SocketAddr,
        /// What happened (exited with status, timeout).
        reason: String,
        /// Log file of the node.
        log: PathBuf,
        /// Last lines of the log.
        log_tail: String,
    },

    /// Stopping a Kafka node failed.
    #[error("stopping Kafka node (pid {pid}) failed: {reason}")]
    BrokerStop {
        /// Pid of the JVM.
        pid: u32,
        /// What went wrong.
        reason: String,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A Kafka client operation (admin, producer, consumer) failed.
    #[error("{context}: {source}")]
    Kafka {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// The Kafka wire protocol could not be encoded or decoded.
    #[error("kafka protocol error while {context}: {reason}")]
    Protocol {
        /// What the harness was doing.
        context: String,
        /// What was wrong with the bytes.
        reason: String,
    },

    /// A condition was not reached before its deadline.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// The condition waited for.
        what: String,
        /// How long the harness waited.
        waited: std::time::Duration,
    },
}

impl HarnessError {
    /// Wraps an I/O error with what the harness was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wraps a Kafka client error with what the harness was doing.
    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        HarnessError::Kafka {
            context: context.into(),
            source,
        }
    }

    /// A protocol (codec) error.
    pub fn protocol(context: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        HarnessError::Protocol {
            context: context.into(),
            reason: reason.to_string(),
        }
    }
}

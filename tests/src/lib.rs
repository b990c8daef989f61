//! Test harness for `exactly`: a local Apache Kafka launcher, a fault-injecting proxy, a process
//! supervisor and an exactly-once checker.

pub mod chaos;
pub mod cluster;
pub mod eos;
pub mod eos_service;
pub mod error;
pub mod kafka;
pub mod process;
pub mod proxy;
pub mod rebalance;

pub use cluster::{unique_name, TestCluster};
pub use error::HarnessError;
pub use kafka::{ClusterOptions, KafkaCluster};
pub use proxy::{Proxy, ProxyStats};

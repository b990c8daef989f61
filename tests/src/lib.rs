//! Test harness for `exactly`: broker launcher, read-committed proxy, process supervisor and
//! exactly-once checker.

pub mod broker;
pub mod chaos;
pub mod cluster;
pub mod eos;
pub mod error;
pub mod process;
pub mod proxy;

pub use broker::Broker;
pub use cluster::{unique_name, TestCluster};
pub use error::HarnessError;
pub use proxy::{Proxy, ProxyStats};

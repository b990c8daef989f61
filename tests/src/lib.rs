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
pub mod scrape;
pub mod security;

pub use cluster::{unique_name, TestCluster};
pub use error::HarnessError;
pub use kafka::{ClusterOptions, KafkaCluster};
pub use proxy::{Proxy, ProxyStats};

/// Logging of the harness's command-line tools: to stderr, filtered by `RUST_LOG`, else by
/// `default_filter`.
pub fn init_tool_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The path of binary `name` of this crate, built beside the running executable (the check
/// binaries start `eos-service` this way). The error says how to build it.
pub fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("locating this executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        anyhow::bail!(
            "{} not found: build it with `cargo build -p exactly-tests --bins` (same profile)",
            path.display()
        );
    }
    Ok(path)
}

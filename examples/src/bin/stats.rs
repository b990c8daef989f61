//! Service: `stats`; see `exactly_examples::stats` and `exactly_examples::service`.

use clap::Parser;
use exactly_examples::service::{self, StatsArgs};

/// Keeps per-account totals and counts from balance events, emits a summary per update.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: StatsArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service::init_logging();
    service::run_stats(Cli::parse().args).await
}

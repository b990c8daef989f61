//! Service: `ledger`; see `exactly_examples::ledger` and `exactly_examples::service`.

use clap::Parser;
use exactly_examples::service::{self, LedgerArgs};

/// Applies transfer legs to account balances, refuses overdrafts, emits balance events.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: LedgerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service::init_logging();
    service::run_ledger(Cli::parse().args).await
}

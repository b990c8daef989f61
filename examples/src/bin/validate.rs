//! Service: `validate`; see `exactly_examples::validate` and `exactly_examples::service`.

use clap::Parser;
use exactly_examples::service::{self, ValidateArgs};

/// Validates payment commands: valid ones become ledger legs keyed by account, the rest go to the dead-letter topic.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: ValidateArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    service::init_logging();
    service::run_validate(Cli::parse().args).await
}

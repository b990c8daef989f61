//! The fraud detector example (see `exactly_examples::fraud`).
//!
//! `fraud --check` starts a local Apache Kafka, runs two detectors through kill -9 restarts
//! and checks their outputs against the reference model; `fraud service ...` is one detector.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use exactly::{App, AppConfig};
use exactly_examples::fraud::check::{run_check, CheckArgs};
use exactly_examples::fraud::{FraudDetector, Topics};

#[derive(Debug, Parser)]
#[command(
    about = "exactly example: a fraud detector (a profile join, windows, timers, wall-clock reports)"
)]
struct Cli {
    #[command(subcommand)]
    service: Option<Command>,
    /// Run the detector on Kafka through kill -9 restarts and check it against the model.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    args: CheckArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one detector until SIGTERM.
    Service(ServiceArgs),
}

#[derive(Debug, clap::Args)]
struct ServiceArgs {
    #[arg(long, env = "EXACTLY_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    #[arg(long, env = "EXACTLY_APP_ID", default_value = "fraud-detector")]
    app_id: String,
    /// The transactions topic.
    #[arg(long, default_value = "fraud.transactions")]
    input: String,
    /// The card profiles topic (co-partitioned with the transactions).
    #[arg(long, default_value = "fraud.profiles")]
    profiles: String,
    /// How long a record waits for the other input to have one too, in ms.
    #[arg(long, default_value_t = 0)]
    max_input_idle_ms: u64,
    /// Prefix of the output topics (`<prefix>.alerts`, ...).
    #[arg(long, default_value = "fraud")]
    prefix: String,
    /// How often each partition reports, in ms.
    #[arg(long, default_value_t = 10_000)]
    report_ms: u64,
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    #[arg(long, default_value_t = 20)]
    commit_when_idle_ms: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fraud: cannot start the tokio runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.service {
            Some(Command::Service(args)) => {
                exactly_examples::service::init_logging();
                run_service(args).await.map(|()| true)
            }
            None if cli.check => {
                let exe = std::env::current_exe().context("locating the fraud executable")?;
                run_check(cli.args, exe).await
            }
            None => anyhow::bail!("nothing to do: pass --check, or `service` to run a detector"),
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("fraud: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_service(args: ServiceArgs) -> anyhow::Result<()> {
    let config = AppConfig::new(&args.app_id, &args.brokers)
        .input_topics([&args.input, &args.profiles])
        .co_partitioned(true)
        .max_input_idle(Duration::from_millis(args.max_input_idle_ms))
        .commit_interval(Duration::from_millis(args.commit_interval_ms))
        .commit_when_idle(Duration::from_millis(args.commit_when_idle_ms))
        .from_env()?;
    let detector = FraudDetector {
        profiles_topic: args.profiles.clone(),
        topics: Topics::with_prefix(&args.prefix),
        report_every: Duration::from_millis(args.report_ms),
    };
    App::new(config, detector)?.run().await?;
    Ok(())
}

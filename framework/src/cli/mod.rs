//! The `exactly` command line: operating an app from outside it (feature `cli`).
//!
//! ```text
//! exactly inspect         --brokers B --app A [--topic T]...
//! exactly reset           --brokers B --app A --to earliest|latest|<time> [--dry-run] [--topic T]...
//! exactly verify-snapshot --brokers B --app A [--topic T]...
//! ```
//!
//! - `inspect` prints, per input partition, what a restart would find: the latest committed
//!   incremental record (next input offset, transaction sequence, records since the full
//!   snapshot, its age), the full snapshot it points to (offset, input offset, bytes, chunks,
//!   age), how many records the snapshot partition keeps, and the input lag.
//! - `reset` points every partition of a *stopped* app at an input offset with the default
//!   state (refused while the consumer group has members; `--dry-run` prints the plan only).
//! - `verify-snapshot` reads every chunk of each partition's latest full snapshot and checks
//!   it as recovery would (checksums, chunk set, encoding); it fails when one does not check
//!   out.
//!
//! Without `--topic` the input topics are found through the app's snapshot topics. Every
//! `EXACTLY_*` setting of [`AppConfig::from_env`](crate::AppConfig::from_env) applies, so a
//! secured cluster works with the service's own environment (`EXACTLY_KAFKA_SASL_USERNAME`,
//! ...), and so does `EXACTLY_SNAPSHOT_TOPIC_PATTERN`.
//!
//! Install it with `cargo install --path framework --features cli`. The same commands run
//! in-process with [`run`]:
//!
//! ```
//! // Arguments are checked before anything connects to Kafka:
//! let mut out = Vec::new();
//! let error = exactly::cli::run(["exactly", "reset", "--brokers", "localhost:9092",
//!     "--app", "ledger", "--to", "yesterday"], &mut out).unwrap_err();
//! assert!(error.to_string().contains("is not a reset position"));
//! ```

mod group;
mod inspect;
mod reset;
mod topics;
mod verify;

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rdkafka::error::KafkaError;

pub use reset::ResetTo;

use crate::config::AppConfig;
use crate::error::Error;
use crate::snapshot::store::PartitionReader;

/// How long a read of a snapshot or input partition may make no progress.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A reader of the app's partitions. librdkafka's `assign()` needs a group id; this group is
/// never joined and nothing is committed to it.
fn reader(config: &AppConfig) -> Result<PartitionReader, CliError> {
    let mut reader_config = config.consumer_config(false);
    reader_config.set("group.id", format!("{}.cli", config.app_id));
    Ok(PartitionReader::new(reader_config, READ_TIMEOUT)?)
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The arguments do not parse (or help / version was asked for: print it).
    #[error("{0}")]
    Usage(#[from] clap::Error),
    /// A Kafka call, a snapshot read or the configuration failed.
    #[error(transparent)]
    App(#[from] Error),
    /// The cluster did not answer.
    #[error("cannot reach the Kafka cluster at {brokers}: {source}; check --brokers (EXACTLY_BROKERS) and, for a secured cluster, the EXACTLY_KAFKA_* settings (EXACTLY_KAFKA_SECURITY_PROTOCOL, EXACTLY_KAFKA_SASL_USERNAME, ...)")]
    NoConnection {
        /// The bootstrap servers tried.
        brokers: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// No input topic was given and no snapshot topic names the app.
    #[error("found no app {app:?} on {brokers}: no topic is named like its snapshot topics ({pattern:?}, with {{topic}} an existing input topic); check --app (the app id), or name its input topics with --topic (and set EXACTLY_SNAPSHOT_TOPIC_PATTERN if the app sets one)")]
    AppNotFound {
        /// The app id.
        app: String,
        /// The bootstrap servers.
        brokers: String,
        /// The snapshot topic pattern with the app id filled in.
        pattern: String,
    },
    /// `reset` on an app that is running.
    #[error("consumer group {group:?} has active members ({}): stop every instance of the app, and after a crash wait for the group's session timeout, before resetting it", if *members > 0 { members.to_string() } else { "the broker refused an offset commit from outside the group".to_owned() })]
    MembersActive {
        /// The consumer group (the app id).
        group: String,
        /// How many members the group reported (0: the broker refused the commit instead).
        members: usize,
    },
    /// `--to` is not a position.
    #[error("--to {0:?} is not a reset position: use earliest, latest, milliseconds since the epoch, or an RFC 3339 time such as 2026-11-28T12:00:00Z")]
    ResetPosition(String),
    /// `verify-snapshot` found snapshots that do not check out (each is listed in the output).
    #[error("{failed} full snapshots failed verification ({verified} verified); see the lines marked FAILED")]
    SnapshotsFailed {
        /// Snapshots that failed.
        failed: usize,
        /// Snapshots that checked out.
        verified: usize,
    },
    /// The output could not be written.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Parser)]
#[command(
    name = "exactly",
    version,
    about = "Inspect, reset and verify exactly apps on Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per input partition: the latest committed progress, the full snapshot it points to,
    /// the snapshot topic's size and the input lag.
    Inspect(Target),
    /// Points every partition of a stopped app at an input offset, with the default state.
    Reset {
        #[command(flatten)]
        target: Target,
        /// earliest, latest, a time in ms since the epoch, or an RFC 3339 time.
        #[arg(long, value_parser = parse_reset_to)]
        to: ResetTo,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Reads and checks every chunk of each partition's latest full snapshot.
    VerifySnapshot(Target),
}

#[derive(Debug, Args)]
struct Target {
    /// Bootstrap servers of the Kafka cluster.
    #[arg(long, env = "EXACTLY_BROKERS")]
    brokers: String,
    /// The app id (its consumer group id).
    #[arg(long, env = "EXACTLY_APP_ID")]
    app: String,
    /// An input topic of the app (repeat for several); default: found via its snapshot topics.
    #[arg(long = "topic")]
    topics: Vec<String>,
}

fn parse_reset_to(s: &str) -> Result<ResetTo, String> {
    s.parse().map_err(|e: CliError| e.to_string())
}

/// Runs one command (`args[0]` is the program name) and writes its report to `out`.
/// Blocking: call it from a thread that may block (e.g. `tokio::task::spawn_blocking`).
pub fn run<I, T>(args: I, out: &mut dyn Write) -> Result<(), CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    execute(cli.command, out)
}

/// The `exactly` binary: parses the process's arguments, runs the command, prints errors.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(usage) => usage.exit(),
    };
    // Warnings of the library (e.g. a slow read being retried) go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match execute(cli.command, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command, out: &mut dyn Write) -> Result<(), CliError> {
    match command {
        Command::Inspect(target) => {
            let (config, inputs) = target.resolve()?;
            inspect::run(&config, &inputs, out)
        }
        Command::Reset {
            target,
            to,
            dry_run,
        } => {
            let (config, inputs) = target.resolve()?;
            reset::run(&config, &inputs, to, dry_run, out)
        }
        Command::VerifySnapshot(target) => {
            let (config, inputs) = target.resolve()?;
            verify::run(&config, &inputs, out)
        }
    }
}

impl Target {
    /// The app's configuration (`EXACTLY_*` environment applied, then the flags) and its
    /// input topics.
    fn resolve(&self) -> Result<(AppConfig, Vec<topics::InputTopic>), CliError> {
        let mut config = AppConfig::new(&self.app, &self.brokers)
            .from_env()
            .map_err(Error::Config)?;
        config.app_id = self.app.clone();
        config.bootstrap_servers = self.brokers.clone();
        if !self.topics.is_empty() {
            config.input_topics = self.topics.clone();
        }
        let inputs = topics::resolve(&mut config)?;
        config.validate().map_err(Error::Config)?;
        Ok((config, inputs))
    }
}

/// One line about the app's consumer group.
fn group_summary(config: &AppConfig) -> String {
    match group::describe(config) {
        Ok(Some(group)) => format!(
            "consumer group {} is {} with {} members",
            config.app_id, group.state, group.members
        ),
        Ok(None) => format!("consumer group {} has no members", config.app_id),
        Err(error) => format!("consumer group {} not described: {error}", config.app_id),
    }
}

//! The exactly-once chaos suite; see `exactly_tests::chaos`.
//!
//! `cargo run --release -p exactly-tests --bin chaos -- --events E [--seed S] [--kafka-nodes 3]`
//!
//! Prints progress, then exactly one line
//! `CHAOS events=E kills=K zombies=Z rebalances=B net_faults=F broker_crashes=C duplicates=D missing=M state=match seed=S`
//! and exits 0 only when nothing was duplicated, missing or out of order and B's balances and
//! C's totals match the reference model. Exit 1: an exactly-once violation (the first
//! offending record ids are printed); exit 2: the run could not complete (a service died, the
//! chain did not drain, the deadline passed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use exactly_tests::chaos::{self, ChaosOptions};

#[derive(Debug, Parser)]
#[command(about = "exactly chaos suite: payments A -> B -> C through random faults")]
struct Cli {
    /// Number of fault events.
    #[arg(long, default_value_t = 30)]
    events: usize,
    /// Seed of the fault schedule and of the input (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Payment commands per second while the faults run.
    #[arg(long, default_value_t = 150)]
    rate: u64,
    /// Accounts of the generated input.
    #[arg(long, default_value_t = 500)]
    accounts: u64,
    /// The services' session timeout in ms (a zombie is paused 3 s longer).
    #[arg(long, default_value_t = 6_000)]
    session_timeout_ms: u64,
    /// Longest wait for the chain to drain after the last event, in seconds.
    #[arg(long, default_value_t = 300)]
    drain_timeout_secs: u64,
    /// Fail the drain early when no group commits anything for this many seconds.
    #[arg(long, default_value_t = 90)]
    drain_stall_secs: u64,
    /// Deadline of the whole run in seconds (default: from the schedule, generous).
    #[arg(long)]
    deadline_secs: Option<u64>,
    /// Directory for all logs of the run.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Do not run `cargo build -p exactly-examples --bins` first; use the binaries as they are.
    #[arg(long)]
    no_build: bool,
    /// Fail the run when a service exits on its own (default: restart it, report the crash).
    #[arg(long)]
    fail_on_crash: bool,
    /// Nodes of the run's local Apache Kafka: 1 (no broker crashes: a lone node forgets
    /// transaction state it acknowledged), or 3 (replication factor 3; broker crashes SIGKILL
    /// partition leaders and the active controller).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    kafka_nodes: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let seed = cli.seed.unwrap_or_else(rand::random);
    let mut options = ChaosOptions::new(cli.events, seed);
    options.rate = cli.rate;
    options.accounts = cli.accounts;
    options.session_timeout = Duration::from_millis(cli.session_timeout_ms);
    options.drain_timeout = Duration::from_secs(cli.drain_timeout_secs);
    options.drain_stall_timeout = Duration::from_secs(cli.drain_stall_secs);
    options.log_dir = cli.log_dir;
    options.build = !cli.no_build;
    options.fail_on_crash = cli.fail_on_crash;
    options.kafka_nodes = cli.kafka_nodes;
    let deadline = cli
        .deadline_secs
        .map(Duration::from_secs)
        .unwrap_or_else(|| options.default_deadline());

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("chaos: cannot start the tokio runtime: {error}");
            return ExitCode::from(2);
        }
    };
    println!(
        "chaos: seed {seed}, {} events, deadline {deadline:?}",
        cli.events
    );
    // Dropping the run's future (deadline, ctrl-c) kills and reaps every child and the broker.
    let result = runtime.block_on(async {
        tokio::select! {
            r = tokio::time::timeout(deadline, chaos::run(options)) => r.map_err(|_| {
                format!("the run did not finish within its deadline of {deadline:?} (raise --deadline-secs)")
            }),
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        }
    });
    match result {
        Ok(Ok(outcome)) => {
            for note in &outcome.notes {
                println!("note: {note}");
            }
            if !outcome.crashes.is_empty() {
                println!(
                    "{} service crash(es) (restarted; not an exactly-once violation, but a robustness finding):",
                    outcome.crashes.len()
                );
                for crash in &outcome.crashes {
                    println!("  crash: {crash}");
                }
            }
            if !outcome.is_clean() {
                println!("FAILED: exactly-once violated; first offending records:");
                for line in &outcome.offending {
                    println!("  {line}");
                }
                println!("logs: {}", outcome.log_dir.display());
            }
            println!(
                "chaos: {} commands, wall time {:.1}s, logs in {}",
                outcome.inputs,
                outcome.wall.as_secs_f64(),
                outcome.log_dir.display()
            );
            println!("{}", outcome.chaos_line());
            if outcome.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(Err(error)) => {
            println!("CHAOS FAILED seed={seed}: {error}");
            ExitCode::from(2)
        }
        Err(reason) => {
            println!("CHAOS FAILED seed={seed}: {reason}");
            ExitCode::from(2)
        }
    }
}

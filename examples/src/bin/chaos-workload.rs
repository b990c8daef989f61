//! The payments side of the chaos suite (`cargo run -p exactly-tests --bin chaos`).
//!
//! The chaos orchestrator lives in the harness crate `exactly-tests`, which cannot link this
//! crate (this crate depends on it). So everything that needs the payments domain runs here,
//! as a child process the orchestrator starts and whose one result line it parses:
//!
//! - `produce`: produces the seeded payment commands ([`generator::generate`]) at a steady
//!   rate until SIGTERM (or `--max-count`), then flushes and prints `PRODUCED count=N`. The
//!   generator is prefix-stable, so the first N commands of the seed are exactly what was
//!   produced.
//! - `verify`: reads every output topic of the chain back with read_committed and compares it
//!   with the reference model ([`model::expect`]) of the first N commands
//!   ([`exactly_examples::verify`]): duplicates and missing ids per topic, B's final balances
//!   and C's final totals. Prints a human report, then one line
//!   `VERIFY inputs=N outputs=R duplicates=D missing=M unexpected=U order_violations=O
//!   state=match|mismatch`, then `OFFENDING <topic> <kind> <id> [at <positions>]` lines for
//!   the first offending records. Exit code 0 when clean, 1 on a violation, 2 when the check
//!   itself failed.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use exactly_examples::generator;
use exactly_examples::model;
use exactly_examples::producer::{command_producer, command_record};
use exactly_examples::verify::{verify_chain, OutputTopics, TopicCheck};
use exactly_tests::eos::{CheckOptions, Position};
use rdkafka::producer::Producer;

#[derive(Debug, Parser)]
#[command(version, about = "payments workload of the exactly chaos suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Produce seeded payment commands until SIGTERM.
    Produce(ProduceArgs),
    /// Check the chain's outputs against the reference model.
    Verify(VerifyArgs),
}

/// What identifies the input: the same values must be given to `produce` and `verify`.
#[derive(Debug, Clone, clap::Args)]
struct InputArgs {
    /// Seed of the command generator.
    #[arg(long)]
    seed: u64,
    /// Number of accounts.
    #[arg(long, default_value_t = 500)]
    accounts: u64,
}

#[derive(Debug, Clone, clap::Args)]
struct ProduceArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Bootstrap servers to produce to.
    #[arg(long)]
    brokers: String,
    /// Topic of payment commands.
    #[arg(long)]
    topic: String,
    /// Commands per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Stop after this many commands even without SIGTERM.
    #[arg(long, default_value_t = 10_000_000)]
    max_count: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Bootstrap servers (read_committed is done by them or by the harness proxy).
    #[arg(long)]
    brokers: String,
    /// How many commands were produced (`PRODUCED count=N` of `produce`).
    #[arg(long)]
    count: usize,
    /// Output topics of the chain.
    #[arg(long)]
    ledger_topic: String,
    #[arg(long)]
    dead_letter_topic: String,
    #[arg(long)]
    balances_topic: String,
    #[arg(long)]
    rejections_topic: String,
    #[arg(long)]
    stats_topic: String,
    /// How long reading back one topic may take, in seconds.
    #[arg(long, default_value_t = 180)]
    timeout_secs: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // librdkafka's own warnings (why a producer failed) go to stderr, into the log; stdout
    // carries the result lines the orchestrator reads.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("chaos-workload: cannot start the tokio runtime: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Produce(args) => produce(args).await.map(|()| true),
            Command::Verify(args) => verify(args).await,
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("chaos-workload failed: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------
// produce

async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = Arc::clone(&stop);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
            stopper.store(true, Ordering::Release);
        }
    });
    let count = tokio::task::spawn_blocking(move || produce_blocking(&args, &stop)).await??;
    println!("PRODUCED count={count}");
    std::io::stdout().flush()?;
    Ok(())
}

fn produce_blocking(args: &ProduceArgs, stop: &AtomicBool) -> anyhow::Result<usize> {
    let producer = command_producer(&args.brokers).context("creating the input producer")?;
    // Generated in blocks: the generator is prefix-stable, so block k of a longer run is the
    // same as the tail of a shorter one.
    let mut commands = generator::generate(
        args.input.seed,
        args.max_count.min(200_000),
        args.input.accounts,
    );
    let started = Instant::now();
    let mut produced = 0usize;
    while produced < args.max_count && !stop.load(Ordering::Acquire) {
        if produced == commands.len() {
            commands = generator::generate(
                args.input.seed,
                (commands.len() * 2).min(args.max_count),
                args.input.accounts,
            );
        }
        let command = &commands[produced];
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(produced as f64 / args.rate as f64);
            let now = Instant::now();
            if due > now {
                producer.poll(due - now);
                continue;
            }
        }
        match producer.send(command_record(&args.topic, command)) {
            Ok(()) => produced += 1,
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => {
                producer.poll(Duration::from_millis(10));
            }
            Err((error, _)) => {
                let fatal = rdkafka::producer::Producer::client(&producer)
                    .fatal_error()
                    .map(|(code, reason)| format!(" (fatal: {code:?}: {reason})"))
                    .unwrap_or_default();
                bail!(
                    "producing command {} to {}: {error}{fatal}",
                    command.id,
                    args.topic
                )
            }
        }
        producer.poll(Duration::ZERO);
        if produced % 1000 == 0 {
            eprintln!("produced {produced}");
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the input producer")?;
    let failed = producer.context().failed();
    if failed > 0 {
        let first = producer.context().first_error();
        bail!("{failed} of {produced} commands were not delivered; first error: {first}");
    }
    Ok(produced)
}

// ---------------------------------------------------------------------------------------
// verify

async fn verify(args: VerifyArgs) -> anyhow::Result<bool> {
    let commands = generator::generate(args.input.seed, args.count, args.input.accounts);
    let expectation = model::expect(&commands).context("the reference model refused the input")?;
    let options = CheckOptions {
        timeout: Duration::from_secs(args.timeout_secs),
        max_listed: 10,
        ..CheckOptions::default()
    };
    let topics = OutputTopics {
        dead_letters: &args.dead_letter_topic,
        ledger: &args.ledger_topic,
        balances: &args.balances_topic,
        rejections: &args.rejections_topic,
        stats: &args.stats_topic,
    };
    let verdict = verify_chain(&args.brokers, &topics, &expectation, &options).await?;

    for TopicCheck { report, .. } in &verdict.topics {
        println!(
            "topic {}: {} records, duplicates={} missing={} unexpected={} order_violations={}",
            report.topic,
            report.records_read,
            report.duplicate_count,
            report.missing_count,
            report.unexpected_count,
            report.order_violation_count
        );
        if !report.is_clean() {
            println!("{report}");
        }
    }
    for problem in verdict.state.problems.iter().take(20) {
        println!("state mismatch: {problem}");
    }
    println!(
        "VERIFY inputs={} outputs={} duplicates={} missing={} unexpected={} order_violations={} state={}",
        commands.len(),
        verdict.records_read(),
        verdict.duplicates(),
        verdict.missing(),
        verdict.unexpected(),
        verdict.order_violations(),
        verdict.state.verdict()
    );
    for TopicCheck { report, .. } in &verdict.topics {
        let positions = |p: &[Position]| {
            p.iter()
                .map(Position::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        for d in &report.duplicates {
            println!(
                "OFFENDING {} duplicate {} at {}",
                report.topic,
                d.id,
                positions(&d.positions)
            );
        }
        for id in &report.missing {
            println!("OFFENDING {} missing {id}", report.topic);
        }
        for u in &report.unexpected {
            println!(
                "OFFENDING {} unexpected {} at {}",
                report.topic, u.id, u.position
            );
        }
        for v in &report.order_violations {
            println!(
                "OFFENDING {} order {} seq {} at {} after seq {} at {}",
                report.topic, v.id, v.seq, v.position, v.previous_seq, v.previous_position
            );
        }
    }
    std::io::stdout().flush()?;
    Ok(verdict.is_clean())
}

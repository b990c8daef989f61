//! The benchmark: exactly against a raw pipe, Kafka Streams and Quix Streams on the same
//! broker, the same records, in one run. See `exactly_examples::bench` and the README's Performance section.
//!
//! ```text
//! cargo run --release -p exactly-examples --bin bench            # 1M records
//! cargo run --release -p exactly-examples --bin bench -- --quick # 100k records
//! cargo run --release -p exactly-examples --bin bench -- --only scale --scale-keys 10000,100000
//! cargo run --release -p exactly-examples --bin bench -- --only latency --brokers HOST:PORT
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use exactly_examples::bench::{self, footprint, scale, BenchOptions};
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::kafka::{ClusterOptions, Jvm};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks exactly against a raw pipe and Quix Streams, side by side")]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Bootstrap servers of an existing cluster; without it the bench starts the local Apache
    /// Kafka.
    #[arg(long, env = "EXACTLY_BROKERS")]
    brokers: Option<String>,
    /// About 100k records instead of 1M (and a shorter latency run).
    #[arg(long)]
    quick: bool,
    /// Input records of the throughput cases (default 1M, 100k with --quick).
    #[arg(long)]
    records: Option<u64>,
    /// Keys of the restored state (default: as many as --records).
    #[arg(long)]
    state_keys: Option<u64>,
    /// Partitions of the throughput and chain topics.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Distinct keys of the throughput input.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Input rate of the latency case, commands per second.
    #[arg(long, default_value_t = 1_000)]
    latency_rate: u64,
    /// Seconds the latency case produces (default 30, 10 with --quick).
    #[arg(long)]
    latency_seconds: Option<u64>,
    /// Do not run Quix Streams (reported as not measured).
    #[arg(long)]
    skip_quix: bool,
    /// Key counts of the state-at-scale case, comma-separated (default 10000,1000000,10000000;
    /// the BENCH line's commit_p99_ratio_10m_vs_10k needs 10000 and 10000000).
    #[arg(long)]
    scale_keys: Option<KeyCounts>,
    /// Update records per measurement of the state-at-scale case (default 80000, 10000 with
    /// --quick): 800 commits, so that the p99 is not just the third-slowest of 200, and fewer
    /// than the 100 000 records after which a full snapshot would fall into the measurement.
    #[arg(long)]
    scale_updates: Option<u64>,
    /// Run only this case (for development): `scale`, `latency`, `throughput` or `restore`
    /// (the last two without the peers). Prints its results, no BENCH line.
    #[arg(long, hide = true, value_parser = ["scale", "latency", "throughput", "restore"])]
    only: Option<String>,
}

/// `--scale-keys`: a comma-separated list of key counts.
#[derive(Debug, Clone)]
struct KeyCounts(Vec<u64>);

impl std::str::FromStr for KeyCounts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        scale::parse_key_counts(s).map(KeyCounts)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: one process of the per-partition cost case.
    #[command(hide = true)]
    FootprintChild {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        app_id: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        output: String,
        #[arg(long)]
        partitions: i32,
        #[arg(long)]
        records: u64,
    },
    /// Internal: one process of the state-at-scale case.
    #[command(hide = true)]
    ScaleChild {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        app_id: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        output: String,
        #[arg(long)]
        variant: scale::Variant,
        #[arg(long)]
        state_dir: std::path::PathBuf,
        #[arg(long)]
        mode: scale::Mode,
        #[arg(long)]
        input_end: u64,
        #[arg(long)]
        hold: bool,
    },
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The chain's input holds deliberately malformed commands; each dead-lettered one is a
        // warning of the framework's, which would bury the results.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,exactly::partition=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Plain text in the log files of child processes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match args.command {
            Some(Command::FootprintChild {
                ref brokers,
                ref app_id,
                ref topic,
                ref output,
                partitions,
                records,
            }) => footprint::child(brokers, app_id, topic, output, partitions, records).await,
            Some(Command::ScaleChild {
                ref brokers,
                ref app_id,
                ref topic,
                ref output,
                variant,
                ref state_dir,
                mode,
                input_end,
                hold,
            }) => {
                scale::child(&scale::ChildArgs {
                    brokers: brokers.clone(),
                    app_id: app_id.clone(),
                    topic: topic.clone(),
                    output: output.clone(),
                    variant,
                    state_dir: state_dir.clone(),
                    mode,
                    input_end,
                    hold,
                })
                .await
            }
            None => run(&args).await,
        }
    });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let say = move |line: &str| println!("[{:>7.1}s] {line}", started.elapsed().as_secs_f64());
    let records = args
        .records
        .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    let _cluster;
    let bootstrap = match &args.brokers {
        Some(brokers) => brokers.clone(),
        None => {
            say("starting the local Apache Kafka");
            // As Kafka's start script runs a broker, not with the tests' small serial-GC heap.
            let options = ClusterOptions {
                jvm: Jvm::KafkaDefaults,
                ..ClusterOptions::default()
            };
            let cluster = TestCluster::start_owned(options)
                .await
                .context("starting the local Apache Kafka")?;
            // Straight to the broker: the fault-injecting proxy is for tests, not measurements.
            let bootstrap = cluster.direct_bootstrap_servers();
            _cluster = cluster;
            bootstrap
        }
    };
    let run_id = unique_name("bench");
    let log_dir = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&log_dir)
        .with_context(|| format!("creating the log directory {}", log_dir.display()))?;
    let options = BenchOptions {
        bootstrap: bootstrap.clone(),
        run: run_id,
        records,
        partitions: args.partitions,
        keys: args.keys,
        state_keys: args.state_keys.unwrap_or(records),
        latency_rate: args.latency_rate,
        latency_duration: Duration::from_secs(args.latency_seconds.unwrap_or(if args.quick {
            10
        } else {
            30
        })),
        scale_keys: args
            .scale_keys
            .as_ref()
            .map_or_else(|| scale::DEFAULT_KEYS.to_vec(), |k| k.0.clone()),
        scale_updates: args
            .scale_updates
            .unwrap_or(if args.quick { 10_000 } else { 80_000 }),
        footprint_partitions: vec![1, 8, 32, 128],
        skip_quix: args.skip_quix.then(|| "skipped (--skip-quix)".to_owned()),
        bench_exe: std::env::current_exe().context("locating the bench binary")?,
        log_dir: log_dir.clone(),
    };
    say(&format!(
        "brokers {bootstrap}; logs in {}",
        log_dir.display()
    ));
    if args.only.as_deref() == Some("restore") {
        let r = bench::run_restore(&options, bench::Peers::Skip, &say).await?;
        let ratio = r.replay.restore.as_secs_f64() / r.snapshot.restore.as_secs_f64().max(1e-9);
        println!(
            "\n  from its full snapshot {} ms, by replay {} ms: restore_vs_replay={ratio:.1}",
            r.snapshot.restore.as_millis(),
            r.replay.restore.as_millis()
        );
        return Ok(());
    }
    if args.only.as_deref() == Some("throughput") {
        let t = bench::run_throughput(&options, bench::Peers::Skip, &say).await?;
        println!();
        for tp in [
            &t.raw,
            &t.txn_pipe,
            &t.exactly_pass_through,
            &t.exactly_default,
        ]
        .into_iter()
        .chain(&t.exactly_intervals)
        {
            println!(
                "  {:<48} {:>8.2} s {:>10.0} records/s",
                tp.case,
                tp.elapsed.as_secs_f64(),
                tp.rate()
            );
        }
        return Ok(());
    }
    if args.only.as_deref() == Some("latency") {
        let latency = bench::run_latency(&options, &say).await?;
        println!();
        print!("{}", latency.hop_table());
        return Ok(());
    }
    if args.only.is_some() {
        let results = bench::run_scale(&options, &say).await?;
        println!();
        print!("{}", results.table());
        println!();
        let or_na = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
        println!(
            "SCALE warm_vs_cold_restore={} commit_p99_ratio_10m_vs_10k={} snapshot_topic_vs_full_snapshot={:.2}",
            or_na(results.warm_vs_cold_restore()),
            or_na(results.commit_p99_ratio_10m_vs_10k().map(|(r, _)| r)),
            results.snapshot_topic.ratio()
        );
        return Ok(());
    }
    let results = bench::run(&options, &say).await?;
    println!();
    print!("{}", results.tables());
    println!();
    println!("{}", results.summary_line());
    Ok(())
}

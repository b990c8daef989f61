//! The benchmark (`cargo run --release -p exactly-examples --bin bench`): every case on the
//! same broker and the same input records, in one run, reported as ratios against a
//! baseline measured in that run (absolute numbers are not comparable between machines or
//! runs).
//!
//! - [`raw`]: the ceiling, a librdkafka consume → produce pipe without transactions or state;
//! - [`txn_pipe`]: the floor of exactly-once on this design, the same pipe in Kafka
//!   transactions with one transactional producer per partition, without the framework;
//! - [`workload`]: the input and the stateful count exactly (and Quix) compute;
//! - [`engine`]: an exactly app inside this process, run until its input is committed;
//! - [`quix`]: Quix Streams 3.28.1 in its own virtualenv, doing the same count;
//! - [`kstreams`]: Kafka Streams 4.4 (exactly-once v2), built with Maven, doing the same count;
//! - [`recovery`]: restoring a large state from a full snapshot vs replaying it;
//! - [`latency`]: end-to-end latency through the payments chain A → B → C;
//! - [`scale`]: state at scale: commit latency at 10k to 10M keys, plain state vs keyed
//!   store; warm vs cold restore; snapshot topic size after many full snapshots;
//! - [`footprint`]: threads and memory per assigned partition;
//! - [`progress`]: the common finish line (the group's committed offsets);
//! - [`report`]: the tables and the `BENCH ...` line.

pub mod engine;
pub mod footprint;
pub mod kstreams;
pub mod latency;
pub mod progress;
pub mod quix;
pub mod raw;
pub mod recovery;
pub mod report;
pub mod scale;
pub mod txn_pipe;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use exactly::AppConfig;
use exactly_tests::chaos::ChainTopics;

use crate::topics::create_topics;
use report::{QuixResult, Results, Throughput};
use workload::{CountProcessor, PassThrough};

/// Topic configs every benchmark topic gets. Quix reads `retention.ms` and `retention.bytes`
/// of its input topic to configure its changelog topics, and the local broker does not report
/// defaults (framework/DESIGN.md §6).
pub const TOPIC_CONFIG: [(&str, &str); 2] =
    [("retention.ms", "604800000"), ("retention.bytes", "-1")];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bootstrap servers.
    pub bootstrap: String,
    /// Prefix of every topic and group of this run.
    pub run: String,
    /// Input records of the throughput cases.
    pub records: u64,
    /// Partitions of the throughput topics (and the chain's).
    pub partitions: i32,
    /// Distinct keys of the throughput input.
    pub keys: u64,
    /// Keys of the restored state (one record each, one partition).
    pub state_keys: u64,
    /// Input rate of the latency case, commands per second.
    pub latency_rate: u64,
    /// How long the latency case produces.
    pub latency_duration: Duration,
    /// Key counts of the state-at-scale case.
    pub scale_keys: Vec<u64>,
    /// Update records per measurement of the state-at-scale case.
    pub scale_updates: u64,
    /// Assigned partition counts of the footprint case.
    pub footprint_partitions: Vec<i32>,
    /// Skip Quix (reported as not measured, with this reason).
    pub skip_quix: Option<String>,
    /// This benchmark's binary (re-run for the footprint case).
    pub bench_exe: PathBuf,
    /// Where child process logs go.
    pub log_dir: PathBuf,
}

impl BenchOptions {
    /// The name of this run's topic `name`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.run)
    }

    /// The id of this run's app `name` (app ids take no '.': they prefix transactional ids
    /// and snapshot topics).
    pub fn app(&self, name: &str) -> String {
        format!("{}-{name}", self.run)
    }
}

/// Longest any single case may take before the benchmark gives up on it.
const CASE_LIMIT: Duration = Duration::from_secs(1800);

/// Runs every case; `say` reports progress.
pub async fn run(options: &BenchOptions, say: &(dyn Fn(&str) + Sync)) -> anyhow::Result<Results> {
    let o = options;
    let throughput = run_throughput(o, Peers::Run, say).await?;
    let restore = run_restore(o, Peers::Run, say).await?;
    say(&format!(
        "case 5: end-to-end latency A -> B -> C at {} commands/s for {} s",
        o.latency_rate,
        o.latency_duration.as_secs()
    ));
    let latency = run_latency(o, say).await?;
    let scale = run_scale(o, say).await?;
    let footprints = run_footprints(o, say).await?;
    Ok(Results {
        records: o.records,
        partitions: o.partitions,
        raw: throughput.raw,
        txn_pipe: throughput.txn_pipe,
        exactly_pass_through: throughput.exactly_pass_through,
        exactly_default: throughput.exactly_default,
        exactly_intervals: throughput.exactly_intervals,
        quix: throughput.quix,
        kstreams: throughput.kstreams,
        kstreams_restore: restore.kstreams,
        restore_snapshot: restore.snapshot,
        restore_replay: restore.replay,
        state_keys: o.state_keys,
        latency,
        latency_rate: o.latency_rate,
        scale,
        footprints,
    })
}

/// Whether the throughput cases run the peers (Quix Streams, Kafka Streams) too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// Run them.
    Run,
    /// Only exactly (and the raw pipe), for development.
    Skip,
}

/// What the throughput cases measured.
pub struct ThroughputResults {
    /// The raw pipe.
    pub raw: Throughput,
    /// The transactional pipe.
    pub txn_pipe: Throughput,
    /// exactly passing records through, without state or decoding.
    pub exactly_pass_through: Throughput,
    /// exactly at its default settings.
    pub exactly_default: Throughput,
    /// exactly at other commit intervals.
    pub exactly_intervals: Vec<Throughput>,
    /// Quix Streams.
    pub quix: QuixResult,
    /// Kafka Streams, or why it did not run.
    pub kstreams: Result<Vec<Throughput>, String>,
}

/// Cases 1 to 3: the raw pipe, exactly at three commit intervals and the peers, on the same
/// input.
pub async fn run_throughput(
    o: &BenchOptions,
    peers: Peers,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ThroughputResults> {
    let (topic, app) = (|name: &str| o.topic(name), |name: &str| o.app(name));
    let input = topic("input");
    let outputs = [
        "out-raw",
        "out-exactly-default",
        "out-exactly-10ms",
        "out-exactly-1000ms",
        "out-quix",
        "out-kstreams-1",
        "out-kstreams-n",
        "out-warm-up-raw",
        "out-warm-up-exactly",
        "out-txn-pipe",
        "out-exactly-pass-through",
    ]
    .map(topic);
    let mut throughput_topics: Vec<&str> = vec![&input];
    throughput_topics.extend(outputs.iter().map(String::as_str));
    create_topics(
        &o.bootstrap,
        &throughput_topics,
        o.partitions,
        &TOPIC_CONFIG,
    )
    .await?;

    say(&format!("producing {} input records to {input}", o.records));
    let produced = {
        let (bootstrap, input, records, keys) =
            (o.bootstrap.clone(), input.clone(), o.records, o.keys);
        tokio::task::spawn_blocking(move || {
            workload::produce_input(&bootstrap, &input, records, keys)
        })
        .await
        .context("the input producer panicked")??
    };
    say(&format!(
        "produced in {:.1} s ({:.0} records/s)",
        produced.as_secs_f64(),
        o.records as f64 / produced.as_secs_f64()
    ));

    // The first consumer group and the first transactional producer of a fresh broker wait
    // for it to create and load __consumer_offsets and __transaction_state, and its JIT is
    // cold: a raw pipe measured first paid for all of it (3.6 s instead of 0.9 s for 100k
    // records in one run).
    say("warm-up: an unmeasured raw pipe and exactly run over the same input");
    raw_pipe(o, &input, &outputs[7], &topic("warm-up-raw")).await?;
    exactly_run(o, &app("warm-up"), &input, &outputs[8], None)
        .await
        .context("the warm-up run")?;

    say("case 1: raw pipe (consume -> produce, no transactions, no state)");
    let raw_elapsed = raw_pipe(o, &input, &outputs[0], &topic("raw")).await?;
    let raw = Throughput {
        case: "raw pipe (no transactions, no state)".into(),
        records: o.records,
        elapsed: raw_elapsed,
    };
    say(&format!("  {:.0} records/s", raw.rate()));

    say("case 1b: transactional pipe (one transactional producer per partition, no framework)");
    let txn_pipe = Throughput {
        case: "transactional pipe (no framework, no state)".into(),
        records: o.records,
        elapsed: transactional_pipe(o, &input, &outputs[9], &topic("txn-pipe")).await?,
    };
    say(&format!("  {:.0} records/s", txn_pipe.rate()));

    say("case 2: exactly EOS, pass-through (no state, no JSON)");
    let exactly_pass_through = Throughput {
        case: "exactly EOS, pass-through (no state, no JSON)".into(),
        records: o.records,
        elapsed: pass_through_run(o, &app("exactly-pass-through"), &input, &outputs[10])
            .await
            .context("the pass-through run")?
            .elapsed,
    };
    say(&format!("  {:.0} records/s", exactly_pass_through.rate()));

    let mut exactly_runs = Vec::new();
    for (label, interval, output) in [
        (
            "exactly EOS, default settings (commit 100 ms)",
            None,
            &outputs[1],
        ),
        ("exactly EOS, commit interval 10 ms", Some(10), &outputs[2]),
        (
            "exactly EOS, commit interval 1000 ms",
            Some(1000),
            &outputs[3],
        ),
    ] {
        say(&format!("case 2: {label}"));
        let app_id = app(&format!(
            "exactly-{}",
            interval.map_or("default".to_owned(), |ms| format!("{ms}ms"))
        ));
        let run = exactly_run(o, &app_id, &input, output, interval)
            .await
            .with_context(|| format!("case {label}"))?;
        let tp = Throughput {
            case: label.into(),
            records: o.records,
            elapsed: run.elapsed,
        };
        say(&format!(
            "  {:.0} records/s, {} transactions",
            tp.rate(),
            run.metrics.transactions_committed
        ));
        exactly_runs.push(tp);
    }
    let exactly_default = exactly_runs.remove(0);

    let not_run = || "not run (--only throughput)".to_owned();
    if peers == Peers::Skip {
        return Ok(ThroughputResults {
            raw,
            txn_pipe,
            exactly_pass_through,
            exactly_default,
            exactly_intervals: exactly_runs,
            quix: QuixResult::Unavailable(not_run()),
            kstreams: Err(not_run()),
        });
    }
    let quix = match &o.skip_quix {
        Some(reason) => QuixResult::Unavailable(reason.clone()),
        None => {
            say("case 3: Quix Streams 3.28.1, exactly-once (installing it first if needed)");
            run_quix(o, &input, &outputs[4], say).await
        }
    };
    if let QuixResult::Measured(tp) = &quix {
        say(&format!("  {:.0} records/s", tp.rate()));
    }

    say("case 3b: Kafka Streams 4.4, exactly_once_v2 (building it first if needed)");
    let kstreams = run_kstreams(o, &input, [&outputs[5], &outputs[6]], say).await;
    match &kstreams {
        Ok(runs) => {
            for tp in runs {
                say(&format!("  {}: {:.0} records/s", tp.case, tp.rate()));
            }
        }
        Err(why) => say(&format!("  not measured: {why}")),
    }

    Ok(ThroughputResults {
        raw,
        txn_pipe,
        exactly_pass_through,
        exactly_default,
        exactly_intervals: exactly_runs,
        quix,
        kstreams,
    })
}

/// The raw pipe over `input` into `output` with consumer group `group`; its time.
async fn raw_pipe(
    o: &BenchOptions,
    input: &str,
    output: &str,
    group: &str,
) -> anyhow::Result<Duration> {
    let (bootstrap, input, output, group, records) = (
        o.bootstrap.clone(),
        input.to_owned(),
        output.to_owned(),
        group.to_owned(),
        o.records,
    );
    tokio::task::spawn_blocking(move || {
        raw::run_raw_pipe(&bootstrap, &input, &output, &group, records, CASE_LIMIT)
    })
    .await
    .context("the raw pipe panicked")?
}

/// The transactional pipe over `input` into `output` with consumer group `group`, committing
/// every 100 ms (exactly's default commit interval); its time.
async fn transactional_pipe(
    o: &BenchOptions,
    input: &str,
    output: &str,
    group: &str,
) -> anyhow::Result<Duration> {
    let (bootstrap, input, output, group) = (
        o.bootstrap.clone(),
        input.to_owned(),
        output.to_owned(),
        group.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        txn_pipe::run_txn_pipe(
            &bootstrap,
            &input,
            &output,
            &group,
            Duration::from_millis(100),
            CASE_LIMIT,
        )
    })
    .await
    .context("the transactional pipe panicked")?
}

/// exactly passing `input` through to `output` as `app_id`, at the default settings, until its
/// group committed the whole input.
async fn pass_through_run(
    o: &BenchOptions,
    app_id: &str,
    input: &str,
    output: &str,
) -> anyhow::Result<engine::ThroughputRun> {
    let config = AppConfig::new(app_id, &o.bootstrap).input_topic(input);
    let processor = PassThrough {
        output_topic: output.to_owned(),
    };
    run_over_input(o, config, processor, input).await
}

/// The counting app as `app_id` over `input` into `output`, at the default settings or the
/// given commit interval (ms), until its group committed the whole input.
async fn exactly_run(
    o: &BenchOptions,
    app_id: &str,
    input: &str,
    output: &str,
    commit_interval_ms: Option<u64>,
) -> anyhow::Result<engine::ThroughputRun> {
    let mut config = AppConfig::new(app_id, &o.bootstrap).input_topic(input);
    if let Some(ms) = commit_interval_ms {
        config = config.commit_interval(Duration::from_millis(ms));
    }
    let processor = CountProcessor {
        output_topic: output.to_owned(),
    };
    run_over_input(o, config, processor, input).await
}

/// Runs `processor` with `config` over the throughput case's `input` until its group
/// committed all of it.
async fn run_over_input<P: exactly::Processor>(
    o: &BenchOptions,
    config: AppConfig,
    processor: P,
    input: &str,
) -> anyhow::Result<engine::ThroughputRun> {
    engine::run_to_end(
        config,
        processor,
        &o.bootstrap,
        input,
        o.partitions,
        o.records,
        CASE_LIMIT,
    )
    .await
}

/// What the restore case measured.
pub struct RestoreResults {
    /// exactly from its full snapshot.
    pub snapshot: recovery::RestoreRun,
    /// exactly replaying everything.
    pub replay: recovery::RestoreRun,
    /// Kafka Streams from its changelog, or why it did not run.
    pub kstreams: Result<kstreams::KStreamsRestore, String>,
}

/// Case 4: the same large state restored by exactly from its full snapshot, by replaying
/// everything, and by Kafka Streams from its changelog.
pub async fn run_restore(
    o: &BenchOptions,
    peers: Peers,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<RestoreResults> {
    let (topic, app) = (|name: &str| o.topic(name), |name: &str| o.app(name));
    say(&format!("case 4: restore of a {}-key state", o.state_keys));
    let state_input = topic("state-input");
    let restore_outputs = [topic("out-restore-snapshot"), topic("out-restore-replay")];
    create_topics(
        &o.bootstrap,
        &[&state_input, &restore_outputs[0], &restore_outputs[1]],
        1,
        &TOPIC_CONFIG,
    )
    .await?;
    {
        let (bootstrap, state_input, keys) =
            (o.bootstrap.clone(), state_input.clone(), o.state_keys);
        tokio::task::spawn_blocking(move || {
            workload::produce_input(&bootstrap, &state_input, keys, keys)
        })
        .await
        .context("the state input producer panicked")??;
    }
    let restore_snapshot = recovery::measure_restore(
        &o.bootstrap,
        &state_input,
        &restore_outputs[0],
        o.state_keys,
        &app("restore-snapshot"),
        true,
        CASE_LIMIT,
    )
    .await
    .context("restore with full snapshots")?;
    say(&format!(
        "  with full snapshots: restore {} ms ({} records replayed), snapshot {} bytes",
        restore_snapshot.restore.as_millis(),
        restore_snapshot.replayed,
        restore_snapshot.snapshot_bytes
    ));
    let restore_replay = recovery::measure_restore(
        &o.bootstrap,
        &state_input,
        &restore_outputs[1],
        o.state_keys,
        &app("restore-replay"),
        false,
        CASE_LIMIT,
    )
    .await
    .context("restore by replay")?;
    say(&format!(
        "  without: restore {} ms ({} records replayed)",
        restore_replay.restore.as_millis(),
        restore_replay.replayed
    ));

    if peers == Peers::Skip {
        return Ok(RestoreResults {
            snapshot: restore_snapshot,
            replay: restore_replay,
            kstreams: Err("not run (--only restore)".to_owned()),
        });
    }
    say("  Kafka Streams: the same state restored from its changelog into an empty state dir");
    let kstreams_restore =
        run_kstreams_restore(o, &state_input, &topic("out-restore-kstreams"), say).await;
    match &kstreams_restore {
        Ok(r) => say(&format!(
            "  Kafka Streams: restore {} ms ({} records), {} ms after its start",
            r.restore.as_millis(),
            r.records,
            r.ready_after_start.as_millis()
        )),
        Err(why) => say(&format!("  Kafka Streams restore not measured: {why}")),
    }

    Ok(RestoreResults {
        snapshot: restore_snapshot,
        replay: restore_replay,
        kstreams: kstreams_restore,
    })
}

/// Case 7: throughput, threads and memory at each assigned partition count.
pub async fn run_footprints(
    o: &BenchOptions,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Vec<footprint::Footprint>> {
    let (topic, app) = (|name: &str| o.topic(name), |name: &str| o.app(name));
    say("case 7: partition scaling (throughput, threads, memory)");
    let mut footprints = Vec::new();
    for &partitions in &o.footprint_partitions {
        let fp_input = topic(&format!("footprint-{partitions}"));
        let fp_output = topic(&format!("out-footprint-{partitions}"));
        create_topics(
            &o.bootstrap,
            &[&fp_input, &fp_output],
            partitions,
            &TOPIC_CONFIG,
        )
        .await?;
        // The same records (and keys) at every partition count: only the partitioning differs.
        let records = o.records;
        {
            let (bootstrap, fp_input, keys) = (o.bootstrap.clone(), fp_input.clone(), o.keys);
            tokio::task::spawn_blocking(move || {
                workload::produce_input(&bootstrap, &fp_input, records, keys)
            })
            .await
            .context("the footprint input producer panicked")??;
        }
        let footprint = footprint::measure(&footprint::FootprintCase {
            bench_exe: &o.bench_exe,
            bootstrap: &o.bootstrap,
            app_id: &app(&format!("footprint-app-{partitions}")),
            topic: &fp_input,
            output: &fp_output,
            partitions,
            records,
            log_dir: &o.log_dir,
        })
        .await
        .with_context(|| format!("the footprint with {partitions} partitions"))?;
        say(&format!(
            "  {partitions} partitions: {:.0} records/s, first record after {} ms, {} threads, {:.1} MiB",
            footprint.records_per_s,
            footprint.first_record_ms,
            footprint.threads,
            footprint.rss_kib as f64 / 1024.0
        ));
        footprints.push(footprint);
    }

    Ok(footprints)
}

/// Case 5 alone: end-to-end latency through the payments chain (see [`latency`]).
///
/// A first pass of the same chain, on topics and app ids of its own, at the same rate and for
/// as long, warms the broker up and is not counted (its p50 and p99 are reported beside the
/// measured ones). When the case starts, the broker's JIT has not yet compiled the paths of
/// hundreds of small transactions a second. Measured in session 18 on brokers that had run only
/// the throughput case: the first pass's p99 was 428, 446 and 522 ms, with the broker at
/// 121–133 % of the two cores and a transaction's flush at p50 22 ms, falling to 10 ms over
/// its 30 s; the pass right after it, 177, 251 and 223 ms, at 95–100 % and a flush of 6–8 ms.
/// The measured pass's apps still start cold, and its first two seconds are still left out.
pub async fn run_latency(
    o: &BenchOptions,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<latency::LatencyRun> {
    say("  warm-up (not counted): the same chain on topics of its own, as fast and as long");
    let warm_up = chain_latency(o, "chain-warm-up")
        .await
        .context("the latency case's warm-up")?;
    say(&format!(
        "  warm-up: p50 {} ms, p99 {} ms",
        warm_up.p50.as_millis(),
        warm_up.p99.as_millis()
    ));
    let mut latency = chain_latency(o, "chain")
        .await
        .context("the latency case")?;
    latency.warm_up = Some(latency::WarmUp {
        p50: warm_up.p50,
        p99: warm_up.p99,
    });
    say(&format!(
        "  p50 {} ms, p99 {} ms",
        latency.p50.as_millis(),
        latency.p99.as_millis()
    ));
    Ok(latency)
}

/// One pass of the latency case on the chain named `name`.
async fn chain_latency(o: &BenchOptions, name: &str) -> anyhow::Result<latency::LatencyRun> {
    let chain = ChainTopics::new(&o.topic(name));
    create_topics(&o.bootstrap, &chain.all(), o.partitions, &TOPIC_CONFIG).await?;
    latency::measure_chain_latency(
        &o.bootstrap,
        &o.app(name),
        &chain,
        o.partitions,
        o.latency_rate,
        o.latency_duration,
    )
    .await
}

/// Case 6 alone: state at scale (see [`scale`]).
pub async fn run_scale(
    o: &BenchOptions,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<scale::ScaleResults> {
    say(&format!(
        "case 6: state at scale ({} keys; {} updates per measurement)",
        o.scale_keys
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
        o.scale_updates
    ));
    scale::measure(
        &scale::ScaleCase {
            bench_exe: &o.bench_exe,
            bootstrap: &o.bootstrap,
            run: &o.run,
            keys: &o.scale_keys,
            updates: o.scale_updates,
            log_dir: &o.log_dir,
        },
        say,
    )
    .await
    .context("case 6, state at scale")
}

/// Kafka Streams on the same input, with one stream thread and with one per partition, each
/// measured to the same finish line; any reason it cannot run becomes the result.
async fn run_kstreams(
    o: &BenchOptions,
    input: &str,
    outputs: [&String; 2],
    say: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Throughput>, String> {
    let env = {
        let progress = |line: &str| say(&format!("  {line}"));
        tokio::task::block_in_place(|| kstreams::prepare(progress)).map_err(|e| e.to_string())?
    };
    let mut runs = Vec::new();
    for (threads, output) in [(1, outputs[0]), (o.partitions.max(1) as usize, outputs[1])] {
        let application_id = format!("{}-kstreams-{threads}", o.run);
        let offsets =
            progress::GroupOffsets::new(&o.bootstrap, &application_id, input, o.partitions)
                .map_err(|e| format!("{e:#}"))?;
        let args = kstreams::KStreamsCountArgs {
            bootstrap: o.bootstrap.clone(),
            input: input.to_owned(),
            output: output.clone(),
            application_id,
            threads,
            log_path: o.log_dir.join(format!("kstreams-{threads}.log")),
        };
        let started = Instant::now();
        let (mut process, _state_dir) = env.spawn_count(&args).map_err(|e| e.to_string())?;
        let finished = tokio::task::block_in_place(|| {
            offsets.wait_for(o.records, started, CASE_LIMIT, || {
                still_running(&mut process, "before finishing")
            })
        });
        if let Err(e) = process.terminate(Duration::from_secs(30)).await {
            tracing::warn!(error = %e, "stopping Kafka Streams");
        }
        let elapsed = finished.map_err(|e| format!("{e:#}"))?;
        runs.push(Throughput {
            case: format!(
                "Kafka Streams {}, exactly_once_v2, {threads} thread{}",
                kstreams::KSTREAMS_VERSION,
                if threads == 1 { "" } else { "s" }
            ),
            records: o.records,
            elapsed,
        });
    }
    Ok(runs)
}

/// Ok while the Kafka Streams app runs; an error with its log tail once it exited `when`.
fn still_running(
    process: &mut exactly_tests::process::ChildProcess,
    when: &str,
) -> anyhow::Result<()> {
    match process.try_status()? {
        None => Ok(()),
        Some(status) => anyhow::bail!(
            "Kafka Streams exited {when} ({status}); log {}:\n{}",
            process.log_path().display(),
            process.log_tail(20)
        ),
    }
}

/// Kafka Streams builds the restore case's state (one partition, every key distinct), stops,
/// and starts again with its state directory wiped: it restores the store from its changelog.
async fn run_kstreams_restore(
    o: &BenchOptions,
    input: &str,
    output: &str,
    say: &(dyn Fn(&str) + Sync),
) -> Result<kstreams::KStreamsRestore, String> {
    create_topics(&o.bootstrap, &[output], 1, &TOPIC_CONFIG)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let env = {
        let progress = |line: &str| say(&format!("  {line}"));
        tokio::task::block_in_place(|| kstreams::prepare(progress)).map_err(|e| e.to_string())?
    };
    let application_id = format!("{}-kstreams-restore", o.run);
    let offsets = progress::GroupOffsets::new(&o.bootstrap, &application_id, input, 1)
        .map_err(|e| format!("{e:#}"))?;
    let args = |log: &str| kstreams::KStreamsCountArgs {
        bootstrap: o.bootstrap.clone(),
        input: input.to_owned(),
        output: output.to_owned(),
        application_id: application_id.clone(),
        threads: 1,
        log_path: o.log_dir.join(log),
    };
    let started = Instant::now();
    let (mut first, first_state) = env
        .spawn_count(&args("kstreams-restore-build.log"))
        .map_err(|e| e.to_string())?;
    let built = tokio::task::block_in_place(|| {
        offsets.wait_for(o.state_keys, started, CASE_LIMIT, || {
            still_running(&mut first, "while building the state")
        })
    });
    let stopped = first.terminate(Duration::from_secs(60)).await;
    built.map_err(|e| format!("{e:#}"))?;
    stopped.map_err(|e| format!("stopping Kafka Streams: {e}"))?;
    drop(first_state); // the local state goes: the restart restores from the changelog

    let started = Instant::now();
    let (mut second, _state) = env
        .spawn_count(&args("kstreams-restore.log"))
        .map_err(|e| e.to_string())?;
    let line = second
        .wait_for_log("KSTREAMS-RESTORED", CASE_LIMIT)
        .await
        .map_err(|e| e.to_string());
    let ready_after_start = started.elapsed();
    if let Err(e) = second.terminate(Duration::from_secs(60)).await {
        tracing::warn!(error = %e, "stopping Kafka Streams");
    }
    let line = line?;
    let (records, restore) = kstreams::parse_restored(&line)
        .ok_or_else(|| format!("cannot read the restore line {line:?}"))?;
    Ok(kstreams::KStreamsRestore {
        restore,
        ready_after_start,
        records,
    })
}

/// Quix on the same input, measured to the same finish line; any reason it cannot run becomes
/// the result.
async fn run_quix(
    o: &BenchOptions,
    input: &str,
    output: &str,
    say: &(dyn Fn(&str) + Sync),
) -> QuixResult {
    let prepared = {
        let progress = |line: &str| say(&format!("  {line}"));
        tokio::task::block_in_place(|| quix::prepare(progress))
    };
    let env = match prepared {
        Ok(env) => env,
        Err(why) => return QuixResult::Unavailable(why.to_string()),
    };
    let group = format!("{}.quix", o.run);
    let offsets = match progress::GroupOffsets::new(&o.bootstrap, &group, input, o.partitions) {
        Ok(offsets) => offsets,
        Err(e) => return QuixResult::Unavailable(format!("{e:#}")),
    };
    let args = quix::QuixCountArgs {
        broker: o.bootstrap.clone(),
        input_topic: input.to_owned(),
        output_topic: output.to_owned(),
        group,
        commit_interval: None,
        log_path: o.log_dir.join("quix.log"),
    };
    let started = Instant::now();
    let mut process = match env.spawn_count(&args) {
        Ok(process) => process,
        Err(why) => return QuixResult::Unavailable(why.to_string()),
    };
    let finished = tokio::task::block_in_place(|| {
        offsets.wait_for(o.records, started, CASE_LIMIT, || {
            match process.try_exit() {
                Some(exit) => anyhow::bail!("Quix exited before finishing: {exit}"),
                None => Ok(()),
            }
        })
    });
    if let Err(e) = process.stop() {
        tracing::warn!(error = %e, "stopping Quix");
    }
    match finished {
        Ok(elapsed) => QuixResult::Measured(Throughput {
            case: "Quix Streams 3.28.1, exactly-once".into(),
            records: o.records,
            elapsed,
        }),
        Err(why) => QuixResult::Unavailable(format!("{why:#}")),
    }
}

//! A service driven by time, used by the integration tests of wall-clock ticks and stream-time
//! timers under kill -9 (tests/tests/integration/framework_time.rs).
//!
//! Input: key = a card (any UTF-8 string), value = a unique record id (UTF-8).
//! - Every record's id waits in the state until the next wall-clock tick
//!   (`Processor::on_wall_clock`, every `--tick-ms`), which sends each waiting id to `--output`
//!   as key = id, value = `"tick <id> <tick number>"` and empties the waiting set. Every input
//!   id must come out exactly once: a replay that fired its ticks elsewhere than where they
//!   first fired would send some ids twice (or never).
//! - Every record (re)schedules a stream-time timer for its card `--idle-ms` after the
//!   record's timestamp; when it fires the service sends key = card, value =
//!   `"idle <card> <time>"`. No such value may come out twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Parser;
use exactly::{App, AppConfig, Output, ProcessError, Processor, Record, Timer, Timers, Utf8};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "exactly test service: wall-clock ticks and stream-time timers")]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    app_id: String,
    #[arg(long)]
    input: String,
    #[arg(long)]
    output: String,
    #[arg(long, default_value_t = 500)]
    tick_ms: u64,
    #[arg(long, default_value_t = 1_000)]
    idle_ms: i64,
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// AppConfig::commit_when_idle: how long a transaction stays open after its last input.
    #[arg(long, default_value_t = 20)]
    commit_when_idle_ms: u64,
    #[arg(long, default_value_t = 100_000)]
    full_snapshot_every: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Clock {
    /// Ids waiting for the next tick.
    waiting: BTreeSet<String>,
    ticks: u64,
    /// Each card's timer.
    idle_at: BTreeMap<String, i64>,
    timers: Timers,
}

struct TickService {
    tick: Duration,
    idle_ms: i64,
    output: String,
}

impl Processor for TickService {
    type State = Clock;
    type Key = Utf8;
    type Value = Utf8;

    fn process(
        &self,
        clock: &mut Clock,
        record: &Record<'_, String, String>,
        _: &mut Output,
    ) -> Result<(), ProcessError> {
        clock.waiting.insert(record.value().clone());
        let card = record.key();
        let at = record.timestamp().unwrap_or_default() + self.idle_ms;
        if let Some(before) = clock.idle_at.insert(card.clone(), at) {
            clock.timers.cancel(before, card)?;
        }
        clock.timers.schedule(at, card)?;
        Ok(())
    }

    fn wall_clock_interval(&self) -> Option<Duration> {
        Some(self.tick)
    }

    fn on_wall_clock(
        &self,
        clock: &mut Clock,
        _now_ms: i64,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        if clock.waiting.is_empty() {
            return Ok(());
        }
        clock.ticks += 1;
        for id in std::mem::take(&mut clock.waiting) {
            let value = format!("tick {id} {}", clock.ticks);
            out.send_as::<Utf8, Utf8>(&self.output, &id, &value)?;
        }
        Ok(())
    }

    fn on_timer(
        &self,
        clock: &mut Clock,
        timer: &Timer,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        clock.idle_at.remove(&timer.key);
        let value = format!("idle {} {}", timer.key, timer.time);
        out.send_as::<Utf8, Utf8>(&self.output, &timer.key, &value)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .init();
    let args = Args::parse();
    let config = AppConfig::new(&args.app_id, &args.brokers)
        .input_topic(&args.input)
        .commit_interval(Duration::from_millis(args.commit_interval_ms))
        .commit_when_idle(Duration::from_millis(args.commit_when_idle_ms))
        .full_snapshot_every_records(args.full_snapshot_every);
    let config = match config.from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("clock-service: {e}");
            std::process::exit(2);
        }
    };
    let processor = TickService {
        tick: Duration::from_millis(args.tick_ms),
        idle_ms: args.idle_ms,
        output: args.output.clone(),
    };
    let app = match App::new(config, processor) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("clock-service failed: {e}");
            std::process::exit(2);
        }
    };
    match app.run().await {
        Ok(()) => println!("clock-service stopped cleanly"),
        Err(e) => {
            println!("clock-service failed: {e}");
            std::process::exit(1);
        }
    }
}

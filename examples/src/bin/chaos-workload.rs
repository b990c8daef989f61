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
//!   with the reference model ([`model::expect`]) of the first N commands: duplicates and
//!   missing ids per topic, B's final balances and C's final totals. Prints a human report and
//!   one line `VERIFY duplicates=D missing=M unexpected=U order_violations=O state=match|mismatch`
//!   followed by `OFFENDING <topic> <kind> <id> [at <positions>]` lines for the first
//!   offending records. Exit code 0 when clean, 1 on a violation, 2 when the check itself
//!   failed.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand};
use exactly_examples::generator;
use exactly_examples::model::{self, AccountCurrency};
use exactly_examples::payments::{
    leg_id, AccountSummary, BalanceChanged, Rejection, Transfer, PAYMENT_ID_HEADER,
};
use exactly_examples::stats::Totals;
use exactly_tests::eos::{check_topic_with, CheckOptions, EosReport, Observed, Position};
use rdkafka::message::{BorrowedMessage, DeliveryResult, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

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

/// Counts failed deliveries: a command that never arrived would look like a lost record.
#[derive(Default)]
struct DeliveryCounter {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

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
    let producer: BaseProducer<DeliveryCounter> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(DeliveryCounter::default())
        .context("creating the input producer")?;
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
        let headers = OwnedHeaders::new().insert(Header {
            key: PAYMENT_ID_HEADER,
            value: Some(command.id.as_str()),
        });
        let record = BaseRecord::to(&args.topic)
            .key(&command.key)
            .payload(&command.value)
            .headers(headers);
        match producer.send(record) {
            Ok(()) => produced += 1,
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => {
                producer.poll(Duration::from_millis(10));
            }
            Err((error, _)) => bail!(
                "producing command {} to {}: {error}",
                command.id,
                args.topic
            ),
        }
        producer.poll(Duration::ZERO);
        if produced % 1000 == 0 {
            eprintln!("produced {produced}");
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the input producer")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = producer
            .context()
            .first_error
            .lock()
            .map(|e| e.clone().unwrap_or_default())
            .unwrap_or_default();
        bail!("{failed} of {produced} commands were not delivered; first error: {first}");
    }
    Ok(produced)
}

// ---------------------------------------------------------------------------------------
// verify

fn json<T: serde::de::DeserializeOwned>(m: &BorrowedMessage<'_>) -> Result<T, String> {
    let bytes = m
        .payload()
        .ok_or_else(|| format!("record at {}/{} has no value", m.partition(), m.offset()))?;
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "undecodable record at {}/{}: {e}",
            m.partition(),
            m.offset()
        )
    })
}

async fn verify(args: VerifyArgs) -> anyhow::Result<bool> {
    let commands = generator::generate(args.input.seed, args.count, args.input.accounts);
    let expectation = model::expect(&commands).context("the reference model refused the input")?;
    let options = CheckOptions {
        timeout: Duration::from_secs(args.timeout_secs),
        max_listed: 10,
        ..CheckOptions::default()
    };
    let b = args.brokers.as_str();
    let mut reports: Vec<EosReport> = Vec::new();

    reports.push(
        check_topic_with(
            b,
            &args.dead_letter_topic,
            expectation.dead_letters.clone(),
            |m: &BorrowedMessage<'_>| {
                let id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .filter(|h| h.key == PAYMENT_ID_HEADER)
                            .last()
                            .and_then(|h| h.value)
                    })
                    .ok_or_else(|| {
                        format!(
                            "dead letter at {}/{} has no {PAYMENT_ID_HEADER} header",
                            m.partition(),
                            m.offset()
                        )
                    })?;
                Ok(Some(Observed::id(String::from_utf8_lossy(id).into_owned())))
            },
            &options,
        )
        .await?,
    );
    reports.push(
        check_topic_with(
            b,
            &args.ledger_topic,
            expectation.ledger_legs.clone(),
            |m: &BorrowedMessage<'_>| Ok(Some(Observed::id(json::<Transfer>(m)?.leg_id()))),
            &options,
        )
        .await?,
    );
    let balances: Arc<Mutex<BTreeMap<AccountCurrency, (u64, i64)>>> = Arc::default();
    let seen = Arc::clone(&balances);
    reports.push(
        check_topic_with(
            b,
            &args.balances_topic,
            expectation.balance_events.clone(),
            move |m: &BorrowedMessage<'_>| {
                let e: BalanceChanged = json(m)?;
                if let Ok(mut seen) = seen.lock() {
                    let slot = seen
                        .entry((e.account.clone(), e.currency.clone()))
                        .or_insert((0, 0));
                    if e.version >= slot.0 {
                        *slot = (e.version, e.balance_cents);
                    }
                }
                Ok(Some(Observed {
                    id: leg_id(&e.id, e.leg),
                    key: Some(e.account),
                    seq: Some(e.version),
                }))
            },
            &options,
        )
        .await?,
    );
    reports.push(
        check_topic_with(
            b,
            &args.rejections_topic,
            expectation.rejections.clone(),
            |m: &BorrowedMessage<'_>| Ok(Some(Observed::id(json::<Rejection>(m)?.id))),
            &options,
        )
        .await?,
    );
    let totals: Arc<Mutex<BTreeMap<AccountCurrency, (u64, Totals)>>> = Arc::default();
    let seen = Arc::clone(&totals);
    reports.push(
        check_topic_with(
            b,
            &args.stats_topic,
            expectation.balance_events.clone(),
            move |m: &BorrowedMessage<'_>| {
                let s: AccountSummary = json(m)?;
                if let Ok(mut seen) = seen.lock() {
                    let slot = seen
                        .entry((s.account.clone(), s.currency.clone()))
                        .or_insert((0, Totals::default()));
                    if s.updates >= slot.0 {
                        *slot = (
                            s.updates,
                            Totals {
                                debit_count: s.debit_count,
                                credit_count: s.credit_count,
                                debited_cents: s.debited_cents,
                                credited_cents: s.credited_cents,
                                balance_cents: s.balance_cents,
                            },
                        );
                    }
                }
                Ok(Some(Observed {
                    id: s.event,
                    key: Some(s.account),
                    seq: Some(s.updates),
                }))
            },
            &options,
        )
        .await?,
    );

    // State: B's last balance and C's last totals per (account, currency) against the model.
    let balances = balances
        .lock()
        .map_err(|_| anyhow!("balance map poisoned"))?;
    let totals = totals.lock().map_err(|_| anyhow!("totals map poisoned"))?;
    let mut state_problems = Vec::new();
    for (k, expected) in &expectation.balances {
        match balances.get(k) {
            Some((_, actual)) if actual == expected => {}
            Some((_, actual)) => {
                state_problems.push(format!("B balance of {k:?}: {actual}, model {expected}"))
            }
            None => state_problems.push(format!("B balance of {k:?}: no event, model {expected}")),
        }
    }
    for k in balances
        .keys()
        .filter(|k| !expectation.balances.contains_key(*k))
    {
        state_problems.push(format!("B balance of {k:?}: not in the model"));
    }
    for (k, expected) in &expectation.totals {
        match totals.get(k) {
            Some((_, actual)) if actual == expected => {}
            Some((_, actual)) => {
                state_problems.push(format!("C totals of {k:?}: {actual:?}, model {expected:?}"))
            }
            None => {
                state_problems.push(format!("C totals of {k:?}: no summary, model {expected:?}"))
            }
        }
    }
    for k in totals
        .keys()
        .filter(|k| !expectation.totals.contains_key(*k))
    {
        state_problems.push(format!("C totals of {k:?}: not in the model"));
    }

    let sum = |f: fn(&EosReport) -> usize| reports.iter().map(f).sum::<usize>();
    let duplicates = sum(|r| r.duplicate_count);
    let missing = sum(|r| r.missing_count);
    let unexpected = sum(|r| r.unexpected_count);
    let order = sum(|r| r.order_violation_count);
    let records: u64 = reports.iter().map(|r| r.records_read).sum();
    for report in &reports {
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
    for problem in state_problems.iter().take(20) {
        println!("state mismatch: {problem}");
    }
    let state = if state_problems.is_empty() {
        "match"
    } else {
        "mismatch"
    };
    println!(
        "VERIFY inputs={} outputs={records} duplicates={duplicates} missing={missing} unexpected={unexpected} order_violations={order} state={state}",
        commands.len()
    );
    for report in &reports {
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
    Ok(reports.iter().all(EosReport::is_clean) && state_problems.is_empty())
}

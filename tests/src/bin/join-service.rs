//! A service over two co-partitioned inputs, used by tests/tests/integration/framework_inputs.rs.
//!
//! Inputs `--left` and `--right` (same partition count; key = any UTF-8 string, value = a
//! unique record id) form one unit per partition (`AppConfig::co_partitioned`). Per unit the
//! state is a running hash of the order in which the records reached the processor; each
//! record sends key = its id, value = `"<n> <topic> <id> <hash>"` (n = records so far in the
//! unit, hash = the running hash after it). The outputs of a unit thus form a chain that the
//! test checks link by link: a replay that chose another order would break it (and fail
//! recovery's fingerprint check).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use clap::Parser;
use exactly::{App, AppConfig, Output, ProcessError, Processor, Record, Utf8};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(about = "exactly test service: two co-partitioned inputs, order-sensitive state")]
struct Args {
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    app_id: String,
    #[arg(long)]
    left: String,
    #[arg(long)]
    right: String,
    #[arg(long)]
    output: String,
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Order {
    count: u64,
    hash: u64,
}

struct Chain {
    output: String,
}

/// The next link of a unit's chain (the test recomputes it).
fn link(previous: u64, topic: &str, id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (previous, topic, id).hash(&mut hasher);
    hasher.finish()
}

impl Processor for Chain {
    type State = Order;
    type Key = Utf8;
    type Value = Utf8;

    fn process(
        &self,
        order: &mut Order,
        record: &Record<'_, String, String>,
        out: &mut Output,
    ) -> Result<(), ProcessError> {
        let id = record.value();
        order.count += 1;
        order.hash = link(order.hash, record.topic(), id);
        let value = format!("{} {} {id} {}", order.count, record.topic(), order.hash);
        out.send_as::<Utf8, Utf8>(&self.output, id, &value)?;
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
        .input_topics([&args.left, &args.right])
        .co_partitioned(true)
        .commit_interval(Duration::from_millis(args.commit_interval_ms));
    let config = match config.from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("join-service: {e}");
            std::process::exit(2);
        }
    };
    let processor = Chain {
        output: args.output.clone(),
    };
    let app = match App::new(config, processor) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("join-service failed: {e}");
            std::process::exit(2);
        }
    };
    match app.run().await {
        Ok(()) => println!("join-service stopped cleanly"),
        Err(e) => {
            println!("join-service failed: {e}");
            std::process::exit(1);
        }
    }
}

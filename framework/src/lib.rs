//! exactly: exactly-once stream processing on Apache Kafka with snapshot-based state recovery.
//!
//! You write a [`Processor`]: a function from (state, input record) to (new state, output
//! records), where the state is an ordinary serde-serializable Rust value kept in memory per
//! input partition. [`App`] runs it on a consumer group and guarantees that every input record
//! affects state and outputs **exactly once**, across crashes, restarts, rebalances and zombie
//! instances: outputs, consumed offsets and an incremental snapshot of the state's progress
//! are committed in one Kafka transaction per batch, by one transactional producer per input
//! partition (`transactional.id = <app>.<topic>.<partition>`, which fences zombies). After a
//! crash a partition's state is rebuilt from its latest full snapshot plus a short replay of
//! the input, and checked against the recorded state fingerprint.
//!
//! # Using exactly
//!
//! `exactly` is not on crates.io yet: depend on it by git or by path. The quickstart below
//! also needs `serde` (derive), `tokio` (for `#[tokio::main]`: `macros`, `rt-multi-thread`)
//! and `tracing-subscriber` (`env-filter`, so that `RUST_LOG` works):
//!
//! ```toml
//! [dependencies]
//! exactly = { git = "<URL of this repository>" } # or { path = "<clone>/framework" }
//! serde = { version = "1", features = ["derive"] }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! tracing-subscriber = { version = "0.3", features = ["env-filter"] }
//! ```
//!
//! librdkafka and RocksDB are built from source, which needs a C and C++ compiler, `make`,
//! `pkg-config`, the OpenSSL headers and libclang (for RocksDB's bindings). [`App::run`] needs a Tokio runtime with its time and I/O drivers, which
//! `#[tokio::main]` provides.
//!
//! # Quickstart
//!
//! A per-user click counter, complete:
//!
//! ```no_run
//! use std::collections::HashMap;
//! use exactly::{App, AppConfig, Json, Output, ProcessError, Processor, Record, Utf8};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Click { page: String }
//!
//! /// Counts clicks per user and publishes each new count to `click-counts`.
//! struct ClickCounter;
//!
//! impl Processor for ClickCounter {
//!     type State = HashMap<String, u64>; // one per input partition, snapshotted by exactly
//!     type Key = Utf8;                    // the user id
//!     type Value = Json<Click>;
//!
//!     fn process(&self, counts: &mut Self::State, click: &Record<'_, String, Click>,
//!                out: &mut Output) -> Result<(), ProcessError> {
//!         let count = counts.entry(click.key().clone()).or_default();
//!         *count += 1;
//!         out.send_json("click-counts", click.key(), count)?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), exactly::Error> {
//!     tracing_subscriber::fmt::init(); // to stdout: errors, or what RUST_LOG=info asks for
//!     let config = AppConfig::new("click-counter", "localhost:9092")
//!         .input_topic("clicks")
//!         .from_env()?; // EXACTLY_* overrides, e.g. EXACTLY_KAFKA_SASL_USERNAME
//!     App::new(config, ClickCounter)?.run().await // until SIGTERM / ctrl-c
//! }
//! ```
//!
//! The same processor, run in-process by [`testing::TestDriver`] (no broker): records in,
//! outputs and state out, and the check that recovery's replay rebuilds both.
//!
//! ```
//! # use std::collections::HashMap;
//! # use exactly::{Json, Output, ProcessError, Processor, Record, Utf8};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)]
//! # struct Click { page: String }
//! # struct ClickCounter;
//! # impl Processor for ClickCounter {
//! #     type State = HashMap<String, u64>;
//! #     type Key = Utf8;
//! #     type Value = Json<Click>;
//! #     fn process(&self, counts: &mut Self::State, click: &Record<'_, String, Click>,
//! #                out: &mut Output) -> Result<(), ProcessError> {
//! #         let count = counts.entry(click.key().clone()).or_default();
//! #         *count += 1;
//! #         out.send_json("click-counts", click.key(), count)?;
//! #         Ok(())
//! #     }
//! # }
//! use exactly::testing::TestDriver;
//!
//! let mut driver = TestDriver::new(ClickCounter);
//! for user in ["ada", "bob", "ada"] {
//!     driver.pipe("clicks", &user.to_string(), &Click { page: "/".into() }).unwrap();
//! }
//! let counts: Vec<(String, u64)> = driver.read_json("click-counts").unwrap();
//! assert_eq!(counts, [("ada".into(), 1), ("bob".into(), 1), ("ada".into(), 2)]);
//! assert_eq!(driver.state("clicks", 0).unwrap()["ada"], 2);
//! driver.verify_determinism().unwrap(); // snapshot, restore, replay: same state and outputs
//! ```
//!
//! # The pieces
//!
//! - [`Processor`], [`Record`], [`Output`], [`OutputRecord`]: the processing API.
//! - [`Store`]: a keyed state store for state too large to snapshot whole or keep in memory
//!   (RocksDB on local disk, warm restarts, O(changes) commits).
//! - Time, replay-safe: [`Timers`] (stream-time timers, fired into
//!   [`Processor::on_timer`]), wall-clock ticks ([`Processor::on_wall_clock`], recorded per
//!   transaction and replayed from the log), and [`window`] (tumbling, hopping and session
//!   windows with a grace period).
//! - [`Format`] with [`Raw`], [`Utf8`], [`Json`]: typed keys and values (how each treats
//!   absent, null, keys and values is tabled on [`Format`]).
//! - [`AppConfig`]: builder, `EXACTLY_*` environment overrides, and any librdkafka property
//!   passed through to the clients (`security.protocol`, `sasl.*`, `ssl.*`, ...).
//! - [`ErrorPolicy`]: what happens to records that fail to decode or to process.
//! - [`Metrics`]: counters (records, transactions, snapshots, recoveries) readable while running.
//! - [`testing::TestDriver`]: run a processor in-process, without a broker, and check that it
//!   is deterministic and that its state survives a snapshot.
//! - [`design`]: how exactly-once and recovery work (snapshot topics, transactions, recovery,
//!   failure handling), and what is not built yet.
//!
//! # Determinism
//!
//! Recovery replays input records through `process`, so it must depend only on the state and
//! the record: use [`Record::timestamp`] (or stream-time [`Timers`], or the `now_ms` of a
//! wall-clock tick), not the wall clock; no random numbers; no `HashMap` iteration order
//! deciding outputs. Violations are detected (state fingerprint and output
//! digest mismatch) and reported instead of silently diverging.
#![warn(missing_docs)]

/// Generated from `proto/exactly.proto`.
#[allow(clippy::all, missing_docs, dead_code)]
pub(crate) mod proto {
    include!(concat!(env!("OUT_DIR"), "/exactly.v1.rs"));
}

mod admin;
#[cfg(feature = "cli")]
pub mod cli;
mod codec;
mod config;
mod continuity;
mod error;
pub mod join;
mod metrics;
mod partition;
mod partitioner;
mod processor;
mod progress;
mod recovery;
mod runtime;
mod security;
pub(crate) mod snapshot;
mod state;
mod step;
mod stuck;
pub mod testing;
pub mod window;

#[doc = include_str!("../DESIGN.md")]
pub mod design {}

pub use codec::{BoxError, DecodeError, Encode, EncodeError, Format, Json, Raw, Utf8};
pub use config::{
    AppConfig, ConfigError, ErrorPolicy, GroupProtocol, StartFrom, DEFAULT_SNAPSHOT_TOPIC_PATTERN,
};
pub use error::Error;
pub use metrics::{Metrics, MetricsSnapshot};
pub use processor::{
    dead_letter_headers, KeyOf, OldState, Output, OutputRecord, ProcessError, Processor, Record,
    RecordError, RecordPart, ValueOf,
};
pub use runtime::App;
pub use snapshot::SnapshotError;
pub use state::{Entries, Store, StoreError, Timer, Timers};

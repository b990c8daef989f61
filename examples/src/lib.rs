//! Example services built on `exactly`: a payments chain A → B → C and its demo.
//!
//! - [`validate`] (A): payment commands → ledger legs; bad commands → dead-letter topic.
//! - [`ledger`] (B): account balances; applies legs, refuses overdrafts.
//! - [`stats`] (C): per-account running totals.
//!
//! Each is a [`exactly::Processor`] here, unit-tested with [`exactly::testing::TestDriver`],
//! and a thin binary (`src/bin/{validate,ledger,stats}.rs`). [`payments`] holds the records
//! of every topic, [`generator`] the demo's seeded input (produced with [`producer`]),
//! [`model`] the reference model the demo checks the chain's final state against, and
//! [`verify`] the end-to-end check of the chain's output topics against it (used by the demo
//! and the chaos suite's workload). [`upgrade`] shows a new version of a service taking over
//! its predecessor's state (a version bump and a state migration, tested before deploying).
//!
//! [`fraud`] is a service made of time: windows of record time, idle timers and wall-clock
//! reports, checked on Kafka through kill -9 by `fraud --check`.

pub mod bench;
pub mod fraud;
pub mod generator;
pub mod ledger;
pub mod model;
pub mod payments;
pub mod producer;
pub mod service;
pub mod stats;
pub mod topics;
pub mod upgrade;
pub mod validate;
pub mod verify;

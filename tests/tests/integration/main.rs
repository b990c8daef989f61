//! The integration tests, one module per subject, in one test binary: they share this
//! process's local Kafka (one JVM start instead of one per file), and the two test threads
//! keep working while a long test (the chaos run) runs, instead of each file waiting for its
//! slowest test before the next file starts.
//!
//! Every test owns its topics and group ids; a test that stops, kills or restarts a broker
//! owns its cluster. Run one subject with `cargo test -p exactly-tests --test integration
//! framework_eos::`.

mod framework_support;

mod chaos;
mod framework_atomicity;
mod framework_eos;
mod framework_failures;
mod framework_group;
mod framework_inputs;
mod framework_policies;
mod framework_recovery_errors;
mod framework_store;
mod framework_time;
mod framework_upgrades;
mod harness;
mod kafka;
mod operating;
mod proxy;
mod security;

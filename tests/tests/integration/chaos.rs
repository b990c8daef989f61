//! A short chaos run (30 fault events, fixed seed) as part of the test command: the payments
//! chain A → B → C, three instances each, through kills, zombies, rebalances and network
//! faults (real Apache Kafka, one node: no broker crashes, which need three nodes; see the
//! README) must end with no duplicate, nothing missing and B's and C's state equal to the
//! reference model. The long runs (≥ 200 events) are documented in the README.
//!
//! It runs the `chaos` binary of this package (built by cargo for this test) as a child, so
//! the binary's own path — locating and building the `exactly-examples` service binaries,
//! the deadline, the exit code and the `CHAOS` line — is what is tested.

use std::time::Duration;

use exactly_tests::process::{ChildProcess, ProcessSpec};

/// Seed of the test's schedule: a fixed one, so a failure is reproducible with
/// `cargo run --release -p exactly-tests --bin chaos -- --events 30 --seed 20261123`. Its 30
/// events: 7 kills, 1 zombie, 6 rebalances, 16 network faults.
const SEED: u64 = 20_261_123;
const EVENTS: usize = 30;

/// Bound of the whole run, beyond the chaos binary's own deadline (build of the service
/// binaries, start-up, ~2-3 minutes of faults, drain, verification).
const TIMEOUT: Duration = Duration::from_secs(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_fault_events_keep_the_chain_exactly_once() {
    let mut spec = ProcessSpec::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--events", &EVENTS.to_string(), "--seed", &SEED.to_string()])
        .env("NO_COLOR", "1");
    // `cargo test --workspace` has just built the service binaries; building them again from
    // inside the test is then a no-op, but skipping it can be asked for explicitly.
    if std::env::var_os("EXACTLY_CHAOS_NO_BUILD").is_some() {
        spec = spec.arg("--no-build");
    }
    let mut chaos = ChildProcess::spawn("chaos", spec).expect("start the chaos binary");
    let status = match chaos.wait_exit(TIMEOUT).await {
        Ok(status) => status,
        Err(error) => {
            let tail = chaos.log_tail(60);
            let _ = chaos.kill_hard().await;
            panic!("chaos run did not finish: {error}\n--- output ---\n{tail}");
        }
    };
    let output = chaos.log_text().expect("read the chaos output");
    let tail = chaos.log_tail(80);
    let line = output
        .lines()
        .find(|l| l.starts_with("CHAOS "))
        .unwrap_or_else(|| panic!("no CHAOS line ({status}); output:\n{tail}"));
    assert!(
        status.success(),
        "chaos run failed ({status}): {line}\n--- output ---\n{tail}"
    );

    // Exactly the documented shape, with the counts adding up to the events.
    let fields: Vec<(&str, &str)> = line
        .trim_start_matches("CHAOS ")
        .split(' ')
        .map(|kv| kv.split_once('=').expect("key=value"))
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        [
            "events",
            "kills",
            "zombies",
            "rebalances",
            "net_faults",
            "broker_crashes",
            "duplicates",
            "missing",
            "state",
            "seed"
        ],
        "{line}"
    );
    let value = |key: &str| fields.iter().find(|(k, _)| *k == key).unwrap().1;
    let number = |key: &str| value(key).parse::<usize>().unwrap();
    assert_eq!(number("events"), EVENTS, "{line}");
    assert_eq!(
        number("kills")
            + number("zombies")
            + number("rebalances")
            + number("net_faults")
            + number("broker_crashes"),
        EVENTS,
        "{line}"
    );
    assert!(
        number("kills") > 0
            && number("zombies") > 0
            && number("rebalances") > 0
            && number("net_faults") > 0,
        "the schedule must kill, pause and rescale services and disturb the network: {line}"
    );
    // One Kafka node: broker crashes belong to 3-node runs (a lone node forgets acknowledged
    // transaction state when it goes down; see the README's chaos section).
    assert_eq!(number("broker_crashes"), 0, "{line}");
    assert_eq!(
        (value("duplicates"), value("missing"), value("state")),
        ("0", "0", "match"),
        "{line}\n{tail}"
    );
    assert_eq!(value("seed"), SEED.to_string());
}

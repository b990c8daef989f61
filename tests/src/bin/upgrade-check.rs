//! `upgrade-check`: can a new version of a service be deployed over the old one?
//!
//! ```text
//! cargo run --release -p exactly-tests --bin upgrade-check
//! ```
//!
//! Runs version 1 of the stateful `eos-service` on the local Kafka, stops it (SIGTERM) or
//! kills it (SIGKILL, with no full snapshot since its start, so recovery must replay), deploys
//! version 2 over it and checks what happens, once per scenario:
//!
//! | scenario | version 2 | expected |
//! |---|---|---|
//! | `compatible_after_shutdown` | a state field added with a default | `ok` |
//! | `compatible_after_crash` | the same, `Processor::version` bumped | `ok` |
//! | `output_change_bumped` | other outputs, version bumped, after a crash | `ok` |
//! | `output_change_unbumped` | other outputs, same version, after a crash | `refused`, naming both causes |
//! | `incompatible_unmigrated` | a state field added without a default | `refused`, naming the field |
//! | `incompatible_migrated` | the same, with `Processor::migrate_state` | `ok` |
//!
//! `ok` means version 2 processed the rest of the input and the output topic holds every
//! input exactly once (version 1's outputs, then version 2's). It prints exactly
//! `UPGRADE-CHECK compatible_after_shutdown=ok compatible_after_crash=ok output_change_bumped=ok output_change_unbumped=refused incompatible_unmigrated=refused incompatible_migrated=ok duplicates=0 missing=0 verdict=PASS`
//! when all is as expected. Exit code 0 on PASS, 1 on FAIL, 2 when the check could not run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use exactly_tests::eos_service::{
    expected_outputs, inputs, produce, service_spec_at, wait_for_outputs,
};
use exactly_tests::kafka::ClusterOptions;
use exactly_tests::process::ChildProcess;
use exactly_tests::{unique_name, TestCluster};

/// Records processed by version 1, then by version 2.
const BEFORE: usize = 100;
const AFTER: usize = 100;
const WAIT: Duration = Duration::from_secs(90);

/// How version 1 ends.
#[derive(Clone, Copy)]
enum Ending {
    /// SIGTERM: a final full snapshot, nothing to replay.
    Shutdown,
    /// SIGKILL with no full snapshot since the start: everything is replayed.
    Crash,
}

/// What version 2 must do.
enum Expect {
    /// Process the rest; `v2_outputs`: its outputs carry the ` v2` suffix.
    Ok { v2_outputs: bool },
    /// Exit with an error containing `needle`.
    Refused { needle: &'static str },
}

struct Scenario {
    name: &'static str,
    ending: Ending,
    v2_args: &'static [&'static str],
    expect: Expect,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "compatible_after_shutdown",
        ending: Ending::Shutdown,
        v2_args: &["--state-v2"],
        expect: Expect::Ok { v2_outputs: false },
    },
    Scenario {
        name: "compatible_after_crash",
        ending: Ending::Crash,
        v2_args: &["--state-v2", "--processor-version", "2"],
        expect: Expect::Ok { v2_outputs: false },
    },
    Scenario {
        name: "output_change_bumped",
        ending: Ending::Crash,
        v2_args: &["--output-v2", "--processor-version", "2"],
        expect: Expect::Ok { v2_outputs: true },
    },
    Scenario {
        name: "output_change_unbumped",
        ending: Ending::Crash,
        v2_args: &["--output-v2"],
        expect: Expect::Refused {
            needle: "either a non-deterministic processor",
        },
    },
    Scenario {
        name: "incompatible_unmigrated",
        ending: Ending::Shutdown,
        v2_args: &["--state-v3", "--processor-version", "3"],
        expect: Expect::Refused {
            needle: "missing field `generation`",
        },
    },
    Scenario {
        name: "incompatible_migrated",
        ending: Ending::Shutdown,
        v2_args: &["--state-v3", "--processor-version", "3", "--migrate"],
        expect: Expect::Ok { v2_outputs: false },
    },
];

/// Full snapshots only at a graceful stop.
const NO_PERIODIC_SNAPSHOTS: [&str; 4] = [
    "--full-snapshot-every",
    "100000000",
    "--full-snapshot-interval-ms",
    "3600000",
];

#[tokio::main]
async fn main() -> ExitCode {
    exactly_tests::init_tool_logging("warn,rdkafka::client=off");
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("upgrade-check: could not run: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// One scenario's result: `ok`, `refused` or what went wrong, and the output counts.
struct Outcome {
    verdict: String,
    duplicates: usize,
    missing: usize,
}

async fn run() -> anyhow::Result<bool> {
    let started = Instant::now();
    let cluster = TestCluster::start_owned(ClusterOptions::default()).await?;
    let bootstrap = cluster.direct_bootstrap_servers();
    let binary = exactly_tests::sibling_binary("eos-service")?;
    let mut line = String::from("UPGRADE-CHECK");
    let (mut duplicates, mut missing, mut pass) = (0, 0, true);
    for scenario in &SCENARIOS {
        let outcome = run_scenario(&cluster, &bootstrap, &binary, scenario).await?;
        eprintln!(
            "[{:6.1}s] {}: {}",
            started.elapsed().as_secs_f64(),
            scenario.name,
            outcome.verdict
        );
        let expected = match scenario.expect {
            Expect::Ok { .. } => "ok",
            Expect::Refused { .. } => "refused",
        };
        pass &= outcome.verdict == expected;
        duplicates += outcome.duplicates;
        missing += outcome.missing;
        line.push_str(&format!(" {}={}", scenario.name, outcome.verdict));
    }
    pass &= duplicates == 0 && missing == 0;
    let verdict = if pass { "PASS" } else { "FAIL" };
    println!("{line} duplicates={duplicates} missing={missing} verdict={verdict}");
    Ok(pass)
}

async fn run_scenario(
    cluster: &TestCluster,
    bootstrap: &str,
    binary: &PathBuf,
    scenario: &Scenario,
) -> anyhow::Result<Outcome> {
    let input = unique_name(&format!("upgrade-{}-in", scenario.name));
    let output = unique_name(&format!("upgrade-{}-out", scenario.name));
    let app = unique_name(&format!("upgrade-{}", scenario.name));
    cluster.create_topic(&input, 1).await?;
    cluster.create_topic(&output, 1).await?;
    let records = inputs(0..BEFORE + AFTER, 1);
    let (before, after) = records.split_at(BEFORE);
    let spec = || service_spec_at(binary, bootstrap, &app, &input, &output);

    produce(bootstrap, &input, before);
    let v1_spec = match scenario.ending {
        Ending::Shutdown => spec(),
        Ending::Crash => spec().args(NO_PERIODIC_SNAPSHOTS),
    };
    let mut v1 = ChildProcess::spawn(format!("{app}-v1"), v1_spec)?;
    let report = wait_for_outputs(bootstrap, &output, &expected_outputs(before), WAIT).await;
    if !report.is_clean() {
        bail!("version 1 did not process its input: {report}");
    }
    match scenario.ending {
        Ending::Shutdown => {
            let status = v1.terminate(Duration::from_secs(60)).await?;
            if !status.success() {
                bail!("version 1 did not stop cleanly: {status}");
            }
        }
        Ending::Crash => {
            v1.kill_hard().await?;
        }
    }

    produce(bootstrap, &input, after);
    let mut v2 = ChildProcess::spawn(format!("{app}-v2"), spec().args(scenario.v2_args))?;
    let outcome = match scenario.expect {
        Expect::Ok { v2_outputs } => {
            let mut expected = expected_outputs(before);
            let rest = expected_outputs(&records)[BEFORE..].to_vec();
            expected.extend(rest.into_iter().map(|value| {
                if v2_outputs {
                    format!("{value} v2")
                } else {
                    value
                }
            }));
            let report = wait_for_outputs(bootstrap, &output, &expected, WAIT).await;
            let verdict = if report.is_clean() {
                "ok".to_owned()
            } else if !v2.is_running() {
                format!("exited({})", last_error(&v2))
            } else {
                "wrong-outputs".to_owned()
            };
            Outcome {
                verdict,
                duplicates: report.duplicate_count,
                missing: report.missing_count,
            }
        }
        Expect::Refused { needle } => refused(&mut v2, needle).await?,
    };
    v2.kill_hard().await?;
    Ok(outcome)
}

/// `refused` when version 2 exits with an error containing `needle`.
async fn refused(v2: &mut ChildProcess, needle: &str) -> anyhow::Result<Outcome> {
    let verdict = match v2.wait_exit(WAIT).await {
        Ok(status) => {
            let log = v2.run_log_text().context("reading version 2's log")?;
            if status.code() == Some(1) && log.contains(needle) {
                "refused".to_owned()
            } else {
                format!("exited-without-{needle:?}")
            }
        }
        Err(_) => "accepted".to_owned(),
    };
    Ok(Outcome {
        verdict,
        duplicates: 0,
        missing: 0,
    })
}

/// The service's `eos-service failed: ...` line, shortened.
fn last_error(child: &ChildProcess) -> String {
    let log = child.run_log_text().unwrap_or_default();
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("eos-service failed: "))
        .map(|e| e.chars().take(80).collect())
        .unwrap_or_else(|| "no error".to_owned())
}

//! Deploying a new version of a service over the old one: a compatible change of the state
//! type restarts after a graceful shutdown; after a crash, new code replays the input since
//! the last full snapshot and is accepted when it declares a new `Processor::version`, and
//! refused with an error naming both possible causes when it does not.
//!
//! Version 1 is `eos-service` as it is; version 2 adds a defaulted field to its state
//! (`--state-v2`) and/or appends ` v2` to its outputs (`--output-v2`).

use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::process::ChildProcess;

/// Full snapshots only at a graceful stop: a crash leaves every processed record to replay.
const NO_PERIODIC_SNAPSHOTS: [&str; 4] = [
    "--full-snapshot-every",
    "100000000",
    "--full-snapshot-interval-ms",
    "3600000",
];

/// Outputs of version 2 (`--output-v2`) for `records`, counting on from `before` (the
/// records version 1 processed).
fn expected_v2_outputs(before: &[Input], records: &[Input]) -> Vec<String> {
    let all: Vec<Input> = before.iter().chain(records).cloned().collect();
    expected_outputs(&all)[before.len()..]
        .iter()
        .map(|value| format!("{value} v2"))
        .collect()
}

/// Version 1 processes `records` with `extra` arguments, then dies by SIGKILL: its state is
/// in no full snapshot, so recovery replays every record.
async fn process_and_crash(s: &Setup, records: &[Input], extra: &[&str]) -> ChildProcess {
    let mut service = s.process(records, extra).await;
    service.kill_hard().await.expect("kill -9");
    service
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compatible_state_change_restarts_after_a_graceful_shutdown() {
    let s = Setup::new("upgrade-graceful").await;
    let records = inputs(0..200, 1);
    let mut v1 = s.process(&records[..100], &[]).await;
    // A first start has nothing to recover and is not counted as a recovery.
    let m = last_metrics(&v1).expect("metrics");
    assert_eq!(
        (metric(&m, "fresh_starts"), metric(&m, "recoveries")),
        (1, 0),
        "{m}"
    );
    stop_cleanly(&mut v1).await;
    produce(&s.bootstrap, &s.input, &records[100..]);
    let mut v2 = s.spawn(&["--state-v2"]);
    s.assert_outputs(&v2, &records, Duration::from_secs(60))
        .await;
    let m = last_metrics(&v2).expect("metrics");
    assert_eq!(
        (metric(&m, "fresh_starts"), metric(&m, "recoveries")),
        (0, 1),
        "{m}"
    );
    stop_cleanly(&mut v2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_replays_with_its_own_code_after_a_crash() {
    let s = Setup::new("upgrade-bumped").await;
    let records = inputs(0..200, 1);
    drop(process_and_crash(&s, &records[..100], &NO_PERIODIC_SNAPSHOTS).await);
    produce(&s.bootstrap, &s.input, &records[100..]);
    let mut v2 = s.spawn(&["--state-v2", "--output-v2", "--processor-version", "2"]);
    let changed = v2
        .wait_for_log("processor version changed", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("no version change reported: {e}"));
    for needle in [
        "from_version=0",
        "to_version=2",
        "replayed=100",
        "state_fingerprint=differs",
        "output_digest=differs",
    ] {
        assert!(changed.contains(needle), "{needle:?} not in {changed}");
    }
    // Version 1's outputs for the first 100 records stay (they are committed); version 2
    // produces the rest, counting on from the replayed state.
    let mut expected = expected_outputs(&records[..100]);
    expected.extend(expected_v2_outputs(&records[..100], &records[100..]));
    let report =
        wait_for_outputs(&s.bootstrap, &s.output, &expected, Duration::from_secs(60)).await;
    assert!(report.is_clean(), "{report}\n{}", v2.log_tail(40));
    stop_cleanly(&mut v2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_outputs_without_a_version_bump_are_refused_after_a_crash() {
    let s = Setup::new("upgrade-unbumped").await;
    let records = inputs(0..100, 1);
    drop(process_and_crash(&s, &records, &NO_PERIODIC_SNAPSHOTS).await);
    let mut v2 = s.spawn(&["--output-v2"]);
    let (code, log) = wait_for_failure(&mut v2, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    for needle in [
        "offsets [0, 100) gave output digest",
        "processor version 0",
        "a non-deterministic processor",
        "new code deployed without a new Processor::version",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_state_change_is_refused_unless_migrated() {
    let s = Setup::new("upgrade-migrate").await;
    let records = inputs(0..200, 1);
    let mut v1 = s.process(&records[..100], &[]).await;
    stop_cleanly(&mut v1).await;
    produce(&s.bootstrap, &s.input, &records[100..]);

    let mut unmigrated = s.spawn(&["--state-v3", "--processor-version", "3"]);
    let (code, log) = wait_for_failure(&mut unmigrated, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    for needle in [
        &format!("snapshot partition {}/0", s.snapshot_topic()),
        "does not read as eos_service::CountsV3",
        "missing field `generation`",
        "Processor::migrate_state",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }

    let mut migrated = s.spawn(&["--state-v3", "--processor-version", "3", "--migrate"]);
    s.assert_outputs(&migrated, &records, Duration::from_secs(60))
        .await;
    let log = migrated.run_log_text().expect("log");
    assert!(
        log.contains("state migrated")
            && log.contains("from_version=0")
            && log.contains("to_version=3"),
        "{}",
        migrated.log_tail(40)
    );
    stop_cleanly(&mut migrated).await;
}

/// The `upgrade-check` binary runs every scenario above (and a compatible state change after
/// a crash) on a Kafka of its own and prints its verdict line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_check_passes() {
    let spec = exactly_tests::process::ProcessSpec::new(env!("CARGO_BIN_EXE_upgrade-check"))
        .env("NO_COLOR", "1");
    let mut check = ChildProcess::spawn("upgrade-check", spec).expect("start upgrade-check");
    let status = check
        .wait_exit(Duration::from_secs(600))
        .await
        .expect("upgrade-check finished");
    let output = check.log_text().expect("output");
    let line = output
        .lines()
        .find(|l| l.starts_with("UPGRADE-CHECK "))
        .unwrap_or_else(|| panic!("no UPGRADE-CHECK line ({status}):\n{}", check.log_tail(60)));
    assert!(status.success(), "{line}\n{}", check.log_tail(60));
    assert_eq!(
        line,
        "UPGRADE-CHECK compatible_after_shutdown=ok compatible_after_crash=ok output_change_bumped=ok output_change_unbumped=refused incompatible_unmigrated=refused incompatible_migrated=ok duplicates=0 missing=0 verdict=PASS"
    );
}

/// After a crash, an incompatible state change meets the old state in the last full snapshot
/// (taken every 40 records here) and replays what follows it with the new code: refused
/// without a migration, accepted with one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_state_change_after_a_crash_needs_a_migration() {
    let s = Setup::new("upgrade-crash-migrate").await;
    let records = inputs(0..200, 1);
    let snapshots_every_40 = ["--full-snapshot-every", "40"];
    drop(process_and_crash(&s, &records[..100], &snapshots_every_40).await);
    produce(&s.bootstrap, &s.input, &records[100..]);

    let v3 = ["--state-v3", "--processor-version", "3"];
    let mut unmigrated = s.spawn(&v3);
    let (code, log) = wait_for_failure(&mut unmigrated, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("missing field `generation`"), "{log}");

    let mut migrated = s.spawn(&[&v3[..], &["--migrate"]].concat());
    s.assert_outputs(&migrated, &records, Duration::from_secs(60))
        .await;
    let log = migrated.run_log_text().expect("log");
    assert!(log.contains("state migrated"), "{}", migrated.log_tail(40));
    // How much is replayed depends on where the last snapshot fell (records commit in
    // batches); the new version is reported either way.
    assert!(
        log.contains("processor version changed"),
        "{}",
        migrated.log_tail(40)
    );
    stop_cleanly(&mut migrated).await;
}

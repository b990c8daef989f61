//! Time under kill -9 on real Kafka (the `clock-service` test binary): a wall-clock tick whose
//! transaction did not commit never happened, and the ticks that did commit are replayed by
//! recovery where and when they first fired (read from the incremental records), so every
//! input id leaves through exactly one tick; stream-time timers fire exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::{ChildProcess, ProcessSpec};

/// Input records per round; one round per kill.
const PER_ROUND: usize = 100;
const ROUNDS: usize = 3;
/// Cards that go idle between two rounds: all but the card of the next round's first record,
/// which is processed before the timers its timestamp makes due, and reschedules its own.
const IDLE_PER_GAP: usize = KEYS - 1;

fn clock_spec(bootstrap: &str, app: &str, input: &str, output: &str) -> ProcessSpec {
    ProcessSpec::new(env!("CARGO_BIN_EXE_clock-service"))
        .args([
            "--brokers",
            bootstrap,
            "--app-id",
            app,
            "--input",
            input,
            "--output",
            output,
            // A tick every 300 ms; a transaction stays open a second after its last input,
            // so a kill right after a tick lands before the commit that would carry it.
            "--tick-ms",
            "300",
            "--commit-interval-ms",
            "1500",
            "--commit-when-idle-ms",
            "1000",
            "--idle-ms",
            "1000",
        ])
        .env(
            "RUST_LOG",
            "info,exactly=debug,librdkafka=warn,rdkafka=warn",
        )
}

/// The `next_offset` field of a log line.
fn next_offset(line: &str) -> Option<i64> {
    let rest = &line[line.find("next_offset=")? + "next_offset=".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Kills per round before the test gives up on landing one between a tick and the next
/// commit (a commit can follow a tick by less than the time the test takes to see the tick
/// and kill, e.g. when a streamed full snapshot completes).
const KILL_ATTEMPTS: usize = 5;

/// Waits for a live tick after the input up to `end` was processed and kills the service at
/// once; true when the kill landed between that tick and the next commit, as meant.
async fn kill_right_after_a_tick(service: &mut ChildProcess, end: i64) -> bool {
    let tick = service
        .wait_for_log_line(
            "a wall-clock tick after the new input",
            |line| line.contains("wall-clock tick") && next_offset(line) >= Some(end),
            Duration::from_secs(60),
        )
        .await
        .expect("a tick after the new input");
    service.kill_hard().await.expect("kill -9");
    let log = service.run_log_text().expect("log");
    let after_tick = &log[log.find(&tick).expect("the tick's line")..];
    let landed = !after_tick.contains("transaction committed");
    if !landed {
        eprintln!("a commit came between the tick and the kill; killing again after a restart:\n{after_tick}");
    }
    landed
}

/// Kills the service right after a tick, restarting it from Kafka (local store wiped) and
/// trying again until a kill lands between a tick and the next commit.
async fn kill_between_a_tick_and_its_commit(
    service: &mut ChildProcess,
    state_dir: &std::path::Path,
    end: i64,
) {
    for attempt in 1..=KILL_ATTEMPTS {
        if kill_right_after_a_tick(service, end).await {
            return;
        }
        assert!(
            attempt < KILL_ATTEMPTS,
            "{KILL_ATTEMPTS} kills right after a tick all landed after the next commit:\n{}",
            service.log_tail(60)
        );
        std::fs::remove_dir_all(state_dir).expect("wiping the state dir");
        service.restart().expect("restart");
    }
}

/// Three rounds of input, each followed by a kill -9 right after a tick and a restart from
/// Kafka (the local store wiped: a warm restart resumes from its last commit, after which no
/// tick committed, and would replay none).
async fn ticks_and_timers_survive_kill_9(prefix: &str, extra_args: &[&str]) {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name(&format!("{prefix}-in"));
    let output = unique_name(&format!("{prefix}-out"));
    let app = unique_name(&format!("{prefix}-app"));
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");
    let state_dir = tempfile::tempdir().expect("state dir");
    let spec = clock_spec(&bootstrap, &app, &input, &output)
        .args(extra_args)
        .env("EXACTLY_STATE_DIR", state_dir.path());
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let records = inputs(round * PER_ROUND..(round + 1) * PER_ROUND, 1);
        produce(&bootstrap, &input, &records);
        all.extend(records);
        kill_between_a_tick_and_its_commit(&mut service, state_dir.path(), all.len() as i64).await;
        std::fs::remove_dir_all(state_dir.path()).expect("wiping the state dir");
        service.restart().expect("restart");
        // The ticks of the next run send this round's ids (and the cards idle since the
        // round before); wait for them before the next round, so that the next kill has
        // committed ticks behind it to replay.
        let expected = (all.len() + IDLE_PER_GAP * round) as u64;
        let ticked = wait_for_count(&bootstrap, &output, expected, Duration::from_secs(60)).await;
        assert!(
            ticked >= expected,
            "round {round}: {ticked} outputs:\n{}",
            service.log_tail(60)
        );
    }
    // Recovery replayed committed ticks (not just records) at least once.
    let log = service.log_text().expect("log");
    assert!(
        log.lines().any(|l| l.contains("partition recovered")
            && !l.contains("wall_clock_ticks=0")
            && l.contains("wall_clock_ticks=")),
        "no recovery replayed a wall-clock tick:\n{}",
        service.log_tail(80)
    );
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
    check_outputs(&read_all(&bootstrap, &output).await, &all);
}

/// Every input id left through exactly one tick; each card went idle once per gap between
/// rounds (the last round's timers have no later record to pass them).
fn check_outputs(outputs: &[ReadRecord], inputs: &[Input]) {
    let mut ticked: BTreeMap<String, u32> = BTreeMap::new();
    let mut idle: BTreeMap<String, u32> = BTreeMap::new();
    for record in outputs {
        let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default());
        let mut words = value.split(' ');
        match words.next() {
            Some("tick") => *ticked.entry(words.next().unwrap_or("").into()).or_default() += 1,
            Some("idle") => *idle.entry(value.to_string()).or_default() += 1,
            _ => panic!("unexpected output {value:?}"),
        }
    }
    let duplicates: Vec<_> = ticked.iter().filter(|(_, n)| **n > 1).collect();
    let missing: Vec<_> = inputs
        .iter()
        .filter(|i| !ticked.contains_key(&i.id))
        .map(|i| &i.id)
        .collect();
    assert!(
        duplicates.is_empty() && missing.is_empty() && ticked.len() == inputs.len(),
        "ticked ids: duplicates {duplicates:?}, missing {missing:?}, {} distinct of {}",
        ticked.len(),
        inputs.len()
    );
    let twice: Vec<_> = idle.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "timers fired twice: {twice:?}");
    assert_eq!(
        idle.len(),
        IDLE_PER_GAP * (ROUNDS - 1),
        "idle outputs: {:?}",
        idle.keys()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_ticks_replay_from_the_log_after_kill_9() {
    // No full snapshot: recovery replays every tick since the first transaction.
    ticks_and_timers_survive_kill_9("ticks", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_ticks_since_a_full_snapshot_replay_after_kill_9() {
    // Full snapshots after about every transaction: recovery restores the base and replays
    // the ticks committed after it.
    ticks_and_timers_survive_kill_9("ticks-full", &["--full-snapshot-every", "30"]).await;
}

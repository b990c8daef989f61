//! Tests of the test harness itself: the process supervisor (with `sh` scripts as children)
//! and the exactly-once checker against the local Apache Kafka behind the fault-injecting proxy.

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use exactly_tests::eos::{check_topic, Observed};
use exactly_tests::process::{ChildProcess, ProcessError, ProcessSpec, Supervisor};
use exactly_tests::{unique_name, TestCluster};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(20);

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new("sh").arg("-c").arg(script)
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `T` stopped, `Z` zombie), `None` if the
/// pid no longer exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls until `condition` holds, failing the test with `what` after `WAIT`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pid is gone once it no longer exists, or exists only as a zombie someone else must reap.
fn gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

#[tokio::test]
async fn kill_hard_crashes_and_reaps_the_child() {
    let mut child = ChildProcess::spawn("sleeper", sh("echo ready; exec sleep 1000")).unwrap();
    child.wait_for_log("ready", WAIT).await.unwrap();
    let pid = child.pid().unwrap();
    assert!(child.is_running());
    let status = child.kill_hard().await.unwrap();
    assert_eq!(status.signal(), Some(9));
    assert!(!child.is_running());
    assert_eq!(child.pid(), None, "a reaped child has no pid any more");
    assert_eq!(
        proc_state(pid),
        None,
        "the child must be reaped, not a zombie"
    );
    // Killing again is harmless and reports the same status.
    assert_eq!(child.kill_hard().await.unwrap().signal(), Some(9));
    assert!(matches!(
        child.pause(),
        Err(ProcessError::NotRunning { .. })
    ));
}

#[tokio::test]
async fn pause_freezes_and_resume_continues() {
    let script = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.02; done";
    let mut child = ChildProcess::spawn("ticker", sh(script)).unwrap();
    child.wait_for_log("tick 1", WAIT).await.unwrap();
    let pid = child.pid().unwrap();

    child.pause().unwrap();
    assert!(child.is_paused());
    eventually("the child to be stopped", || proc_state(pid) == Some('T')).await;
    assert!(child.is_running(), "a paused child still counts as running");
    let ticks_when_paused = count_ticks(&child);

    child.resume().unwrap();
    assert!(!child.is_paused());
    let next = format!("tick {}", ticks_when_paused + 2);
    child.wait_for_log(&next, WAIT).await.unwrap();
    assert_ne!(proc_state(pid), Some('T'));
}

fn count_ticks(child: &ChildProcess) -> usize {
    child
        .run_log_text()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("tick "))
        .count()
}

#[tokio::test]
async fn terminate_returns_the_exit_status_of_a_polite_child() {
    let script = "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = ChildProcess::spawn("polite", sh(script)).unwrap();
    child.wait_for_log("ready", WAIT).await.unwrap();
    let status = child.terminate(WAIT).await.unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(child.log_text().unwrap().contains("got-term"));
}

#[tokio::test]
async fn terminate_kills_a_child_that_ignores_sigterm_after_the_grace_period() {
    let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = ChildProcess::spawn("stubborn", sh(script)).unwrap();
    child.wait_for_log("ready", WAIT).await.unwrap();
    let started = Instant::now();
    let status = child.terminate(Duration::from_millis(300)).await.unwrap();
    assert_eq!(status.signal(), Some(9));
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn terminate_reaches_a_paused_child() {
    let script = "trap 'exit 4' TERM; echo ready; while :; do sleep 0.05; done";
    let mut child = ChildProcess::spawn("paused-polite", sh(script)).unwrap();
    child.wait_for_log("ready", WAIT).await.unwrap();
    child.pause().unwrap();
    assert_eq!(child.terminate(WAIT).await.unwrap().code(), Some(4));
}

#[tokio::test]
async fn restart_reuses_the_command_and_appends_to_the_log() {
    let mut child =
        ChildProcess::spawn("restartable", sh("echo ready pid=$$; exec sleep 1000")).unwrap();
    let first = child.wait_for_log("ready", WAIT).await.unwrap();
    let first_pid = child.pid().unwrap();
    assert_eq!(first, format!("ready pid={first_pid}"));

    child.kill_hard().await.unwrap();
    child.restart().unwrap();
    assert_eq!(child.runs(), 2);
    // Only the new run's output counts: the first run's "ready" line must not match.
    let second = child.wait_for_log("ready", WAIT).await.unwrap();
    let second_pid = child.pid().unwrap();
    assert_ne!(first_pid, second_pid);
    assert_eq!(second, format!("ready pid={second_pid}"));

    let log = child.log_text().unwrap();
    assert!(log.contains(&first) && log.contains(&second), "{log}");
    assert!(log.contains("restartable run 2"), "{log}");
    assert!(!child.run_log_text().unwrap().contains(&first));

    // Restarting a running child kills the old run first.
    child.restart().unwrap();
    assert!(gone(second_pid));
    child.wait_for_log("ready", WAIT).await.unwrap();
}

#[tokio::test]
async fn wait_for_log_fails_fast_when_the_child_exits() {
    let mut child = ChildProcess::spawn("quitter", sh("echo bye; exit 2")).unwrap();
    let started = Instant::now();
    match child.wait_for_log("never printed", WAIT).await {
        Err(ProcessError::ExitedWhileWaiting { status, tail, .. }) => {
            assert_eq!(status.code(), Some(2));
            assert!(tail.contains("bye"), "{tail}");
        }
        other => panic!("expected ExitedWhileWaiting, got {other:?}"),
    }
    assert!(started.elapsed() < WAIT);
}

#[tokio::test]
async fn wait_for_log_times_out_with_the_log_tail() {
    let mut child =
        ChildProcess::spawn("quiet", sh("echo something-else; exec sleep 1000")).unwrap();
    child.wait_for_log("something-else", WAIT).await.unwrap();
    let error = child
        .wait_for_log("ready", Duration::from_millis(200))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, ProcessError::LogTimeout { .. }), "{text}");
    assert!(text.contains("something-else"), "{text}");
    assert!(
        text.contains(&child.log_path().display().to_string()),
        "{text}"
    );
}

#[test]
fn a_missing_program_is_a_spawn_error_naming_the_log() {
    let error = ChildProcess::spawn("nothing", ProcessSpec::new("/nonexistent/exactly-service"))
        .unwrap_err();
    assert!(matches!(error, ProcessError::Spawn { .. }), "{error}");
    assert!(error.to_string().contains("/nonexistent/exactly-service"));
}

#[tokio::test]
async fn spec_sets_args_env_and_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("logs").join("env.log");
    let spec = sh("echo \"arg=$0 var=$EXACTLY_TEST_VAR cwd=$(pwd)\"")
        .arg("first")
        .env("EXACTLY_TEST_VAR", "hello")
        .current_dir(dir.path())
        .log_file(&log);
    let mut child = ChildProcess::spawn("env", spec).unwrap();
    assert_eq!(child.log_path(), log);
    let line = child.wait_for_log("arg=", WAIT).await.unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(line, format!("arg=first var=hello cwd={}", cwd.display()));
    assert_eq!(child.wait_exit(WAIT).await.unwrap().code(), Some(0));
}

#[tokio::test]
async fn dropping_a_child_reaps_it_even_when_paused() {
    let mut child = ChildProcess::spawn("dropped", sh("echo ready; exec sleep 1000")).unwrap();
    child.wait_for_log("ready", WAIT).await.unwrap();
    let pid = child.pid().unwrap();
    let log = child.log_path().to_owned();
    child.pause().unwrap();
    drop(child);
    assert_eq!(
        proc_state(pid),
        None,
        "dropped child must be killed and reaped"
    );
    assert!(
        log.exists(),
        "the log {} is kept for inspection",
        log.display()
    );
}

#[test]
fn a_panicking_test_still_reaps_its_children() {
    let mut pids = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut supervisor = Supervisor::new();
        for name in ["a", "b"] {
            let child = supervisor.spawn(name, sh("exec sleep 1000")).unwrap();
            pids.push(child.pid().unwrap());
        }
        panic!("test failure while children run");
    }));
    assert!(result.is_err());
    assert_eq!(pids.len(), 2);
    for pid in pids {
        assert_eq!(proc_state(pid), None, "pid {pid} survived the panic");
    }
}

#[tokio::test]
async fn supervisor_names_lookup_and_kill_all() {
    let mut supervisor = Supervisor::new();
    for name in ["svc-a", "svc-b", "svc-c"] {
        supervisor
            .spawn(name, sh("echo ready; exec sleep 1000"))
            .unwrap();
    }
    assert!(matches!(
        supervisor.spawn("svc-a", sh("true")),
        Err(ProcessError::DuplicateName(_))
    ));
    assert!(matches!(
        supervisor.child("svc-x"),
        Err(ProcessError::UnknownName(_))
    ));
    assert_eq!(
        supervisor.names().collect::<Vec<_>>(),
        ["svc-a", "svc-b", "svc-c"]
    );
    supervisor
        .child("svc-b")
        .unwrap()
        .wait_for_log("ready", WAIT)
        .await
        .unwrap();
    supervisor.child("svc-b").unwrap().pause().unwrap();
    let pids: Vec<u32> = supervisor.iter_mut().map(|c| c.pid().unwrap()).collect();
    assert!(supervisor.describe().contains("svc-c: running as pid"));

    let statuses = supervisor.kill_all().await.unwrap();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.iter().all(|(_, s)| s.signal() == Some(9)));
    for pid in pids {
        assert_eq!(proc_state(pid), None);
    }
    // Children stay supervised and can be restarted by name.
    supervisor.child("svc-a").unwrap().restart().unwrap();
    supervisor
        .child("svc-a")
        .unwrap()
        .wait_for_log("ready", WAIT)
        .await
        .unwrap();
    let removed = supervisor.remove("svc-a").unwrap();
    assert_eq!(removed.runs(), 2);
}

/// A child must not die when the thread that asked for it ends (PR_SET_PDEATHSIG is bound to
/// the forking thread; the harness forks from one long-lived thread).
#[tokio::test]
async fn children_outlive_the_thread_that_spawned_them() {
    let mut child = std::thread::spawn(|| {
        ChildProcess::spawn(
            "orphan-candidate",
            sh("sleep 0.3; echo still-alive; exec sleep 1000"),
        )
        .unwrap()
    })
    .join()
    .unwrap();
    child.wait_for_log("still-alive", WAIT).await.unwrap();
    assert!(child.is_running());
}

const PARENT_HELPER_ENV: &str = "EXACTLY_TESTS_PARENT_DEATH_HELPER";

/// Not a test on its own: run by `children_die_with_a_test_process_that_dies_without_unwinding`
/// in a child test process, which spawns a grandchild and then aborts.
#[test]
#[ignore = "helper process for children_die_with_a_test_process_that_dies_without_unwinding"]
fn parent_death_helper() {
    if std::env::var_os(PARENT_HELPER_ENV).is_none() {
        return;
    }
    let child = ChildProcess::spawn("grandchild", sh("exec sleep 1000")).unwrap();
    println!("GRANDCHILD_PID={}", child.pid().unwrap());
    std::mem::forget(child);
    std::process::abort();
}

#[tokio::test]
async fn children_die_with_a_test_process_that_dies_without_unwinding() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ProcessSpec::new(std::env::current_exe().unwrap())
        // The test's name in this binary: the module's path below the crate, then the name.
        .args([
            "--exact",
            "harness::parent_death_helper",
            "--ignored",
            "--nocapture",
        ])
        .env(PARENT_HELPER_ENV, "1")
        .log_file(dir.path().join("helper.log"));
    let mut helper = ChildProcess::spawn("aborting-test-process", spec).unwrap();
    let line = helper.wait_for_log("GRANDCHILD_PID=", WAIT).await.unwrap();
    let grandchild: u32 = line["GRANDCHILD_PID=".len()..].trim().parse().unwrap();
    let status = helper.wait_exit(WAIT).await.unwrap();
    assert_eq!(status.signal(), Some(6), "the helper aborts");
    eventually("the grandchild to die with its parent", || gone(grandchild)).await;
}

// ---- exactly-once checker against the local Kafka behind the fault-injecting proxy ----

/// A transactional producer with `init_transactions` done (blocking: call off the reactor).
fn transactional_producer(
    mut config: ClientConfig,
    txn_id: &str,
) -> ThreadedProducer<DefaultProducerContext> {
    let producer: ThreadedProducer<DefaultProducerContext> = config
        .set("transactional.id", txn_id)
        .set("message.timeout.ms", "20000")
        .set("transaction.timeout.ms", "30000")
        .create()
        .unwrap();
    producer.init_transactions(WAIT).unwrap();
    producer
}

/// Sends `(key, id, seq)` records in one transaction, then commits or aborts it.
fn send_txn(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    records: &[(&str, String, u64)],
    commit: bool,
) {
    producer.begin_transaction().unwrap();
    for (key, id, seq) in records {
        let seq = seq.to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "seq",
            value: Some(seq.as_str()),
        });
        producer
            .send(BaseRecord::to(topic).key(*key).payload(id).headers(headers))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    // Make sure aborted records really reach the log before the abort marker.
    producer.flush(WAIT).unwrap();
    if commit {
        producer.commit_transaction(WAIT).unwrap();
    } else {
        producer.abort_transaction(WAIT).unwrap();
    }
}

fn id_key_seq(message: &BorrowedMessage<'_>) -> Result<Option<Observed>, String> {
    let id = message
        .payload_view::<str>()
        .ok_or("no payload")?
        .map_err(|e| e.to_string())?
        .to_owned();
    let key = message
        .key_view::<str>()
        .transpose()
        .map_err(|e| e.to_string())?
        .map(str::to_owned);
    let seq = message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "seq"))
        .and_then(|h| h.value)
        .map(|v| {
            std::str::from_utf8(v)
                .map_err(|e| e.to_string())?
                .parse::<u64>()
                .map_err(|e| e.to_string())
        })
        .transpose()?;
    Ok(Some(Observed { id, key, seq }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eos_checker_sees_committed_records_only_and_reports_violations() {
    let cluster = TestCluster::start().await.unwrap();
    let topic = unique_name("eos-check");
    cluster.create_topic(&topic, 3).await.unwrap();

    let txn_id = unique_name("eos-check-txn");
    let bootstrap = cluster.bootstrap_servers();
    let (config, t, id) = (cluster.client_config(), topic.clone(), txn_id.clone());
    let expected: Vec<String> = tokio::task::spawn_blocking(move || {
        let (topic, producer) = (t, transactional_producer(config, &id));
        let mut expected = Vec::new();
        for batch in 0..4u64 {
            let records: Vec<(&str, String, u64)> = ["k1", "k2", "k3"]
                .iter()
                .flat_map(|key| {
                    (0..5u64)
                        .map(move |i| (*key, format!("{key}-{}", batch * 5 + i), batch * 5 + i))
                })
                .collect();
            expected.extend(records.iter().map(|(_, id, _)| id.clone()));
            send_txn(&producer, &topic, &records, true);
            // Aborted transactions in between: their records must never be seen.
            let aborted: Vec<(&str, String, u64)> = ["k1", "k2", "k3"]
                .iter()
                .map(|key| (*key, format!("aborted-{key}-{batch}"), 0))
                .collect();
            send_txn(&producer, &topic, &aborted, false);
        }
        expected
    })
    .await
    .unwrap();
    assert_eq!(expected.len(), 60);

    // Clean: every committed id once, aborted ones invisible, per-key order intact.
    let report = check_topic(&bootstrap, &topic, expected.clone(), id_key_seq)
        .await
        .unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.records_read, 60, "{report}");

    // The checker must catch what it exists for: a duplicate, a missing id, an unexpected id
    // and an out-of-order record, all committed through the same proxy.
    let (config, t) = (cluster.client_config(), topic.clone());
    tokio::task::spawn_blocking(move || {
        send_txn(
            &transactional_producer(config, &txn_id),
            &t,
            &[
                ("k1", "k1-3".to_owned(), 3),       // duplicate, and seq 3 after 19
                ("k2", "stranger".to_owned(), 100), // unexpected
            ],
            true,
        );
    })
    .await
    .unwrap();
    let mut expected_more = expected.clone();
    expected_more.push("never-produced".to_owned());
    let report = check_topic(&bootstrap, &topic, expected_more, id_key_seq)
        .await
        .unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.duplicate_count, 1, "{report}");
    assert_eq!(report.duplicates[0].id, "k1-3");
    assert_eq!(report.duplicates[0].positions.len(), 2);
    assert_eq!(
        report.missing,
        vec!["never-produced".to_owned()],
        "{report}"
    );
    assert_eq!(report.unexpected_count, 1, "{report}");
    assert_eq!(report.unexpected[0].id, "stranger");
    assert_eq!(report.order_violation_count, 1, "{report}");
    assert_eq!(report.order_violations[0].key, "k1");
    assert_eq!(report.order_violations[0].previous_seq, 19);
    let text = report.to_string();
    assert!(
        text.contains("VIOLATED") && text.contains("never-produced"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eos_checker_stops_at_an_open_transaction_and_rejects_unknown_topics() {
    let cluster = TestCluster::start().await.unwrap();
    let topic = unique_name("eos-open");
    cluster.create_topic(&topic, 1).await.unwrap();
    let (config, t) = (cluster.client_config(), topic.clone());
    let open = tokio::task::spawn_blocking(move || {
        let committed = transactional_producer(config.clone(), &unique_name("eos-open-c"));
        let open = transactional_producer(config, &unique_name("eos-open-o"));
        send_txn(&committed, &t, &[("k", "first".to_owned(), 1)], true);
        open.begin_transaction().unwrap();
        open.send(BaseRecord::to(&t).key("k").payload("open"))
            .map_err(|(e, _)| e)
            .unwrap();
        open.flush(WAIT).unwrap();
        send_txn(&committed, &t, &[("k", "after-open".to_owned(), 2)], true);
        open
    })
    .await
    .unwrap();

    // The end is the last stable offset: the open transaction hides it and everything after.
    let bootstrap = cluster.bootstrap_servers();
    let started = Instant::now();
    let report = check_topic(&bootstrap, &topic, ["first"], id_key_seq)
        .await
        .unwrap();
    assert!(report.is_clean(), "{report}");
    assert!(started.elapsed() < Duration::from_secs(20));

    tokio::task::spawn_blocking(move || open.commit_transaction(WAIT).unwrap())
        .await
        .unwrap();
    let report = check_topic(
        &bootstrap,
        &topic,
        ["first", "open", "after-open"],
        id_key_seq,
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{report}");

    let error = check_topic(&bootstrap, &unique_name("no-such-topic"), ["x"], id_key_seq)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no-such-topic"), "{error}");
}

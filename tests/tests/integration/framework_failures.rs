//! Failures are loud and bounded: what the runtime cannot do correctly stops the app with an
//! error that says what happened, and what it can recover from it recovers from at once. Each
//! case is set up for real on the broker (timed-out transactions, refused records, compacted
//! snapshot topics, panics, deleted input, recreated topics, missing snapshots, slow snapshots,
//! a dropped `run_until`).

use std::time::{Duration, Instant};

use crate::framework_support::*;
use exactly::{App, AppConfig, Output, ProcessError, Processor, Record, Utf8};
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;
use kafka_protocol::messages::ApiKey;
use rdkafka::admin::AdminOptions;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// How long a service may take to fail once the cause is in place.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(60);

/// What these tests need beyond the shared [`Setup`].
impl Setup {
    /// Processes `n` records to the end, then stops the service cleanly (SIGTERM): its state
    /// is in a final full snapshot, the group's offsets are committed.
    async fn process_and_stop(&self, n: usize) -> ChildProcess {
        let mut service = self.process(&inputs(0..n, 1), &[]).await;
        stop_cleanly(&mut service).await;
        service
    }

    /// Deletes `topic` and waits until the broker's metadata no longer lists it.
    async fn delete_topic(&self, topic: &str) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in self
            .admin()
            .delete_topics(&[topic], &options)
            .await
            .expect("delete topics")
        {
            result.unwrap_or_else(|(topic, code)| panic!("deleting {topic}: {code:?}"));
        }
        let config = self.cluster.client_config();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config.create().expect("metadata client");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let metadata = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(5))
                    .expect("metadata");
                let listed = metadata
                    .topics()
                    .iter()
                    .any(|t| t.name() == topic && t.error().is_none());
                if !listed {
                    return;
                }
                assert!(Instant::now() < deadline, "{topic} still listed after 30 s");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .expect("metadata task");
    }

    /// Deletes the input below `deleted_before` while `service` lags behind it, and expects the
    /// retention-gap error, with the committed outputs a gapless prefix of `records` up to the
    /// position it names. Returns that position and the log.
    async fn delete_and_expect_a_retention_gap(
        &self,
        service: &mut ChildProcess,
        records: &[Input],
        deleted_before: i64,
    ) -> (i64, String) {
        self.delete_records_before(&self.input, deleted_before)
            .await;
        let log = expect_failure(
            service,
            &[
                &format!("unprocessed input of {}/0 was deleted", self.input),
                &format!("but the log now starts at {deleted_before}"),
            ],
        )
        .await;
        let position = number_after(&log, "this app's next record is at offset ");
        let committed = self
            .assert_outputs_are_a_prefix(records, position as usize)
            .await;
        eprintln!("failed at position {position}; {committed} outputs committed");
        (position, log)
    }

    /// The committed outputs are exactly those of a gapless prefix of `records`, of at most
    /// `limit` records: nothing was skipped, nothing past the failure point committed.
    async fn assert_outputs_are_a_prefix(&self, records: &[Input], limit: usize) -> usize {
        let n = read_all(&self.bootstrap, &self.output).await.len();
        assert!(
            n <= limit,
            "{n} outputs committed, at most {limit} expected"
        );
        let report = check(
            &self.bootstrap,
            &self.output,
            &expected_outputs(&records[..n]),
        )
        .await;
        assert!(report.is_clean(), "outputs are not a prefix: {report}");
        n
    }
}

/// Waits for the service to exit and checks that it failed (exit code 1) with every one of
/// `needles` in its log; returns the log.
async fn expect_failure(service: &mut ChildProcess, needles: &[&str]) -> String {
    expect_failure_within(service, FAILURE_TIMEOUT, needles).await
}

/// Like [`expect_failure`], for failures that may take up to `timeout`.
async fn expect_failure_within(
    service: &mut ChildProcess,
    timeout: Duration,
    needles: &[&str],
) -> String {
    let (code, log) = wait_for_failure(service, timeout).await;
    assert_eq!(code, 1, "expected exit code 1:\n{log}");
    for needle in needles {
        assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
    }
    log
}

/// Seconds since midnight (UTC) of a log line's leading RFC 3339 timestamp
/// (`2026-11-28T07:47:36.832273Z  INFO ...`).
fn time_of(line: &str) -> f64 {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let time = stamp
        .split_once('T')
        .map(|(_, time)| time.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"));
    let fields: Vec<f64> = time
        .split(':')
        .map(|f| {
            f.parse()
                .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"))
        })
        .collect();
    assert_eq!(fields.len(), 3, "bad timestamp in {line:?}");
    fields[0] * 3600.0 + fields[1] * 60.0 + fields[2]
}

/// The number right after the first `prefix` in `log`.
fn number_after(log: &str, prefix: &str) -> i64 {
    let start = log
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{log}"))
        + prefix.len();
    log[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in:\n{log}"))
}

/// A commit stalled past `transaction.timeout.ms` (the broker answers its produce requests
/// 5 s late, the transaction timeout is 3 s; the coordinator aborts the transaction and bumps
/// the producer's epoch meanwhile) is abandoned and the partition recovers at once, with a
/// new producer: not idled for a session timeout as a fenced zombie would be, and exactly
/// once.
///
/// (The coordinator learns of a transaction only when it commits: outputs are produced then.
/// So a slow `process` no longer outlives the timeout, see the next test; a stalled commit
/// is what still can.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_stalled_past_the_timeout_recovers_at_once() {
    let s = Setup::new("txn-timeout").await;
    let (first, second) = (inputs(0..20, 1), inputs(20..40, 1));
    produce(&s.bootstrap, &s.input, &first);
    let mut service = s.spawn(&["--transaction-timeout-ms", "3000"]);
    s.assert_outputs(&service, &first, Duration::from_secs(90))
        .await;
    s.cluster
        .proxy
        .set_latency(ApiKey::Produce, Duration::from_secs(5));
    // Straight to the broker: the test's own produce requests are not to be delayed.
    produce(&s.cluster.direct_bootstrap_servers(), &s.input, &second);
    let abandoned = service
        .wait_for_log(
            "aborting the transaction; rebuilding state through recovery",
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", service.log_tail(40)));
    s.cluster.proxy.set_latency(ApiKey::Produce, Duration::ZERO);
    let records: Vec<Input> = first.into_iter().chain(second).collect();
    s.assert_outputs(&service, &records, Duration::from_secs(90))
        .await;
    assert!(service.is_running(), "{}", service.log_tail(40));

    let log = service.run_log_text().expect("log");
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == abandoned)
        .unwrap_or_else(|| panic!("no {abandoned:?} in:\n{log}"));
    let live_again = lines[at..]
        .iter()
        .find(|l| l.contains("going live"))
        .unwrap_or_else(|| panic!("no \"going live\" after the stalled commit in:\n{log}"));
    let took = (time_of(live_again) - time_of(lines[at])).rem_euclid(86_400.0);
    eprintln!("live again {took:.3} s after the stalled commit was abandoned");
    // Treated as a fenced zombie, the partition would wait a session timeout plus 2 s before
    // anyone took it again (8 s with the 6 s sessions of eos-service's setup).
    assert!(
        took < 6.0,
        "recovery took {took:.3} s after the stalled commit:\n{log}"
    );
    stop_cleanly(&mut service).await;
}

/// An abort that times out leaves librdkafka's producer inside that call: it refuses every
/// other transactional call ("Conflicting abort_transaction API call is already in progress")
/// until the abort is called again. The worker gives such a producer up and recovers with a
/// new one, whose `init_transactions` aborts what the old one left open. (Seen after a broker
/// crash in the 3-node test: the worker retried its barrier on the stuck producer for its whole
/// 300 s recovery budget, and the transaction left open held back the output partition's last
/// stable offset, hiding every later output there.) The proxy holds every EndTxn request, the
/// commit's and then the aborts', until the worker has replaced a producer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_abort_before_recovery_replaces_the_producer() {
    let s = Setup::new("abort-timeout").await;
    let (first, second) = (inputs(0..20, 1), inputs(20..40, 1));
    produce(&s.bootstrap, &s.input, &first);
    let mut service = s.spawn(&["--transaction-timeout-ms", "3000"]);
    s.assert_outputs(&service, &first, Duration::from_secs(90))
        .await;
    s.cluster.proxy.hold_end_txn_requests(true);
    // Straight to the broker: the test's own producer is not transactional anyway.
    produce(&s.cluster.direct_bootstrap_servers(), &s.input, &second);
    service
        .wait_for_log(
            "the barrier transaction before recovery could not be begun or aborted; recreating the producer",
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", service.log_tail(40)));
    s.cluster.proxy.hold_end_txn_requests(false);
    let records: Vec<Input> = first.into_iter().chain(second).collect();
    s.assert_outputs(&service, &records, Duration::from_secs(90))
        .await;
    assert!(service.is_running(), "{}", service.log_tail(40));
    let log = service.run_log_text().expect("log");
    let stuck = log
        .lines()
        .find(|l| l.contains("recovery failed; retrying") && l.contains("Conflicting"));
    assert!(
        stuck.is_none(),
        "recovery retried on a producer inside an unfinished abort: {stuck:?}"
    );
    stop_cleanly(&mut service).await;
}

/// A `process` call slower than `transaction.timeout.ms` does not time its transaction out:
/// the coordinator learns of a transaction only when it commits (its outputs are produced
/// then), so nothing is aborted and nothing replayed. (With outputs produced as `process`
/// returned them, this very record used to outlive the timeout and abort its transaction.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_process_call_does_not_time_out_its_transaction() {
    let s = Setup::new("slow-process").await;
    let records = inputs(0..40, 1);
    produce(&s.bootstrap, &s.input, &records);
    // id-000020 takes 5 s, the transaction timeout is 3 s.
    let mut service = s.spawn(&[
        "--transaction-timeout-ms",
        "3000",
        "--slow-once",
        "id-000020:5000",
    ]);
    s.assert_outputs(&service, &records, Duration::from_secs(90))
        .await;
    assert!(service.is_running(), "{}", service.log_tail(40));
    let log = service.run_log_text().expect("log");
    assert!(
        log.contains("processing a record slowly, once"),
        "the slow record was not processed:\n{log}"
    );
    for sign_of_an_abort in [
        "outlived the transaction timeout",
        "aborting the transaction",
        "partition recovered",
    ] {
        assert!(
            !log.contains(sign_of_an_abort),
            "found {sign_of_an_abort:?}:\n{log}"
        );
    }
    stop_cleanly(&mut service).await;
}

/// A record the broker refuses every time (larger than the output topic's
/// `max.message.bytes`) aborts every transaction it is in; after the abort budget the
/// partition fails, naming the broker's refusal, instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_aborts_fail_the_partition_naming_the_first_error() {
    let s = Setup::with_output_config("aborts", &[("max.message.bytes", "1024")]).await;
    let big = Input {
        id: format!("id-big-{}", "x".repeat(2000)),
        key: "k0".into(),
        partition: 0,
    };
    produce(&s.bootstrap, &s.input, &[big]);
    let started = Instant::now();
    let mut service = s.spawn(&["--max-consecutive-aborts", "3"]);
    let log = expect_failure(
        &mut service,
        &[
            &format!("{}/0 aborted 3 transactions in a row", s.input),
            "the first failure was:",
            "Broker: Message size too large",
        ],
    )
    .await;
    eprintln!("failed after {:?}", started.elapsed());
    assert_eq!(
        log.matches("aborting the transaction; rebuilding state through recovery")
            .count(),
        3,
        "{log}"
    );
    let outputs = read_all(&s.bootstrap, &s.output).await;
    assert!(outputs.is_empty(), "aborted outputs visible: {outputs:?}");
}

/// Compaction would delete snapshot records that later ones point at: an existing compacted
/// snapshot topic is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_snapshot_topic_is_refused_at_start() {
    let s = Setup::new("compacted").await;
    s.cluster
        .create_topic_with_config(&s.snapshot_topic(), 1, &[("cleanup.policy", "compact")])
        .await
        .expect("snapshot topic");
    let mut service = s.spawn(&[]);
    expect_failure(
        &mut service,
        &[
            &format!(
                "snapshot topic {:?} has cleanup.policy=compact",
                s.snapshot_topic()
            ),
            "set cleanup.policy=delete",
        ],
    )
    .await;
}

/// A panic in `process` fails the partition, and the app exits with an error naming it: never
/// a partition left assigned with a dead worker, never a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_processor_fails_the_partition_and_the_app() {
    let s = Setup::new("panic").await;
    let records = inputs(0..20, 1);
    produce(&s.bootstrap, &s.input, &records);
    let mut service = s.spawn(&["--panic-on", "id-000010"]);
    expect_failure(
        &mut service,
        &[
            &format!("processor panicked on record {}/0 at offset 10", s.input),
            "panic on record id-000010",
        ],
    )
    .await;
    // The transaction holding the record aborted: at most the records before it committed.
    s.assert_outputs_are_a_prefix(&records, 10).await;
}

/// Input deleted (DeleteRecords, as retention does) beyond a lagging app's position was never
/// processed: the app must stop and say so, never jump to the new log start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_unprocessed_input_is_a_retention_gap_not_a_skip() {
    const DELETED_BEFORE: i64 = 3_000;
    let s = Setup::new("deleted").await;
    let records = inputs(0..4_000, 1);
    produce(&s.bootstrap, &s.input, &records);
    // 5 ms per record; with (almost) no bytes held for the worker, the fetch position stays
    // about one worker queue (2 048 records) ahead of what is processed, far below 3 000 when
    // the records are deleted.
    let mut service = s.spawn(&["--per-record-delay-ms", "5", "--max-buffered-bytes", "1"]);
    wait_for_metrics(
        &service,
        "processing started",
        Duration::from_secs(60),
        |m| metric(m, "records_processed") >= 1,
    )
    .await;
    let (position, log) = s
        .delete_and_expect_a_retention_gap(&mut service, &records, DELETED_BEFORE)
        .await;
    assert!(position < DELETED_BEFORE, "{log}");
}

/// The same deletion, met by librdkafka's own jump rather than by a fetch: partitions are
/// assigned at the logical offset BEGINNING, and a seek that lands while that lookup is in
/// flight makes librdkafka look it up again later and move the fetcher to the log start. The
/// group consumer's ListOffsets requests are delayed 5 s so that the worker's seek always lands
/// in that window; the records below 3 000 are deleted while the service processes, before the
/// second lookup answers. Without the consumer thread's continuity check the fetcher jumps
/// from ~100 to 3 000 and the service goes on without any error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_jump_over_deleted_input_is_a_retention_gap() {
    const DELETED_BEFORE: i64 = 3_000;
    const LOOKUP_DELAY: Duration = Duration::from_secs(5);
    let s = Setup::new("jump").await;
    let records = inputs(0..4_000, 1);
    drop(s.process_and_stop(100).await);
    produce(&s.bootstrap, &s.input, &records[100..]);
    s.cluster.proxy.faults().set_client_latency(
        ApiKey::ListOffsets,
        &format!("exactly-{}", s.app),
        LOOKUP_DELAY,
    );
    let mut service = s.spawn(&["--per-record-delay-ms", "5", "--max-buffered-bytes", "1"]);
    wait_for_metrics(
        &service,
        "processing after the restart",
        Duration::from_secs(60),
        |m| metric(m, "records_processed") >= 1,
    )
    .await;
    let (position, log) = s
        .delete_and_expect_a_retention_gap(&mut service, &records, DELETED_BEFORE)
        .await;
    assert!((100..DELETED_BEFORE).contains(&position), "{log}");
    let jumped = log.contains("the consumer jumped over input deleted before it was read");
    eprintln!("failed at position {position}; caught at the jump: {jumped}");
}

/// The same librdkafka jump without a deletion goes backwards, to the log start: the consumer
/// thread seeks the fetcher back to where it was instead of re-reading the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetcher_jump_back_to_the_log_start_is_sought_forward() {
    let s = Setup::new("rewind").await;
    let records = inputs(0..400, 1);
    drop(s.process_and_stop(100).await);
    produce(&s.bootstrap, &s.input, &records[100..]);
    s.cluster.proxy.faults().set_client_latency(
        ApiKey::ListOffsets,
        &format!("exactly-{}", s.app),
        Duration::from_secs(5),
    );
    let mut service = s.spawn(&[]);
    let rewound = service
        .wait_for_log("went back on its own", Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("no rewind seen: {e}"));
    assert!(rewound.contains("offset=0"), "{rewound}");
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    let rewinds = service
        .run_log_text()
        .expect("log")
        .matches("went back on its own")
        .count();
    assert_eq!(rewinds, 1, "{}", service.log_tail(40));
    stop_cleanly(&mut service).await;
}

/// The input topic was deleted and created again: it ends before what the app already
/// processed, and continuing would mix two different logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_input_topic_is_refused() {
    let s = Setup::new("recreated").await;
    let mut service = s.process_and_stop(100).await;
    s.delete_topic(&s.input).await;
    s.cluster.create_topic(&s.input, 1).await.expect("recreate");
    produce(&s.bootstrap, &s.input, &inputs(0..10, 1));
    service.restart().expect("restart");
    expect_failure(
        &mut service,
        &[
            &format!(
                "input {}/0 ends at offset 10, but this app already processed it up to offset 100",
                s.input
            ),
            "was deleted and recreated",
        ],
    )
    .await;
}

/// Committed offsets and no snapshot: the state is missing, not new. Starting from an empty
/// state would reprocess input whose outputs already went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_without_snapshots_are_refused() {
    let s = Setup::new("no-snapshots").await;
    let mut service = s.process_and_stop(100).await;
    s.delete_topic(&s.snapshot_topic()).await;
    service.restart().expect("restart");
    expect_failure(
        &mut service,
        &[
            &format!(
                "group {} has committed offset 100 for {}/0, but snapshot partition {}/0 holds no snapshot record",
                s.app,
                s.input,
                s.snapshot_topic()
            ),
            &format!(
                "kafka-consumer-groups.sh --delete-offsets --group {} --topic {}",
                s.app, s.input
            ),
        ],
    )
    .await;
}

/// Inputs with a key each: the state has one entry per record.
fn distinct_keys(n: usize) -> Vec<Input> {
    (0..n)
        .map(|i| Input {
            id: format!("id-{i:06}"),
            key: format!("key-{i:06}"),
            partition: 0,
        })
        .collect()
}

/// A full snapshot that takes longer to write than the transaction timeout goes in several
/// transactions, none of which times out; and the snapshot they make up is readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_full_snapshot_never_times_out_a_transaction() {
    // The arithmetic: 60 000 keys of 10 characters with a count of 1 are ~12 bytes each in
    // MessagePack, ~720 KB of state; in chunks of 1 KiB, ~700 chunks. The worker writes them
    // 16 at a time and waits for each group's delivery: with 100 ms of latency on every
    // Produce request, ≥ 100 ms per group, so ≥ 44 × 100 ms = 4.4 s of writing, more than
    // twice the 2 s transaction timeout. In one transaction, the coordinator (checking every
    // second) would abort it; cut into transactions of at most ~500 ms (a quarter of the
    // timeout), none comes near it.
    const KEYS: usize = 60_000;
    const TRANSACTION_TIMEOUT_MS: u64 = 2_000;
    let s = Setup::new("slow-snapshot").await;
    let records = distinct_keys(KEYS);
    produce(&s.bootstrap, &s.input, &records);
    s.cluster
        .proxy
        .set_latency(ApiKey::Produce, Duration::from_millis(100));
    let keys = KEYS.to_string();
    let timeout = TRANSACTION_TIMEOUT_MS.to_string();
    let mut service = s.spawn(&[
        "--transaction-timeout-ms",
        &timeout,
        "--max-chunk-bytes",
        "1024",
        "--max-batch-records",
        "2000",
        // One full snapshot, when the last record is processed.
        "--full-snapshot-every",
        &keys,
    ]);
    s.assert_outputs(&service, &records, Duration::from_secs(180))
        .await;
    let m = wait_for_metrics(&service, "a full snapshot", Duration::from_secs(120), |m| {
        metric(m, "full_snapshots_written") >= 1
    })
    .await;
    let log = service.run_log_text().expect("log");
    let chunks_line = log
        .lines()
        .find(|l| l.contains("full snapshot chunks committed"))
        .unwrap_or_else(|| panic!("no full snapshot in:\n{log}"));
    let chunks = number_after(chunks_line, "chunks=");
    let took_ms = metric(&m, "full_snapshot_ms");
    eprintln!("full snapshot: {chunks} chunks written in {took_ms} ms ({chunks_line})");
    assert!(chunks > 16, "{chunks_line}");
    assert!(
        took_ms > TRANSACTION_TIMEOUT_MS,
        "the full snapshot took {took_ms} ms, not longer than the transaction timeout: the test does not test anything"
    );
    assert_eq!(metric(&m, "transactions_aborted"), 0, "{m}");
    assert!(!log.contains("outlived the transaction timeout"), "{log}");

    // The snapshot's chunks span several transactions (commit markers between them): a
    // restart recovers from it, replaying nothing.
    stop_cleanly(&mut service).await;
    service.restart().expect("restart");
    let m = wait_for_metrics(&service, "recovered", Duration::from_secs(60), |m| {
        metric(m, "recoveries") >= 1
    })
    .await;
    assert_eq!(metric(&m, "recoveries_from_full_snapshot"), 1, "{m}");
    assert_eq!(metric(&m, "last_recovery_replayed_records"), 0, "{m}");
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    s.cluster.proxy.clear_faults();
    stop_cleanly(&mut service).await;
}

/// Counts records; no outputs.
struct Counter;

impl Processor for Counter {
    type State = u64;
    type Key = Utf8;
    type Value = Utf8;

    fn process(
        &self,
        count: &mut u64,
        _record: &Record<'_, String, String>,
        _out: &mut Output,
    ) -> Result<(), ProcessError> {
        *count += 1;
        Ok(())
    }
}

/// Polls `condition` every 100 ms until it holds; panics after `timeout`.
async fn wait_until(what: &str, timeout: Duration, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Dropping the `run_until` future stops the app: its partition is committed and released,
/// so another instance of the app gets it (a dropped future must not leave an app running,
/// unowned, holding its partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_run_until_stops_the_app() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("dropped-in");
    let app_id = unique_name("dropped-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    produce(&bootstrap, &input, &inputs(0..10, 1));
    let app = || {
        let config = AppConfig::new(&app_id, &bootstrap).input_topic(&input);
        App::new(config, Counter).expect("app")
    };

    let first = app();
    let first_metrics = first.metrics();
    let owns_its_partition = || {
        let m = first_metrics.snapshot();
        m.partitions_assigned >= 1 && m.records_processed >= 10
    };
    tokio::select! {
        result = first.run_until(std::future::pending()) => {
            panic!("the app stopped on its own: {result:?}")
        }
        () = wait_until("the first app to process its input", Duration::from_secs(60), owns_its_partition) => {}
    }
    // The run_until future is dropped here.
    let dropped = Instant::now();

    let second = app();
    let second_metrics = second.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(second.run_until(async {
        let _ = stopped.await;
    }));
    wait_until(
        "the second app to get the partition",
        Duration::from_secs(30),
        || second_metrics.snapshot().partitions_assigned >= 1,
    )
    .await;
    eprintln!(
        "partition handed over {:?} after the drop",
        dropped.elapsed()
    );
    let first_final = first_metrics.snapshot();
    assert_eq!(first_final.partitions_assigned, 0, "{first_final:?}");
    // Its graceful stop left a full snapshot for the next owner.
    assert!(first_final.full_snapshots_written >= 1, "{first_final:?}");
    wait_until("the second app to recover", Duration::from_secs(30), || {
        second_metrics.snapshot().recoveries_from_full_snapshot >= 1
    })
    .await;
    stop.send(()).expect("second app running");
    running
        .await
        .expect("second app task")
        .expect("second app stopped cleanly");
}

/// librdkafka 2.12's `send_offsets_to_transaction` never checks its deadline while it waits
/// for a group coordinator it cannot reach: a worker stuck there would neither commit nor stop
/// (seen in the 3-node chaos run). The worker bounds the call (a quarter of the transaction
/// timeout plus 5 s), gives that producer up and recovers with a new one. The proxy loses a
/// TxnOffsetCommit request and refuses every connection for 40 s, so its retry has no
/// coordinator to go to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_offsets_commit_gives_up_its_producer_within_its_bound() {
    let s = Setup::new("hung-offsets").await;
    let records = inputs(0..40, 1);
    produce(&s.bootstrap, &s.input, &records[..20]);
    // Transaction timeout 8 s: the call's bound is 8 / 4 + 5 = 7 s.
    let mut service = s.spawn(&["--transaction-timeout-ms", "8000"]);
    s.assert_outputs(&service, &records[..20], Duration::from_secs(60))
        .await;
    let outage = Duration::from_secs(40);
    s.cluster
        .proxy
        .faults()
        .outage_on_next_request(ApiKey::TxnOffsetCommit, outage);
    produce(&s.bootstrap, &s.input, &records[20..]);
    let armed = Instant::now();
    let hung = service
        .wait_for_log("a librdkafka call hung", Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("the worker never gave the hung call up: {e}"));
    let waited = armed.elapsed();
    assert!(hung.contains("send_offsets_to_transaction"), "{hung}");
    // Given up while the outage still lasted: bounded by the worker, not by the network.
    assert!(
        waited < outage - Duration::from_secs(5),
        "gave up only after {waited:?}, the outage lasted {outage:?}"
    );
    eprintln!("gave the hung call up {waited:?} after the outage was armed");
    let faults = s.cluster.proxy.faults();
    wait_until("the outage to end", outage, || !faults.refusing()).await;
    s.assert_outputs(&service, &records, Duration::from_secs(150))
        .await;
    assert!(service.is_running(), "{}", service.log_tail(40));
    stop_cleanly(&mut service).await;
}

/// A fatal consumer error stops the app with an error naming the setting, instead of being
/// warned about forever: a second instance with the same `group.instance.id` is refused by
/// the group coordinator (UNRELEASED_INSTANCE_ID, fatal for librdkafka). It rejoins for one
/// session timeout (the id could be a crashed predecessor's), then stops. The first instance
/// keeps processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_group_instance_id_stops_the_newcomer() {
    let s = Setup::new("instance-id").await;
    let records = inputs(0..40, 1);
    produce(&s.bootstrap, &s.input, &records[..20]);
    let instance = format!("{}-static", s.app);
    let mut first = s.spawn(&["--group-instance-id", &instance]);
    s.assert_outputs(&first, &records[..20], Duration::from_secs(60))
        .await;
    let mut second = s.spawn(&["--group-instance-id", &instance]);
    // The app waits the broker's default session timeout (45 s) plus a margin.
    expect_failure_within(
        &mut second,
        Duration::from_secs(120),
        &[
            "the group still holds this group.instance.id for another member",
            &format!("the group consumer of {} cannot go on", s.app),
            "another instance uses the same group.instance.id: give every instance its own",
        ],
    )
    .await;
    produce(&s.bootstrap, &s.input, &records[20..]);
    s.assert_outputs(&first, &records, Duration::from_secs(60))
        .await;
    assert!(first.is_running(), "{}", first.log_tail(40));
    stop_cleanly(&mut first).await;
}

/// What a partition buffers between the consumer and its worker is bounded in bytes, not only
/// in records: 300 records with a 64 KiB header each behind a slow processor, with
/// `max_buffered_bytes` 1 MiB, never have much more than 1 MiB buffered (the worker's
/// 2048-record channel alone would take all 19 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_input_is_bounded_in_bytes() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    const PAD: usize = 64 * 1024;
    const MAX_BUFFERED: usize = 1024 * 1024;
    let s = Setup::new("buffered-bytes").await;
    let records = inputs(0..300, 1);
    let (bootstrap, input, padded) = (s.bootstrap.clone(), s.input.clone(), records.clone());
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        let pad = vec![b'x'; PAD];
        for r in &padded {
            let headers = OwnedHeaders::new().insert(Header {
                key: "pad",
                value: Some(&pad[..]),
            });
            let record = BaseRecord::to(&input)
                .key(r.key.as_str())
                .payload(r.id.as_str())
                .partition(r.partition)
                .headers(headers);
            producer.send(record).map_err(|(e, _)| e).expect("send");
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(60)).expect("flush");
    })
    .await
    .expect("producer task");

    let mut service = s.spawn(&[
        "--per-record-delay-ms",
        "10",
        "--max-buffered-bytes",
        &MAX_BUFFERED.to_string(),
    ]);
    s.assert_outputs(&service, &records, Duration::from_secs(120))
        .await;
    let metrics = last_metrics(&service).expect("metrics line");
    let buffered = metrics["max_buffered_bytes"]
        .as_u64()
        .expect("max_buffered_bytes") as usize;
    eprintln!("at most {buffered} bytes buffered (limit {MAX_BUFFERED})");
    // The bound plus the one record that may always go to an empty channel and the one the
    // consumer polled as the partition paused.
    assert!(
        buffered <= MAX_BUFFERED + 2 * (PAD + 1024),
        "{buffered} bytes buffered, limit {MAX_BUFFERED}"
    );
    assert!(buffered >= PAD, "nothing was buffered: {metrics}");
    stop_cleanly(&mut service).await;
}

/// A transaction left open upstream stops a read_committed input partition without any error.
/// The app notices its last stable offset standing below the high watermark, logs the stuck
/// offset with the commands that resolve it, and counts the partition; once the transaction is
/// aborted, the partition moves on and every record is processed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_stuck_behind_an_open_transaction_is_reported() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    let s = Setup::new("stuck").await;
    let records = inputs(0..40, 1);
    let mut service = s
        .process(&records[..20], &["--stuck-input-after-ms", "3000"])
        .await;

    // Offset 20: a record in a transaction that stays open; then 20 committed records behind it.
    let (bootstrap, input) = (s.bootstrap.clone(), s.input.clone());
    let hanging = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("transactional.id", unique_name("hanging"))
            .set("transaction.timeout.ms", "300000")
            .create()
            .expect("transactional producer");
        producer
            .init_transactions(Duration::from_secs(30))
            .expect("init");
        producer.begin_transaction().expect("begin");
        producer
            .send(
                BaseRecord::to(&input)
                    .key("k0")
                    .payload("never-committed")
                    .partition(0),
            )
            .map_err(|(e, _)| e)
            .expect("send");
        producer.flush(Duration::from_secs(30)).expect("flush");
        producer
    })
    .await
    .expect("producer task");
    produce(&s.bootstrap, &s.input, &records[20..]);

    let m = wait_for_metrics(&service, "a stuck input", Duration::from_secs(60), |m| {
        metric(m, "stuck_input_partitions") == 1
    })
    .await;
    assert_eq!(metric(&m, "records_processed"), 20, "{m}");
    let log = service.run_log_text().expect("log");
    let line = log
        .lines()
        .find(|l| l.contains("input partition stuck"))
        .unwrap_or_else(|| panic!("no warning:\n{}", service.log_tail(30)));
    for needle in [
        "stuck_offset=20",
        "high_watermark=41",
        &format!("find-hanging --topic {} --partition 0", s.input),
        "--start-offset 20",
    ] {
        assert!(line.contains(needle), "{needle} missing in {line}");
    }

    tokio::task::spawn_blocking(move || {
        hanging
            .abort_transaction(Duration::from_secs(30))
            .expect("abort");
    })
    .await
    .expect("abort task");
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    wait_for_metrics(
        &service,
        "the input to move",
        Duration::from_secs(60),
        |m| metric(m, "stuck_input_partitions") == 0,
    )
    .await;
    assert!(service
        .run_log_text()
        .expect("log")
        .contains("input partition moves again"));
    stop_cleanly(&mut service).await;
}

//! Operating an app: the `exactly` command line against a real app's topics (`inspect` while it
//! runs and after, `verify-snapshot`, a `reset` that makes it reprocess its input from the
//! default state, refused while it runs) and the Prometheus endpoint scraped while it runs.

use std::time::Duration;

use crate::framework_support::*;
use exactly::cli::CliError;

/// Runs `exactly <args> --brokers .. --app ..` in-process; its output, or its error and output.
async fn exactly_cli(s: &Setup, args: &[&str]) -> Result<String, (CliError, String)> {
    let mut argv: Vec<String> = ["exactly"]
        .iter()
        .chain(args)
        .map(|a| a.to_string())
        .collect();
    argv.extend([
        "--brokers".into(),
        s.bootstrap.clone(),
        "--app".into(),
        s.app.clone(),
    ]);
    let (result, out) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let result = exactly::cli::run(&argv, &mut out);
        (result, out)
    })
    .await
    .expect("cli thread");
    let text = String::from_utf8_lossy(&out).into_owned();
    result.map(|()| text.clone()).map_err(|e| (e, text))
}

/// The whitespace-separated fields of partition 0's row in `inspect` output.
fn partition_row(inspect: &str) -> Vec<String> {
    inspect
        .lines()
        .map(str::split_whitespace)
        .map(|fields| fields.map(str::to_owned).collect::<Vec<_>>())
        .find(|fields| fields.first().map(String::as_str) == Some("0") && fields.len() > 10)
        .unwrap_or_else(|| panic!("no row for partition 0 in:\n{inspect}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_verify_and_reset_an_app() {
    let s = Setup::new("cli").await;
    let records = inputs(0..300, 1);
    let mut service = s.process(&records, &["--full-snapshot-every", "100"]).await;

    // Running and caught up.
    let text = exactly_cli(&s, &["inspect"]).await.expect("inspect");
    assert!(
        text.contains(&format!("input {} (1 partitions)", s.input)),
        "{text}"
    );
    let row = partition_row(&text);
    // partition next_offset input_end lag txn_seq since_base last_commit(2 words) ...
    assert_eq!(&row[1..4], ["300", "300", "0"], "{text}");
    let err = exactly_cli(&s, &["reset", "--to", "earliest"]).await;
    assert!(
        matches!(err, Err((CliError::MembersActive { .. }, _))),
        "a reset of a running app must be refused: {err:?}"
    );

    stop_cleanly(&mut service).await;
    let text = exactly_cli(&s, &["verify-snapshot"]).await.expect("verify");
    assert!(
        text.contains("verified 1 full snapshots, 0 failed"),
        "{text}"
    );

    let plan = exactly_cli(&s, &["reset", "--to", "earliest", "--dry-run"])
        .await
        .expect("dry run");
    assert!(plan.contains("next offset 300 -> 0"), "{plan}");
    assert!(plan.contains("dry run: nothing changed"), "{plan}");
    let text = exactly_cli(&s, &["inspect"]).await.expect("inspect");
    assert_eq!(
        partition_row(&text)[1],
        "300",
        "a dry run changed something:\n{text}"
    );

    let done = exactly_cli(&s, &["reset", "--to", "earliest"])
        .await
        .expect("reset");
    assert!(done.contains("reset done: 1 partitions"), "{done}");
    let text = exactly_cli(&s, &["inspect"]).await.expect("inspect");
    let row = partition_row(&text);
    assert_eq!(&row[1..6], ["0", "300", "300", "0", "0"], "{text}");

    // Restarted, the app reprocesses everything from the default state: the same 300 outputs
    // (counts from 1 again), after the first 300.
    service.restart().expect("restart");
    let count = wait_for_count(&s.bootstrap, &s.output, 600, Duration::from_secs(60)).await;
    assert_eq!(count, 600, "{}", service.log_tail(40));
    let outputs: Vec<Option<Vec<u8>>> = read_all(&s.bootstrap, &s.output)
        .await
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(
        outputs[..300],
        outputs[300..],
        "the reprocessing did not start over"
    );
    let text = exactly_cli(&s, &["inspect"]).await.expect("inspect");
    assert_eq!(&partition_row(&text)[1..4], ["300", "300", "0"], "{text}");
    stop_cleanly(&mut service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_what_is_wrong() {
    let s = Setup::new("cli-errors").await;
    let err = exactly_cli(&s, &["inspect"]).await;
    assert!(
        matches!(err, Err((CliError::AppNotFound { .. }, _))),
        "an app that never ran: {err:?}"
    );
    let err = exactly_cli(&s, &["inspect", "--topic", "no-such-topic-here"]).await;
    let (error, _) = err.expect_err("a missing topic");
    assert!(
        error
            .to_string()
            .contains("\"no-such-topic-here\" does not exist"),
        "{error}"
    );
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let error = tokio::task::spawn_blocking(move || {
        exactly::cli::run(
            [
                "exactly",
                "inspect",
                "--brokers",
                "127.0.0.1:1",
                "--app",
                "a",
            ],
            &mut out,
        )
        .expect_err("nothing listens on port 1")
    })
    .await
    .expect("cli thread");
    assert!(matches!(error, CliError::NoConnection { .. }), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_is_scraped_while_the_app_runs() {
    use exactly_tests::scrape::{sample, scrape};
    let s = Setup::new("scrape").await;
    let records = inputs(0..300, 1);
    let mut service = s
        .process(
            &records,
            &[
                "--metrics-addr",
                "127.0.0.1:0",
                "--full-snapshot-every",
                "100",
            ],
        )
        .await;
    let addr = metrics_addr_of(&service).await;
    let partition = format!(r#"{{topic="{}",partition="0"}}"#, s.input);
    let series = |name: &str| format!("exactly_{name}{partition}");
    // Outputs are committed before the worker publishes its position, and the consumer
    // publishes the input end once a second: scrape until both are in.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = scrape(addr).await.expect("scrape");
        let caught_up = sample(&text, &series("partition_next_offset")) == Some(300.0)
            && sample(&text, &series("partition_input_end")) == Some(300.0);
        if caught_up {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never caught up:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        sample(&text, &series("partition_assigned")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("partition_records_total")),
        Some(300.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("partition_lag_records")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("partition_recovering")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "exactly_records_processed_total"),
        Some(300.0),
        "{text}"
    );
    let commits = sample(&text, "exactly_transaction_commit_seconds_count").unwrap_or(0.0);
    assert!(commits >= 1.0, "{text}");
    // Full snapshots are due at commits: 300 records in few transactions make at least one.
    let snapshots = sample(&text, "exactly_full_snapshot_seconds_count").unwrap_or(0.0);
    assert!(snapshots >= 1.0, "{text}");
    let written = sample(&text, "exactly_full_snapshots_written_total");
    assert_eq!(written, Some(snapshots), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    // More input: the lag shows it until processed.
    let more = inputs(300..400, 1);
    produce(&s.bootstrap, &s.input, &more);
    let all: Vec<_> = records.into_iter().chain(more).collect();
    s.assert_outputs(&service, &all, Duration::from_secs(60))
        .await;
    stop_cleanly(&mut service).await;
}

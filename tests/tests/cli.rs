//! The `exactly` command line against a real app's topics: `inspect` while it runs and after,
//! `verify-snapshot` of its full snapshots, and a `reset` that makes it reprocess its input
//! from the default state (refused while it runs).

mod framework_support;

use std::time::Duration;

use exactly::cli::CliError;
use framework_support::*;

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
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let result = exactly::cli::run(&argv, &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        result.map(|()| text.clone()).map_err(|e| (e, text))
    })
    .await
    .expect("cli thread")
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

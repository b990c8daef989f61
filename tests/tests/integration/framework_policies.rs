//! Bad records under each error policy, and the atomicity of an aborted transaction.

use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::ChildProcess;

/// Fail policy: the transaction holding the bad record is aborted as a whole — none of its
/// outputs and no snapshot record become visible — and the service stops with an error naming
/// topic, partition and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_policy_aborts_the_transaction_and_stops_with_the_record_position() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("fail-in");
    let output = unique_name("fail-out");
    let app = unique_name("fail-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");

    let records = inputs(0..16, 1);
    let (committed, rest) = records.split_at(5);
    produce(&bootstrap, &input, committed);
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--commit-interval-ms",
        "1500",
        "--poison",
        "id-000015",
    ]);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn");
    let expected_first = expected_outputs(committed);
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_first,
        Duration::from_secs(60),
    )
    .await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    let snapshot_topic = format!("{app}.{input}.snapshots");
    let snapshot_records_before = read_all(&bootstrap, &snapshot_topic).await.len();
    assert!(snapshot_records_before >= 1);

    // 10 good records and the poison one arrive together: one transaction.
    produce(&bootstrap, &input, rest);
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&format!(
            "processor failed on record {input}/0 at offset 15"
        )),
        "{log}"
    );
    // Neither the outputs of the aborted transaction nor a snapshot record of it are visible.
    let outputs = read_all(&bootstrap, &output).await;
    assert_eq!(
        outputs.len(),
        5,
        "outputs of the aborted transaction leaked: {outputs:?}"
    );
    let snapshot_records = read_all(&bootstrap, &snapshot_topic).await.len();
    assert_eq!(snapshot_records, snapshot_records_before);

    // The failure is sticky (nothing committed past the record): a restart fails again.
    service.restart().expect("restart");
    let (code, log) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("at offset 15"), "{log}");
}

async fn run_lenient_policy(
    policy: &str,
    dead_letter: Option<&str>,
) -> (TestCluster, String, ChildProcess) {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("lenient-in");
    let output = unique_name("lenient-out");
    let app = unique_name("lenient-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");
    if let Some(dl) = dead_letter {
        cluster
            .create_topic(dl, 1)
            .await
            .expect("dead-letter topic");
    }

    let first = inputs(0..40, 1);
    let second = inputs(40..80, 1);
    produce(&bootstrap, &input, &first); // offsets 0..40, poison = id-000020 at offset 20
    produce_raw(&bootstrap, &input, 0, b"k0", &[0xff, 0xfe, 0x00]); // offset 40: not UTF-8
    produce(&bootstrap, &input, &second);
    let spec = service_spec(&bootstrap, &app, &input, &output).args([
        "--error-policy",
        policy,
        "--poison",
        "id-000020",
    ]);
    let service = ChildProcess::spawn(app.clone(), spec).expect("spawn");
    let good: Vec<Input> = first
        .iter()
        .chain(second.iter())
        .filter(|r| r.id != "id-000020")
        .cloned()
        .collect();
    let expected = expected_outputs(&good);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(60)).await;
    assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    (cluster, bootstrap, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_policy_skips_and_counts_bad_records() {
    let (_cluster, _bootstrap, mut service) = run_lenient_policy("skip", None).await;
    let m = wait_for_metrics(&service, "2 skipped", Duration::from_secs(10), |m| {
        metric(m, "records_skipped") == 2
    })
    .await;
    assert_eq!(metric(&m, "records_dead_lettered"), 0, "{m}");
    let log = service.run_log_text().expect("log");
    assert!(log.contains("skipping a record"), "{log}");
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_policy_writes_bad_records_with_error_headers() {
    let dl = unique_name("dead-letters");
    let (_cluster, bootstrap, mut service) =
        run_lenient_policy(&format!("dead-letter:{dl}"), Some(&dl)).await;
    let m = wait_for_metrics(&service, "2 dead-lettered", Duration::from_secs(10), |m| {
        metric(m, "records_dead_lettered") == 2
    })
    .await;
    assert_eq!(metric(&m, "records_skipped"), 0, "{m}");
    let dead = read_all(&bootstrap, &dl).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let poison = &dead[0];
    assert_eq!(poison.value.as_deref(), Some(&b"id-000020"[..]));
    assert_eq!(
        poison.header("exactly.error.kind").as_deref(),
        Some("processor")
    );
    assert_eq!(
        poison.header("exactly.source.offset").as_deref(),
        Some("20")
    );
    assert_eq!(
        poison.header("exactly.source.partition").as_deref(),
        Some("0")
    );
    let undecodable = &dead[1];
    assert_eq!(undecodable.value.as_deref(), Some(&[0xff, 0xfe, 0x00][..]));
    assert_eq!(
        undecodable.header("exactly.error.kind").as_deref(),
        Some("decode-value")
    );
    assert_eq!(
        undecodable.header("exactly.source.offset").as_deref(),
        Some("40")
    );
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

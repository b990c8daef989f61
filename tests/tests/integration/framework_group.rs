//! Several instances of one app: rebalances hand partitions over with their state, and a
//! paused instance whose partitions moved on is fenced when it wakes up.

use std::time::{Duration, Instant};

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::Supervisor;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_hands_partitions_over_with_state_intact() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("rb-in");
    let output = unique_name("rb-out");
    let app = unique_name("rb-app");
    cluster.create_topic(&input, 4).await.expect("input topic");
    cluster
        .create_topic(&output, 4)
        .await
        .expect("output topic");
    let mut all = Vec::new();
    let mut procs = Supervisor::new();

    let batch = inputs(0..1500, 4);
    produce(&bootstrap, &input, &batch);
    all.extend(batch);
    procs
        .spawn("a", service_spec(&bootstrap, &app, &input, &output))
        .expect("spawn a");
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_outputs(&all),
        Duration::from_secs(60),
    )
    .await;
    assert!(report.is_clean(), "{report}");

    // A second instance joins: partitions are split between them.
    procs
        .spawn("b", service_spec(&bootstrap, &app, &input, &output))
        .expect("spawn b");
    let b_metrics = wait_for_metrics(
        procs.get("b").expect("b"),
        "b owns partitions",
        Duration::from_secs(60),
        |m| metric(m, "partitions_assigned") >= 1 && metric(m, "recoveries") >= 1,
    )
    .await;
    // A wrote a final full snapshot when its partitions were revoked.
    assert!(
        metric(&b_metrics, "recoveries_from_full_snapshot") >= 1,
        "{b_metrics}"
    );

    let batch = inputs(1500..3000, 4);
    produce(&bootstrap, &input, &batch);
    all.extend(batch);
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_outputs(&all),
        Duration::from_secs(90),
    )
    .await;
    assert!(report.is_clean(), "{report}");
    let a = last_metrics(procs.get("a").expect("a")).expect("a metrics");
    let b = last_metrics(procs.get("b").expect("b")).expect("b metrics");
    assert!(metric(&a, "partitions_assigned") >= 1, "a: {a}");
    assert!(metric(&b, "partitions_assigned") >= 1, "b: {b}");

    // A leaves gracefully: B takes everything over and continues every key's count.
    let status = procs
        .child("a")
        .expect("a")
        .terminate(Duration::from_secs(30))
        .await
        .expect("stop a");
    assert!(status.success());
    let batch = inputs(3000..4500, 4);
    produce(&bootstrap, &input, &batch);
    all.extend(batch);
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_outputs(&all),
        Duration::from_secs(90),
    )
    .await;
    assert!(
        report.is_clean(),
        "{report}\nb:\n{}",
        procs.get("b").expect("b").log_tail(40)
    );
    let b = last_metrics(procs.get("b").expect("b")).expect("b metrics");
    assert_eq!(metric(&b, "partitions_assigned"), 4, "b: {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_zombie_is_fenced_and_adds_no_duplicates() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("zombie-in");
    let output = unique_name("zombie-out");
    let app = unique_name("zombie-app");
    cluster.create_topic(&input, 2).await.expect("input topic");
    cluster
        .create_topic(&output, 2)
        .await
        .expect("output topic");
    let mut procs = Supervisor::new();

    // Slow records and long transactions: the zombie always holds an open transaction.
    let slow = ["--per-record-delay-ms", "3", "--commit-interval-ms", "1500"];
    let records = inputs(0..4000, 2);
    produce(&bootstrap, &input, &records);
    procs
        .spawn(
            "zombie",
            service_spec(&bootstrap, &app, &input, &output).args(slow),
        )
        .expect("spawn zombie");
    let seen = wait_for_count(&bootstrap, &output, 300, Duration::from_secs(60)).await;
    assert!(
        seen >= 300,
        "{}",
        procs.get("zombie").expect("z").log_tail(60)
    );

    // Freeze it mid-transaction; a new instance takes its partitions after the session timeout.
    procs
        .child("zombie")
        .expect("zombie")
        .pause()
        .expect("SIGSTOP");
    procs
        .spawn("heir", service_spec(&bootstrap, &app, &input, &output))
        .expect("spawn heir");
    wait_for_metrics(
        procs.get("heir").expect("heir"),
        "heir owns both partitions",
        Duration::from_secs(90),
        // Started both: recovered, or fresh (a partition the zombie never committed on).
        |m| {
            metric(m, "partitions_assigned") == 2
                && metric(m, "recoveries") + metric(m, "fresh_starts") >= 2
        },
    )
    .await;

    // Wake the zombie: its open transaction was aborted by the heir's init_transactions and
    // its commit must be fenced.
    procs
        .child("zombie")
        .expect("zombie")
        .resume()
        .expect("SIGCONT");
    procs
        .child("zombie")
        .expect("zombie")
        .wait_for_log("fenced", Duration::from_secs(60))
        .await
        .expect("the zombie was fenced");

    let expected = expected_outputs(&records);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(120)).await;
    assert!(
        report.is_clean(),
        "{report}\nzombie:\n{}\nheir:\n{}",
        procs.get("zombie").expect("z").log_tail(40),
        procs.get("heir").expect("h").log_tail(40)
    );
}

/// A zombie elsewhere re-initialises the transactional id of a partition this instance
/// rightfully owns, fencing it. Nobody revokes the partition (this instance's membership is
/// fine), so after a session timeout the instance takes it over again - fencing the zombie
/// back - and finishes the input exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_owner_takes_its_partition_back() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("refence-in");
    let output = unique_name("refence-out");
    let app = unique_name("refence-app");
    cluster.create_topic(&input, 1).await.expect("input topic");
    cluster
        .create_topic(&output, 1)
        .await
        .expect("output topic");
    let mut procs = Supervisor::new();

    // Slow records and long transactions: the owner always holds an open transaction.
    let slow = ["--per-record-delay-ms", "2", "--commit-interval-ms", "500"];
    let records = inputs(0..3000, 1);
    produce(&bootstrap, &input, &records);
    procs
        .spawn(
            "owner",
            service_spec(&bootstrap, &app, &input, &output).args(slow),
        )
        .expect("spawn owner");
    let seen = wait_for_count(&bootstrap, &output, 200, Duration::from_secs(60)).await;
    assert!(
        seen >= 200,
        "{}",
        procs.get("owner").expect("o").log_tail(60)
    );

    // The "zombie": a producer with the owner's transactional id.
    let transactional_id = format!("{app}.{input}.0");
    let rogue_bootstrap = bootstrap.clone();
    let rogue = tokio::task::spawn_blocking(move || {
        let rogue: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &rogue_bootstrap)
            .set("transactional.id", &transactional_id)
            .create()
            .expect("rogue producer");
        rogue
            .init_transactions(Duration::from_secs(30))
            .expect("rogue init_transactions");
        rogue
    })
    .await
    .expect("rogue task");

    let owner = procs.child("owner").expect("owner");
    owner
        .wait_for_log("fenced", Duration::from_secs(60))
        .await
        .expect("the owner was fenced");
    owner
        .wait_for_log("taking it over again", Duration::from_secs(60))
        .await
        .expect("the owner took its partition back");

    let expected = expected_outputs(&records);
    let report = wait_for_outputs(&bootstrap, &output, &expected, Duration::from_secs(120)).await;
    assert!(
        report.is_clean(),
        "{report}\nowner:\n{}",
        procs.get("owner").expect("o").log_tail(60)
    );
    drop(rogue);
}

/// Rebalances stop only the partitions that move (the default group protocol): the
/// `rebalance-check` binary runs 3 instances on 12 partitions under input, adds a 4th and
/// stops one, and judges from the services' own logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_stop_only_the_partitions_that_move() {
    let spec = exactly_tests::process::ProcessSpec::new(env!("CARGO_BIN_EXE_rebalance-check"))
        .env("NO_COLOR", "1");
    let mut check = exactly_tests::process::ChildProcess::spawn("rebalance-check", spec)
        .expect("start rebalance-check");
    let status = check
        .wait_exit(Duration::from_secs(600))
        .await
        .expect("rebalance-check finished");
    let output = check.log_text().expect("output");
    let line = output
        .lines()
        .find(|l| l.starts_with("REBALANCE-CHECK "))
        .unwrap_or_else(|| {
            panic!(
                "no REBALANCE-CHECK line ({status}):\n{}",
                check.log_tail(60)
            )
        });
    assert!(status.success(), "{line}\n{}", check.log_tail(60));
    assert!(line.contains("unmoved_stopped=0 "), "{line}");
    assert!(line.ends_with("verdict=PASS"), "{line}");
}

/// A group coordinator's answer that moves partitions can be lost (the coordinator fails, the
/// request times out). librdkafka 2.12 retries such a heartbeat as it was, without the fields
/// that make Kafka send the assignment again, so the member never learns that it must give a
/// partition up, and the coordinator waits the rebalance timeout (`max.poll.interval.ms`, 5
/// minutes) before it fences the member: the newcomer that waits for the partition gets
/// nothing meanwhile. The app rejoins its group after a coordinator request timed out, so the
/// newcomer gets its partition within seconds of the timeout. (The member's request timeout is
/// 10 s here, below the group's 45 s session timeout, as when a coordinator fails over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_does_not_strand_partitions() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let input = unique_name("lost-in");
    let output = unique_name("lost-out");
    let app = unique_name("lost-app");
    let a_client = unique_name("lost-a");
    cluster.create_topic(&input, 2).await.expect("input topic");
    cluster
        .create_topic(&output, 2)
        .await
        .expect("output topic");
    let mut procs = Supervisor::new();
    let first = inputs(0..200, 2);
    produce(&bootstrap, &input, &first);
    let a_args = [
        "--consumer-kafka".to_owned(),
        format!("client.id={a_client}"),
        "--consumer-kafka".to_owned(),
        "socket.timeout.ms=10000".to_owned(),
    ];
    procs
        .spawn(
            "a",
            service_spec(&bootstrap, &app, &input, &output).args(&a_args),
        )
        .expect("spawn a");
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_outputs(&first),
        Duration::from_secs(60),
    )
    .await;
    assert!(report.is_clean(), "{report}");

    cluster.proxy.faults().lose_next_assignment(&a_client);
    procs
        .spawn("b", service_spec(&bootstrap, &app, &input, &output))
        .expect("spawn b");
    wait_for_metrics(
        procs.get("b").expect("b"),
        "b owns a partition",
        Duration::from_secs(90),
        |m| metric(m, "partitions_assigned") >= 1 && metric(m, "recoveries") >= 1,
    )
    .await;
    let a = procs.get("a").expect("a");
    let a_log = a.run_log_text().expect("a's log");
    assert!(
        a_log.contains("rejoining the group"),
        "the assignment was not lost on its way to a:\n{}",
        a.log_tail(40)
    );
    let all = inputs(0..400, 2);
    produce(&bootstrap, &input, &all[200..]);
    let report = wait_for_outputs(
        &bootstrap,
        &output,
        &expected_outputs(&all),
        Duration::from_secs(60),
    )
    .await;
    assert!(report.is_clean(), "{report}");
}

/// With the classic protocol and an instance id, an instance restarted after `kill -9` takes
/// its partition back at once: the group coordinator replaces the static member instead of
/// waiting for its session timeout (two minutes here, so that the difference shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarted_after_a_crash_takes_its_partitions_back_at_once() {
    const SESSION_TIMEOUT: Duration = Duration::from_secs(120);
    let s = Setup::new("static-classic").await;
    let instance = format!("{}-0", s.app);
    let session = format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis());
    let args = [
        "--group-protocol",
        "cooperative-sticky",
        "--group-instance-id",
        &instance,
        "--consumer-kafka",
        &session,
    ];
    let records = inputs(0..40, 1);
    let mut service = s.process(&records[..20], &args).await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    let restarted = Instant::now();
    produce(&s.bootstrap, &s.input, &records[20..]);
    s.assert_outputs(&service, &records, SESSION_TIMEOUT / 2)
        .await;
    eprintln!("resumed {:?} after the restart", restarted.elapsed());
    assert!(service.is_running(), "{}", service.log_tail(40));
    stop_cleanly(&mut service).await;
}

/// Under the consumer protocol a static member that crashed keeps its instance id until the
/// group's session timeout (6 s on the test broker). The instance restarted sooner is refused
/// (UNRELEASED_INSTANCE_ID, fatal to librdkafka's consumer): it joins again with a new consumer
/// until the id is released, instead of stopping, and then processes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarted_after_a_crash_waits_for_its_id() {
    let s = Setup::new("static-consumer").await;
    let instance = format!("{}-0", s.app);
    let args = ["--group-instance-id", instance.as_str()];
    let records = inputs(0..40, 1);
    let mut service = s.process(&records[..20], &args).await;
    service.kill_hard().await.expect("kill -9");
    service.restart().expect("restart");
    produce(&s.bootstrap, &s.input, &records[20..]);
    s.assert_outputs(&service, &records, Duration::from_secs(60))
        .await;
    let log = service.run_log_text().expect("log");
    assert!(
        log.contains("the group still holds this group.instance.id")
            && log.contains("joined the group with the released group.instance.id"),
        "the restart did not meet its predecessor's id:\n{}",
        service.log_tail(40)
    );
    assert!(service.is_running(), "{}", service.log_tail(40));
    stop_cleanly(&mut service).await;
}

/// The group's committed offset of partition 0 of `topic` (`None`: nothing committed).
fn group_offset(probe: &exactly_tests::chaos::drain::GroupProbe) -> Option<i64> {
    probe
        .committed()
        .expect("the group's committed offsets")
        .into_iter()
        .find(|(partition, _)| *partition == 0)
        .and_then(|(_, offset)| offset)
}

/// A partition whose owner committed transactions without the group's offsets (they go once
/// per `group_offsets_interval`) and was killed before it caught up: the next owner, given
/// no more input, brings the group's offsets up to its snapshots. Without that, lag tools and
/// any finish line that watches the group wait for good (a 200-event chaos run did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_partition_brings_the_group_offsets_up_to_date() {
    let setup = Setup::new("offsets-catch-up").await;
    let records = inputs(0..400, 1);
    produce(&setup.bootstrap, &setup.input, &records);
    let spec = service_spec(&setup.bootstrap, &setup.app, &setup.input, &setup.output)
        // Transactions of 50 records, and only the first sends offsets; a quiet partition
        // catches the group up a whole commit interval (4 s) after its last transaction,
        // which leaves the test the time to kill it first.
        .args(["--commit-interval-ms", "4000", "--max-batch-records", "50"])
        .env("EXACTLY_GROUP_OFFSETS_INTERVAL_MS", "3600000");
    let mut service =
        exactly_tests::process::ChildProcess::spawn(setup.app.clone(), spec).expect("spawn");
    let seen = wait_for_count(
        &setup.bootstrap,
        &setup.output,
        records.len() as u64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(seen, records.len() as u64, "{}", service.log_tail(40));
    let probe =
        exactly_tests::chaos::drain::GroupProbe::new(&setup.bootstrap, &setup.app, &setup.input, 1)
            .expect("group probe");
    let end = records.len() as i64;
    let before_kill = group_offset(&probe);
    service.kill_hard().await.expect("kill -9");
    assert!(
        before_kill.is_some_and(|offset| offset < end),
        "the group was meant to trail the input before the kill (only the first transaction sends offsets): {before_kill:?} of {end}\n{}",
        service.log_tail(40)
    );

    service.restart().expect("restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut offset = group_offset(&probe);
    while offset != Some(end) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        offset = group_offset(&probe);
    }
    assert_eq!(
        offset,
        Some(end),
        "the recovered partition left the group's offset behind its snapshots:\n{}",
        service.log_tail(40)
    );
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
}

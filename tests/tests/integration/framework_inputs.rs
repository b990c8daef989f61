//! Co-partitioned inputs on real Kafka (the `join-service` test binary): partition p of two
//! input topics is one unit with one state. The unit's records reach the processor in the
//! order recorded with each transaction, and recovery replays that order, not a new one: the
//! test makes the live order differ from timestamp order (the right input's records are older
//! but arrive later), kills the service with SIGKILL, and checks every unit's output chain
//! link by link after the replay.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use crate::framework_support::*;
use exactly_tests::cluster::{unique_name, TestCluster};
use exactly_tests::process::{ChildProcess, ProcessSpec};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const PARTITIONS: i32 = 2;

fn join_spec(bootstrap: &str, app: &str, left: &str, right: &str, output: &str) -> ProcessSpec {
    ProcessSpec::new(env!("CARGO_BIN_EXE_join-service"))
        .args(["--brokers", bootstrap, "--app-id", app])
        .args(["--left", left, "--right", right, "--output", output])
        .env(
            "RUST_LOG",
            "info,exactly=debug,librdkafka=warn,rdkafka=warn",
        )
}

/// Produces ids `prefix-from..prefix-to` to `topic`, spread over the partitions, each with
/// timestamp `base_ms + i`.
fn produce_at(
    bootstrap: &str,
    topic: &str,
    prefix: &str,
    ids: std::ops::Range<usize>,
    base_ms: i64,
) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    for i in ids {
        let id = format!("{prefix}-{i:04}");
        let key = format!("k{}", i % 5);
        let partition = i as i32 % PARTITIONS;
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(id.as_str())
            .partition(partition)
            .timestamp(base_ms + i as i64);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(20));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

fn link(previous: u64, topic: &str, id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    (previous, topic, id).hash(&mut hasher);
    hasher.finish()
}

/// Checks every unit's chain (`"<n> <topic> <id> <hash>"` values): per unit, n runs 1, 2, ...
/// without a gap or repeat, and each hash links the previous one to the record; every id in
/// `ids` appears exactly once. Returns, per unit, the order of the topics.
fn check_chains(outputs: &[ReadRecord], ids: usize) -> Vec<String> {
    // A unit is identified by its chain: find each output's unit by following the links.
    let mut links: BTreeMap<u64, Vec<(u64, String, String, u64)>> = BTreeMap::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for record in outputs {
        let value =
            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned();
        let parts: Vec<&str> = value.split(' ').collect();
        let [n, topic, id, hash] = parts[..] else {
            panic!("unexpected output {value:?}");
        };
        *seen.entry(id.to_owned()).or_default() += 1;
        let n: u64 = n.parse().expect("n");
        let hash: u64 = hash.parse().expect("hash");
        links.entry(record.partition as u64).or_default().push((
            n,
            topic.to_owned(),
            id.to_owned(),
            hash,
        ));
    }
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "ids output more than once: {twice:?}");
    assert_eq!(seen.len(), ids, "distinct ids output");
    // Outputs are keyed by id, so a unit's chain spreads over the output's partitions: rebuild
    // the chains from their first links.
    let mut all: Vec<(u64, String, String, u64)> = links.into_values().flatten().collect();
    all.sort();
    let mut chains: Vec<(u64, u64, String)> = Vec::new(); // (last n, last hash, topics)
    for (n, topic, id, hash) in all {
        let previous = chains.iter().position(|(last_n, last_hash, _)| {
            *last_n + 1 == n && link(*last_hash, &topic, &id) == hash
        });
        match previous {
            Some(i) => {
                chains[i].0 = n;
                chains[i].1 = hash;
                chains[i].2.push(side(&topic));
            }
            None => {
                assert!(
                    n == 1 && link(0, &topic, &id) == hash,
                    "output {n} {topic} {id} {hash} links to no chain"
                );
                chains.push((1, hash, side(&topic).to_string()));
            }
        }
    }
    assert_eq!(chains.len(), PARTITIONS as usize, "one chain per unit");
    chains.into_iter().map(|(_, _, topics)| topics).collect()
}

/// `l` for the left input, `r` for the right one.
fn side(topic: &str) -> char {
    if topic.contains("-left-") {
        'l'
    } else {
        'r'
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn co_partitioned_inputs_replay_in_the_recorded_order_after_kill_9() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let (left, right, output) = (
        unique_name("inputs-left"),
        unique_name("inputs-right"),
        unique_name("inputs-out"),
    );
    let app = unique_name("inputs-app");
    // Timestamps from 1970: retention by time must not delete the records under the test.
    for topic in [&left, &right, &output] {
        cluster
            .create_topic_with_config(topic, PARTITIONS, &[("retention.ms", "-1")])
            .await
            .expect("topic");
    }
    let spec = join_spec(&bootstrap, &app, &left, &right, &output);
    let mut service = ChildProcess::spawn(app.clone(), spec).expect("spawn service");
    // Four rounds, each waited for: left, right, left, right, with timestamps that put them in
    // another order (right 1, right 2, left 2, left 1): live, each round goes when it
    // arrives (the other input has nothing waiting). A replay that chose by timestamp, or by
    // what its reads happen to return first, would not meet them in that order.
    let rounds = [
        (&left, "left", 0..100, 4_000_000),
        (&right, "right", 0..100, 1_000_000),
        (&left, "left", 100..200, 3_000_000),
        (&right, "right", 100..200, 2_000_000),
    ];
    for (n, (topic, prefix, ids, base_ms)) in rounds.into_iter().enumerate() {
        produce_at(&bootstrap, topic, prefix, ids, base_ms);
        let expected = 100 * (n as u64 + 1);
        assert!(
            wait_for_count(&bootstrap, &output, expected, Duration::from_secs(60)).await
                >= expected,
            "{}",
            service.log_tail(60)
        );
    }
    service.kill_hard().await.expect("kill -9");
    // Recovery replays all 400 from the start (no full snapshot yet), in the recorded order;
    // then the last round, left, arrives.
    produce_at(&bootstrap, &left, "left", 200..300, 5_000_000);
    service.restart().expect("restart");
    assert!(
        wait_for_count(&bootstrap, &output, 500, Duration::from_secs(60)).await >= 500,
        "{}",
        service.log_tail(60)
    );
    let log = service.log_text().expect("log");
    assert!(
        !log.contains("partition failed"),
        "{}",
        service.log_tail(60)
    );
    let replays = log
        .lines()
        .filter(|l| l.contains("partition recovered") && !l.contains(" replayed=0 "))
        .count();
    assert_eq!(replays, PARTITIONS as usize, "both units replayed:\n{log}");
    service
        .terminate(Duration::from_secs(30))
        .await
        .expect("terminate");
    let orders = check_chains(&read_all(&bootstrap, &output).await, 500);
    let rounds = ["l", "r", "l", "r", "l"]
        .map(|side| side.repeat(50))
        .concat();
    for order in &orders {
        assert_eq!(
            *order, rounds,
            "each unit met the rounds in the order they arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_with_different_partition_counts_are_refused_at_start() {
    let cluster = TestCluster::start().await.expect("cluster");
    let bootstrap = bootstrap_of(&cluster);
    let (left, right, output) = (
        unique_name("uneven-left"),
        unique_name("uneven-right"),
        unique_name("uneven-out"),
    );
    cluster.create_topic(&left, 2).await.expect("topic");
    cluster.create_topic(&right, 3).await.expect("topic");
    cluster.create_topic(&output, 1).await.expect("topic");
    let app = unique_name("uneven-app");
    let spec = join_spec(&bootstrap, &app, &left, &right, &output);
    let mut service = ChildProcess::spawn(app, spec).expect("spawn service");
    let (code, text) = wait_for_failure(&mut service, Duration::from_secs(60)).await;
    assert_ne!(code, 0);
    assert!(
        text.contains("do not have the same number of partitions")
            && text.contains(&format!("{left}: 2"))
            && text.contains(&format!("{right}: 3")),
        "{text}"
    );
}

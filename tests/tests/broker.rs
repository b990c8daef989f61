//! Integration tests of the nisshi launcher and [`TestCluster`].
//!
//! Run with `--nocapture` to see the measured start times.

use std::path::Path;
use std::time::Instant;

use exactly_tests::broker::nisshi_binary;
use exactly_tests::proxy::client::KafkaConnection;
use exactly_tests::{unique_name, Broker, TestCluster};

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn answers(address: std::net::SocketAddr) -> bool {
    match KafkaConnection::connect(address).await {
        Ok(mut connection) => connection.api_versions().await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stop_restart_and_drop_reap_the_broker() {
    let binary = nisshi_binary().await.expect("nisshi");
    assert!(binary.is_file());

    let started = Instant::now();
    let mut broker = Broker::start().await.expect("broker");
    eprintln!("MEASURE warm Broker::start: {:?}", started.elapsed());
    let address = broker.address();
    assert!(address.ip().is_loopback());
    assert!(answers(address).await);
    assert!(
        broker.log_path().is_file(),
        "log at {}",
        broker.log_path().display()
    );
    let first_pid = broker.pid().expect("running");

    let restarted = Instant::now();
    broker.restart().await.expect("restart");
    eprintln!("MEASURE Broker::restart: {:?}", restarted.elapsed());
    assert_eq!(broker.address(), address, "restart keeps the port");
    let second_pid = broker.pid().expect("running");
    assert_ne!(first_pid, second_pid);
    assert!(!alive(first_pid), "the first broker process was not reaped");
    assert!(answers(address).await);

    broker.stop().await.expect("stop");
    assert!(broker.pid().is_none());
    assert!(!alive(second_pid), "stop left the process behind");
    assert!(!answers(address).await);
    broker.stop().await.expect("stopping twice is fine");

    let dropped = Broker::start().await.expect("broker");
    let pid = dropped.pid().expect("running");
    drop(dropped);
    assert!(!alive(pid), "drop left the process behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_start_and_topic_creation() {
    let started = Instant::now();
    let cluster = TestCluster::start().await.expect("cluster");
    eprintln!("MEASURE TestCluster::start: {:?}", started.elapsed());
    assert_eq!(
        cluster.bootstrap_servers(),
        cluster.proxy.address().to_string()
    );
    let topic = unique_name("created");
    let created = Instant::now();
    cluster.create_topic(&topic, 4).await.expect("create");
    eprintln!(
        "MEASURE create_topic(4 partitions): {:?}",
        created.elapsed()
    );
    // Creating it again is not an error.
    cluster.create_topic(&topic, 4).await.expect("create again");
    assert!(cluster.proxy.stats().connections > 0);
}

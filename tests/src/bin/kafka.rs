//! `kafka`: the local Apache Kafka the tests use, for developing your own services against.
//!
//! ```text
//! cargo run --release -p exactly-tests --bin kafka -- --topic payments:8 --topic alerts:8
//! cargo run --release -p exactly-tests --bin kafka -- --port 9092 --nodes 3 --topic in:12
//! ```
//!
//! Starts Apache Kafka 4.4.0 (fetching its jars with Maven on first use), creates the topics
//! given as `NAME[:PARTITIONS]` (default 1 partition), prints `bootstrap.servers=HOST:PORT` and
//! runs until ctrl-c (or SIGTERM), then shuts the nodes down cleanly. Kill your service with
//! `kill -9` as often as you like; the broker keeps its data until it stops.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use exactly_tests::kafka::{ClusterOptions, Jvm, KafkaCluster, KAFKA_VERSION};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

#[derive(Debug, Parser)]
#[command(about = "Runs a local Apache Kafka for development until ctrl-c")]
struct Cli {
    /// A topic to create, `NAME` or `NAME:PARTITIONS` (repeatable).
    #[arg(long = "topic", value_name = "NAME[:PARTITIONS]", value_parser = parse_topic)]
    topics: Vec<(String, i32)>,
    /// Broker port of node 1 (node N listens on PORT + N - 1); default: free ports.
    #[arg(long)]
    port: Option<u16>,
    /// Nodes: 1, or 3 (replication factor 3, min.insync.replicas 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    nodes: u32,
    /// Run the nodes with Kafka's own start-script JVM settings (1 GiB heap, G1), as the
    /// benchmark does, instead of the tests' small serial-GC heap.
    #[arg(long)]
    kafka_jvm: bool,
}

fn parse_topic(text: &str) -> Result<(String, i32), String> {
    let (name, partitions) = match text.split_once(':') {
        Some((name, n)) => (
            name,
            n.parse::<i32>().ok().filter(|n| *n > 0).ok_or_else(|| {
                format!("partitions of {name:?} must be a positive number, got {n:?}")
            })?,
        ),
        None => (text, 1),
    };
    if name.is_empty() {
        return Err("a topic needs a name".into());
    }
    Ok((name.to_owned(), partitions))
}

#[tokio::main]
async fn main() -> ExitCode {
    exactly_tests::init_tool_logging("warn");
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kafka: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut options = if cli.nodes > 1 {
        ClusterOptions::three_nodes()
    } else {
        ClusterOptions::default()
    };
    options.nodes = cli.nodes;
    if cli.kafka_jvm {
        options.jvm = Jvm::KafkaDefaults;
    }
    if let Some(port) = cli.port {
        options.broker_ports = (0..cli.nodes as u16).map(|i| port + i).collect();
    }
    eprintln!(
        "starting Apache Kafka {KAFKA_VERSION} ({} node(s))",
        cli.nodes
    );
    let mut kafka = tokio::task::spawn_blocking(move || KafkaCluster::start(options)).await??;
    let bootstrap = kafka.bootstrap_servers();
    create_topics(
        &bootstrap,
        &cli.topics,
        kafka.options().replication_factor() as i32,
    )
    .await?;
    for node in kafka.nodes() {
        eprintln!(
            "node {} pid {} listens on {}, log {}",
            node.id(),
            node.pid().unwrap_or(0),
            node.address(),
            node.log_path().display()
        );
    }
    println!("bootstrap.servers={bootstrap}");
    wait_for_shutdown_signal().await?;
    eprintln!("stopping Kafka (controlled shutdown)");
    tokio::task::spawn_blocking(move || {
        for id in (1..=kafka.nodes().len() as u32).rev() {
            kafka.stop_node(id)?;
        }
        Ok::<_, exactly_tests::HarnessError>(())
    })
    .await??;
    Ok(())
}

async fn create_topics(
    bootstrap: &str,
    topics: &[(String, i32)],
    replication: i32,
) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| {
            NewTopic::new(name, *partitions, TopicReplication::Fixed(replication))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(name) => eprintln!("created topic {name}"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => eprintln!("topic {name} exists"),
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

async fn wait_for_shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

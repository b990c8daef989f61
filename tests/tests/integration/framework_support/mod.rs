//! Helpers of the framework's integration tests: the `eos-service` workload (in the harness
//! library, shared with the `rebalance-check` binary), and one app over a one-partition input
//! and output topic ([`Setup`]). Not every test file uses every helper.
#![allow(dead_code)]

use std::time::Duration;

use exactly_tests::cluster::{unique_name, TestCluster};
pub use exactly_tests::eos_service::*;
use exactly_tests::process::ChildProcess;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::{Offset, TopicPartitionList};

/// The `eos-service` command for app `app_id` reading `input` and writing `output`.
pub fn service_spec(
    bootstrap: &str,
    app_id: &str,
    input: &str,
    output: &str,
) -> exactly_tests::process::ProcessSpec {
    service_spec_at(
        env!("CARGO_BIN_EXE_eos-service"),
        bootstrap,
        app_id,
        input,
        output,
    )
}

/// One app (`eos-service`) over a one-partition input and output topic of the shared cluster.
pub struct Setup {
    pub cluster: TestCluster,
    pub bootstrap: String,
    pub input: String,
    pub output: String,
    pub app: String,
}

impl Setup {
    /// Unique names starting with `prefix`; both topics created.
    pub async fn new(prefix: &str) -> Setup {
        Setup::with_output_config(prefix, &[]).await
    }

    /// Like [`Setup::new`], the output topic created with `output_config`.
    pub async fn with_output_config(prefix: &str, output_config: &[(&str, &str)]) -> Setup {
        let cluster = TestCluster::start().await.expect("cluster");
        let bootstrap = bootstrap_of(&cluster);
        let input = unique_name(&format!("{prefix}-in"));
        let output = unique_name(&format!("{prefix}-out"));
        let app = unique_name(&format!("{prefix}-app"));
        cluster.create_topic(&input, 1).await.expect("input topic");
        cluster
            .create_topic_with_config(&output, 1, output_config)
            .await
            .expect("output topic");
        Setup {
            cluster,
            bootstrap,
            input,
            output,
            app,
        }
    }

    /// The app's snapshot topic.
    pub fn snapshot_topic(&self) -> String {
        format!("{}.{}.snapshots", self.app, self.input)
    }

    /// Starts the service with `extra` arguments.
    pub fn spawn(&self, extra: &[&str]) -> ChildProcess {
        let spec = service_spec(&self.bootstrap, &self.app, &self.input, &self.output).args(extra);
        ChildProcess::spawn(self.app.clone(), spec).expect("spawn eos-service")
    }

    /// Waits until the outputs are exactly those of `records`, once each.
    pub async fn assert_outputs(
        &self,
        service: &ChildProcess,
        records: &[Input],
        timeout: Duration,
    ) {
        let expected = expected_outputs(records);
        let report = wait_for_outputs(&self.bootstrap, &self.output, &expected, timeout).await;
        assert!(report.is_clean(), "{report}\n{}", service.log_tail(60));
    }

    /// Produces `records`, starts the service with `extra` arguments and waits until it has
    /// processed them.
    pub async fn process(&self, records: &[Input], extra: &[&str]) -> ChildProcess {
        produce(&self.bootstrap, &self.input, records);
        let service = self.spawn(extra);
        self.assert_outputs(&service, records, Duration::from_secs(60))
            .await;
        service
    }

    /// An admin client (through the proxy).
    pub fn admin(&self) -> AdminClient<DefaultClientContext> {
        self.cluster.client_config().create().expect("admin client")
    }

    /// DeleteRecords (what retention does): `topic`/0 then starts at `offset`.
    pub async fn delete_records_before(&self, topic: &str, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
            .expect("tpl");
        let result = self
            .admin()
            .delete_records(&tpl, &AdminOptions::new())
            .await
            .expect("delete records");
        for element in result.elements() {
            assert!(
                element.error().is_ok(),
                "delete records failed: {:?}",
                element.error()
            );
        }
    }
}

/// Stops the service with SIGTERM and checks that it stopped cleanly.
pub async fn stop_cleanly(service: &mut ChildProcess) {
    let status = service
        .terminate(Duration::from_secs(60))
        .await
        .expect("stop");
    assert!(status.success(), "{}", service.log_tail(40));
}

/// The address the service printed as `METRICS_ADDR <addr>`.
pub async fn metrics_addr_of(
    service: &exactly_tests::process::ChildProcess,
) -> std::net::SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = service.run_log_text().unwrap_or_default();
        if let Some(addr) = log.lines().find_map(|l| l.strip_prefix("METRICS_ADDR ")) {
            return addr.trim().parse().expect("an address");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no METRICS_ADDR line:\n{}",
            service.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

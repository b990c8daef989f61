//! Security on a local secured Apache Kafka (SASL_PLAINTEXT with PLAIN and SCRAM-SHA-512, SSL,
//! mTLS; the StandardAuthorizer with ACLs): what `security-check` runs, as a test. An
//! `eos-service` runs exactly-once through each mechanism by configuration alone with exactly
//! the README's ACLs; a wrong password, an untrusted certificate and each missing ACL stop it
//! within seconds with an error naming the cause; no secret shows in any log.

use exactly_tests::kafka::{ClusterOptions, KafkaCluster};
use exactly_tests::security::run_checks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_exactly_once_on_a_secured_cluster_and_fail_clearly_when_misconfigured() {
    let options = ClusterOptions {
        secured: true,
        ..ClusterOptions::default()
    };
    let kafka = tokio::task::spawn_blocking(move || KafkaCluster::start(options))
        .await
        .expect("start thread")
        .expect("a secured Kafka");
    let eos_service = std::path::PathBuf::from(env!("CARGO_BIN_EXE_eos-service"));
    let report = run_checks(&kafka, eos_service, |line| eprintln!("{line}")).await;
    let line = report.line();
    eprintln!("{line}");
    assert!(report.passed(), "{line}\n{report:#?}");
    assert_eq!(
        line,
        "SECURITY-CHECK plain=ok scram=ok tls=ok mtls=ok wrong_password=clear untrusted_cert=clear missing_acl=clear secrets_in_logs=0 verdict=PASS"
    );
}

//! `security-check`: exactly-once through SASL/PLAIN, SCRAM-SHA-512, TLS and mTLS against a
//! local secured Apache Kafka (by configuration alone), clear and fast failures for a wrong
//! password, an untrusted certificate and each missing ACL, and no secret in any log. Prints
//! `SECURITY-CHECK plain=ok scram=ok tls=ok mtls=ok wrong_password=clear untrusted_cert=clear
//! missing_acl=clear secrets_in_logs=0 verdict=PASS` (other values name what failed).

use std::process::ExitCode;

use exactly_tests::kafka::{ClusterOptions, KafkaCluster};
use exactly_tests::security::{run_checks, Report};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let eos_service = match exactly_tests::sibling_binary("eos-service") {
        Ok(path) => path,
        Err(e) => {
            eprintln!("security-check: {e:#}");
            return ExitCode::from(2);
        }
    };
    println!("starting a secured Apache Kafka (SASL_PLAINTEXT, SSL, mTLS listeners; ACLs)");
    let options = ClusterOptions {
        secured: true,
        ..ClusterOptions::default()
    };
    let kafka = match tokio::task::spawn_blocking(move || KafkaCluster::start(options)).await {
        Ok(Ok(kafka)) => kafka,
        Ok(Err(e)) => {
            eprintln!("security-check: starting Kafka: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("security-check: {e}");
            return ExitCode::from(2);
        }
    };
    let report: Report = run_checks(&kafka, eos_service, |line| println!("{line}")).await;
    let broker_check = broker_check_through_tls(&kafka).await;
    println!("{}", report.line());
    if report.passed() && broker_check {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `broker-check` through the TLS listener, with the same settings a service uses (as `-X`).
async fn broker_check_through_tls(kafka: &KafkaCluster) -> bool {
    use exactly_tests::process::{ChildProcess, ProcessSpec};
    let (Some(pki), Some(bootstrap)) = (kafka.pki(), kafka.secured_bootstrap("ssl")) else {
        return false;
    };
    let binary = match exactly_tests::sibling_binary("broker-check") {
        Ok(path) => path,
        Err(e) => {
            println!("broker-check through TLS: FAILED: {e:#}");
            return false;
        }
    };
    let ca = format!("ssl.ca.location={}", pki.ca_pem.display());
    let spec = ProcessSpec::new(binary).args([
        "--brokers",
        bootstrap.as_str(),
        "-X",
        "security.protocol=SSL",
        "-X",
        ca.as_str(),
    ]);
    let mut child = match ChildProcess::spawn("broker-check", spec) {
        Ok(child) => child,
        Err(e) => {
            println!("broker-check through TLS: FAILED: {e}");
            return false;
        }
    };
    let status = child.wait_exit(std::time::Duration::from_secs(300)).await;
    let log = child.log_text().unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.starts_with("BROKER-CHECK"))
        .unwrap_or("no BROKER-CHECK line");
    let passed = matches!(status, Ok(s) if s.success());
    println!("broker-check through TLS (-X security.protocol=SSL -X ssl.ca.location=...): {line}");
    if !passed {
        println!("{}", child.log_tail(30));
    }
    passed
}

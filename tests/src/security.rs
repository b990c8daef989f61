//! The security checks (`security-check`, and the `security` integration test): an
//! `eos-service` runs exactly-once through SASL/PLAIN, SCRAM-SHA-512, TLS and mTLS by
//! configuration alone (`EXACTLY_KAFKA_*`), with exactly the ACLs the README lists; a wrong
//! password, an untrusted certificate and each missing ACL fail fast with an error that names
//! the cause; and no secret appears in any log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::cluster::unique_name;
use crate::eos_service::{expected_outputs, inputs, produce, service_spec_at, wait_for_outputs};
use crate::kafka::acl::{create_acls, Acl, Operation, Resource};
use crate::kafka::security::{Pki, CLIENT_CN, PLAIN_USERS, SCRAM_USER, STORE_PASSWORD};
use crate::kafka::KafkaCluster;
use crate::process::ChildProcess;

/// How long a misconfigured service may take to stop with its error.
pub const FAIL_WITHIN: Duration = Duration::from_secs(45);

/// How a service connects: the listener and its `EXACTLY_KAFKA_*` settings.
#[derive(Debug, Clone)]
pub struct Connection {
    pub bootstrap: String,
    pub env: Vec<(String, String)>,
    /// The principal the brokers see (ACLs are granted to it).
    pub principal: String,
}

/// The secured cluster the checks run against, and the `eos-service` binary.
pub struct Bench<'a> {
    pub kafka: &'a KafkaCluster,
    pub eos_service: PathBuf,
    /// Every log line of every service run, for the secrets check.
    pub logs: Vec<(String, String)>,
    /// The error each misconfigured service stopped with, last first.
    pub errors: Vec<String>,
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Worked (or failed as it should, with a clear error) in this time.
    Ok(Duration),
    Failed(String),
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok(_))
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl<'a> Bench<'a> {
    pub fn new(kafka: &'a KafkaCluster, eos_service: PathBuf) -> Self {
        Bench {
            kafka,
            eos_service,
            logs: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn pki(&self) -> &Pki {
        self.kafka.pki().expect("a secured cluster")
    }

    fn listener(&self, kind: &str) -> String {
        self.kafka
            .secured_bootstrap(kind)
            .expect("a secured cluster")
    }

    /// SASL/PLAIN as `user`.
    pub fn plain(&self, user: &str, password: &str) -> Connection {
        Connection {
            bootstrap: self.listener("sasl"),
            env: env(&[
                ("EXACTLY_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                ("EXACTLY_KAFKA_SASL_MECHANISMS", "PLAIN"),
                ("EXACTLY_KAFKA_SASL_USERNAME", user),
                ("EXACTLY_KAFKA_SASL_PASSWORD", password),
            ]),
            principal: format!("User:{user}"),
        }
    }

    /// SASL/SCRAM-SHA-512 as the SCRAM user.
    pub fn scram(&self) -> Connection {
        let (user, password) = SCRAM_USER;
        Connection {
            bootstrap: self.listener("sasl"),
            env: env(&[
                ("EXACTLY_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                ("EXACTLY_KAFKA_SASL_MECHANISMS", "SCRAM-SHA-512"),
                ("EXACTLY_KAFKA_SASL_USERNAME", user),
                ("EXACTLY_KAFKA_SASL_PASSWORD", password),
            ]),
            principal: format!("User:{user}"),
        }
    }

    /// TLS, trusting `ca` (server authentication only: the principal is ANONYMOUS).
    pub fn tls(&self, ca: &Path) -> Connection {
        Connection {
            bootstrap: self.listener("ssl"),
            env: env(&[
                ("EXACTLY_KAFKA_SECURITY_PROTOCOL", "SSL"),
                ("EXACTLY_KAFKA_SSL_CA_LOCATION", &path(ca)),
            ]),
            principal: "User:ANONYMOUS".into(),
        }
    }

    /// mTLS with the client certificate in `keystore`.
    pub fn mtls(&self, keystore: &Path) -> Connection {
        Connection {
            bootstrap: self.listener("mtls"),
            env: env(&[
                ("EXACTLY_KAFKA_SECURITY_PROTOCOL", "SSL"),
                ("EXACTLY_KAFKA_SSL_CA_LOCATION", &path(&self.pki().ca_pem)),
                ("EXACTLY_KAFKA_SSL_KEYSTORE_LOCATION", &path(keystore)),
                ("EXACTLY_KAFKA_SSL_KEYSTORE_PASSWORD", STORE_PASSWORD),
            ]),
            principal: format!("User:CN={CLIENT_CN}"),
        }
    }

    /// Input and output topics of a new app, created through the super user's listener.
    async fn topics(&self, prefix: &str) -> Result<(String, String, String), String> {
        let app = unique_name(&format!("{prefix}-app"));
        let input = unique_name(&format!("{prefix}-in"));
        let output = unique_name(&format!("{prefix}-out"));
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.kafka.bootstrap_servers())
            .create()
            .map_err(|e| e.to_string())?;
        let topics = [
            NewTopic::new(&input, 1, TopicReplication::Fixed(1)),
            NewTopic::new(&output, 1, TopicReplication::Fixed(1)),
        ];
        for result in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .map_err(|e| e.to_string())?
        {
            result.map_err(|(topic, code)| format!("creating {topic}: {code}"))?;
        }
        Ok((app, input, output))
    }

    fn spawn(&self, connection: &Connection, app: &str, input: &str, output: &str) -> ChildProcess {
        let mut spec =
            service_spec_at(&self.eos_service, &connection.bootstrap, app, input, output)
                .env("RUST_LOG", "debug,librdkafka=debug,rdkafka=debug");
        for (k, v) in &connection.env {
            spec = spec.env(k, v);
        }
        ChildProcess::spawn(app.to_owned(), spec).expect("spawn eos-service")
    }

    fn keep_log(&mut self, service: &ChildProcess) {
        let log = service.log_text().unwrap_or_default();
        self.logs.push((service.name().to_owned(), log));
    }

    /// A service through `connection`, granted `acls(app, input, output)`, processes 100
    /// records exactly once and stops cleanly.
    pub async fn runs_exactly_once(
        &mut self,
        name: &str,
        connection: &Connection,
        acls: impl Fn(&str, &str, &str) -> Vec<Acl>,
    ) -> Outcome {
        let started = Instant::now();
        let (app, input, output) = match self.topics(name).await {
            Ok(names) => names,
            Err(e) => return Outcome::Failed(e),
        };
        let plaintext = self.kafka.bootstrap_servers();
        if connection.principal != "User:ANONYMOUS" {
            if let Err(e) = create_acls(
                &plaintext,
                &connection.principal,
                &acls(&app, &input, &output),
            ) {
                return Outcome::Failed(e.to_string());
            }
        }
        let records = inputs(0..100, 1);
        produce(&plaintext, &input, &records);
        let mut service = self.spawn(connection, &app, &input, &output);
        let report = wait_for_outputs(
            &plaintext,
            &output,
            &expected_outputs(&records),
            Duration::from_secs(90),
        )
        .await;
        let stopped = service.terminate(Duration::from_secs(60)).await;
        self.keep_log(&service);
        if !report.is_clean() {
            return Outcome::Failed(format!("{report}\n{}", service.log_tail(40)));
        }
        match stopped {
            Ok(status) if status.success() => Outcome::Ok(started.elapsed()),
            Ok(status) => {
                Outcome::Failed(format!("stopped with {status}\n{}", service.log_tail(40)))
            }
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// A service through `connection` (granted `acls`) stops within [`FAIL_WITHIN`] with an
    /// error whose text contains every one of `says`.
    pub async fn fails_clearly(
        &mut self,
        name: &str,
        connection: &Connection,
        acls: impl Fn(&str, &str, &str) -> Vec<Acl>,
        says: impl Fn(&str, &str, &str) -> Vec<String>,
    ) -> Outcome {
        let (app, input, output) = match self.topics(name).await {
            Ok(names) => names,
            Err(e) => return Outcome::Failed(e),
        };
        let plaintext = self.kafka.bootstrap_servers();
        let granted = acls(&app, &input, &output);
        if !granted.is_empty() {
            if let Err(e) = create_acls(&plaintext, &connection.principal, &granted) {
                return Outcome::Failed(e.to_string());
            }
        }
        produce(&plaintext, &input, &inputs(0..10, 1));
        let started = Instant::now();
        let mut service = self.spawn(connection, &app, &input, &output);
        let exit = service.wait_exit(FAIL_WITHIN).await;
        let took = started.elapsed();
        if exit.is_err() {
            self.errors
                .push(format!("(still running after {FAIL_WITHIN:?})"));
            let _ = service.terminate(Duration::from_secs(30)).await;
        }
        self.keep_log(&service);
        let log = service.log_text().unwrap_or_default();
        let error_lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("ERROR") || l.contains("eos-service failed") || l.contains("error:")
            })
            .collect();
        match exit {
            Err(_) => Outcome::Failed(format!(
                "still running after {FAIL_WITHIN:?}\n{}",
                service.log_tail(40)
            )),
            Ok(status) if status.success() => {
                self.errors.push("(exited cleanly)".into());
                Outcome::Failed(format!("exited cleanly\n{}", service.log_tail(40)))
            }
            Ok(_) => {
                // The one error the service stopped with must say it all.
                let stopped_with = log
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("eos-service failed"))
                    .unwrap_or("");
                let wanted = says(&app, &input, &output);
                let missing: Vec<&String> = wanted
                    .iter()
                    .filter(|w| !stopped_with.contains(w.as_str()))
                    .collect();
                self.errors.push(stopped_with.to_owned());
                if missing.is_empty() {
                    Outcome::Ok(took)
                } else {
                    Outcome::Failed(format!(
                        "the error does not say {missing:?}; error lines:\n{}\n{}",
                        error_lines.join("\n"),
                        service.log_tail(40)
                    ))
                }
            }
        }
    }

    /// Lines of every kept log that show a secret (a password or a key store password).
    pub fn secrets_in_logs(&self) -> Vec<String> {
        let mut secrets: Vec<&str> = PLAIN_USERS.iter().map(|(_, password)| *password).collect();
        secrets.push(SCRAM_USER.1);
        secrets.push(STORE_PASSWORD);
        secrets.push(WRONG_PASSWORD);
        let mut found = Vec::new();
        for (service, log) in &self.logs {
            for line in log.lines() {
                if secrets.iter().any(|s| line.contains(s)) {
                    found.push(format!("{service}: {line}"));
                }
            }
        }
        found
    }
}

/// The password the wrong-password check uses.
pub const WRONG_PASSWORD: &str = "not-alices-password";

/// Exactly the ACLs an exactly service needs (the README's list): for app `app` reading `input`
/// and writing `output`.
pub fn service_acls(app: &str, input: &str, output: &str) -> Vec<Acl> {
    use Operation::*;
    let snapshot_prefix = format!("{app}.");
    let mut acls = vec![
        Acl::literal(Resource::Topic, input, Read),
        Acl::literal(Resource::Topic, input, Describe),
        Acl::literal(Resource::Group, app, Read),
        Acl::literal(Resource::Topic, output, Write),
        Acl::literal(Resource::Topic, output, Describe),
        Acl::prefixed(Resource::TransactionalId, &snapshot_prefix, Write),
        Acl::prefixed(Resource::TransactionalId, &snapshot_prefix, Describe),
    ];
    for operation in [Create, Read, Write, Describe, DescribeConfigs] {
        acls.push(Acl::prefixed(Resource::Topic, &snapshot_prefix, operation));
    }
    acls
}

/// The results of every check, for the `SECURITY-CHECK` line.
#[derive(Debug, Default)]
pub struct Report {
    pub plain: Option<Outcome>,
    pub scram: Option<Outcome>,
    pub tls: Option<Outcome>,
    pub mtls: Option<Outcome>,
    pub wrong_password: Option<Outcome>,
    pub untrusted_cert: Option<Outcome>,
    /// One per missing ACL: (what was missing, outcome).
    pub missing_acl: Vec<(String, Outcome)>,
    /// Other misconfigurations that must fail clearly too (not on the line; in the verdict).
    pub other_failures: Vec<(String, Outcome)>,
    pub secrets_in_logs: Vec<String>,
}

impl Report {
    fn word(outcome: &Option<Outcome>, good: &'static str) -> &'static str {
        match outcome {
            Some(o) if o.is_ok() => good,
            _ => "FAILED",
        }
    }

    fn missing_acl_clear(&self) -> bool {
        !self.missing_acl.is_empty() && self.missing_acl.iter().all(|(_, o)| o.is_ok())
    }

    /// Everything worked or failed as it should, and no secret showed.
    pub fn passed(&self) -> bool {
        [
            &self.plain,
            &self.scram,
            &self.tls,
            &self.mtls,
            &self.wrong_password,
            &self.untrusted_cert,
        ]
        .iter()
        .all(|o| o.as_ref().is_some_and(Outcome::is_ok))
            && self.missing_acl_clear()
            && self.other_failures.iter().all(|(_, o)| o.is_ok())
            && self.secrets_in_logs.is_empty()
    }

    /// `SECURITY-CHECK plain=ok ... verdict=PASS`.
    pub fn line(&self) -> String {
        format!(
            "SECURITY-CHECK plain={} scram={} tls={} mtls={} wrong_password={} untrusted_cert={} missing_acl={} secrets_in_logs={} verdict={}",
            Report::word(&self.plain, "ok"),
            Report::word(&self.scram, "ok"),
            Report::word(&self.tls, "ok"),
            Report::word(&self.mtls, "ok"),
            Report::word(&self.wrong_password, "clear"),
            Report::word(&self.untrusted_cert, "clear"),
            if self.missing_acl_clear() { "clear" } else { "FAILED" },
            self.secrets_in_logs.len(),
            if self.passed() { "PASS" } else { "FAIL" },
        )
    }
}

/// The error the last misconfigured service stopped with, for the report.
fn last_error(bench: &Bench<'_>) -> String {
    bench.errors.last().cloned().unwrap_or_default()
}

fn describe(what: &str, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(took) => format!("{what}: ok ({:.1} s)", took.as_secs_f64()),
        Outcome::Failed(why) => format!("{what}: FAILED: {why}"),
    }
}

/// Runs every check against the secured `kafka`; `say` gets one line per check.
pub async fn run_checks(
    kafka: &KafkaCluster,
    eos_service: PathBuf,
    say: impl Fn(String),
) -> Report {
    let mut bench = Bench::new(kafka, eos_service);
    let mut report = Report::default();
    let (alice, alice_password) = PLAIN_USERS[0];

    let plain = bench.plain(alice, alice_password);
    let outcome = bench
        .runs_exactly_once("sec-plain", &plain, service_acls)
        .await;
    say(describe(
        "SASL/PLAIN with exactly the README's ACLs",
        &outcome,
    ));
    report.plain = Some(outcome);

    let scram = bench.scram();
    let outcome = bench
        .runs_exactly_once("sec-scram", &scram, service_acls)
        .await;
    say(describe("SASL/SCRAM-SHA-512", &outcome));
    report.scram = Some(outcome);

    let tls = bench.tls(&bench.pki().ca_pem.clone());
    let outcome = bench.runs_exactly_once("sec-tls", &tls, service_acls).await;
    say(describe("TLS", &outcome));
    report.tls = Some(outcome);

    let mtls = bench.mtls(&bench.pki().client_keystore.clone());
    let outcome = bench
        .runs_exactly_once("sec-mtls", &mtls, service_acls)
        .await;
    say(describe("mTLS", &outcome));
    report.mtls = Some(outcome);

    let wrong = bench.plain(alice, WRONG_PASSWORD);
    let outcome = bench
        .fails_clearly(
            "sec-wrong-pw",
            &wrong,
            |_, _, _| Vec::new(),
            |_, _, _| vec!["authentication failed".into(), "sasl.password".into()],
        )
        .await;
    say(describe("a wrong password fails clearly", &outcome));
    say(format!("  {}", last_error(&bench)));
    report.wrong_password = Some(outcome);

    let untrusted = bench.tls(&bench.pki().rogue_ca_pem.clone());
    let outcome = bench
        .fails_clearly(
            "sec-untrusted",
            &untrusted,
            |_, _, _| Vec::new(),
            |_, _, _| vec!["not trusted".into(), "ssl.ca.location".into()],
        )
        .await;
    say(describe(
        "an untrusted broker certificate fails clearly",
        &outcome,
    ));
    report.untrusted_cert = Some(outcome);

    let none = |_: &str, _: &str, _: &str| Vec::new();
    let unknown_user = bench.plain("nobody", WRONG_PASSWORD);
    let mut scram_unknown = bench.scram();
    scram_unknown.env[2].1 = "nobody".into();
    let mut plaintext_on_tls = bench.tls(&bench.pki().ca_pem.clone());
    plaintext_on_tls
        .env
        .retain(|(k, _)| !k.ends_with("SECURITY_PROTOCOL"));
    let expired = bench.mtls(&bench.pki().expired_client_keystore.clone());
    let others: [(&str, &str, Connection, [&str; 2]); 4] = [
        (
            "an unknown PLAIN user",
            "sec-unknown",
            unknown_user,
            ["authentication failed", "sasl.username"],
        ),
        (
            "an unknown SCRAM user",
            "sec-scram-unknown",
            scram_unknown,
            ["authentication failed", "SCRAM user"],
        ),
        (
            "a plaintext client on the TLS port",
            "sec-plain-on-tls",
            plaintext_on_tls,
            ["another protocol", "security.protocol"],
        ),
        (
            "an expired client certificate (mTLS)",
            "sec-expired",
            expired,
            [
                "refused this client's TLS certificate",
                "ssl.keystore.location",
            ],
        ),
    ];
    for (what, name, connection, words) in others {
        let says = move |_: &str, _: &str, _: &str| words.iter().map(|w| (*w).to_owned()).collect();
        let outcome = bench.fails_clearly(name, &connection, none, says).await;
        say(describe(&format!("{what} fails clearly"), &outcome));
        say(format!("  {}", last_error(&bench)));
        report.other_failures.push((what.to_owned(), outcome));
    }

    let checks = missing_acl_checks(&mut bench).await;
    let errors = bench.errors.iter().rev().take(checks.len()).rev();
    for (index, ((what, outcome), error)) in checks.into_iter().zip(errors).enumerate() {
        say(describe(&format!("missing ACL {index}: {what}"), &outcome));
        say(format!("  {error}"));
        report.missing_acl.push((what, outcome));
    }

    report.secrets_in_logs = bench.secrets_in_logs();
    for line in report.secrets_in_logs.iter().take(10) {
        say(format!("SECRET IN A LOG: {line}"));
    }
    report
}

/// One service per ACL of [`service_acls`] left out (a user of its own each): it must stop
/// with an authorization error naming the resource.
async fn missing_acl_checks(bench: &mut Bench<'_>) -> Vec<(String, Outcome)> {
    use Operation::*;
    type Matches = fn(&Acl, &str, &str, &str) -> bool;
    type Names = fn(&str, &str, &str) -> String;
    let cases: [(&str, Matches, Names); 6] = [
        (
            "READ on the input topic",
            |a, _, i, _| a.name == i && a.operation == Read,
            |_, i, _| i.to_owned(),
        ),
        (
            "READ on the consumer group",
            |a, app, _, _| a.resource == Resource::Group && a.name == app,
            |app, _, _| app.to_owned(),
        ),
        (
            "WRITE on the output topic",
            |a, _, _, o| a.name == o && a.operation == Write,
            |_, _, o| o.to_owned(),
        ),
        (
            "CREATE on the snapshot topics",
            |a, _, _, _| a.resource == Resource::Topic && a.operation == Create,
            |app, i, _| format!("{app}.{i}.snapshots"),
        ),
        (
            "WRITE on the snapshot topics",
            |a, app, _, _| {
                a.resource == Resource::Topic
                    && a.prefixed
                    && a.name.starts_with(app)
                    && a.operation == Write
            },
            |app, i, _| format!("{app}.{i}.snapshots"),
        ),
        (
            "WRITE on the transactional ids",
            |a, _, _, _| a.resource == Resource::TransactionalId && a.operation == Write,
            |app, i, _| format!("{app}.{i}.0"),
        ),
    ];
    let mut results = Vec::new();
    for (index, (what, matches, names)) in cases.into_iter().enumerate() {
        let (user, password) = PLAIN_USERS[index + 1];
        let connection = bench.plain(user, password);
        let acls = move |app: &str, input: &str, output: &str| {
            service_acls(app, input, output)
                .into_iter()
                .filter(|acl| !matches(acl, app, input, output))
                .collect()
        };
        let says = move |app: &str, input: &str, output: &str| {
            vec!["authoriz".to_owned(), names(app, input, output)]
        };
        let outcome = bench
            .fails_clearly(&format!("sec-acl{index}"), &connection, acls, says)
            .await;
        results.push((what.to_owned(), outcome));
    }
    results
}

/// How a service connects to a secured cluster through `mechanism` (`plain`, `scram`, `tls`
/// or `mtls`), as the checks do; `None` for another name or a cluster that is not secured.
pub fn connection(kafka: &KafkaCluster, mechanism: &str) -> Option<Connection> {
    let pki = kafka.pki()?.clone();
    let bench = Bench::new(kafka, PathBuf::new());
    let (alice, password) = PLAIN_USERS[0];
    Some(match mechanism {
        "plain" => bench.plain(alice, password),
        "scram" => bench.scram(),
        "tls" => bench.tls(&pki.ca_pem),
        "mtls" => bench.mtls(&pki.client_keystore),
        _ => return None,
    })
}

/// ACLs that let a principal run every app whose ids, topics and transactional ids start
/// with `prefix` (the demo's run name): the same operations as [`service_acls`], by prefix.
pub fn prefix_acls(prefix: &str) -> Vec<Acl> {
    use Operation::*;
    let mut acls = vec![
        Acl::prefixed(Resource::Group, prefix, Read),
        Acl::prefixed(Resource::TransactionalId, prefix, Write),
        Acl::prefixed(Resource::TransactionalId, prefix, Describe),
    ];
    for operation in [Create, Read, Write, Describe, DescribeConfigs] {
        acls.push(Acl::prefixed(Resource::Topic, prefix, operation));
    }
    acls
}

//! A secured local Kafka: besides its PLAINTEXT listener (the tests' super user, for set-up),
//! each node listens with SASL_PLAINTEXT (PLAIN and SCRAM-SHA-512), SSL (a certificate from a
//! CA made for the cluster) and SSL with client certificates required (mTLS), and authorizes
//! every request with the KRaft `StandardAuthorizer`: a principal can do only what the ACLs a
//! test creates ([`super::acl`]) allow.
//!
//! The certificates are made with the JDK's `keytool` (the broker needs a JDK anyway): no
//! OpenSSL command line needed. Stores are PKCS#12, which both Kafka and librdkafka read.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::install::Installation;
use crate::error::HarnessError;

/// Password of every key store the harness makes (test material only).
pub const STORE_PASSWORD: &str = "exactly-test-store";
/// PLAIN users the brokers accept: (name, password). `acl-*` users exist for ACL tests.
pub const PLAIN_USERS: &[(&str, &str)] = &[
    ("alice", "alice-secret-pw"),
    ("acl-0", "acl-secret-0"),
    ("acl-1", "acl-secret-1"),
    ("acl-2", "acl-secret-2"),
    ("acl-3", "acl-secret-3"),
    ("acl-4", "acl-secret-4"),
    ("acl-5", "acl-secret-5"),
    ("acl-6", "acl-secret-6"),
    ("acl-7", "acl-secret-7"),
];
/// The SCRAM-SHA-512 user created once the cluster runs.
pub const SCRAM_USER: (&str, &str) = ("scram-bob", "bob-scram-secret-pw");
/// The subject of the client certificate: its principal is `User:CN=exactly-client`.
pub const CLIENT_CN: &str = "exactly-client";

/// Certificates and key stores of one secured cluster.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    /// The cluster CA's certificate (PEM): what clients trust (`ssl.ca.location`).
    pub ca_pem: PathBuf,
    /// Another CA's certificate: trusting only it, a client rejects the brokers.
    pub rogue_ca_pem: PathBuf,
    /// The brokers' key and certificate (CN=localhost, SAN 127.0.0.1 and localhost).
    pub broker_keystore: PathBuf,
    /// The CA, for brokers checking client certificates.
    pub truststore: PathBuf,
    /// A client key and certificate signed by the CA (`ssl.keystore.location`).
    pub client_keystore: PathBuf,
    /// A client certificate signed by the CA that expired yesterday.
    pub expired_client_keystore: PathBuf,
}

impl Pki {
    /// Makes a CA, a broker and two client certificates under `dir`.
    pub fn make(installation: &Installation, dir: &Path) -> Result<Pki, HarnessError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let keytool = Keytool::new(installation, dir);
        let pki = Pki {
            dir: dir.to_owned(),
            ca_pem: dir.join("ca.pem"),
            rogue_ca_pem: dir.join("rogue-ca.pem"),
            broker_keystore: dir.join("broker.p12"),
            truststore: dir.join("truststore.p12"),
            client_keystore: dir.join("client.p12"),
            expired_client_keystore: dir.join("expired-client.p12"),
        };
        keytool.certificate_authority("ca", "CN=exactly-test-ca")?;
        keytool.run(&[
            "-exportcert",
            "-rfc",
            "-alias",
            "ca",
            "-keystore",
            "ca.p12",
            "-file",
            "ca.pem",
        ])?;
        keytool.certificate_authority("rogue", "CN=exactly-rogue-ca")?;
        keytool.run(&[
            "-exportcert",
            "-rfc",
            "-alias",
            "rogue",
            "-keystore",
            "rogue.p12",
            "-file",
            "rogue-ca.pem",
        ])?;
        keytool.import("ca", "ca.pem", "truststore.p12")?;
        keytool.signed(
            "broker",
            "CN=localhost",
            "SAN=ip:127.0.0.1,dns:localhost",
            "serverAuth",
            None,
        )?;
        keytool.signed(
            "client",
            &format!("CN={CLIENT_CN}"),
            "SAN=dns:exactly-client",
            "clientAuth",
            None,
        )?;
        keytool.signed(
            "expired-client",
            &format!("CN={CLIENT_CN}"),
            "SAN=dns:exactly-client",
            "clientAuth",
            Some(("-3d", "1")),
        )?;
        Ok(pki)
    }

    /// `server.properties` lines of a node listening on `sasl`, `ssl` and `mtls` besides its
    /// PLAINTEXT `broker` port and its controller port.
    pub(crate) fn listener_properties(
        &self,
        broker: u16,
        controller: u16,
        ports: SecuredPorts,
    ) -> String {
        let SecuredPorts { sasl, ssl, mtls } = ports;
        let plain_users: String = PLAIN_USERS
            .iter()
            .map(|(user, password)| format!(" user_{user}=\"{password}\""))
            .collect();
        let store = |path: &Path| path.display().to_string();
        format!(
            "\
listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller},SASL_PLAINTEXT://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl},MTLS://127.0.0.1:{mtls}
advertised.listeners=PLAINTEXT://127.0.0.1:{broker},SASL_PLAINTEXT://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl},MTLS://127.0.0.1:{mtls}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL,MTLS:SSL
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-512
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required{plain_users};
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore}
ssl.keystore.password={STORE_PASSWORD}
ssl.key.password={STORE_PASSWORD}
ssl.truststore.type=PKCS12
ssl.truststore.location={truststore}
ssl.truststore.password={STORE_PASSWORD}
listener.name.mtls.ssl.client.auth=required
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false
",
            keystore = store(&self.broker_keystore),
            truststore = store(&self.truststore),
        )
    }
}

/// The secured listeners' ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct SecuredPorts {
    pub sasl: u16,
    pub ssl: u16,
    pub mtls: u16,
}

struct Keytool {
    program: PathBuf,
    dir: PathBuf,
}

impl Keytool {
    fn new(installation: &Installation, dir: &Path) -> Self {
        // `keytool` sits beside `java` in a JDK; `java` from PATH means keytool from PATH.
        let beside = installation.java.with_file_name("keytool");
        let program = if installation.java.components().count() > 1 && beside.is_file() {
            beside
        } else {
            PathBuf::from("keytool")
        };
        Keytool {
            program,
            dir: dir.to_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Result<(), HarnessError> {
        let output = Command::new(&self.program)
            .args(args)
            .args(["-storepass", STORE_PASSWORD, "-storetype", "PKCS12"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                HarnessError::io(
                    format!("running {} (part of the JDK)", self.program.display()),
                    e,
                )
            })?;
        if !output.status.success() {
            return Err(HarnessError::KafkaUnavailable(format!(
                "keytool {} failed ({}): {}{}",
                args.first().unwrap_or(&""),
                output.status,
                String::from_utf8_lossy(&output.stdout).trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// A new RSA key pair with a self-signed certificate in `<alias>.p12`; `extra` adds
    /// keytool options (e.g. `-ext bc:c` for a CA).
    fn key_pair(&self, alias: &str, dname: &str, extra: &[&str]) -> Result<(), HarnessError> {
        let store = format!("{alias}.p12");
        let mut args = vec![
            "-genkeypair",
            "-alias",
            alias,
            "-dname",
            dname,
            "-keyalg",
            "RSA",
            "-keysize",
            "2048",
            "-validity",
            "30",
            "-keystore",
            &store,
            "-keypass",
            STORE_PASSWORD,
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Adds the certificate in `file` to `store` as `alias` (trusted as is).
    fn import(&self, alias: &str, file: &str, store: &str) -> Result<(), HarnessError> {
        self.run(&[
            "-importcert",
            "-noprompt",
            "-alias",
            alias,
            "-file",
            file,
            "-keystore",
            store,
        ])
    }

    /// A self-signed CA key pair in `<alias>.p12`.
    fn certificate_authority(&self, alias: &str, dname: &str) -> Result<(), HarnessError> {
        self.key_pair(alias, dname, &["-ext", "bc:c"])
    }

    /// A key pair in `<alias>.p12` with a certificate signed by the `ca` CA, the CA
    /// certificate beside it. `window`: (start date, validity days) instead of now + 30 days.
    fn signed(
        &self,
        alias: &str,
        dname: &str,
        san: &str,
        usage: &str,
        window: Option<(&str, &str)>,
    ) -> Result<(), HarnessError> {
        let store = format!("{alias}.p12");
        let csr = format!("{alias}.csr");
        let pem = format!("{alias}.pem");
        let eku = format!("EKU={usage}");
        self.key_pair(alias, dname, &[])?;
        self.run(&[
            "-certreq",
            "-alias",
            alias,
            "-keystore",
            &store,
            "-file",
            &csr,
        ])?;
        let mut gencert = vec![
            "-gencert",
            "-alias",
            "ca",
            "-keystore",
            "ca.p12",
            "-infile",
            &csr,
            "-outfile",
            &pem,
            "-rfc",
            "-ext",
            san,
            "-ext",
            &eku,
            "-ext",
            "KU=digitalSignature,keyEncipherment",
        ];
        match window {
            Some((start, days)) => gencert.extend(["-startdate", start, "-validity", days]),
            None => gencert.extend(["-validity", "30"]),
        }
        self.run(&gencert)?;
        self.import("ca", "ca.pem", &store)?;
        self.import(alias, &pem, &store)
    }
}

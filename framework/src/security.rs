//! Security failures, recognized and explained. Authentication, TLS and authorization errors
//! are not transient (retrying cannot fix a password, a trust store or a missing ACL), so they
//! stop the app at once with one error that says which setting or ACL to check, instead of
//! being retried for minutes or aborting transactions in a loop.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// An authorization failure: the principal lacks an ACL.
pub(crate) fn is_authorization(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// The error's code when it is an authorization failure.
pub(crate) fn authorization_code(error: &KafkaError) -> Option<RDKafkaErrorCode> {
    let code = match error {
        // rdkafka gives admin results no code through `rdkafka_error_code`.
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    };
    code.filter(|&code| is_authorization(code))
}

/// Why the cluster refused a connection, and what to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionProblem {
    pub(crate) what: &'static str,
    pub(crate) fix: &'static str,
    /// librdkafka's description (never holds a secret: it names settings, not values).
    pub(crate) detail: String,
}

/// Recognizes a client error (`code`, librdkafka's `reason`, or a `FAIL` log line with
/// `code` unknown) that no retry can fix.
pub(crate) fn connection_problem(
    code: RDKafkaErrorCode,
    reason: &str,
) -> Option<ConnectionProblem> {
    let problem = |what, fix| {
        Some(ConnectionProblem {
            what,
            fix,
            detail: reason.to_owned(),
        })
    };
    let lower = reason.to_ascii_lowercase();
    if matches!(
        code,
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed
    ) || lower.contains("sasl authentication error")
    {
        return problem(
            "SASL authentication failed",
            "check sasl.mechanisms, sasl.username and sasl.password (EXACTLY_KAFKA_SASL_MECHANISMS, EXACTLY_KAFKA_SASL_USERNAME, EXACTLY_KAFKA_SASL_PASSWORD); a SCRAM user must have been created on the cluster for that mechanism",
        );
    }
    if lower.contains("certificate verify failed") {
        return if lower.contains("expired") {
            problem(
                "the broker's TLS certificate has expired",
                "the brokers need a renewed certificate (their ssl.keystore.*); until then no client can connect",
            )
        } else {
            problem(
                "the broker's TLS certificate is not trusted",
                "set ssl.ca.location (EXACTLY_KAFKA_SSL_CA_LOCATION) to the CA certificate (PEM) that signed the brokers' certificates",
            )
        };
    }
    // The broker's TLS alert: it refused the certificate this client sent (or sent none).
    if lower.contains("ssl") && lower.contains(" alert ") {
        return problem(
            "the broker refused this client's TLS certificate",
            "set ssl.keystore.location and ssl.keystore.password (or ssl.certificate.location and ssl.key.location) to an unexpired client certificate signed by a CA the brokers trust",
        );
    }
    if code == RDKafkaErrorCode::SSL {
        return problem(
            "the TLS handshake failed",
            "check the ssl.* settings (EXACTLY_KAFKA_SSL_*) and that the listener uses TLS",
        );
    }
    if lower.contains("security.protocol") {
        return plaintext_on_another_listener(reason);
    }
    None
}

/// A listener that closes the connection at the client's first request (librdkafka ≥ 2.x
/// no longer says why): it expects TLS or SASL, and this client speaks plaintext.
fn plaintext_on_another_listener(reason: &str) -> Option<ConnectionProblem> {
    Some(ConnectionProblem {
        what: "the listener speaks another protocol than this client",
        fix: "set security.protocol (EXACTLY_KAFKA_SECURITY_PROTOCOL) to the listener's: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        detail: reason.to_owned(),
    })
}

/// How many connections a broker must close at the first request before that counts as a
/// protocol mismatch rather than a broker restarting.
const FIRST_REQUEST_DISCONNECTS: u32 = 2;

/// A client context that remembers the first connection problem its client reported, so a
/// request that then fails can say why instead of timing out.
#[derive(Default)]
pub(crate) struct ProblemWatch {
    first: Mutex<Option<ConnectionProblem>>,
    first_request_disconnects: AtomicU32,
}

impl ProblemWatch {
    pub(crate) fn problem(&self) -> Option<ConnectionProblem> {
        self.first.lock().ok().and_then(|first| first.clone())
    }

    fn note(&self, problem: ConnectionProblem) {
        if let Ok(mut first) = self.first.lock() {
            first.get_or_insert(problem);
        }
    }
}

impl ClientContext for ProblemWatch {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // Some failures reach only the log: a TLS alert, a connection closed at once.
        if fac == "FAIL" {
            if let Some(problem) = connection_problem(RDKafkaErrorCode::Unknown, log_message) {
                self.note(problem);
            } else if log_message.contains("Disconnected")
                && log_message.contains("in state APIVERSION_QUERY")
                && self
                    .first_request_disconnects
                    .fetch_add(1, Ordering::Relaxed)
                    + 1
                    >= FIRST_REQUEST_DISCONNECTS
            {
                if let Some(problem) = plaintext_on_another_listener(log_message) {
                    self.note(problem);
                }
            }
        }
        crate::runtime::log_librdkafka(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error
            .rdkafka_error_code()
            .and_then(|code| connection_problem(code, reason))
        {
            Some(problem) => self.note(problem),
            None => tracing::debug!(error = %error, reason, "client error"),
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ProblemWatch {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafkas_security_errors_are_explained() {
        let wrong_password = connection_problem(
            RDKafkaErrorCode::Authentication,
            "sasl_plaintext://127.0.0.1:9093/bootstrap: SASL authentication error: Authentication failed: Invalid username or password (after 3ms in state AUTH_REQ)",
        );
        assert!(wrong_password.is_some_and(|p| p.fix.contains("sasl.password")));
        let untrusted = connection_problem(
            RDKafkaErrorCode::SSL,
            "ssl://127.0.0.1:9094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified, verify that ssl.ca.location is correctly configured",
        );
        assert!(untrusted
            .is_some_and(|p| p.what.contains("not trusted") && p.fix.contains("ssl.ca.location")));
        let plaintext_on_tls = connection_problem(
            RDKafkaErrorCode::BrokerTransportFailure,
            "127.0.0.1:9094/bootstrap: Disconnected while requesting ApiVersion: might be caused by incorrect security.protocol configuration (connecting to a SSL listener?) or broker version is < 0.10",
        );
        assert!(plaintext_on_tls.is_some_and(|p| p.fix.contains("security.protocol")));
        assert_eq!(
            connection_problem(
                RDKafkaErrorCode::BrokerTransportFailure,
                "Connection refused"
            ),
            None
        );
        assert!(is_authorization(
            RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        ));
        assert!(!is_authorization(RDKafkaErrorCode::RequestTimedOut));
        let create_refused = KafkaError::AdminOp(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(authorization_code(&create_refused).is_some());
    }
}

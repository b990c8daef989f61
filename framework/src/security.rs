//! Security failures, recognized and explained. Authentication, TLS and authorization errors
//! are not transient (retrying cannot fix a password, a trust store or a missing ACL), so they
//! stop the app at once with one error that says which setting or ACL to check, instead of
//! being retried for minutes or aborting transactions in a loop.

use std::sync::Mutex;

use rdkafka::client::ClientContext;
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

/// Recognizes a client error (`code`, librdkafka's `reason`) that no retry can fix.
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
    match code {
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => problem(
            "SASL authentication failed",
            "check sasl.mechanisms, sasl.username and sasl.password (EXACTLY_KAFKA_SASL_MECHANISMS, EXACTLY_KAFKA_SASL_USERNAME, EXACTLY_KAFKA_SASL_PASSWORD); a SCRAM user must have been created on the cluster for that mechanism",
        ),
        RDKafkaErrorCode::SSL if lower.contains("certificate verify failed") && lower.contains("expired") => problem(
            "the broker's TLS certificate has expired",
            "the brokers need a renewed certificate (their ssl.keystore.*); until then no client can connect",
        ),
        RDKafkaErrorCode::SSL if lower.contains("certificate verify failed") => problem(
            "the broker's TLS certificate is not trusted",
            "set ssl.ca.location (EXACTLY_KAFKA_SSL_CA_LOCATION) to the CA certificate (PEM) that signed the brokers' certificates",
        ),
        RDKafkaErrorCode::SSL if lower.contains("alert") => problem(
            "the broker refused this client's TLS certificate",
            "set ssl.keystore.location and ssl.keystore.password (or ssl.certificate.location and ssl.key.location) to an unexpired client certificate signed by a CA the brokers trust",
        ),
        RDKafkaErrorCode::SSL => problem(
            "the TLS handshake failed",
            "check the ssl.* settings (EXACTLY_KAFKA_SSL_*) and that the listener uses TLS",
        ),
        _ if lower.contains("security.protocol") => problem(
            "the listener speaks another protocol than this client",
            "set security.protocol (EXACTLY_KAFKA_SECURITY_PROTOCOL) to the listener's: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        ),
        _ => None,
    }
}

/// A client context that remembers the first connection problem its client reported, so a
/// request that then fails can say why instead of timing out.
#[derive(Default)]
pub(crate) struct ProblemWatch {
    first: Mutex<Option<ConnectionProblem>>,
}

impl ProblemWatch {
    pub(crate) fn problem(&self) -> Option<ConnectionProblem> {
        self.first.lock().ok().and_then(|first| first.clone())
    }
}

impl ClientContext for ProblemWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        let problem = error
            .rdkafka_error_code()
            .and_then(|code| connection_problem(code, reason));
        match problem {
            Some(problem) => {
                if let Ok(mut first) = self.first.lock() {
                    first.get_or_insert(problem);
                }
            }
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

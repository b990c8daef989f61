//! Admin calls the rdkafka crate does not wrap, through librdkafka's C API: creating ACLs and
//! SCRAM credentials on the local secured cluster (as its super user, on the PLAINTEXT
//! listener).

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::error::HarnessError;

const TIMEOUT: Duration = Duration::from_secs(30);

/// What an ACL grants on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Topic,
    Group,
    TransactionalId,
    /// The cluster (its name is always `kafka-cluster`).
    Cluster,
}

/// An operation an ACL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    Write,
    Create,
    Describe,
    DescribeConfigs,
    IdempotentWrite,
}

/// One "allow `principal` `operation` on `resource` `name` (or every name starting with it)
/// from any host" rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    pub resource: Resource,
    pub name: String,
    pub prefixed: bool,
    pub operation: Operation,
}

impl Acl {
    pub fn literal(resource: Resource, name: &str, operation: Operation) -> Acl {
        Acl {
            resource,
            name: name.to_owned(),
            prefixed: false,
            operation,
        }
    }

    pub fn prefixed(resource: Resource, prefix: &str, operation: Operation) -> Acl {
        Acl {
            resource,
            name: prefix.to_owned(),
            prefixed: true,
            operation,
        }
    }
}

impl std::fmt::Display for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pattern = if self.prefixed { "prefix " } else { "" };
        write!(
            f,
            "{:?} on {:?} {pattern}{:?}",
            self.operation, self.resource, self.name
        )
    }
}

/// Creates `acls` for `principal` (e.g. `User:alice`) through `bootstrap` (a listener whose
/// principal may alter ACLs).
pub fn create_acls(bootstrap: &str, principal: &str, acls: &[Acl]) -> Result<(), HarnessError> {
    let admin = admin_client(bootstrap)?;
    let principal = c_string(principal)?;
    let host = c_string("*")?;
    let mut bindings = Vec::with_capacity(acls.len());
    for acl in acls {
        let name = c_string(if acl.resource == Resource::Cluster {
            "kafka-cluster"
        } else {
            &acl.name
        })?;
        let mut errstr = [0 as c_char; 256];
        // SAFETY: every pointer is a valid NUL-terminated string or buffer for the call.
        let binding = unsafe {
            rd::rd_kafka_AclBinding_new(
                resource_type(acl.resource),
                name.as_ptr(),
                if acl.prefixed {
                    rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_PREFIXED
                } else {
                    rd::rd_kafka_ResourcePatternType_t::RD_KAFKA_RESOURCE_PATTERN_LITERAL
                },
                principal.as_ptr(),
                host.as_ptr(),
                operation(acl.operation),
                rd::rd_kafka_AclPermissionType_t::RD_KAFKA_ACL_PERMISSION_TYPE_ALLOW,
                errstr.as_mut_ptr(),
                errstr.len(),
            )
        };
        if binding.is_null() {
            // SAFETY: librdkafka wrote a NUL-terminated message into errstr.
            let why = unsafe { CStr::from_ptr(errstr.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            destroy_bindings(&mut bindings);
            return Err(failed(format!("ACL {acl}: {why}")));
        }
        bindings.push(binding);
    }
    let rk = admin.inner().native_ptr();
    // SAFETY: the bindings were created above and are destroyed after the call (librdkafka
    // copies them); the event is destroyed by `request`.
    let result = unsafe {
        request(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_CREATEACLS,
            |options, queue| {
                rd::rd_kafka_CreateAcls(rk, bindings.as_mut_ptr(), bindings.len(), options, queue)
            },
            |event| {
                let result = rd::rd_kafka_event_CreateAcls_result(event);
                let mut count = 0usize;
                let results = rd::rd_kafka_CreateAcls_result_acls(result, &mut count);
                for i in 0..count {
                    let error = rd::rd_kafka_acl_result_error(*results.add(i));
                    if !error.is_null() {
                        return Err(text(rd::rd_kafka_error_string(error)));
                    }
                }
                Ok(())
            },
        )
    };
    destroy_bindings(&mut bindings);
    result.map_err(|why| failed(format!("creating ACLs for {principal:?}: {why}")))
}

/// Creates (or replaces) the SCRAM-SHA-512 credential of `user`.
pub fn create_scram_user(bootstrap: &str, user: &str, password: &str) -> Result<(), HarnessError> {
    let admin = admin_client(bootstrap)?;
    let name = c_string(user)?;
    let salt: Vec<u8> = format!("exactly-salt-{user}").into_bytes();
    // SAFETY: the strings and buffers outlive the call, which copies them.
    let mut alteration = unsafe {
        rd::rd_kafka_UserScramCredentialUpsertion_new(
            name.as_ptr(),
            rd::rd_kafka_ScramMechanism_t::RD_KAFKA_SCRAM_MECHANISM_SHA_512,
            8192,
            password.as_ptr(),
            password.len(),
            salt.as_ptr(),
            salt.len(),
        )
    };
    if alteration.is_null() {
        return Err(failed(format!(
            "SCRAM credential of {user:?}: refused by librdkafka"
        )));
    }
    let rk = admin.inner().native_ptr();
    // SAFETY: as in `create_acls`.
    let result = unsafe {
        request(
            rk,
            rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_ALTERUSERSCRAMCREDENTIALS,
            |options, queue| {
                rd::rd_kafka_AlterUserScramCredentials(rk, &mut alteration, 1, options, queue)
            },
            |event| {
                let result = rd::rd_kafka_event_AlterUserScramCredentials_result(event);
                let mut count = 0usize;
                let responses =
                    rd::rd_kafka_AlterUserScramCredentials_result_responses(result, &mut count);
                for i in 0..count {
                    let error = rd::rd_kafka_AlterUserScramCredentials_result_response_error(
                        *responses.add(i),
                    );
                    if !error.is_null()
                        && rd::rd_kafka_error_code(error)
                            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                    {
                        return Err(text(rd::rd_kafka_error_string(error)));
                    }
                }
                Ok(())
            },
        )
    };
    // SAFETY: created above, not used after this.
    unsafe { rd::rd_kafka_UserScramCredentialAlteration_destroy(alteration) };
    result.map_err(|why| failed(format!("creating SCRAM user {user:?}: {why}")))
}

fn admin_client(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>, HarnessError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| failed(format!("creating an admin client for {bootstrap}: {e}")))
}

/// Sends one admin request on a queue of its own and hands its result event to `read`.
///
/// # Safety
/// `rk` is a live client handle; `send` issues exactly one admin request on the given options
/// and queue; `read` only reads the event.
unsafe fn request(
    rk: *mut rd::rd_kafka_t,
    op: rd::rd_kafka_admin_op_t,
    send: impl FnOnce(*mut rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
    read: impl FnOnce(*mut rd::rd_kafka_event_t) -> Result<(), String>,
) -> Result<(), String> {
    let queue = rd::rd_kafka_queue_new(rk);
    let options = rd::rd_kafka_AdminOptions_new(rk, op);
    let mut errstr = [0 as c_char; 256];
    let timeout_ms = TIMEOUT.as_millis() as i32;
    rd::rd_kafka_AdminOptions_set_request_timeout(
        options,
        timeout_ms,
        errstr.as_mut_ptr(),
        errstr.len(),
    );
    send(options, queue);
    let event = rd::rd_kafka_queue_poll(queue, timeout_ms + 5_000);
    let result = if event.is_null() {
        Err("no answer within the timeout".to_owned())
    } else if rd::rd_kafka_event_error(event) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
    {
        Err(text(rd::rd_kafka_event_error_string(event)))
    } else {
        read(event)
    };
    if !event.is_null() {
        rd::rd_kafka_event_destroy(event);
    }
    rd::rd_kafka_AdminOptions_destroy(options);
    rd::rd_kafka_queue_destroy(queue);
    result
}

fn destroy_bindings(bindings: &mut Vec<*mut rd::rd_kafka_AclBinding_t>) {
    for binding in bindings.drain(..) {
        // SAFETY: each was created by rd_kafka_AclBinding_new and is destroyed once.
        unsafe { rd::rd_kafka_AclBinding_destroy(binding) };
    }
}

fn resource_type(resource: Resource) -> rd::rd_kafka_ResourceType_t {
    use rd::rd_kafka_ResourceType_t as T;
    match resource {
        Resource::Topic => T::RD_KAFKA_RESOURCE_TOPIC,
        Resource::Group => T::RD_KAFKA_RESOURCE_GROUP,
        Resource::TransactionalId => T::RD_KAFKA_RESOURCE_TRANSACTIONAL_ID,
        Resource::Cluster => T::RD_KAFKA_RESOURCE_BROKER,
    }
}

fn operation(operation: Operation) -> rd::rd_kafka_AclOperation_t {
    use rd::rd_kafka_AclOperation_t as O;
    match operation {
        Operation::Read => O::RD_KAFKA_ACL_OPERATION_READ,
        Operation::Write => O::RD_KAFKA_ACL_OPERATION_WRITE,
        Operation::Create => O::RD_KAFKA_ACL_OPERATION_CREATE,
        Operation::Describe => O::RD_KAFKA_ACL_OPERATION_DESCRIBE,
        Operation::DescribeConfigs => O::RD_KAFKA_ACL_OPERATION_DESCRIBE_CONFIGS,
        Operation::IdempotentWrite => O::RD_KAFKA_ACL_OPERATION_IDEMPOTENT_WRITE,
    }
}

fn c_string(s: &str) -> Result<CString, HarnessError> {
    CString::new(s).map_err(|_| failed(format!("{s:?} contains a NUL byte")))
}

/// # Safety
/// `s` is null or a valid NUL-terminated string.
unsafe fn text(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    CStr::from_ptr(s).to_string_lossy().into_owned()
}

fn failed(why: String) -> HarnessError {
    HarnessError::KafkaUnavailable(why)
}

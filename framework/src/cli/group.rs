//! The app's consumer group as the group coordinator describes it.
//!
//! librdkafka's `DescribeConsumerGroups` asks with ConsumerGroupDescribe for groups of the
//! consumer protocol (KIP-848, the framework's default) and DescribeGroups for classic ones;
//! the classic call alone reports a KIP-848 group as having no members. The rdkafka crate does
//! not wrap it, so it is called through the C API here, on a queue of its own.

use std::ffi::{CStr, CString};
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::bindings as rd;
use rdkafka::client::DefaultClientContext;

use super::CliError;
use crate::config::AppConfig;
use crate::error::Error;

/// How long the description may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the coordinator says about the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupInfo {
    /// `Stable`, `Empty`, `PreparingRebalance`, ...
    pub(super) state: String,
    pub(super) members: usize,
}

/// `None`: the group does not exist (or is dead).
pub(super) fn describe(config: &AppConfig) -> Result<Option<GroupInfo>, CliError> {
    let admin: AdminClient<DefaultClientContext> = config
        .admin_config()
        .create()
        .map_err(|source| Error::kafka("creating the admin client", source))?;
    let group = CString::new(config.app_id.as_str()).map_err(|_| failed("the app id has a NUL"))?;
    let timeout_ms = DESCRIBE_TIMEOUT.as_millis() as i32;
    let rk = admin.inner().native_ptr();
    // SAFETY: `rk` stays valid while `admin` lives (to the end of this function). Every
    // object created here is destroyed by `Owned` on every path; the description's strings
    // are copied out before the event that owns them is destroyed.
    unsafe {
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
            ),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as std::os::raw::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        let mut groups = [group.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, groups.as_mut_ptr(), 1, options.0, queue.0);
        let event = rd::rd_kafka_queue_poll(queue.0, timeout_ms + 5_000);
        if event.is_null() {
            return Err(failed("no answer within the timeout"));
        }
        let event = Owned(event, rd::rd_kafka_event_destroy);
        if rd::rd_kafka_event_error(event.0) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return Err(failed(&text(rd::rd_kafka_event_error_string(event.0))));
        }
        let result = rd::rd_kafka_event_DescribeConsumerGroups_result(event.0);
        let mut count = 0usize;
        let descriptions = rd::rd_kafka_DescribeConsumerGroups_result_groups(result, &mut count);
        if result.is_null() || descriptions.is_null() || count == 0 {
            return Ok(None);
        }
        let description = *descriptions;
        let error = rd::rd_kafka_ConsumerGroupDescription_error(description);
        if !error.is_null() {
            if rd::rd_kafka_error_code(error)
                == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND
            {
                return Ok(None);
            }
            return Err(failed(&text(rd::rd_kafka_error_string(error))));
        }
        let state = text(rd::rd_kafka_consumer_group_state_name(
            rd::rd_kafka_ConsumerGroupDescription_state(description),
        ));
        let members = rd::rd_kafka_ConsumerGroupDescription_member_count(description);
        Ok((state != "Dead").then_some(GroupInfo { state, members }))
    }
}

fn failed(why: &str) -> CliError {
    CliError::App(Error::kafka(
        format!("describing the consumer group: {why}"),
        rdkafka::error::KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::Fail),
    ))
}

/// A C string owned by librdkafka, copied.
///
/// # Safety
/// `s` is null or a valid NUL-terminated string.
unsafe fn text(s: *const std::os::raw::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    CStr::from_ptr(s).to_string_lossy().into_owned()
}

/// A librdkafka object destroyed when it goes out of scope.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by the matching librdkafka constructor and destroyed only here.
            unsafe { (self.1)(self.0) }
        }
    }
}

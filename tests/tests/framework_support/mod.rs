//! Helpers of the framework's integration tests: the `eos-service` workload (in the harness
//! library, shared with the `rebalance-check` binary).

pub use exactly_tests::eos_service::*;

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

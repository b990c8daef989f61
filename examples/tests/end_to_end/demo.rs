//! Runs the demo end to end (local broker + proxy, the services as child processes, a SIGKILL
//! of a ledger instance) on a small input and checks its verdict line.

use std::process::Command;

#[test]
fn demo_reports_exactly_once_through_a_crash() {
    let output = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args([
            "--count",
            "2000",
            "--rate",
            "400",
            "--accounts",
            "200",
            "--seed",
            "7",
        ])
        .args(["--drain-timeout-secs", "180"])
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("EOS-CHECK "))
        .unwrap_or_else(|| panic!("no EOS-CHECK line\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    assert!(
        verdict.starts_with("EOS-CHECK inputs=2000 outputs=")
            && verdict.contains(" duplicates=0 missing=0 state=match "),
        "{verdict}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        output.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("CRASH: killed ledger-2 with SIGKILL"),
        "{stdout}"
    );
}

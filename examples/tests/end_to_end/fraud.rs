//! Runs `fraud --check` (local broker, two detectors, kill -9 restarts, some right after a
//! wall-clock tick) on a smaller input (8 000 transactions) and checks its verdict line.

use std::process::Command;

#[test]
fn fraud_detector_is_exactly_once_through_kill_9() {
    let output = Command::new(env!("CARGO_BIN_EXE_fraud"))
        .args([
            "--check", "--count", "8000", "--cards", "800", "--rate", "1200",
        ])
        .output()
        .expect("running fraud --check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("FRAUD-CHECK "))
        .unwrap_or_else(|| panic!("no FRAUD-CHECK line\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    assert!(
        verdict.starts_with("FRAUD-CHECK inputs=8000 alerts=")
            && verdict.ends_with(" duplicates=0 missing=0 state=match verdict=PASS"),
        "{verdict}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        output.status.success(),
        "fraud --check failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
}

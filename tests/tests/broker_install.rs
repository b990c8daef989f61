//! The install path of the nisshi launcher, without installing: with an empty cache and no
//! cargo on PATH it must take the install lock and fail with an error that says what to
//! install. (Its own test binary: it changes the process environment.)

use exactly_tests::broker::nisshi_binary;
use exactly_tests::HarnessError;

#[tokio::test]
async fn missing_nisshi_without_cargo_fails_with_advice() {
    let cache = tempfile::tempdir().unwrap();
    let empty_path = tempfile::tempdir().unwrap();
    // Edition 2021: set_var is safe; this binary has only this test.
    std::env::set_var("EXACTLY_CACHE_DIR", cache.path());
    std::env::set_var("PATH", empty_path.path());
    std::env::remove_var("EXACTLY_NISSHI");

    let error = nisshi_binary()
        .await
        .expect_err("nothing to find or install with");
    assert!(
        matches!(error, HarnessError::NisshiUnavailable(_)),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("nightly") && message.contains("EXACTLY_NISSHI"),
        "{message}"
    );
    assert!(
        cache.path().join("nisshi-0.7.0.lock").is_file(),
        "the install lock was not taken"
    );
}

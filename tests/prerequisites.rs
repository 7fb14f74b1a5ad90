//! Under `CI=true`, every prerequisite of the ignored tests must be present: CI runs them all
//! (`make test`), and a missing one must fail the run rather than leave tests unrun. Elsewhere
//! this test only lists what is missing; the tests that need it show as ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[test]
fn every_prerequisite_is_present_under_ci() {
    let missing = common::prerequisites::missing();
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if in_ci {
        assert!(
            missing.is_empty(),
            "CI=true but missing: {} (make test installs them)",
            missing.join(", ")
        );
    } else if !missing.is_empty() {
        eprintln!(
            "missing (the tests needing them are ignored; make test installs them): {}",
            missing.join(", ")
        );
    }
}

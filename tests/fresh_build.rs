//! The README's first command on a machine without libclang (`tests/fresh-build`): the default
//! build, in a fresh clone with every libclang hidden, runs the demo; `--ublk` on it fails with
//! a message that says how to get ublk. Bounded in time; the script is killed by its pid.

use std::time::Duration;

#[test]
fn default_build_and_demo_without_libclang() {
    let _heavy = lockstep_tests::heavy();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fresh-build");
    let out = lockstep_tests::run(script, &[], Duration::from_secs(900));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("fresh-build: 1 passed, 0 failed"),
        "tests/fresh-build failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Comparing disk images after the daemons stopped: the first differing byte in-process, or
//! `cmp`, the real tool, rather than the daemons' own verify.

use std::path::Path;

use crate::control::T;
use crate::run;

/// The first offset where `a` and `b` differ (the shorter length if one is a prefix).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Panic, naming the first differing byte and block, unless the two image files are equal.
pub fn assert_images_equal(a: &Path, b: &Path, what: &str, logs: &str) {
    let p = std::fs::read(a).expect("image");
    let q = std::fs::read(b).expect("image");
    if let Some(at) = first_difference(&p, &q) {
        panic!(
            "{what}: the images differ at byte {at} (block {})\n{logs}",
            at / 4096
        );
    }
}

/// Compare two image files with `cmp`.
pub fn assert_cmp_equal(a: &Path, b: &Path, what: &str, logs: &str) {
    let out = run("cmp", &[a.to_str().unwrap(), b.to_str().unwrap()], T);
    assert!(
        out.status.success(),
        "the images differ {what}: {}\n{logs}",
        String::from_utf8_lossy(&out.stdout)
    );
}

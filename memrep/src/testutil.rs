//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A unique path in `/dev/shm`, removed on drop.
#[derive(Debug)]
pub struct ShmFile(PathBuf);

impl ShmFile {
    pub fn new(tag: &str) -> ShmFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        ShmFile(PathBuf::from(format!(
            "/dev/shm/memrep-test-{}-{n}-{nanos}-{tag}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

//! `tests/guest/prepare`, run once per test process: the host tools, the Debian kernel and its
//! decompressed modules, cached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What `tests/guest/prepare` made.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The kernel image.
    pub kernel: PathBuf,
    /// Its release string.
    pub version: String,
    /// Directory of decompressed modules, `<name>.ko`.
    pub modules: PathBuf,
    /// Module names, dependencies first.
    pub load_order: Vec<String>,
    /// The static busybox.
    pub busybox: PathBuf,
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// The cache directory.
    pub cache: PathBuf,
}

/// Run `tests/guest/prepare` once per process; panics loudly if it cannot (nothing skips).
pub fn prepared() -> &'static Prepared {
    static P: OnceLock<Prepared> = OnceLock::new();
    P.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/prepare");
        let start = Instant::now();
        let out = crate::run(
            script.to_str().expect("utf-8 path"),
            &[],
            Duration::from_secs(1800),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed ({}): the guest tests need qemu-system-x86, busybox-static, nbd-client, fio \
             and the Debian 6.12 kernel from apt.\nstdout:\n{stdout}\nstderr:\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let kv: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| -> &str {
            kv.get(k)
                .unwrap_or_else(|| panic!("{} printed no {k}=…:\n{stdout}", script.display()))
        };
        let load_order_file = PathBuf::from(get("load_order"));
        let load_order = std::fs::read_to_string(&load_order_file)
            .unwrap_or_else(|e| panic!("{}: {e}", load_order_file.display()))
            .split_whitespace()
            .map(String::from)
            .collect();
        let kernel = PathBuf::from(get("kernel"));
        let p = Prepared {
            cache: kernel
                .parent()
                .and_then(Path::parent)
                .expect("cache dir")
                .to_path_buf(),
            kernel,
            version: get("version").into(),
            modules: PathBuf::from(get("modules")),
            load_order,
            busybox: PathBuf::from(get("busybox")),
            qemu: PathBuf::from(get("qemu")),
        };
        eprintln!(
            "guest: prepared kernel {} in {:?}",
            p.version,
            start.elapsed()
        );
        p
    })
}

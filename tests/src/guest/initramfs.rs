//! The guest's initramfs: a base archive (busybox, fio, nbd-client, their shared libraries, the
//! kernel modules) cached by content stamp, plus a small per-run archive (the lockstep binary,
//! `/init`, the script, extra files).

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use super::cpio::Cpio;
use super::{GuestOptions, Prepared};
use crate::lockstep_bin;

/// The initramfs of one run: a copy of the cached base archive with this run's archive
/// appended (the lockstep binary, `/init`, the script, the extra files); the kernel unpacks
/// both. Written to `workdir/initrd.cpio`.
pub(super) fn build(
    p: &Prepared,
    workdir: &Path,
    nonce: &str,
    script: &str,
    opts: &GuestOptions,
) -> PathBuf {
    let base = base_archive(p);
    let initrd = workdir.join("initrd.cpio");
    std::fs::copy(&base, &initrd)
        .unwrap_or_else(|e| panic!("copy {} → {}: {e}", base.display(), initrd.display()));
    let mut cpio = Cpio::new(
        std::fs::OpenOptions::new()
            .append(true)
            .open(&initrd)
            .expect("open initrd"),
    );
    let mut dirs = BTreeSet::new();
    let bin = lockstep_bin();
    add_program(&mut cpio, &mut dirs, &bin, "/usr/bin/lockstep");
    let modules: Vec<&str> = if opts.load_modules {
        p.load_order.iter().map(String::as_str).collect()
    } else {
        let mut need = Vec::new();
        if opts.net {
            need.extend(["failover", "net_failover", "virtio_net"]);
        }
        if !opts.disks.is_empty() {
            need.push("virtio_blk");
        }
        p.load_order
            .iter()
            .map(String::as_str)
            .filter(|m| need.contains(m))
            .collect()
    };
    cpio.file_bytes(
        "/init",
        0o755,
        init_script(nonce, opts, &modules).as_bytes(),
        &mut dirs,
    );
    cpio.file_bytes("/test.sh", 0o755, script.as_bytes(), &mut dirs);
    for (host, guest) in &opts.files {
        assert!(guest.starts_with('/'), "guest path {guest} is not absolute");
        let data = std::fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
        let mode = std::fs::metadata(host)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or(0o644);
        cpio.file_bytes(guest, mode, &data, &mut dirs);
    }
    cpio.finish();
    initrd
}

fn init_script(nonce: &str, opts: &GuestOptions, modules: &[&str]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /bin /sbin /usr/bin /usr/sbin /var/tmp
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/mounts /etc/mtab 2>/dev/null
"#,
    );
    s.push_str(&format!(
        "echo; echo \"LOCKSTEP-GUEST-BOOTED-{nonce} $(cut -d' ' -f1 /proc/uptime)\"\n"
    ));
    for m in modules {
        s.push_str(&format!(
            "insmod /lib/modules/{m}.ko || echo \"guest init: insmod {m} failed\"\n"
        ));
    }
    s.push_str("ip link set lo up\n");
    if opts.net {
        s.push_str(
            r#"i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
"#,
        );
    }
    for (k, v) in &opts.env {
        s.push_str(&format!("export {k}='{}'\n", v.replace('\'', r"'\''")));
    }
    s.push_str(&format!(
        r#"cd /tmp
sh -e /test.sh
st=$?
sync
echo
echo "LOCKSTEP-GUEST-EXIT-{nonce}=$st"
sleep 0.2
poweroff -f
"#
    ));
    s
}

/// The cached base archive: busybox, fio, nbd-client, their libraries, the modules.
fn base_archive(p: &Prepared) -> PathBuf {
    static BASE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut guard = BASE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = guard.as_ref().filter(|b| b.is_file()) {
        return b.clone();
    }
    let fio = find_tool("fio");
    let nbd_client = find_tool("nbd-client");
    let mut inputs: Vec<PathBuf> = vec![p.busybox.clone(), fio.clone(), nbd_client.clone()];
    inputs.extend(
        p.load_order
            .iter()
            .map(|m| p.modules.join(format!("{m}.ko"))),
    );
    inputs.extend(shared_libs(&fio));
    inputs.extend(shared_libs(&nbd_client));
    let mut h = DefaultHasher::new();
    "base-v1".hash(&mut h);
    for i in &inputs {
        i.hash(&mut h);
        if let Ok(m) = std::fs::metadata(i) {
            (m.len(), m.mtime(), m.mtime_nsec(), m.ino()).hash(&mut h);
        }
    }
    let dir = p.cache.join("initramfs");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let path = dir.join(format!("base-{:016x}.cpio", h.finish()));
    if !path.is_file() {
        let start = Instant::now();
        let tmp = dir.join(format!("base.tmp.{}", std::process::id()));
        let mut cpio = Cpio::new(std::fs::File::create(&tmp).expect("create base archive"));
        let mut dirs = BTreeSet::new();
        let data = std::fs::read(&p.busybox).expect("read busybox");
        cpio.file_bytes("/bin/busybox", 0o755, &data, &mut dirs);
        cpio.symlink("/bin/sh", "busybox", &mut dirs);
        add_program(&mut cpio, &mut dirs, &fio, "/usr/bin/fio");
        add_program(&mut cpio, &mut dirs, &nbd_client, "/usr/sbin/nbd-client");
        for m in &p.load_order {
            let f = p.modules.join(format!("{m}.ko"));
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("read {}: {e}", f.display()));
            cpio.file_bytes(&format!("/lib/modules/{m}.ko"), 0o644, &data, &mut dirs);
        }
        let order = p.load_order.join("\n") + "\n";
        cpio.file_bytes(
            "/lib/modules/load-order",
            0o644,
            order.as_bytes(),
            &mut dirs,
        );
        for d in ["/etc", "/root", "/var/tmp", "/mnt"] {
            cpio.dir(d, &mut dirs);
        }
        cpio.file_bytes(
            "/etc/passwd",
            0o644,
            b"root:x:0:0:root:/tmp:/bin/sh\n",
            &mut dirs,
        );
        cpio.file_bytes("/etc/group", 0o644, b"root:x:0:\n", &mut dirs);
        cpio.finish();
        std::fs::rename(&tmp, &path).expect("rename base archive");
        // Older bases are stale.
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if n.starts_with("base-") && e.path() != path {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        eprintln!(
            "guest: built base initramfs {} ({} MiB) in {:?}",
            path.display(),
            std::fs::metadata(&path).map(|m| m.len() >> 20).unwrap_or(0),
            start.elapsed()
        );
    }
    *guard = Some(path.clone());
    path
}

/// A tool on PATH, or in the sbin directories a non-root PATH lacks. Panics when missing.
fn find_tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is missing on the host: tests/guest/prepare installs it (tests/run-all runs prepare)")
        })
}

/// Shared libraries of `bin` (ldd), with the dynamic loader; empty for a static binary.
fn shared_libs(bin: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(bin)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("ldd {}: {e}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// A program and its shared libraries, each library at the path ldd names.
fn add_program(cpio: &mut Cpio<std::fs::File>, dirs: &mut BTreeSet<String>, bin: &Path, at: &str) {
    for lib in shared_libs(bin) {
        let data = std::fs::read(&lib).unwrap_or_else(|e| panic!("read {}: {e}", lib.display()));
        cpio.file_bytes(lib.to_str().expect("utf-8 path"), 0o755, &data, dirs);
    }
    let data = std::fs::read(bin).unwrap_or_else(|e| panic!("read {}: {e}", bin.display()));
    cpio.file_bytes(at, 0o755, &data, dirs);
}

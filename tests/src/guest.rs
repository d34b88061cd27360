//! Kernel tests inside a QEMU guest: the host kernel has neither ublk nor nbd, so the tests that
//! need them boot Debian's 6.12 kernel under `qemu-system-x86_64 -accel tcg` (never KVM) with a
//! busybox initramfs and run one shell script there.
//!
//! `tests/guest/prepare` (run once per test process) installs the host tools and caches the
//! kernel and its decompressed modules. The initramfs is two concatenated uncompressed newc
//! archives: a base (busybox, fio, nbd-client, their shared libraries, the modules), cached by
//! content stamp, and a small per-run part (the lockstep binary, `/init`, the script, extra
//! files). `/init` mounts proc, sys, devtmpfs and a tmpfs on /tmp, loads the modules, brings up
//! eth0 when networking is asked for, runs the script with `sh -e` in /tmp, prints
//! `LOCKSTEP-GUEST-EXIT-<nonce>=<status>` on the console and powers off. The harness reads the
//! console, bounds the run with a timeout, and kills qemu by pid when it overstays or is dropped.
//!
//! In the guest: `/lib/modules/<name>.ko` (load order in `/lib/modules/load-order`),
//! `/usr/bin/lockstep`, `/usr/bin/fio`, `/usr/sbin/nbd-client`, busybox applets, and with
//! networking eth0 = 10.0.2.15/24 whose gateway 10.0.2.2 is the host's loopback.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::lockstep_bin;

/// How to boot the guest and what to give it.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// Bound on the whole run, boot included; qemu is killed when it passes.
    pub timeout: Duration,
    /// A virtio NIC on qemu user networking: guest 10.0.2.15/24, the host's loopback at 10.0.2.2.
    pub net: bool,
    /// Load every prepared module at boot (in dependency order). Without it, only the modules
    /// networking and disks need are loaded and the script insmods the rest itself.
    pub load_modules: bool,
    /// Guest memory in MiB. The initramfs (fio's libraries) and /tmp images live in it.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Host files copied into the initramfs: (host path, absolute guest path).
    pub files: Vec<(PathBuf, String)>,
    /// Raw images attached as virtio disks: /dev/vda, /dev/vdb, … in this order.
    pub disks: Vec<PathBuf>,
    /// Environment for the script.
    pub env: Vec<(String, String)>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            net: false,
            load_modules: true,
            memory_mib: 1024,
            cpus: 2,
            files: Vec::new(),
            disks: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The result of one guest run.
#[derive(Debug)]
pub struct GuestRun {
    /// The script's exit status, from the console marker; `None` when the marker never came.
    pub status: Option<i32>,
    /// Everything the guest printed on its serial console (carriage returns removed).
    pub console: String,
    /// qemu start to `/init` running (kernel boot and initramfs unpacking).
    pub boot: Option<Duration>,
    /// qemu start to qemu exit (or kill).
    pub elapsed: Duration,
    /// The run was stopped by `GuestOptions::timeout`.
    pub timed_out: bool,
    /// qemu's exit status as text.
    pub qemu_status: String,
    nonce: String,
}

impl GuestRun {
    /// What the script printed: the console between the boot and exit markers.
    pub fn output(&self) -> &str {
        let start = format!("LOCKSTEP-GUEST-BOOTED-{}", self.nonce);
        let end = format!("LOCKSTEP-GUEST-EXIT-{}=", self.nonce);
        // From the line after the boot marker (which carries the boot time).
        let from = self
            .console
            .find(&start)
            .map(|i| {
                self.console[i..]
                    .find('\n')
                    .map_or(self.console.len(), |n| i + n + 1)
            })
            .unwrap_or(0);
        let to = self.console[from..]
            .find(&end)
            .map(|i| from + i)
            .unwrap_or(self.console.len());
        self.console[from..to].trim_matches('\n')
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Save the whole console to a file in the temp directory (for a post-mortem); returns it.
    pub fn save_console(&self) -> PathBuf {
        let path = std::env::temp_dir().join(format!("lockstep-guest-{}.log", self.nonce));
        match std::fs::write(&path, &self.console) {
            Ok(()) => path,
            Err(e) => PathBuf::from(format!("(not saved: {e})")),
        }
    }

    /// Panic (with the console tail, and the whole console saved to a file) unless the script
    /// exited with status 0.
    pub fn assert_success(&self) {
        if self.status == Some(0) {
            return;
        }
        let what = match self.status {
            Some(st) => format!("guest script failed with status {st}"),
            None if self.timed_out => "guest run timed out (no exit marker)".to_string(),
            None => format!(
                "guest died without an exit marker (qemu: {})",
                self.qemu_status
            ),
        };
        panic!(
            "{what} after {:?}; console saved to {}; its tail:\n{}",
            self.elapsed,
            self.save_console().display(),
            self.tail(80)
        );
    }
}

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

/// A running guest. qemu is killed by pid when this is dropped.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    started: Instant,
    timeout: Duration,
    console: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    nonce: String,
    workdir: tempfile::TempDir,
}

impl Guest {
    /// Build the initramfs and boot qemu; returns at once. `script` runs under `sh -e` in /tmp.
    pub fn start(script: &str, opts: &GuestOptions) -> Self {
        let p = prepared();
        let workdir = tempfile::Builder::new()
            .prefix("lockstep-guest")
            .tempdir_in("/var/tmp")
            .expect("guest work dir");
        let nonce = format!(
            "{:x}{:x}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                & 0xffff_ffff_ffff
        );

        // initramfs = cached base archive + this run's archive (the kernel unpacks both).
        let base = base_archive(p);
        let initrd = workdir.path().join("initrd.cpio");
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
            init_script(&nonce, opts, &modules).as_bytes(),
            &mut dirs,
        );
        cpio.file_bytes("/test.sh", 0o755, script.as_bytes(), &mut dirs);
        for (host, guest) in &opts.files {
            assert!(guest.starts_with('/'), "guest path {guest} is not absolute");
            let data =
                std::fs::read(host).unwrap_or_else(|e| panic!("read {}: {e}", host.display()));
            let mode = std::fs::metadata(host)
                .map(|m| m.mode() & 0o7777)
                .unwrap_or(0o644);
            cpio.file_bytes(guest, mode, &data, &mut dirs);
        }
        cpio.finish();

        // The live console, for a human to `tail -f` during a run; removed with the work dir.
        let console_file = workdir.path().join("console.log");
        let mut cmd = Command::new(&p.qemu);
        cmd.args(["-accel", "tcg", "-cpu", "max"])
            .args(["-m", &opts.memory_mib.to_string()])
            .args(["-smp", &opts.cpus.to_string()])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&p.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 oops=panic mitigations=off rdinit=/init",
            ]);
        if opts.net {
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
        }
        for (i, d) in opts.disks.iter().enumerate() {
            cmd.args([
                "-drive",
                &format!(
                    "file={},format=raw,if=none,id=d{i},cache=unsafe",
                    d.display()
                ),
                "-device",
                &format!("virtio-blk-pci,drive=d{i}"),
            ]);
        }
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", p.qemu.display()));

        // One reader thread: qemu's stdout (the serial console) and stderr go to a buffer and to
        // the console file as they arrive.
        let console = Arc::new(Mutex::new(Vec::new()));
        let file = std::fs::File::create(&console_file).expect("console file");
        let mut streams: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        let err_stream = streams.pop().expect("stderr");
        let out_stream = streams.pop().expect("stdout");
        let reader = {
            let console = Arc::clone(&console);
            let file = Arc::new(Mutex::new(file));
            std::thread::spawn(move || {
                let pump = |mut s: Box<dyn Read + Send>,
                            console: Arc<Mutex<Vec<u8>>>,
                            file: Arc<Mutex<std::fs::File>>| {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk: Vec<u8> =
                            buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
                        let _ = file.lock().map(|mut f| f.write_all(&chunk));
                        if let Ok(mut c) = console.lock() {
                            c.extend_from_slice(&chunk);
                        }
                    }
                };
                let (c2, f2) = (Arc::clone(&console), Arc::clone(&file));
                let t = std::thread::spawn(move || pump(err_stream, c2, f2));
                pump(out_stream, console, file);
                let _ = t.join();
            })
        };

        Self {
            child,
            started,
            timeout: opts.timeout,
            console,
            reader: Some(reader),
            nonce,
            workdir,
        }
    }

    /// qemu's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console so far (carriage returns removed).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.lock().map(|c| c.clone()).unwrap_or_default())
            .into_owned()
    }

    /// Wait until the guest console shows `needle`, the guest ends, or `deadline` passes.
    /// Returns whether it appeared.
    pub fn wait_for(&mut self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.console().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.console().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Wait for the guest to power off (or the timeout to pass, then kill it) and report.
    pub fn wait(mut self) -> GuestRun {
        let exit_marker = format!("LOCKSTEP-GUEST-EXIT-{}=", self.nonce);
        let mut timed_out = false;
        let mut marker_seen: Option<Instant> = None;
        let qemu_status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait qemu") {
                break st.to_string();
            }
            let now = Instant::now();
            if now.duration_since(self.started) > self.timeout {
                timed_out = true;
                self.kill();
                break "killed at the timeout".to_string();
            }
            // The marker is out but the guest did not power off: give it 10 s, then kill.
            if marker_seen.is_none() && self.console().contains(&exit_marker) {
                marker_seen = Some(now);
            }
            if marker_seen.is_some_and(|t| now.duration_since(t) > Duration::from_secs(10)) {
                self.kill();
                break "killed 10 s after the exit marker (no poweroff)".to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        if let Some(r) = self.reader.take() {
            // qemu is gone, so its pipes reach EOF; the join cannot hang on a live writer.
            let _ = r.join();
        }
        let console = self.console();
        let status = console.find(&exit_marker).and_then(|i| {
            let rest = &console[i + exit_marker.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        });
        // The guest stamps its uptime when /init starts: "LOCKSTEP-GUEST-BOOTED-<nonce> <secs>".
        let boot = (|| {
            let m = format!("LOCKSTEP-GUEST-BOOTED-{} ", self.nonce);
            let i = console.find(&m)?;
            let secs: String = console[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            secs.parse::<f64>().ok().map(Duration::from_secs_f64)
        })();
        let run = GuestRun {
            status,
            console,
            boot,
            elapsed,
            timed_out,
            qemu_status,
            nonce: self.nonce.clone(),
        };
        if std::env::var_os("LOCKSTEP_GUEST_KEEP_CONSOLE").is_some() {
            eprintln!("guest: console saved to {}", run.save_console().display());
        }
        run
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The run's scratch directory (initrd, console log); removed on drop.
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boot a guest, run `script` with `sh -e`, and return its exit status and console.
pub fn run_in_guest(script: &str, opts: &GuestOptions) -> GuestRun {
    Guest::start(script, opts).wait()
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

/// A writer of uncompressed newc ("070701") cpio archives, all entries owned by root.
struct Cpio<W: Write> {
    out: std::io::BufWriter<W>,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    fn new(w: W) -> Self {
        Self {
            out: std::io::BufWriter::with_capacity(1 << 20, w),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let mut hdr = String::with_capacity(110);
        hdr.push_str("070701");
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        for v in [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).expect("cpio entry over 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("name"),
            0,
        ] {
            hdr.push_str(&format!("{v:08x}"));
        }
        self.ino += 1;
        let w = &mut self.out;
        w.write_all(hdr.as_bytes()).expect("write cpio");
        w.write_all(name.as_bytes()).expect("write cpio");
        w.write_all(&[0]).expect("write cpio");
        let pad = |n: usize| (4 - n % 4) % 4;
        w.write_all(&[0; 3][..pad(110 + name.len() + 1)])
            .expect("write cpio");
        w.write_all(data).expect("write cpio");
        w.write_all(&[0; 3][..pad(data.len())]).expect("write cpio");
    }

    /// A directory and its parents (once each).
    fn dir(&mut self, path: &str, dirs: &mut BTreeSet<String>) {
        let path = path.trim_end_matches('/');
        if path.is_empty() || dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, dirs);
        }
        self.entry(path, 0o040755, &[]);
        dirs.insert(path.to_string());
    }

    fn parent(&mut self, path: &str, dirs: &mut BTreeSet<String>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, dirs);
        }
    }

    fn file_bytes(&mut self, path: &str, perm: u32, data: &[u8], dirs: &mut BTreeSet<String>) {
        self.parent(path, dirs);
        self.entry(path, 0o100000 | (perm & 0o7777), data);
    }

    fn symlink(&mut self, path: &str, target: &str, dirs: &mut BTreeSet<String>) {
        self.parent(path, dirs);
        self.entry(path, 0o120777, target.as_bytes());
    }

    fn finish(mut self) {
        self.entry("TRAILER!!!", 0, &[]);
        self.out.flush().expect("flush cpio");
        let f = self.out.into_inner().map_err(|e| e.into_error());
        f.expect("flush cpio");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut v = Vec::new();
        {
            let mut c = Cpio::new(&mut v);
            let mut dirs = BTreeSet::new();
            c.file_bytes("/a/b", 0o644, b"hello", &mut dirs);
            c.finish();
        }
        assert!(v.starts_with(b"070701"));
        assert_eq!(v.len() % 4, 0);
        let text = String::from_utf8_lossy(&v);
        assert!(text.contains("a\0"));
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}

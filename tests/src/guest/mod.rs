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

mod cpio;
mod initramfs;
mod prepare;
pub mod vm;

pub use prepare::{prepared, Prepared};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
        let initrd = initramfs::build(p, workdir.path(), &nonce, script, opts);

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

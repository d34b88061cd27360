//! Disk locking against QEMU 10's own tools (qemu-io, qemu-img, qemu-nbd) and between
//! lockstep daemons: whoever writes a disk file keeps every other writer off it, through
//! QEMU's OFD lock bytes (100 + permission held, 200 + permission not shared).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::pair::secondary_cmd;
use lockstep_tests::*;

const T: Duration = Duration::from_secs(60);

/// Whether another open file description holds a lock on `byte` of `path` (QEMU's test).
fn held(path: &Path, byte: u64) -> bool {
    let f = std::fs::File::open(path).expect("open for the lock probe");
    // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD commands.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK reads and writes the flock we own, on a descriptor we keep open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert!(r == 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    i32::from(fl.l_type) != libc::F_UNLCK
}

/// Poll until `byte` of `path` is held (`want`), or panic after `deadline`.
fn wait_held(path: &Path, byte: u64, want: bool, deadline: Duration, what: &str) {
    let start = Instant::now();
    while held(path, byte) != want {
        assert!(
            start.elapsed() < deadline,
            "{what}: lock byte {byte} still {}held after {deadline:?}",
            if want { "not " } else { "" }
        );
        sleep_ms(20);
    }
}

/// A process killed by pid (SIGKILL) and reaped when dropped, whatever happened before.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Wait for `g` to exit within `deadline` (else panic: the guard kills it); its stderr.
fn finish(g: &mut Guard, deadline: Duration) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            start.elapsed() < deadline,
            "still running after {deadline:?}"
        );
        sleep_ms(20);
    };
    let mut err = String::new();
    if let Some(mut e) = g.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status, err)
}

/// `qemu-io` holding `path` open read-write, reading commands from a pipe kept open.
fn qemu_io_holding(path: &Path, dir: &Path) -> Guard {
    let log = std::fs::File::create(dir.join("qemu-io.log")).unwrap();
    let child = Command::new("qemu-io")
        .args(["-f", "raw", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start qemu-io");
    let g = Guard(child);
    wait_held(path, 101, true, Duration::from_secs(20), "qemu-io");
    g
}

fn lockstep(args: &[&str]) -> (bool, String) {
    let out = run(lockstep_bin().to_str().unwrap(), args, T);
    (out.status.success(), output_text(&out))
}

fn export_args<'a>(disk: &'a str, addr: &'a str) -> Vec<&'a str> {
    vec!["export", "--disk", disk, "--listen", addr]
}

/// The refusal names the disk and what holds it, and the way out.
fn assert_refused(ok: bool, text: &str, disk: &str, holder: &str, byte: &str) {
    assert!(
        !ok,
        "lockstep started on a disk another process holds:\n{text}"
    );
    for want in [
        &format!("disk {disk} is in use by another process that {holder}"),
        byte,
        "--no-lock",
    ] {
        assert!(text.contains(want), "no `{want}` in:\n{text}");
    }
}

#[test]
fn a_lockstep_disk_keeps_qemu_writers_off_and_lets_readers_in() {
    require("qemu-io", "qemu-utils");
    require("qemu-nbd", "qemu-utils");
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let d_str = disk.to_str().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::export(dir.path(), &["--disk", d_str, "--size", "4M"], &addr);
    for b in [100, 101, 103, 201, 202, 203] {
        assert!(held(&disk, b), "lockstep does not hold byte {b}");
    }
    assert!(!held(&disk, 102) && !held(&disk, 200));

    // QEMU writers are refused with QEMU's own message.
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", d_str], T);
    let text = output_text(&out);
    assert!(!out.status.success(), "qemu-io wrote:\n{text}");
    assert!(text.contains("Failed to get \"write\" lock"), "{text}");
    let out = run("qemu-img", &["resize", "-f", "raw", d_str, "8M"], T);
    assert!(
        !out.status.success(),
        "qemu-img resized:\n{}",
        output_text(&out)
    );
    let sock = dir.path().join("qemu-nbd.sock");
    let args = ["-f", "raw", "-k", sock.to_str().unwrap(), d_str];
    let out = run("qemu-nbd", &args, T);
    let text = output_text(&out);
    assert!(!out.status.success() && text.contains("lock"), "{text}");

    // Readers that share writes still read: qemu-img info -U, qemu-io -r. Plain qemu-img
    // info reads too in QEMU 10 (seen here); should an older one not share writes, it must
    // fail on byte 101 with QEMU's own words.
    let info = run_ok("qemu-img", &["info", "-U", "--output=json", d_str], T);
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
    run_ok("qemu-io", &["-r", "-f", "raw", "-c", "read 0 4k", d_str], T);
    let out = run("qemu-img", &["info", d_str], T);
    let text = output_text(&out);
    assert!(
        out.status.success() || text.contains("Failed to get shared \"write\" lock"),
        "{text}"
    );

    // A second lockstep, writable or read-only, is refused; with --no-lock it starts.
    let addr2 = format!("127.0.0.1:{}", free_port());
    let (ok, text) = lockstep(&export_args(d_str, &addr2));
    assert_refused(ok, &text, d_str, "writes it", "101");
    let mut ro = export_args(d_str, &addr2);
    ro.push("--read-only");
    let (ok, text) = lockstep(&ro);
    assert_refused(ok, &text, d_str, "writes it", "101");
    let sec = secondary_cmd(&disk, None, &addr2, &dir.path().join("s.sock"), None, &[]);
    let (ok, text) = lockstep(&refs(&sec));
    assert_refused(ok, &text, d_str, "writes it", "101");
    let mut d2 = Daemon::export(dir.path(), &["--disk", d_str, "--no-lock"], &addr2);
    assert!(d2.stop(T).success(), "{}", d2.log_text());

    // The locks end with the process, however it ends.
    d.signal(libc::SIGKILL);
    d.wait(T);
    wait_held(&disk, 101, false, T, "after kill -9");
    run_ok("qemu-io", &["-f", "raw", "-c", "write 0 4k", d_str], T);
}

#[test]
fn lockstep_refuses_a_disk_qemu_writes() {
    require("qemu-io", "qemu-utils");
    require("qemu-nbd", "qemu-utils");
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let d_str = disk.to_str().unwrap();
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());

    // qemu-io, interactive, holding the image read-write (bytes 100 and 101).
    let mut qio = qemu_io_holding(&disk, dir.path());
    let (ok, text) = lockstep(&export_args(d_str, &addr));
    let by = format!("byte 101 held by qemu-io (pid {})", qio.0.id());
    assert_refused(ok, &text, d_str, "writes it", &by);
    let mut ro = export_args(d_str, &addr);
    ro.push("--read-only");
    let (ok, text) = lockstep(&ro);
    assert_refused(ok, &text, d_str, "writes it", "byte 101 held");
    let mut d = Daemon::export(dir.path(), &["--disk", d_str, "--no-lock"], &addr);
    assert!(d.stop(T).success(), "{}", d.log_text());
    // qemu-io quits at the end of its input, and takes its locks with it.
    let mut stdin = qio.0.stdin.take().expect("qemu-io stdin");
    writeln!(stdin, "write -P 0x5a 0 4k").unwrap();
    drop(stdin);
    wait_held(&disk, 101, false, T, "qemu-io at end of input");
    qio.0.wait().unwrap();

    // qemu-nbd serving it read-write (100, 101, and 203: it lets nobody resize).
    let sock = dir.path().join("qemu-nbd.sock");
    let args = ["-f", "raw", "-k", sock.to_str().unwrap(), d_str];
    let nbd = Daemon::start(
        "qemu-nbd",
        Path::new("/usr/bin/qemu-nbd"),
        &args,
        dir.path(),
    );
    wait_held(&disk, 203, true, Duration::from_secs(20), "qemu-nbd");
    let (ok, text) = lockstep(&export_args(d_str, &addr));
    let by = format!("bytes 101, 203 held by qemu-nbd (pid {})", nbd.pid());
    assert_refused(ok, &text, d_str, "writes it", &by);
    drop(nbd);
    wait_held(&disk, 101, false, T, "qemu-nbd stopped");

    // Nothing holds it now: lockstep starts, and sees what qemu-io wrote.
    let mut d = Daemon::export(dir.path(), &["--disk", d_str], &addr);
    assert!(held(&disk, 201));
    assert!(d.stop(T).success(), "{}", d.log_text());
    assert_eq!(&std::fs::read(&disk).unwrap()[..4096], &[0x5a; 4096][..]);
}

#[test]
fn two_exports_of_one_file_the_second_is_refused() {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let d_str = disk.to_str().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::export(dir.path(), &["--disk", d_str, "--size", "1M"], &addr);
    let addr2 = format!("127.0.0.1:{}", free_port());
    let (ok, text) = lockstep(&export_args(d_str, &addr2));
    // Another lockstep holds 101 (writes) and 201 (lets nobody else write), among others.
    assert_refused(
        ok,
        &text,
        d_str,
        "writes it",
        "bytes 101, 103, 201, 203 held by ",
    );
    assert!(text.contains(&format!(" (pid {});", d.pid())), "{text}");
}

/// A QEMU VM (stopped before its first instruction: `-S`) with the file as a writable
/// virtio-blk drive.
fn vm(disk: &Path, dir: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-machine", "pc", "-accel", "tcg", "-S", "-nodefaults"])
        .args(["-display", "none", "-drive"])
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("vm.log")).unwrap())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_qemu_vm_and_lockstep_keep_off_each_others_disk() {
    require("qemu-system-x86_64", "qemu-system-x86");
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let d_str = disk.to_str().unwrap();
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());

    // A VM's writable drive: 100, 101 held, and 201 (it shares reads and resizes, not writes).
    let mut g = Guard(vm(&disk, dir.path()).spawn().expect("start qemu"));
    wait_held(&disk, 201, true, Duration::from_secs(30), "the VM");
    let (ok, text) = lockstep(&export_args(d_str, &addr));
    let by = format!("bytes 101, 201 held by qemu-system-x86 (pid {})", g.0.id());
    assert_refused(ok, &text, d_str, "writes it", &by);
    let _ = g.0.kill();
    let _ = g.0.wait();
    wait_held(&disk, 101, false, T, "the VM stopped");

    // lockstep first: the VM does not start.
    let mut d = Daemon::export(dir.path(), &["--disk", d_str], &addr);
    let mut vm = Guard(vm(&disk, dir.path()).spawn().expect("start qemu"));
    let (status, text) = finish(&mut vm, T);
    assert!(!status.success(), "the VM started: {text}");
    assert!(text.contains("Failed to get \"write\" lock"), "{text}");
    assert!(d.stop(T).success(), "{}", d.log_text());
}

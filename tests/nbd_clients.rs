//! Real NBD clients from Debian against `lockstep export`: qemu-img, qemu-io, nbdinfo,
//! nbdcopy, and fio's nbd engine with verification.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use lockstep_tests::*;

const T: Duration = Duration::from_secs(120);

fn uri(addr: &str, name: &str) -> String {
    format!("nbd://{addr}/{name}")
}

#[test]
fn qemu_img_info_convert_and_compare() {
    require("qemu-img", "qemu-utils");
    let _g = heavy();
    let dir = scratch();
    let src = dir.path().join("src.raw");
    random_file(&src, 48 << 20, 1);
    let disk = dir.path().join("disk.img");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::export(
        dir.path(),
        &["--disk", disk.to_str().unwrap(), "--size", "48M"],
        &addr,
    );
    let u = uri(&addr, "disk");
    let info = run_ok("qemu-img", &["info", "--output=json", &u], T);
    assert!(
        info.contains("\"virtual-size\": 50331648"),
        "qemu-img info: {info}"
    );
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "-W",
            "-m",
            "8",
            src.to_str().unwrap(),
            &u,
        ],
        T,
    );
    let back = dir.path().join("back.raw");
    read_export(&u, &back, T);
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "round trip through the export changed the data"
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &u,
        ],
        T,
    );
    drop(d);
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&disk).unwrap(),
        "the served file differs from what was written"
    );
}

/// Threads of process `pid` that are tokio runtime workers.
fn runtime_workers(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "tokio-rt-worker")
        .count()
}

#[test]
fn qemu_io_patterns_zeroes_discard_flush_fua() {
    require("qemu-io", "qemu-utils");
    let _g = heavy();
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    random_file(&disk, 4 << 20, 2);
    let addr = format!("127.0.0.1:{}", free_port());
    for flag in [
        None,
        Some("--direct"),
        Some("--writethrough"),
        Some("--threads=1"),
    ] {
        let mut args = vec!["--disk", disk.to_str().unwrap()];
        args.extend(flag);
        let mut d = Daemon::export(dir.path(), &args, &addr);
        if flag == Some("--threads=1") {
            assert_eq!(runtime_workers(d.pid()), 1, "--threads=1 runs one worker");
        }
        let u = uri(&addr, "disk");
        let cmds = [
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0x11 65536 4096",
            "read -P 0x11 65536 4096",
            "write -z 131072 65536",
            "read -P 0 131072 65536",
            "discard 262144 65536",
            "read -P 0 262144 65536",
            "write -P 0x5a 1000 333",
            "read -P 0x5a 1000 333",
            "read -P 0xab 0 1000",
            "read -P 0xab 1333 1000",
            "write -z 4190000 1234",
            "read -P 0 4190000 1234",
            "flush",
        ];
        let mut args = vec!["-f", "raw"];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&u);
        let out = run_ok("qemu-io", &args, T);
        assert!(
            !out.contains("Pattern verification failed") && !out.contains("error"),
            "qemu-io ({flag:?}):\n{out}"
        );
        // Out of range: qemu-io refuses or the server returns an error; either way not a success.
        let bad = run("qemu-io", &["-f", "raw", "-c", "read 4194300 100", &u], T);
        let text = String::from_utf8_lossy(&bad.stdout).into_owned()
            + &String::from_utf8_lossy(&bad.stderr);
        assert!(
            text.contains("error")
                || text.contains("Input/output")
                || text.contains("Invalid")
                || !bad.status.success(),
            "{text}"
        );
        d.signal(libc::SIGTERM);
        assert!(
            d.wait(Duration::from_secs(20)).success(),
            "export did not exit cleanly: {}",
            d.log_text()
        );
        // Check the file itself once the server is gone.
        let f = std::fs::read(&disk).unwrap();
        assert!(f[..1000].iter().all(|&b| b == 0xab));
        assert!(f[1000..1333].iter().all(|&b| b == 0x5a));
        assert!(f[65536..69632].iter().all(|&b| b == 0x11));
        assert!(f[131072..196608].iter().all(|&b| b == 0));
        assert!(f[262144..327680].iter().all(|&b| b == 0));
        assert!(f[4190000..4191234].iter().all(|&b| b == 0));
        assert_eq!(f.len(), 4 << 20);
        random_file(&disk, 4 << 20, 3);
    }
}

#[test]
fn nbdinfo_lists_exports_and_capabilities() {
    require("nbdinfo", "libnbd-bin");
    let _g = heavy();
    let dir = scratch();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::export(
        dir.path(),
        &[
            "--disk",
            a.to_str().unwrap(),
            "--disk",
            b.to_str().unwrap(),
            "--size",
            "8M",
            "--name",
            "alpha",
            "--name",
            "beta",
        ],
        &addr,
    );
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{addr}")], T);
    assert!(
        list.contains("export=\"alpha\"") && list.contains("export=\"beta\""),
        "{list}"
    );
    for cap in ["flush", "fua", "trim", "zero", "multi-conn", "df", "cache"] {
        let out = run("nbdinfo", &["--can", cap, &uri(&addr, "beta")], T);
        assert!(out.status.success(), "nbdinfo --can {cap}: {:?}", out);
    }
    let size = run_ok("nbdinfo", &["--size", &uri(&addr, "alpha")], T);
    assert_eq!(size.trim(), "8388608");
    // The empty name is the first export.
    let size = run_ok("nbdinfo", &["--size", &format!("nbd://{addr}")], T);
    assert_eq!(size.trim(), "8388608");
    // An unknown export is a clean refusal.
    let out = run("nbdinfo", &["--size", &uri(&addr, "gamma")], T);
    assert!(!out.status.success());
    drop(d);

    // Read-only: writes are not offered, and refused if tried.
    let d = Daemon::export(
        dir.path(),
        &["--disk", a.to_str().unwrap(), "--read-only"],
        &addr,
    );
    let u = uri(&addr, "a");
    assert!(run("nbdinfo", &["--is", "read-only", &u], T)
        .status
        .success());
    assert!(!run("nbdinfo", &["--can", "trim", &u], T).status.success());
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 512", &u], T);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            || text.contains("rror")
            || text.contains("ermission")
            || text.contains("read-only"),
        "{text}"
    );
    drop(d);

    // A unix socket works too.
    let sock = dir.path().join("nbd.sock");
    let listen = format!("unix:{}", sock.display());
    let mut d = Daemon::start(
        "unix",
        &lockstep_bin(),
        &["export", "--disk", a.to_str().unwrap(), "--listen", &listen],
        dir.path(),
    );
    let start = std::time::Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no unix socket: {}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let size = run_ok(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd+unix:///a?socket={}", sock.display()),
        ],
        T,
    );
    assert_eq!(size.trim(), "8388608");
    d.signal(libc::SIGINT);
    assert!(d.wait(Duration::from_secs(20)).success());
    assert!(!sock.exists(), "the unix socket file is removed on exit");
}

#[test]
fn nbdcopy_round_trip_with_multiple_connections() {
    require("nbdcopy", "libnbd-bin");
    let _g = heavy();
    let dir = scratch();
    let src = dir.path().join("src.raw");
    random_file(&src, 64 << 20, 4);
    // Leave a hole so sparse handling (block status, zeroing) is exercised.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&vec![0u8; 8 << 20]).unwrap();
    }
    let disk = dir.path().join("disk.img");
    random_file(&disk, 64 << 20, 5);
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::export(dir.path(), &["--disk", disk.to_str().unwrap()], &addr);
    let u = uri(&addr, "disk");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            src.to_str().unwrap(),
            &u,
        ],
        T,
    );
    let back = dir.path().join("back.raw");
    run_ok(
        "nbdcopy",
        &["--connections=4", &u, back.to_str().unwrap()],
        T,
    );
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "nbdcopy round trip differs"
    );
    drop(d);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&disk).unwrap());
}

fn fio(args: &[&str]) -> String {
    let out = run("fio", args, Duration::from_secs(300));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed:\n{text}");
    let errs = text
        .split("err=")
        .skip(1)
        .filter(|rest| !rest.trim_start().starts_with("0:") && !rest.trim_start().starts_with("0 "))
        .count();
    assert!(
        !text.contains("verify: bad") && errs == 0,
        "fio reported errors:\n{text}"
    );
    assert!(
        text.contains("err= 0"),
        "fio printed no job summary:\n{text}"
    );
    text
}

#[test]
fn fio_nbd_engine_verifies_while_hostile_clients_come_and_go() {
    require("fio", "fio");
    let _g = heavy();
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::export(
        dir.path(),
        &["--disk", disk.to_str().unwrap(), "--size", "128M"],
        &addr,
    );
    let u = uri(&addr, "disk");
    // Garbage connections in the background while fio runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let a2 = addr.clone();
    let vandal = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) && n < 500 {
            if let Ok(mut s) = TcpStream::connect(&a2) {
                let junk: Vec<u8> = (0..200u32).map(|i| (i * 7 + n) as u8).collect();
                let _ = s.write_all(&junk);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    });
    let common = [
        "--ioengine=nbd",
        "--iodepth=32",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--group_reporting",
    ];
    let mut a: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    a.extend([
        "--name=rand4k".into(),
        format!("--uri={u}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
    ]);
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    fio(&args);
    // Mixed sizes, sequential, at an offset: unaligned to anything but 512.
    let mut a: Vec<String> = common.iter().map(|s| s.to_string()).collect();
    a.extend([
        "--name=mixed".into(),
        format!("--uri={u}"),
        "--rw=write".into(),
        "--bsrange=512-1M".into(),
        "--offset=64M".into(),
    ]);
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    fio(&args);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let vandals = vandal.join().unwrap();
    assert!(
        vandals > 10,
        "the hostile clients should have run alongside fio"
    );
    // Read it all back through a fresh connection with fio's randread (no errors).
    fio(&[
        "--name=rr",
        "--ioengine=nbd",
        &format!("--uri={u}"),
        "--rw=randread",
        "--bs=4k",
        "--iodepth=32",
        "--size=128M",
        "--time_based",
        "--runtime=2",
    ]);
    assert!(
        d.log_text().contains("closing connection"),
        "hostile connections are logged"
    );
}

#[test]
fn cli_errors_are_clear() {
    let dir = scratch();
    let missing = dir.path().join("missing.img");
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &[
            "export",
            "--disk",
            missing.to_str().unwrap(),
            "--listen",
            "127.0.0.1:1",
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("does not exist") && err.contains("--size"),
        "{err}"
    );
    let big = dir.path().join("big.img");
    random_file(&big, 8192, 1);
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &[
            "export",
            "--disk",
            big.to_str().unwrap(),
            "--size",
            "4K",
            "--listen",
            "127.0.0.1:1",
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("never shrinks"),
        "{err}"
    );
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &["export", "--disk", big.to_str().unwrap(), "--size", "12Q"],
        T,
    );
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("suffix"));
    // No worker threads.
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &["export", "--disk", big.to_str().unwrap(), "--threads", "0"],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--threads"), "{err}");
    // Port already taken.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &["export", "--disk", big.to_str().unwrap(), "--listen", &addr],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot listen"),
        "{err}"
    );
}

#[test]
fn logs_in_a_file_are_plain_text() {
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::export(
        dir.path(),
        &["--disk", disk.to_str().unwrap(), "--size", "1M"],
        &addr,
    );
    d.signal(libc::SIGTERM);
    assert!(d.wait(T).success());
    let log = d.log_text();
    assert!(
        log.contains("INFO") && log.contains("serving") && log.contains("bye"),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "colour codes in a log file: {log:?}");
}

//! netcmp's packet mode with real network stacks: three network namespaces (the client, the
//! primary replica, the secondary replica) joined by `lockstep netcmp --packet` through TAP
//! interfaces it creates, the replicas running the same services (a static HTTP server,
//! `redis-server`) on the same MAC and IP address. Needs root.
//!
//! * `curl` of several MB and `redis-cli` connections get complete, correct replies; the
//!   replicas' output is compared and the client's ACKs are rewritten for the secondary;
//! * a divergence (`redis-cli TIME`) resyncs at once (no epochs: `EpochLink::local`), and
//!   connections opened after it learn their own offsets and compare without a divergence;
//! * the secondary's port can be QEMU's `-netdev stream` (a `unix:` port; QEMU bridges it to a
//!   TAP with a hub): the framing is QEMU's own;
//! * garbage, hostile lengths and truncated frames on `unix:` ports cost the sender its
//!   connection, never netcmp its service; floods of SYNs and of unanswered flows stay within
//!   the memory bound.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use lockstep_tests::control::{control_status, lockstep, tail, wait_status};
use lockstep_tests::packetlab::{num as n, Lab, Peer, BIG, T};
use lockstep_tests::{heavy, lockstep_bin, scratch, Daemon};
use netcmp::l2::build::{arp_request, tcp_frame, udp_frame, Endpoints, TcpSegment};
use netcmp::l2::frame::tcp_flags;
use serde_json::Value;

#[test]
fn taps_in_namespaces_carry_http_and_redis_and_new_connections_are_rewritten() {
    let _h = heavy();
    let dir = scratch();
    let t0 = Instant::now();
    let lab = Lab::start(dir.path(), false);
    println!("lab up in {:?}", t0.elapsed());

    // HTTP: two downloads one after the other, two at once.
    for i in 0..2 {
        let got = dir.path().join(format!("got{i}"));
        let (took, headers) = lab.download(&got);
        lab.check_big(&got);
        assert!(headers.starts_with("HTTP/1.0 200"), "{headers}");
        assert!(
            headers.contains(&format!("Content-length: {BIG}"))
                || headers.contains(&format!("Content-Length: {BIG}")),
            "{headers}"
        );
        let date = headers
            .lines()
            .find(|l| l.starts_with("Date:"))
            .unwrap_or("-");
        println!("download {i}: {BIG} bytes in {took:?}; {date}");
    }
    std::thread::scope(|s| {
        for i in 2..4 {
            let lab = &lab;
            let got = dir.path().join(format!("got{i}"));
            s.spawn(move || {
                lab.download(&got);
                lab.check_big(&got);
            });
        }
    });
    let http = lab.quiet(Duration::from_millis(500));
    println!(
        "after HTTP: {} mismatches, {} timeouts (a reply's Date: header differs when the replicas answer on either side of a second boundary)",
        n(&http, "mismatches"),
        n(&http, "timeouts")
    );
    for p in ["client", "primary", "secondary"] {
        let port = &http["ports"][p];
        assert!(
            n(port, "frames_in") > 1000 && n(port, "frames_out") > 1000,
            "{p}: {port}"
        );
        assert_eq!(n(port, "malformed"), 0, "{p}: {port}");
    }
    assert!(n(&http, "rewrite.rewritten") > 1000, "{http}");
    if n(&http, "mismatches") == 0 && n(&http, "timeouts") == 0 {
        assert!(n(&http, "bytes_compared") >= 4 * BIG as u64, "{http}");
    }

    // Deterministic redis commands, on connections one after the other and at once.
    assert_eq!(lab.redis(&["SET", "k", "v"]).trim(), "OK");
    assert_eq!(lab.redis(&["GET", "k"]).trim(), "v");
    assert_eq!(
        lab.redis(&["-r", "20", "INCR", "n"]).lines().last(),
        Some("20")
    );
    std::thread::scope(|s| {
        for i in 0..4 {
            let lab = &lab;
            s.spawn(move || {
                let key = format!("par{i}");
                let out = lab.redis(&["-r", "30", "INCR", &key]);
                assert_eq!(out.lines().last(), Some("30"), "{out}");
            });
        }
    });
    let det = lab.quiet(Duration::from_millis(300));
    assert_eq!(
        (n(&det, "mismatches"), n(&det, "timeouts")),
        (n(&http, "mismatches"), n(&http, "timeouts")),
        "deterministic commands diverged: {det}\n{}",
        lab.logs()
    );
    assert!(
        n(&det, "bytes_compared") > n(&http, "bytes_compared"),
        "{det}"
    );

    // A nondeterministic reply: one divergence, resynced at once (no epochs). The offsets of
    // connections open then become 0; the TIME connection's own end may time out as well.
    // Both instances may, rarely, answer within the same microsecond (equal replies, no
    // divergence: seen once in a full run): ask again, at most three times.
    let diverged = |s: &Value| n(s, "mismatches") > n(&det, "mismatches") && n(s, "resyncs") >= 1;
    let mut tries = 0;
    loop {
        tries += 1;
        let time = lab.redis(&["TIME"]);
        let secs: u64 = time
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .expect("seconds");
        assert!(secs > 1_700_000_000, "{time}");
        match lab.wait_for(Duration::from_secs(10), diverged) {
            Ok(_) => break,
            Err(st) => assert!(
                tries < 3,
                "netcmp: no divergence after {tries} TIME replies: {st}\n{}",
                lab.logs()
            ),
        }
    }
    let after = lab.quiet(Duration::from_secs(1));
    println!(
        "after TIME: {} mismatches, {} timeouts, {} checkpoints requested, {} resyncs",
        n(&after, "mismatches"),
        n(&after, "timeouts"),
        n(&after, "checkpoints_requested"),
        n(&after, "resyncs")
    );
    assert_eq!(
        n(&after, "resyncs"),
        n(&after, "checkpoints_requested"),
        "{after}"
    );

    // Connections opened after the checkpoint: offsets learned from their SYN-ACKs, ACKs
    // rewritten, replies compared equal.
    for i in 0..3 {
        let key = format!("after{i}");
        assert_eq!(
            lab.redis(&["-r", "10", "INCR", &key]).lines().last(),
            Some("10")
        );
        assert_eq!(lab.redis(&["GET", &key]).trim(), "10");
    }
    std::thread::scope(|s| {
        for i in 0..3 {
            let lab = &lab;
            s.spawn(move || {
                let v = format!("value-{i}");
                assert_eq!(lab.redis(&["SET", &format!("p{i}"), &v]).trim(), "OK");
                assert_eq!(lab.redis(&["GET", &format!("p{i}")]).trim(), v);
            });
        }
    });
    let end = lab.quiet(Duration::from_millis(300));
    assert_eq!(
        (n(&end, "mismatches"), n(&end, "timeouts")),
        (n(&after, "mismatches"), n(&after, "timeouts")),
        "connections after the checkpoint diverged: {end}\n{}",
        lab.logs()
    );
    let rewritten = n(&end, "rewrite.rewritten") - n(&after, "rewrite.rewritten");
    // 12 connections, each with at least its request and its ACKs of the replies.
    assert!(rewritten >= 24, "{rewritten} frames rewritten: {end}");
    assert!(
        n(&end, "bytes_compared") > n(&after, "bytes_compared"),
        "{end}"
    );
    assert!(n(&end, "added_latency_us.samples") > 1000, "{end}");
    assert_eq!(n(&end, "rewrite.queue_dropped"), 0, "{end}");
    println!(
        "end: {} frames rewritten in all, {} after the checkpoint; {} bytes compared; added latency p50 {} µs p99 {} µs; peak held {} bytes; ports: client {} in/{} out, primary {} in/{} out, secondary {} in/{} out, {} dropped",
        n(&end, "rewrite.rewritten"),
        rewritten,
        n(&end, "bytes_compared"),
        n(&end, "added_latency_us.p50"),
        n(&end, "added_latency_us.p99"),
        n(&end, "peak_held_bytes"),
        n(&end, "ports.client.frames_in"),
        n(&end, "ports.client.frames_out"),
        n(&end, "ports.primary.frames_in"),
        n(&end, "ports.primary.frames_out"),
        n(&end, "ports.secondary.frames_in"),
        n(&end, "ports.secondary.frames_out"),
        n(&end, "ports.client.dropped") + n(&end, "ports.primary.dropped") + n(&end, "ports.secondary.dropped"),
    );

    // The CLI reads the packet mode's status.
    let (ok, text, err) = lockstep(
        &["status", "--control", lab.sock.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(ok && text.contains("netcmp (packet mode)"), "{text}{err}");
    assert!(text.contains("frames rewritten"), "{text}");
    println!("whole test {:?}", t0.elapsed());
}

#[test]
fn qemu_netdev_stream_is_a_port() {
    let _h = heavy();
    let dir = scratch();
    let t0 = Instant::now();
    let lab = Lab::start(dir.path(), true);
    let got = dir.path().join("got");
    let (took, _) = lab.download(&got);
    lab.check_big(&got);
    assert_eq!(
        lab.redis(&["-r", "10", "INCR", "q"]).lines().last(),
        Some("10")
    );
    let st = lab.quiet(Duration::from_millis(300));
    let sec = &st["ports"]["secondary"];
    assert!(sec["port"].as_str().unwrap().starts_with("unix:"), "{sec}");
    assert_eq!(
        (
            n(sec, "peers_accepted"),
            n(sec, "bad_framing"),
            n(sec, "malformed")
        ),
        (1, 0, 0),
        "{sec}\n{}",
        lab.logs()
    );
    assert!(
        n(sec, "frames_in") > 1000 && n(sec, "frames_out") > 100,
        "{sec}"
    );
    if n(&st, "mismatches") == 0 && n(&st, "timeouts") == 0 {
        assert!(n(&st, "bytes_compared") >= BIG as u64, "{st}");
    }
    println!(
        "through QEMU's -netdev stream: {BIG} bytes in {took:?}, secondary port {} frames in, {} out; {} mismatches; whole test {:?}",
        n(sec, "frames_in"),
        n(sec, "frames_out"),
        n(&st, "mismatches"),
        t0.elapsed()
    );
}

/// Wait until `f` holds, polling `what` of netcmp's status.
fn wait_for(sock: &Path, d: &Daemon, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let st = control_status(sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}", tail(d, 30)));
        if ok(&st) {
            return st;
        }
        assert!(
            start.elapsed() < T,
            "{what} not within {T:?}: {st}\n{}",
            tail(d, 30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm_hwm_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn garbage_on_unix_ports_costs_the_peer_and_floods_stay_bounded() {
    let _h = heavy();
    let dir = scratch();
    let t0 = Instant::now();
    let (c, p, s) = (
        dir.path().join("c.sock"),
        dir.path().join("p.sock"),
        dir.path().join("s.sock"),
    );
    let sock = dir.path().join("netcmp.sock");
    let port = |x: &Path| format!("unix:{}", x.display());
    let args = [
        "netcmp",
        "--packet",
        "--client-port",
        &port(&c),
        "--primary-port",
        &port(&p),
        "--secondary-port",
        &port(&s),
        "--socket",
        sock.to_str().unwrap(),
        "--max-held",
        "1MiB",
    ]
    .map(String::from);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::start("netcmp", &lockstep_bin(), &refs, dir.path());
    wait_status(&mut d, &sock, T, "netcmp", |v| v["frontend"] == "packet");

    // Hostile lengths and a frame cut short, on the primary's port: the peer is dropped.
    let bad_lengths: [&[u8]; 2] = [&[0, 0, 0, 0], &[0xff, 0xff, 0xff, 0xff]];
    for bytes in bad_lengths {
        let mut g = UnixStream::connect(&p).unwrap();
        g.set_read_timeout(Some(T)).unwrap();
        g.write_all(bytes).unwrap();
        let mut rest = Vec::new();
        let _ = g.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "netcmp closes the connection and says nothing"
        );
    }
    let mut g = UnixStream::connect(&p).unwrap();
    g.write_all(&[0, 0, 3, 232, 1, 2, 3, 4, 5, 6]).unwrap();
    drop(g);
    let st = wait_for(&sock, &d, "three bad framings", |s| {
        n(s, "ports.primary.bad_framing") == 3
    });
    assert_eq!(n(&st, "ports.primary.peers_dropped"), 3, "{st}");

    // Well-framed garbage on every port: counted malformed; a runt and a broken IPv4 header.
    let mut cl = Peer::connect(&c);
    let mut pr = Peer::connect(&p);
    let mut se = Peer::connect(&s);
    wait_for(&sock, &d, "three peers", |s| {
        ["client", "primary", "secondary"]
            .iter()
            .all(|p| s["ports"][p]["connected"] == true)
    });
    let mut bad_ip = vec![0u8; 12];
    bad_ip.extend_from_slice(&[0x08, 0x00]);
    bad_ip.extend_from_slice(&[0xff; 20]);
    for peer in [&mut cl, &mut pr, &mut se] {
        peer.send(&[1, 2, 3, 4, 5]);
        peer.send(&bad_ip);
    }
    // The primary's malformed frames pass to the client (as uncompared output); the others
    // are dropped.
    wait_for(&sock, &d, "malformed frames counted", |s| {
        ["client", "primary", "secondary"]
            .iter()
            .all(|p| n(&s["ports"][p], "malformed") == 2)
            && n(s, "ports.client.frames_out") == 2
    });

    // A real frame still crosses.
    let arp = arp_request(
        [2, 0, 0, 0, 0, 2],
        [10, 0, 0, 2].into(),
        [10, 0, 0, 1].into(),
    );
    cl.send(&arp);
    wait_for(&sock, &d, "the ARP mirrored", |s| {
        n(s, "ports.primary.frames_out") == 1 && n(s, "ports.secondary.frames_out") == 1
    });

    // A SYN flood from the client: mirrored, remembered within the rewrite table's bound.
    let ep = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 2],
        dst_mac: [2, 0, 0, 0, 0, 1],
        vlan: None,
        src: "10.0.0.2".parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
    };
    const SYNS: u64 = 20_000;
    for i in 0..SYNS {
        let f = tcp_frame(
            &ep,
            &TcpSegment {
                src_port: 1024 + i as u16,
                dst_port: 80,
                seq: (i as u32).wrapping_mul(2_654_435_761),
                flags: tcp_flags::SYN,
                mss: Some(1460),
                ..TcpSegment::default()
            },
        );
        cl.send(&f);
    }
    let st = wait_for(&sock, &d, "the SYNs mirrored", |s| {
        n(s, "ports.client.frames_in") == 3 + SYNS
            && n(s, "ports.primary.frames_out") + n(s, "ports.primary.dropped") == 1 + SYNS
            && n(s, "ports.secondary.frames_out") + n(s, "ports.secondary.dropped") == 1 + SYNS
    });
    println!(
        "SYN flood: {} connections remembered, {} frames queued; primary got {}, secondary {} ({} and {} dropped)",
        n(&st, "rewrite.connections"),
        n(&st, "rewrite.queued_frames"),
        pr.count(),
        se.count(),
        n(&st, "ports.primary.dropped"),
        n(&st, "ports.secondary.dropped")
    );

    // A flood of replies the secondary never matches: held within --max-held, released by
    // the bound or the compare timeout, every one reaching the client (or counted dropped).
    const REPLIES: u64 = 20_000;
    let rep = ep.reversed();
    let payload = [0x5a; 1000];
    let before = cl.count();
    let dropped_before = n(&st, "ports.client.dropped");
    for i in 0..REPLIES {
        let f = udp_frame(&rep, 53, 1024 + (i % 5000) as u16, &payload);
        pr.send(&f);
    }
    let st = wait_for(&sock, &d, "every reply released", |s| {
        cl.count() - before + n(s, "ports.client.dropped") - dropped_before == REPLIES
            && n(s, "held_frames") == 0
    });
    let hwm = vm_hwm_kib(d.pid());
    println!(
        "reply flood: peak held {} bytes (bound {}), {} released unconfirmed, {} timeouts, {} checkpoints, {} dropped at the client port; netcmp's peak RSS {} KiB; whole test {:?}",
        n(&st, "peak_held_bytes"),
        1 << 20,
        n(&st, "forced_releases"),
        n(&st, "timeouts"),
        n(&st, "checkpoints_requested"),
        n(&st, "ports.client.dropped"),
        hwm,
        t0.elapsed()
    );
    assert!(n(&st, "peak_held_bytes") <= (1 << 20) + 1200, "{st}");
    assert!(n(&st, "forced_releases") + n(&st, "timeouts") > 0, "{st}");
    assert!(hwm < 256 * 1024, "netcmp's peak RSS {hwm} KiB");
    assert!(d.child.try_wait().unwrap().is_none(), "netcmp still runs");
    assert_eq!(n(&st, "ports.primary.bad_framing"), 3, "{st}");
}

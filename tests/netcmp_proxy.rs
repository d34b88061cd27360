//! netcmp's stream proxy with a real service: two `redis-server` instances (primary and
//! secondary), driven by `redis-benchmark`, `redis-cli` and a RESP client, through
//! `lockstep netcmp`, which requests checkpoints from a real lockstep primary (its periodic
//! checkpoints off, so every checkpoint counted was requested).
//!
//! * deterministic commands: no divergence, no checkpoint, over a long run;
//! * nondeterministic replies (`TIME`, `RANDOMKEY`, a key set differently on each instance):
//!   one checkpoint per difference, and the client always gets the primary's replies,
//!   complete and in order;
//! * buffering (no secondary instance): a reply is held until its checkpoint commits, and
//!   never seen if the primary daemon is killed first;
//! * a secondary instance that stops answering, and more clients than netcmp serves.

use std::time::{Duration, Instant};

use lockstep_tests::control::{control, lockstep};
use lockstep_tests::netpair::{text, NetPair, Reply, Resp};
use lockstep_tests::{heavy, require, run, scratch, sleep_ms};

fn n(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn deterministic_commands_request_no_checkpoint() {
    require("redis-benchmark", "redis-tools");
    let _h = heavy();
    let dir = scratch();
    let np = NetPair::start(dir.path(), false, &["--compare-timeout", "2s"]);
    let (host, port) = np.addr.split_once(':').unwrap();
    // SET/GET of one key and one value, PING, MSET, LRANGE of a list only LPUSHed by one
    // client: replies that do not depend on the order of the clients.
    let out = run(
        "redis-benchmark",
        &[
            "-h",
            host,
            "-p",
            port,
            "-n",
            "30000",
            "-c",
            "8",
            "-q",
            "-t",
            "ping_mbulk,set,get,mset",
        ],
        Duration::from_secs(240),
    );
    assert!(
        out.status.success(),
        "redis-benchmark: {out:?}\n{}",
        np.logs()
    );
    let report = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(report.contains("requests per second"), "{report}");
    // redis-cli --pipe: a longer, varied, single-client session. (Interactive redis-cli
    // first asks for COMMAND DOCS, whose order differs between two redis processes: a real
    // divergence, which is why this uses --pipe.)
    let mut script = Vec::new();
    let resp = |args: &[&str]| {
        let mut m = format!("*{}\r\n", args.len());
        for a in args {
            m.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        m
    };
    for i in 0..2000 {
        let (k, v, half) = (format!("k{i}"), format!("v{i}"), format!("k{}", i / 2));
        for cmd in [
            resp(&["SET", &k, &v]),
            resp(&["INCR", "counter"]),
            resp(&["RPUSH", "list", &v]),
            resp(&["GET", &half]),
            resp(&["LLEN", "list"]),
            resp(&["HSET", "h", &k, &v]),
        ] {
            script.extend_from_slice(cmd.as_bytes());
        }
    }
    std::fs::write(dir.path().join("script"), &script).unwrap();
    let out = run(
        "sh",
        &[
            "-c",
            &format!(
                "redis-cli -h {host} -p {port} --pipe < {}",
                dir.path().join("script").display()
            ),
        ],
        Duration::from_secs(120),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("errors: 0, replies: 12000"),
        "redis-cli --pipe: {out:?}"
    );
    let mut c = Resp::connect(&np.addr, Duration::from_secs(10));
    assert_eq!(
        c.call(&["GET", "counter"]),
        Reply::Bulk(Some(b"2000".to_vec()))
    );
    assert_eq!(c.call(&["LLEN", "list"]), Reply::Int(2000));
    drop(c);
    let st = np.wait(Duration::from_secs(10), "all connections closed", |s| {
        n(s, "connections_open") == 0
    });
    assert_eq!(
        (
            n(&st, "mismatches"),
            n(&st, "timeouts"),
            n(&st, "checkpoints_requested")
        ),
        (0, 0, 0),
        "deterministic commands diverged: {st}\n{}",
        np.logs()
    );
    assert!(n(&st, "bytes_compared") > 500_000, "{st}");
    assert_eq!(n(&st, "bytes_compared"), n(&st, "bytes_released"), "{st}");
    assert_eq!(np.checkpoints(), 0, "no checkpoint was needed");
    assert!(
        st["added_latency_us"]["samples"].as_u64().unwrap() > 1000,
        "{st}"
    );
    // The CLI reads netcmp's status too.
    let (ok, text_out, err) = lockstep(
        &["status", "--control", np.sock.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(
        ok && text_out.contains("netcmp (stream proxy)"),
        "{text_out}{err}"
    );
    assert!(text_out.contains("added latency"), "{text_out}");
}

/// Wait until the primary committed `want` checkpoints and netcmp resynced that often.
fn wait_resynced(np: &NetPair, want: u64) {
    let st = np.wait(Duration::from_secs(30), &format!("resync {want}"), |s| {
        n(s, "resyncs") >= want
    });
    assert_eq!(n(&st, "resyncs"), want, "{st}");
    assert_eq!(np.checkpoints(), want, "{}", np.logs());
}

#[test]
fn each_nondeterministic_reply_requests_one_checkpoint_and_the_client_sees_the_primary() {
    let dir = scratch();
    let np = NetPair::start(dir.path(), false, &[]);
    let mut direct_p = Resp::connect(&np.p_redis, Duration::from_secs(10));
    let mut direct_s = Resp::connect(np.s_redis.as_ref().unwrap(), Duration::from_secs(10));
    // Give the instances different data behind netcmp's back.
    assert_eq!(
        direct_p.call(&["SET", "who", "primary"]),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        direct_s.call(&["SET", "who", "secondary"]),
        Reply::Simple("OK".into())
    );
    let mut c = Resp::connect(&np.addr, Duration::from_secs(10));
    let mut expected = 0;
    for round in 0..3 {
        // A deterministic reply first: no checkpoint.
        let echo = format!("round {round}");
        assert_eq!(text(&c.call(&["ECHO", &echo])), echo);
        assert_eq!(text(&c.call(&["GET", "who"])), "primary");
        expected += 1;
        wait_resynced(&np, expected);
        let Reply::Array(t) = c.call(&["TIME"]) else {
            panic!("TIME is an array")
        };
        assert_eq!(t.len(), 2, "a whole TIME reply");
        let secs: u64 = text(&t[0]).parse().expect("seconds");
        assert!(secs > 1_700_000_000, "{secs}");
        expected += 1;
        wait_resynced(&np, expected);
    }
    // RANDOMKEY over 1000 keys: the instances pick differently (almost always).
    let mut mset = vec!["MSET".to_string()];
    for i in 0..1000 {
        mset.extend([format!("key{i}"), i.to_string()]);
    }
    let refs: Vec<&str> = mset.iter().map(String::as_str).collect();
    assert_eq!(c.call(&refs), Reply::Simple("OK".into()));
    for _ in 0..3 {
        let before = n(&np.status(), "mismatches");
        let k = text(&c.call(&["RANDOMKEY"]));
        assert!(k.starts_with("key") || k == "who", "{k}");
        // Followed by a deterministic command, so that a RANDOMKEY that happened to match
        // ends its comparison too.
        assert_eq!(text(&c.call(&["ECHO", "after"])), "after");
        let st = np.status();
        if n(&st, "mismatches") > before {
            expected += 1;
            wait_resynced(&np, expected);
        }
    }
    let st = np.status();
    assert_eq!(n(&st, "checkpoints_requested"), expected, "{st}");
    assert_eq!(
        n(&st, "mismatches"),
        expected,
        "one checkpoint per difference: {st}"
    );
    assert_eq!(n(&st, "timeouts"), 0, "{st}");
    assert!(expected >= 8, "GET who and TIME differ every time: {st}");
    // The replies were in order and whole: the connection still works.
    assert_eq!(c.call(&["PING"]), Reply::Simple("PONG".into()));
}

#[test]
fn buffered_replies_wait_for_their_checkpoint_and_die_with_the_primary() {
    let dir = scratch();
    let mut np = NetPair::start(dir.path(), true, &[]);
    let st = np.status();
    assert_eq!(st["mode"], "buffer", "{st}");
    let mut c = Resp::connect(&np.addr, Duration::from_millis(1500));
    c.send(&["PING"]);
    // No periodic checkpoints: the reply stays held.
    let held = c.read();
    assert!(held.is_err(), "a reply before its checkpoint: {held:?}");
    let st = np.status();
    assert!(n(&st, "held_bytes") >= 7, "+PONG is held: {st}");
    let before = np.checkpoints();
    let t = Instant::now();
    control(
        &np.pair.p_sock,
        r#"{"cmd":"checkpoint"}"#,
        Duration::from_secs(30),
    )
    .expect("checkpoint");
    assert_eq!(
        c.read().expect("released by the commit"),
        Reply::Simple("PONG".into())
    );
    println!(
        "reply released {:?} after the checkpoint was asked for",
        t.elapsed()
    );
    assert_eq!(np.checkpoints(), before + 1);
    // A second reply, then the primary daemon dies before any checkpoint: never seen.
    c.send(&["ECHO", "doomed"]);
    sleep_ms(300);
    assert!(n(&np.status(), "held_bytes") >= 10);
    np.pair.primary.signal(libc::SIGKILL);
    np.pair.primary.wait(Duration::from_secs(10));
    let r = c.read();
    assert!(
        matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock
            && e.kind() != std::io::ErrorKind::TimedOut),
        "the connection is reset, not answered: {r:?}"
    );
    let st = np.wait(Duration::from_secs(10), "the drop counted", |s| {
        n(s, "dropped_bytes") >= 10
    });
    assert_eq!(st["link"]["connected"], false, "{st}");
}

#[test]
fn a_secondary_that_stops_answering_costs_a_timeout_not_the_service() {
    let dir = scratch();
    let np = NetPair::start(
        dir.path(),
        false,
        &["--compare-timeout", "200ms", "--max-connections", "20"],
    );
    let mut c = Resp::connect(&np.addr, Duration::from_secs(10));
    assert_eq!(c.call(&["SET", "a", "1"]), Reply::Simple("OK".into()));
    np.s_daemon.as_ref().unwrap().signal(libc::SIGSTOP);
    let t = Instant::now();
    for i in 0..5 {
        let v = i.to_string();
        assert_eq!(c.call(&["SET", "a", &v]), Reply::Simple("OK".into()));
    }
    let took = t.elapsed();
    let st = np.status();
    assert!(n(&st, "timeouts") >= 1, "{st}");
    assert!(n(&st, "held_bytes") < 64 << 20, "{st}");
    println!("5 replies with a stopped secondary took {took:?}");
    // More clients than --max-connections: the extra ones are closed, the first keeps working.
    let extra: Vec<_> = (0..25)
        .map(|_| std::net::TcpStream::connect(&np.addr).expect("connect"))
        .collect();
    let st = np.wait(Duration::from_secs(10), "refusals", |s| {
        n(s, "connections_refused") >= 5
    });
    assert!(n(&st, "connections_open") <= 20, "{st}");
    drop(extra);
    assert_eq!(c.call(&["GET", "a"]), Reply::Bulk(Some(b"4".to_vec())));
    np.s_daemon.as_ref().unwrap().signal(libc::SIGCONT);
    // After the requested checkpoint (the secondary is back), comparison resumes.
    np.wait(Duration::from_secs(30), "a resync", |s| {
        n(s, "resyncs") >= 1
    });
    assert_eq!(c.call(&["PING"]), Reply::Simple("PONG".into()));
}

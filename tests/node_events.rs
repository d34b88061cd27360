//! `lockstep events`, consumed while a pair goes through its life: a primary started alone,
//! a secondary that appears and is synced, checkpoints, kill -9 of the primary, failover.
//! Every expected event arrives, in order, on both nodes' streams.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use lockstep_tests::control::{checkpoint, failover, wait_status, T};
use lockstep_tests::pair::{primary_cmd, secondary_cmd};
use lockstep_tests::{free_port, lockstep_bin, owned, refs, require, run_ok, scratch, Daemon};

/// A running `lockstep events` and the events it printed so far.
struct Stream {
    child: Child,
    seen: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(sock: &std::path::Path) -> Stream {
        let mut child = Command::new(lockstep_bin())
            .args(["events", "--control", sock.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("lockstep events");
        let out = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                s.lock().unwrap().push(v);
            }
        });
        Stream {
            child,
            seen,
            reader: Some(reader),
        }
    }

    fn events(&self) -> Vec<Value> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait until an event matching `f` arrived.
    fn wait(&self, what: &str, f: impl Fn(&Value) -> bool) {
        let end = Instant::now() + T;
        while !self.events().iter().any(&f) {
            assert!(
                Instant::now() < end,
                "no {what} event; got:\n{}",
                lines(&self.events())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The stream ends by itself (its daemon is gone); returns everything it printed.
    fn finish(mut self) -> Vec<Value> {
        let end = Instant::now() + T;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < end, "lockstep events did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reader.take().unwrap().join().unwrap();
        self.events()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(v: &[Value]) -> String {
    v.iter().map(|e| format!("{e}\n")).collect()
}

/// An event of kind `event` whose fields include `fields`.
fn is(event: &str, fields: &[(&str, &str)]) -> impl Fn(&Value) -> bool {
    let event = event.to_string();
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |e: &Value| e["event"] == *event && fields.iter().all(|(k, v)| e[k.as_str()] == *v)
}

/// `events` holds, in this order (other events between them), one match of each of `want`.
/// A described expectation about one event.
type Want = (&'static str, Box<dyn Fn(&Value) -> bool>);

fn assert_in_order(events: &[Value], want: &[Want]) {
    let mut at = 0;
    for (what, f) in want {
        match events[at..].iter().position(f) {
            Some(i) => at += i + 1,
            None => panic!("no {what} after event {at}; the stream:\n{}", lines(events)),
        }
    }
    // Numbered without gaps.
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gaps in seq: {seqs:?}"
    );
}

macro_rules! want {
    ($($what:literal => $event:literal $(, $k:literal = $v:literal)*);* $(;)?) => {
        [$(($what, Box::new(is($event, &[$(($k, $v)),*])) as Box<dyn Fn(&Value) -> bool>)),*]
    };
}

#[test]
fn events_follow_a_pair_through_sync_checkpoints_kill9_and_failover() {
    require("qemu-io", "qemu-utils");
    let dir = scratch();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let export = format!("127.0.0.1:{}", free_port());
    let (p_sock, s_sock) = (d.join("primary.sock"), d.join("secondary.sock"));
    // The primary starts alone, so that its stream sees the secondary arrive.
    let pargs = primary_cmd(
        &d.join("p.img"),
        Some("16M"),
        &export,
        &listen,
        &p_sock,
        &owned(&["--connect-timeout", "0", "--checkpoint-interval", "200ms"]),
    );
    let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&pargs), d);
    let st = wait_status(&mut primary, &p_sock, T, "primary", |v| {
        v["mode"] == "unprotected"
    });
    assert!(st["unprotected_reason"].is_string(), "{st}");
    let p_events = Stream::start(&p_sock);
    p_events.wait("status", is("status", &[]));
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 1M",
            &format!("nbd://{export}/lockstep"),
        ],
        T,
    );

    let sargs = secondary_cmd(&d.join("s.img"), Some("16M"), &listen, &s_sock, None, &[]);
    // Started by hand (not start_secondary) so that its stream begins before the primary
    // finds it: wait for the socket only.
    let mut secondary = Daemon::start("secondary", &lockstep_bin(), &refs(&sargs), d);
    let end = Instant::now() + T;
    while !s_sock.exists() {
        assert!(Instant::now() < end, "no secondary control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let s_events = Stream::start(&s_sock);
    s_events.wait("sync done", is("sync", &[("state", "done")]));
    p_events.wait("sync done", is("sync", &[("state", "done")]));
    checkpoint(&p_sock).expect("a checkpoint");
    s_events.wait("checkpoint", is("checkpoint", &[("state", "committed")]));

    primary.signal(libc::SIGKILL);
    primary.wait(T);
    let p_seen = p_events.finish();
    s_events.wait("peer lost", is("peer", &[("state", "lost")]));
    let (ok, out, err) = failover(&s_sock, "checkpoint", &[]);
    assert!(ok, "failover: {err}{out}");
    s_events.wait("failover", is("failover", &[]));
    let s_seen = s_events.events();
    eprintln!("primary:\n{}secondary:\n{}", lines(&p_seen), lines(&s_seen));

    assert_in_order(
        &p_seen,
        &want![
            "first status line" => "status";
            "sync started" => "sync", "state" = "started", "kind" = "full";
            "unprotected -> replicating" => "mode", "previous" = "unprotected", "mode" = "replicating";
            "peer connected" => "peer", "state" = "connected";
            "sync done" => "sync", "state" = "done";
            "checkpoint committed" => "checkpoint", "state" = "committed";
        ],
    );
    assert_in_order(
        &s_seen,
        &want![
            "waiting -> syncing" => "mode", "previous" = "waiting", "mode" = "syncing";
            "peer connected" => "peer", "state" = "connected";
            "sync started" => "sync", "state" = "started";
            "syncing -> replicating" => "mode", "previous" = "syncing", "mode" = "replicating";
            "checkpoint committed" => "checkpoint", "state" = "committed";
            "sync done" => "sync", "state" = "done";
            "checkpoint committed after the sync" => "checkpoint", "state" = "committed";
            "peer lost" => "peer", "state" = "lost";
            "replicating -> paused" => "mode", "previous" = "replicating", "mode" = "paused";
            "paused -> failing-over" => "mode", "mode" = "failing-over";
            "failing-over -> primary" => "mode", "previous" = "failing-over", "mode" = "primary";
            "failover" => "failover", "to" = "checkpoint";
        ],
    );
    drop(s_events);
    assert!(secondary.stop(T).success());
}

//! Talking to running daemons: one request on a control socket, the `lockstep` CLI with a
//! deadline, `status --json`, waiting for a state, and the tail of a daemon's log. Answers are
//! [`serde_json::Value`]s (a missing key indexes to `null`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{lockstep_bin, run, Daemon};

/// Deadline for short commands (status, qemu-io, failover of a small disk).
pub const T: Duration = Duration::from_secs(60);

/// Parse one JSON answer, with the text in the error.
pub fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text.trim()).map_err(|e| format!("{e} in {text:?}"))
}

/// `s` without ANSI colour codes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `n` lines of a daemon's log, without colour codes.
pub fn tail(d: &Daemon, n: usize) -> String {
    let text = strip_ansi(&d.log_text());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One request on a control socket (JSON lines), without going through the CLI: cheap enough
/// to poll the primary every few tens of milliseconds under load. An answer without
/// `"ok": true` is an error.
pub fn control(sock: &Path, req: &str, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v = parse_json(&line)?;
    if v["ok"] != true {
        return Err(format!("control request {req} answered {v}"));
    }
    Ok(v)
}

/// `{"cmd":"status"}` on a control socket.
pub fn control_status(sock: &Path, timeout: Duration) -> Result<Value, String> {
    control(sock, r#"{"cmd":"status"}"#, timeout)
}

/// `{"cmd":"checkpoint"}` on a primary's control socket: a checkpoint now.
pub fn checkpoint(sock: &Path) -> Result<Value, String> {
    control(sock, r#"{"cmd":"checkpoint"}"#, T)
}

/// `lockstep ARGS…` with a deadline: (success, stdout, stderr).
pub fn lockstep(args: &[&str], deadline: Duration) -> (bool, String, String) {
    let out = run(lockstep_bin().to_str().expect("utf-8 path"), args, deadline);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `lockstep failover --control SOCK --to TO FLAGS…`: (success, stdout, stderr).
pub fn failover(sock: &Path, to: &str, flags: &[&str]) -> (bool, String, String) {
    let mut a = vec!["failover", "--control", sock.to_str().unwrap(), "--to", to];
    a.extend_from_slice(flags);
    lockstep(&a, T)
}

/// `lockstep status --control SOCK --json`, parsed. The exit code says how protected the
/// node is (0, 3, 4, 5: docs/operations.md) and is checked against the JSON; any other code
/// is an error.
pub fn status(sock: &Path) -> Result<Value, String> {
    let (code, v) = status_code(sock)?;
    let mode = v["mode"].as_str().unwrap_or("");
    let consistent = v["consistent"] != false;
    let expected: &[i32] = match mode {
        _ if !consistent => &[5],
        "replicating" => &[0, 3],
        "unprotected" | "primary" => &[4],
        _ => &[3],
    };
    if v["role"] != "netcmp" && !expected.contains(&code) {
        return Err(format!(
            "lockstep status exited {code} for mode {mode}: {v}"
        ));
    }
    Ok(v)
}

/// `lockstep status --control SOCK --json`: its exit code and its JSON.
pub fn status_code(sock: &Path) -> Result<(i32, Value), String> {
    let out = run(
        lockstep_bin().to_str().expect("utf-8 path"),
        &["status", "--control", sock.to_str().unwrap(), "--json"],
        T,
    );
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    if ![0, 3, 4, 5].contains(&code) {
        return Err(format!(
            "lockstep status failed ({code}): {}{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_json(&text).map(|v| (code, v))
}

/// Wait until the daemon answers `status` on `sock` with an answer `ready` accepts; panics
/// with the last answer and the log if the daemon exits or `deadline` passes first.
pub fn wait_status(
    d: &mut Daemon,
    sock: &Path,
    deadline: Duration,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    let mut last = String::from("(no answer yet)");
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!(
                "the {what} exited with {st} while we waited for it; log:\n{}",
                tail(d, 60)
            );
        }
        if sock.exists() {
            match control_status(sock, Duration::from_secs(5)) {
                Ok(v) if ready(&v) => return v,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
        }
        if start.elapsed() > deadline {
            panic!(
                "the {what} did not reach the expected state within {deadline:?}; last status: {last}\nlog:\n{}",
                tail(d, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until a daemon's status shows `mode`.
pub fn wait_mode(d: &mut Daemon, sock: &Path, deadline: Duration, what: &str, mode: &str) -> Value {
    wait_status(d, sock, deadline, what, |v| v["mode"] == mode)
}

/// Wait until the primary replicates with its resync complete (the resync's checkpoint
/// committed, or nothing was left to send and a later checkpoint ran) in at least
/// `min_sessions` sessions.
pub fn wait_synced(d: &mut Daemon, sock: &Path, deadline: Duration, min_sessions: u64) -> Value {
    wait_status(d, sock, deadline, "primary (resynced)", |v| {
        v["mode"] == "replicating"
            && v["resyncing"].as_bool() == Some(false)
            && v["resync"]["state"] == "done"
            && v["sessions"].as_u64().unwrap_or(0) >= min_sessions
    })
}

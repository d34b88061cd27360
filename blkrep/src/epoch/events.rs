//! Epoch events for processes outside the daemon (netcmp): which checkpoints committed, and
//! from when their state dates, so that output held until its state is safe can be released.
//!
//! A checkpoint's state dates from the moment the guest was asked to pause
//! ([`EpochEvent::Committed::paused_at_ns`]): whatever the guest produced before that moment
//! belongs to the committed epoch or an earlier one. Times are `CLOCK_MONOTONIC` in
//! nanoseconds ([`monotonic_ns`]), a clock every process on the host shares, so a process
//! that stamps output with [`monotonic_ns`] as it receives it knows, at each commit, exactly
//! which output the commit made safe: the output received before `paused_at_ns` was
//! produced before it.
//!
//! On the control socket (`docs/protocol.md`), `{"cmd": "subscribe"}` answers once and then
//! sends one event per line until either side closes. [`Subscription`] is the client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest line read from a control socket (an answer, e.g. a verify report listing differing
/// chunks, or an event).
const MAX_LINE: u64 = 16 << 20;

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock of [`EpochEvent`] times, shared by every
/// process on the host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Something that happened to a checkpoint, as a subscriber sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EpochEvent {
    /// The secondary committed checkpoint `epoch`: the state as of `paused_at_ns` (and all
    /// output produced before it) survives a failover.
    Committed {
        /// The epoch committed.
        epoch: u64,
        /// When the guest was asked to pause for it ([`monotonic_ns`]).
        paused_at_ns: u64,
    },
    /// Checkpoint `epoch` was cut but failed; its state is carried by the next one.
    Aborted {
        /// The epoch.
        epoch: u64,
        /// Why.
        error: String,
    },
    /// The subscriber fell behind and `missed` events were dropped. Commits are
    /// cumulative: the next `Committed` covers what the missed ones did.
    Lagged {
        /// How many.
        missed: u64,
    },
}

/// How many events wait for a slow subscriber before it misses some ([`EpochEvent::Lagged`]).
pub(crate) const EVENT_BACKLOG: usize = 256;

/// The first answer to `subscribe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The epoch being written when the subscription began.
    pub epoch: u64,
    /// The last epoch committed then.
    pub committed_epoch: u64,
}

/// A subscription to a primary daemon's epoch events over its control socket.
#[derive(Debug)]
pub struct Subscription {
    conn: Control,
    /// The first answer.
    pub start: Subscribed,
}

impl Subscription {
    /// Subscribe at the control socket `path`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Subscription, String> {
        let (conn, v) = Control::send(path, &serde_json::json!({"cmd": "subscribe"}), timeout)
            .await
            .map_err(|e| format!("subscribing at {}: {e}", path.display()))?;
        let start = serde_json::from_value(v)
            .map_err(|e| format!("bad answer from {}: {e}", path.display()))?;
        Ok(Subscription { conn, start })
    }

    /// The next event; an error once the daemon closed the subscription or sent garbage.
    pub async fn next(&mut self) -> Result<EpochEvent, String> {
        let line = self.conn.line().await?;
        serde_json::from_str(&line)
            .map_err(|e| format!("bad event from {}: {e}", self.conn.path.display()))
    }
}

/// Send one request to the control socket at `path` and return the answer; an error for
/// `"ok": false` (the daemon's reason), a lost connection or no answer within `timeout`.
pub async fn control_request(
    path: &Path,
    req: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    Control::send(path, req, timeout).await.map(|(_, v)| v)
}

/// Ask the primary daemon at control socket `path` for a checkpoint and wait for it to
/// commit; returns the epoch committed.
pub async fn request_checkpoint(path: &Path, timeout: Duration) -> Result<u64, String> {
    let v = control_request(path, &serde_json::json!({"cmd": "checkpoint"}), timeout).await?;
    v.get("epoch")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("{} answered a checkpoint without its epoch", path.display()))
}

/// A connection to a control socket that sent one request.
#[derive(Debug)]
struct Control {
    path: PathBuf,
    rd: BufReader<OwnedReadHalf>,
    /// Kept open: closing it ends a subscription.
    _wr: OwnedWriteHalf,
}

impl Control {
    /// Send `req` and read the answer, which must be `"ok": true`.
    async fn send(
        path: &Path,
        req: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(Control, serde_json::Value), String> {
        let fut = async {
            let s = UnixStream::connect(path)
                .await
                .map_err(|e| format!("connecting to control socket {}: {e}", path.display()))?;
            let (rd, mut wr) = s.into_split();
            wr.write_all(format!("{req}\n").as_bytes())
                .await
                .map_err(|e| format!("sending to {}: {e}", path.display()))?;
            let mut conn = Control {
                path: path.to_path_buf(),
                rd: BufReader::new(rd),
                _wr: wr,
            };
            let first = conn.line().await?;
            let v: serde_json::Value = serde_json::from_str(&first)
                .map_err(|e| format!("bad answer from {}: {e}", path.display()))?;
            if v.get("ok").and_then(serde_json::Value::as_bool) != Some(true) {
                return Err(v
                    .get("error")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown error")
                    .to_string());
            }
            Ok((conn, v))
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            format!(
                "no answer from {} within {}",
                path.display(),
                crate::units::duration(timeout)
            )
        })?
    }

    async fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = (&mut self.rd)
            .take(MAX_LINE)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("reading from {}: {e}", self.path.display()))?;
        if n == 0 {
            return Err(format!("{} closed without answering", self.path.display()));
        }
        if !line.ends_with('\n') {
            return Err(format!(
                "{} sent a line longer than {MAX_LINE} bytes",
                self.path.display()
            ));
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        for e in [
            EpochEvent::Committed {
                epoch: 7,
                paused_at_ns: 123,
            },
            EpochEvent::Aborted {
                epoch: 8,
                error: "lost".into(),
            },
            EpochEvent::Lagged { missed: 3 },
        ] {
            let s = serde_json::to_string(&e).unwrap();
            assert!(s.starts_with("{\"event\":"), "{s}");
            assert_eq!(serde_json::from_str::<EpochEvent>(&s).unwrap(), e);
        }
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_ns() >= a + 1_000_000);
    }
}

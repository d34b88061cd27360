//! The packet mode's ports: where whole Ethernet frames come from and go to.
//!
//! - `tap:NAME`: a TAP interface (see [`super::tap`]); one `read` is one frame, one `write`
//!   sends one. A write the interface refuses (it is down, or being moved to another network
//!   namespace) drops the frame.
//! - `unix:PATH`: netcmp listens on a unix stream socket at PATH and serves one peer at a time
//!   with the length-prefixed framing of [`super::framing`] (QEMU's `-netdev stream`). A new
//!   peer replaces the current one, which is closed: a QEMU that restarts or reconnects
//!   (`reconnect-ms`) must not be locked out by a connection whose end netcmp has not noticed
//!   yet, and whoever may connect to the socket may send frames anyway. A peer that sends a
//!   hostile length (0, or over [`MAX_FRAME`]), or does not take a frame within
//!   [`WRITE_TIMEOUT`], is dropped; the port keeps listening.
//!
//! Each port runs as a task: frames it reads go to the engine's queue (stamped with their
//! arrival), frames for it arrive on its own queue, bounded by [`OUT_QUEUE_BYTES`]; past the
//! bound, or with no peer, frames are dropped and counted, as a congested link drops them.

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::framing::{encode, Decoder, MAX_FRAME};
use super::tap;

/// Frames waiting to be written to one port, in bytes; more are dropped.
pub const OUT_QUEUE_BYTES: usize = 4 << 20;
/// How long a `unix:` peer may take to accept one frame before it is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames read from one port in a row before the task lets the others run.
const READ_BATCH: usize = 64;

/// Where a port's frames come from and go to (`tap:NAME` or `unix:PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A TAP interface, created if missing.
    Tap(String),
    /// A unix stream socket netcmp listens on.
    Unix(PathBuf),
}

impl FromStr for PortSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("tap", name)) => {
                tap::valid_name(name)?;
                Ok(PortSpec::Tap(name.into()))
            }
            Some(("unix", path)) if !path.is_empty() => Ok(PortSpec::Unix(path.into())),
            _ => Err(format!("{s:?}: expected tap:NAME or unix:PATH")),
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Tap(n) => write!(f, "tap:{n}"),
            PortSpec::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The clients' side.
    Client,
    /// The primary replica.
    Primary,
    /// The secondary replica.
    Secondary,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        })
    }
}

/// A frame read from a port: where, what, when.
pub(crate) type Incoming = (Side, Vec<u8>, Instant);

/// A port's counters, shared by its task and status.
#[derive(Debug, Default)]
pub(crate) struct PortCounters {
    /// Frames read and given to the engine.
    pub(crate) frames_in: AtomicU64,
    /// Frames written.
    pub(crate) frames_out: AtomicU64,
    /// Frames for the port not written (no peer, queue full, write refused).
    pub(crate) dropped: AtomicU64,
    /// Bad lengths, frames cut short, oversized TAP frames.
    pub(crate) bad_framing: AtomicU64,
    /// `unix:` peers accepted.
    pub(crate) peers_accepted: AtomicU64,
    /// `unix:` peers dropped or replaced.
    pub(crate) peers_dropped: AtomicU64,
    /// A peer is there (`unix:`), the TAP is still read (`tap:`).
    pub(crate) connected: AtomicBool,
    /// Bytes in the outgoing queue.
    pub(crate) queued_bytes: AtomicUsize,
    /// The last error.
    pub(crate) last_error: Mutex<Option<String>>,
}

impl PortCounters {
    fn error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

/// The engine's end of a port's outgoing queue.
#[derive(Debug)]
pub(crate) struct PortSender {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pub(crate) counters: Arc<PortCounters>,
}

impl PortSender {
    /// Queue a frame, or drop it (no peer, queue full).
    pub(crate) fn send(&self, frame: Vec<u8>) {
        let c = &self.counters;
        let n = frame.len();
        if !c.connected.load(Ordering::Relaxed)
            || c.queued_bytes.load(Ordering::Relaxed) + n > OUT_QUEUE_BYTES
        {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.queued_bytes.fetch_add(n, Ordering::Relaxed);
        if self.tx.send(frame).is_err() {
            c.queued_bytes.fetch_sub(n, Ordering::Relaxed);
            c.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An opened port, before its task runs.
#[derive(Debug)]
pub(crate) enum Port {
    /// An attached TAP.
    Tap(AsyncFd<File>, String),
    /// A listening socket.
    Unix(UnixListener, PathBuf),
}

impl Port {
    /// Open what `spec` names: attach the TAP, or bind the socket (replacing a stale socket
    /// file; anything else at the path, or a socket someone answers on, is an error).
    pub(crate) async fn open(spec: &PortSpec) -> Result<Port, String> {
        match spec {
            PortSpec::Tap(name) => {
                let (fd, name) = tap::open(name).map_err(|e| e.to_string())?;
                Ok(Port::Tap(fd, name))
            }
            PortSpec::Unix(path) => {
                remove_stale(path).await?;
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("binding {}: {e}", path.display()))?;
                Ok(Port::Unix(l, path.clone()))
            }
        }
    }

    /// Start the port's task: frames read go to `incoming`; the returned sender takes frames to
    /// write. The task ends when `stop` turns true (a `unix:` port then removes its socket).
    pub(crate) fn spawn(
        self,
        side: Side,
        incoming: mpsc::Sender<Incoming>,
        stop: watch::Receiver<bool>,
    ) -> (PortSender, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(PortCounters::default());
        let task = Task {
            side,
            incoming,
            out: rx,
            c: counters.clone(),
        };
        let handle = match self {
            Port::Tap(fd, name) => {
                counters.connected.store(true, Ordering::Relaxed);
                tokio::spawn(task.tap(fd, name, stop))
            }
            Port::Unix(l, path) => tokio::spawn(task.unix(l, path, stop)),
        };
        (PortSender { tx, counters }, handle)
    }
}

async fn remove_stale(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket: not replacing it",
            path.display()
        ));
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(format!(
            "{} is in use: something answers on it",
            path.display()
        ));
    }
    std::fs::remove_file(path).map_err(|e| format!("removing stale {}: {e}", path.display()))
}

struct Task {
    side: Side,
    incoming: mpsc::Sender<Incoming>,
    out: mpsc::UnboundedReceiver<Vec<u8>>,
    c: Arc<PortCounters>,
}

impl Task {
    /// A frame read: to the engine (waiting while its queue is full).
    async fn deliver(&self, frame: Vec<u8>) -> bool {
        self.c.frames_in.fetch_add(1, Ordering::Relaxed);
        self.incoming
            .send((self.side, frame, Instant::now()))
            .await
            .is_ok()
    }

    /// The next frame to write, its bytes no longer counted as queued.
    fn dequeued(&self, f: &[u8]) {
        self.c.queued_bytes.fetch_sub(f.len(), Ordering::Relaxed);
    }

    async fn tap(mut self, fd: AsyncFd<File>, name: String, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut failed = false;
        loop {
            tokio::select! {
                _ = blkrep::epoch::until_true(&mut stop) => break,
                r = fd.readable(), if !failed => {
                    let mut guard = match r {
                        Ok(g) => g,
                        Err(e) => {
                            failed = self.tap_failed(&name, format!("polling: {e}"));
                            continue;
                        }
                    };
                    for _ in 0..READ_BATCH {
                        match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                            Err(_would_block) => break,
                            Ok(Ok(0)) => {
                                guard.clear_ready();
                                break;
                            }
                            Ok(Ok(n)) if n > MAX_FRAME => {
                                self.c.bad_framing.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(port = %self.side, "TAP {name}: a frame over {MAX_FRAME} bytes, dropped");
                            }
                            Ok(Ok(n)) => {
                                if !self.deliver(buf[..n].to_vec()).await {
                                    return;
                                }
                            }
                            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                            Ok(Err(e)) => {
                                failed = self.tap_failed(&name, format!("reading: {e}"));
                                break;
                            }
                        }
                    }
                }
                f = self.out.recv() => {
                    let Some(f) = f else { break };
                    self.dequeued(&f);
                    // One write is one frame: the TAP takes all of it or none.
                    match fd.get_ref().write(&f) {
                        Ok(n) if n == f.len() => {
                            self.c.frames_out.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(n) => {
                            self.c.dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(port = %self.side, "TAP {name}: wrote {n} of {} bytes", f.len());
                        }
                        Err(e) => {
                            // Down, being moved between namespaces, or its queue full: lost,
                            // as on a wire.
                            self.c.dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(port = %self.side, "TAP {name}: write: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Reading the TAP failed for good (the interface was deleted): stop reading, keep
    /// dropping what is sent to it.
    fn tap_failed(&self, name: &str, e: String) -> bool {
        tracing::error!(port = %self.side, "TAP {name}: {e}; no longer read");
        self.c.connected.store(false, Ordering::Relaxed);
        self.c.error(format!("TAP {name}: {e}"));
        true
    }

    async fn unix(
        mut self,
        listener: UnixListener,
        path: PathBuf,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut peer: Option<(UnixStream, Decoder)> = None;
        loop {
            tokio::select! {
                _ = blkrep::epoch::until_true(&mut stop) => break,
                a = listener.accept() => match a {
                    Ok((s, _)) => {
                        self.c.peers_accepted.fetch_add(1, Ordering::Relaxed);
                        if peer.is_some() {
                            tracing::warn!(port = %self.side, "{}: a new peer replaces the current one", path.display());
                            self.c.peers_dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tracing::info!(port = %self.side, "{}: peer connected", path.display());
                        }
                        peer = Some((s, Decoder::default()));
                        self.c.connected.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(port = %self.side, "{}: accept: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                r = readable(&peer), if peer.is_some() => {
                    let keep = match r {
                        Ok(()) => self.read_peer(&mut peer, &path).await,
                        Err(e) => Err(format!("polling: {e}")),
                    };
                    match keep {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(why) => self.drop_peer(&mut peer, &path, why),
                    }
                }
                f = self.out.recv() => {
                    let Some(f) = f else { break };
                    self.dequeued(&f);
                    let Some((s, _)) = peer.as_mut() else {
                        self.c.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    match tokio::time::timeout(WRITE_TIMEOUT, s.write_all(&encode(&f))).await {
                        Ok(Ok(())) => {
                            self.c.frames_out.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            self.c.dropped.fetch_add(1, Ordering::Relaxed);
                            self.drop_peer(&mut peer, &path, format!("writing: {e}"));
                        }
                        Err(_) => {
                            self.c.dropped.fetch_add(1, Ordering::Relaxed);
                            self.drop_peer(&mut peer, &path, format!("took no frame within {WRITE_TIMEOUT:?}"));
                        }
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Read what the peer sent and pass its whole frames on. `Err`: drop the peer (it left, or
    /// sent a hostile length); `Ok(false)`: the engine is gone.
    async fn read_peer(
        &self,
        peer: &mut Option<(UnixStream, Decoder)>,
        path: &Path,
    ) -> Result<bool, String> {
        let Some((s, dec)) = peer.as_mut() else {
            return Ok(true);
        };
        let n = match s.try_read(dec.space()) {
            Ok(0) => {
                let partial = dec.partial();
                if partial > 0 {
                    self.c.bad_framing.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("left in the middle of a frame ({partial} bytes)"));
                }
                tracing::info!(port = %self.side, "{}: peer left", path.display());
                *peer = None;
                self.c.connected.store(false, Ordering::Relaxed);
                return Ok(true);
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                return Ok(true)
            }
            Err(e) => return Err(format!("reading: {e}")),
        };
        dec.filled(n);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    if !self.deliver(f).await {
                        return Ok(false);
                    }
                }
                Ok(None) => return Ok(true),
                Err(e) => {
                    self.c.bad_framing.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("sent {e}"));
                }
            }
        }
    }

    fn drop_peer(&self, peer: &mut Option<(UnixStream, Decoder)>, path: &Path, why: String) {
        if peer.take().is_some() {
            tracing::warn!(port = %self.side, "{}: peer dropped: {why}", path.display());
            self.c.peers_dropped.fetch_add(1, Ordering::Relaxed);
            self.c.connected.store(false, Ordering::Relaxed);
            self.c.error(format!("peer dropped: {why}"));
        }
    }
}

async fn readable(peer: &Option<(UnixStream, Decoder)>) -> std::io::Result<()> {
    match peer {
        Some((s, _)) => s.readable().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        assert_eq!("tap:lsp0".parse(), Ok(PortSpec::Tap("lsp0".into())));
        assert_eq!(
            "unix:/run/a b.sock".parse(),
            Ok(PortSpec::Unix("/run/a b.sock".into()))
        );
        assert_eq!(PortSpec::Tap("x".into()).to_string(), "tap:x");
        for bad in [
            "lsp0",
            "tap:",
            "unix:",
            "tcp:1.2.3.4:5",
            "tap:waytoolongname01",
        ] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad}");
        }
    }
}

//! Running under a service manager: readiness notification over `$NOTIFY_SOCKET` (systemd's
//! sd_notify protocol: `READY=1`, `STATUS=…`, `MAINPID=…`, `STOPPING=1`) and `--pid-file`.
//!
//! The protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the unix
//! datagram socket named by `NOTIFY_SOCKET`: a path, or `@NAME` for the abstract namespace.
//! Without the variable nothing is sent. A failure to notify is logged, never fatal: the
//! daemon serves either way (systemd then times the start out and says why).

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use blkrep::replica::node::Ready;
use clap::Args;

/// Flags for running as a service, shared by the daemons.
#[derive(Debug, Args, Clone, Default)]
pub struct ServiceArgs {
    /// Write this process's id to FILE once the daemon serves (when it also notifies
    /// READY=1 on $NOTIFY_SOCKET); removed when it exits. A file naming a running lockstep
    /// is refused at start.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// Worker threads of the daemon's runtime (default: one per CPU). 1 suits a small host
    /// that the daemon shares with its clients: it saves the wakeups between workers (on 2
    /// cores, 1.5x the 4k writes of --ack local; docs/performance.md).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

/// Send one sd_notify message (lines `KEY=VALUE`) to `$NOTIFY_SOCKET`, if set. Returns
/// whether it was sent.
pub fn notify(message: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sock.send_to_addr(message.as_bytes(), &addr)?;
        }
        Some(b'/') => {
            sock.send_to(message.as_bytes(), Path::new(&target))?;
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("NOTIFY_SOCKET={target:?}: only a path or @abstract name is supported"),
            ))
        }
    }
    Ok(true)
}

/// [`notify`], logging a failure.
fn notify_logged(message: &str) {
    match notify(message) {
        Ok(true) => tracing::debug!("notified the service manager: {message:?}"),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}"),
    }
}

/// Tell the service manager the daemon serves.
pub fn ready(status: &str) {
    let status = status.replace('\n', " ");
    notify_logged(&format!(
        "READY=1\nSTATUS={status}\nMAINPID={}\n",
        std::process::id()
    ));
}

/// Tell the service manager the daemon is stopping (after SIGTERM/SIGINT).
pub fn stopping(status: &str) {
    let status = status.replace('\n', " ");
    notify_logged(&format!("STOPPING=1\nSTATUS={status}\n"));
}

/// Install the SIGINT and SIGTERM handlers now; the future resolves on either, with its
/// name. Call within a runtime.
pub fn signals() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// A daemon's service state: the pid file it wrote, removed on drop.
#[derive(Debug, Clone)]
pub struct Service {
    pid_file: Option<PathBuf>,
    written: Arc<Mutex<bool>>,
    threads: Option<u16>,
}

impl Service {
    /// Check the flags before anything starts: a pid file naming a running lockstep is
    /// refused, its directory must exist.
    pub fn new(a: &ServiceArgs) -> anyhow::Result<Self> {
        if let Some(p) = &a.pid_file {
            if let Some(pid) = live_lockstep(p) {
                bail!(
                    "--pid-file {}: lockstep (pid {pid}) is running with it; stop it first or give another file",
                    p.display()
                );
            }
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(d) = dir {
                if !d.is_dir() {
                    bail!(
                        "--pid-file {}: {} is not a directory",
                        p.display(),
                        d.display()
                    );
                }
            }
        }
        Ok(Self {
            pid_file: a.pid_file.clone(),
            written: Arc::new(Mutex::new(false)),
            threads: a.threads,
        })
    }

    /// The daemon's runtime, with `--threads` workers.
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Runtime> {
        crate::daemon::runtime_with(self.threads.map(usize::from))
    }

    /// The daemon serves: write the pid file, then notify READY=1 with `status`.
    pub fn ready(&self, status: &str) {
        if let Some(p) = &self.pid_file {
            match write_pid_file(p) {
                Ok(()) => *self.written.lock().unwrap_or_else(|e| e.into_inner()) = true,
                Err(e) => tracing::error!("--pid-file {}: {e:#}", p.display()),
            }
        }
        tracing::info!("ready: {status}");
        ready(status);
    }

    /// [`Service::ready`] as the library's hook.
    pub fn hook(&self) -> Ready {
        let s = self.clone();
        Box::new(move |status| s.ready(&status))
    }

    /// Install the SIGINT/SIGTERM handlers now (before READY=1: a stop right after it must
    /// not kill the daemon unannounced); the future resolves on either, after notifying
    /// STOPPING=1 with `what`. Call within a runtime.
    pub fn shutdown_signal(
        &self,
        what: &'static str,
    ) -> anyhow::Result<impl std::future::Future<Output = ()>> {
        let signal = signals()?;
        Ok(async move {
            let s = signal.await;
            tracing::info!("{s} received");
            stopping(what);
        })
    }

    /// Remove the pid file if this process wrote it.
    pub fn finish(&self) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(p), true) = (&self.pid_file, *written) {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("removing --pid-file {}: {e}", p.display());
            }
            *written = false;
        }
    }
}

/// Write our pid to `p` atomically (a temporary file renamed over it).
fn write_pid_file(p: &Path) -> anyhow::Result<()> {
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(f, "{}", std::process::id())?;
    f.sync_all()?;
    std::fs::rename(&tmp, p).with_context(|| format!("renaming {} to it", tmp.display()))?;
    Ok(())
}

/// The pid in `p` if it names a running process called lockstep (not us).
fn live_lockstep(p: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
    if pid == std::process::id() {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "lockstep").then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both address forms reach a bound datagram socket with the whole message.
    #[test]
    fn notify_reaches_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("lockstep-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let by_path = UnixDatagram::bind(&path).unwrap();
        let name = format!("lockstep-notify-test-{}", std::process::id());
        let abs = {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            UnixDatagram::bind_addr(&a).unwrap()
        };
        let mut buf = [0u8; 256];
        // The only test in this binary that sets the variable.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\n").unwrap());
        let n = by_path.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        assert!(notify("STOPPING=1\n").unwrap());
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
        std::env::set_var("NOTIFY_SOCKET", "relative");
        assert!(notify("READY=1\n").is_err());
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1\n").unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Replication fixtures: a `lockstep secondary` and a `lockstep primary` on fresh images
//! ([`Pair`]), optionally linked through the [`CutProxy`], and the addresses of a pair whose
//! roles are swapped after a failover ([`Swapped`]).
//!
//! The command lines of `lockstep primary` and `lockstep secondary` are spelled in one place
//! each: [`primary_cmd`] and [`secondary_cmd`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::control::{lockstep, tail, wait_mode, wait_status, wait_synced, T};
use crate::images::assert_cmp_equal;
use crate::proxy::CutProxy;
use crate::{free_port, lockstep_bin, owned, refs, Daemon};

/// `lockstep ROLE --disk DISK [--size SIZE] --control CONTROL`.
fn daemon_cmd(role: &str, disk: &Path, size: Option<&str>, control: &Path) -> Vec<String> {
    let mut a = owned(&[role, "--disk", disk.to_str().unwrap()]);
    if let Some(size) = size {
        a.extend(owned(&["--size", size]));
    }
    a.extend(owned(&["--control", control.to_str().unwrap()]));
    a
}

/// `lockstep secondary` on `disk` (created with `size` if given), replication port `listen`,
/// control socket `control`, its own NBD export at `export` if given, then `extra`.
pub fn secondary_cmd(
    disk: &Path,
    size: Option<&str>,
    listen: &str,
    control: &Path,
    export: Option<&str>,
    extra: &[String],
) -> Vec<String> {
    let mut a = daemon_cmd("secondary", disk, size, control);
    a.extend(owned(&["--listen", listen]));
    if let Some(export) = export {
        a.extend(owned(&["--export", export]));
    }
    a.extend(extra.iter().cloned());
    a
}

/// `lockstep primary` on `disk` (created with `size` if given), serving NBD at `export`,
/// replicating to `secondary`, control socket `control`, then `extra`.
pub fn primary_cmd(
    disk: &Path,
    size: Option<&str>,
    export: &str,
    secondary: &str,
    control: &Path,
    extra: &[String],
) -> Vec<String> {
    let mut a = daemon_cmd("primary", disk, size, control);
    a.extend(owned(&["--export", export, "--secondary", secondary]));
    a.extend(extra.iter().cloned());
    a
}

/// Primary flags: acknowledge writes at `ack`, a checkpoint every `interval`.
pub fn ack_flags(ack: &str, interval: &str) -> Vec<String> {
    owned(&["--ack", ack, "--checkpoint-interval", interval])
}

/// Start `lockstep ARGS…` (a secondary) and wait until it waits for a primary.
pub fn start_secondary(dir: &Path, name: &str, args: &[String], sock: &Path) -> Daemon {
    let mut d = Daemon::start(name, &lockstep_bin(), &refs(args), dir);
    wait_mode(&mut d, sock, Duration::from_secs(20), name, "waiting");
    d
}

/// A secondary and a primary on fresh (sparse, hence identical) images.
#[derive(Debug)]
pub struct Pair {
    /// The primary's image file.
    pub p_img: PathBuf,
    /// The secondary's image file.
    pub s_img: PathBuf,
    /// The primary's control socket.
    pub p_sock: PathBuf,
    /// The secondary's control socket.
    pub s_sock: PathBuf,
    /// The disk size both were started with.
    pub size: String,
    /// The primary's NBD export (clients connect here).
    pub export: String,
    /// The secondary's replication port.
    pub listen: String,
    /// The secondary's own export (after failover: the new primary's).
    pub s_export: String,
    // Declared in this order so that on drop the primary stops before the secondary.
    /// The primary.
    pub primary: Daemon,
    /// The secondary.
    pub secondary: Daemon,
}

impl Pair {
    /// A pair of `size` with extra primary flags.
    pub fn start(dir: &Path, size: &str, primary_flags: &[String]) -> Pair {
        Self::start_full(dir, size, primary_flags, &[], false).0
    }

    /// Like `start`, with extra secondary flags, and optionally the primary reaching the
    /// secondary through a [`CutProxy`].
    pub fn start_full(
        dir: &Path,
        size: &str,
        primary_flags: &[String],
        secondary_flags: &[String],
        via_proxy: bool,
    ) -> (Pair, Option<CutProxy>) {
        let bin = lockstep_bin();
        let (p_img, s_img) = (dir.join("primary.img"), dir.join("secondary.img"));
        let (p_sock, s_sock) = (dir.join("primary.sock"), dir.join("secondary.sock"));
        let export = format!("127.0.0.1:{}", free_port());
        let listen = format!("127.0.0.1:{}", free_port());
        let s_export = format!("127.0.0.1:{}", free_port());
        let sargs = secondary_cmd(
            &s_img,
            Some(size),
            &listen,
            &s_sock,
            Some(&s_export),
            secondary_flags,
        );
        let secondary = start_secondary(dir, "secondary", &sargs, &s_sock);
        let proxy = via_proxy.then(|| CutProxy::start(&listen));
        let target = proxy.as_ref().map_or(listen.clone(), |p| p.addr.clone());
        let pargs = primary_cmd(&p_img, Some(size), &export, &target, &p_sock, primary_flags);
        let mut primary = Daemon::start("primary", &bin, &refs(&pargs), dir);
        let st = wait_status(
            &mut primary,
            &p_sock,
            Duration::from_secs(40),
            "primary",
            // The control socket answers while the primary still connects (`paused`).
            |v| v["mode"].is_string() && v["mode"] != "paused",
        );
        assert_eq!(
            st["mode"].as_str(),
            Some("replicating"),
            "a fresh primary should be replicating: {st}\nprimary log:\n{}\nsecondary log:\n{}",
            tail(&primary, 40),
            tail(&secondary, 40)
        );
        (
            Pair {
                p_img,
                s_img,
                p_sock,
                s_sock,
                size: size.into(),
                export,
                listen,
                s_export,
                primary,
                secondary,
            },
            proxy,
        )
    }

    /// The primary's export.
    pub fn uri(&self) -> String {
        format!("nbd://{}/lockstep", self.export)
    }

    /// The secondary's own export.
    pub fn s_uri(&self) -> String {
        format!("nbd://{}/lockstep", self.s_export)
    }

    /// The tails of both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- primary log (tail):\n{}\n--- secondary log (tail):\n{}",
            tail(&self.primary, 40),
            tail(&self.secondary, 40)
        )
    }

    /// Wait until the primary's status satisfies `ready`.
    pub fn wait_primary(&mut self, deadline: Duration, ready: impl Fn(&Value) -> bool) -> Value {
        wait_status(&mut self.primary, &self.p_sock, deadline, "primary", ready)
    }

    /// Wait until the primary has resynced in at least `min_sessions` sessions (see
    /// [`wait_synced`]).
    pub fn wait_synced(&mut self, deadline: Duration, min_sessions: u64) -> Value {
        wait_synced(&mut self.primary, &self.p_sock, deadline, min_sessions)
    }

    /// Wait until the secondary's status shows `mode`.
    pub fn wait_secondary(&mut self, deadline: Duration, mode: &str) -> Value {
        wait_mode(
            &mut self.secondary,
            &self.s_sock,
            deadline,
            "secondary",
            mode,
        )
    }

    /// SIGTERM the primary and assert a clean exit within `deadline`; the failure names
    /// `what` and shows both logs.
    pub fn stop_primary_ok(&mut self, deadline: Duration, what: &str) {
        let st = self.primary.stop(deadline);
        assert!(st.success(), "{what} exited with {st}\n{}", self.logs());
    }

    /// [`Pair::stop_primary_ok`] for the secondary.
    pub fn stop_secondary_ok(&mut self, deadline: Duration, what: &str) {
        let st = self.secondary.stop(deadline);
        assert!(st.success(), "{what} exited with {st}\n{}", self.logs());
    }

    /// Start the secondary again, same disk and addresses, after it was killed.
    pub fn restart_secondary(&mut self, dir: &Path, name: &str) {
        let args = secondary_cmd(
            &self.s_img,
            Some(&self.size),
            &self.listen,
            &self.s_sock,
            Some(&self.s_export),
            &[],
        );
        self.secondary = Daemon::start(name, &lockstep_bin(), &refs(&args), dir);
    }

    /// Run another `lockstep primary` (its own disk `p2.img` of the pair's size and socket
    /// `p2.sock` in `dir`) against this pair's secondary port until it gives up within
    /// `connect_timeout`: (success, stdout, stderr).
    pub fn intruding_primary(
        &self,
        dir: &Path,
        connect_timeout: &str,
        flags: &[String],
    ) -> (bool, String, String) {
        let mut extra = owned(&["--connect-timeout", connect_timeout]);
        extra.extend(flags.iter().cloned());
        let a = primary_cmd(
            &dir.join("p2.img"),
            Some(&self.size),
            &format!("127.0.0.1:{}", free_port()),
            &self.listen,
            &dir.join("p2.sock"),
            &extra,
        );
        lockstep(&refs(&a), T)
    }

    /// Stop the primary with SIGTERM (its final checkpoint) and compare the two images with
    /// `cmp`, the real tool, not the daemons' own verify.
    pub fn stop_and_cmp(&mut self, what: &str, logs: &str) {
        self.primary.stop(Duration::from_secs(60));
        assert_cmp_equal(&self.p_img, &self.s_img, what, logs);
    }
}

/// Addresses for a pair whose roles are swapped (the old secondary's disk as the primary).
#[derive(Debug)]
pub struct Swapped {
    /// The new secondary's replication port.
    pub listen: String,
    /// The new primary's export.
    pub export: String,
    /// The new primary's control socket.
    pub p_sock: PathBuf,
    /// The new secondary's control socket.
    pub s_sock: PathBuf,
}

impl Swapped {
    /// Fresh ports and sockets in `dir`.
    pub fn new(dir: &Path) -> Swapped {
        Swapped {
            listen: format!("127.0.0.1:{}", free_port()),
            export: format!("127.0.0.1:{}", free_port()),
            p_sock: dir.join("p2.sock"),
            s_sock: dir.join("s2.sock"),
        }
    }

    /// The new primary's export.
    pub fn uri(&self) -> String {
        format!("nbd://{}/lockstep", self.export)
    }

    /// Start the new secondary on `disk` (the old primary's) and wait until it waits.
    pub fn start_secondary(&self, dir: &Path, name: &str, disk: &Path, extra: &[&str]) -> Daemon {
        let a = secondary_cmd(disk, None, &self.listen, &self.s_sock, None, &owned(extra));
        start_secondary(dir, name, &a, &self.s_sock)
    }

    /// The new primary's command line, on `disk` (the failed-over node's).
    pub fn primary_args(&self, disk: &Path) -> Vec<String> {
        let extra = owned(&["--checkpoint-interval", "100ms", "--connect-timeout", "10s"]);
        primary_cmd(disk, None, &self.export, &self.listen, &self.p_sock, &extra)
    }
}

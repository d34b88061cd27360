//! A QEMU VM's device state as a participant of the epochs: captured while the VM is stopped
//! for the cut, committed on the secondary all-or-nothing with the disk and the guest's RAM
//! (a shared `memory-backend-file` that a memory region replicates).
//!
//! Capture: QMP `migrate` to a `file:` URI with the `x-ignore-shared` capability, so the
//! stream holds only device state (a few hundred KB; RAM is shared and replicated as a
//! region). QEMU writes the file ([`DeviceState`]'s scratch path), lockstep reads it once the
//! migration completed, and the VM continues from `postmigrate` at the guest hook's `cont`.
//!
//! ```text
//!  primary                                         secondary
//!  cut(n):     migrate file:SCRATCH, read it
//!  prepare(n): BEGIN(n, len, digest) CHUNK… ──▶   staged in RAM
//!              summary(len, digest)          ──▶   prepare(n): check, write PATH.n, fsync
//!                                                  commit(n): PATH.n is the committed state
//!                                                  failover: PATH.<committed> → PATH
//! ```
//!
//! Restoring on the secondary (after `lockstep failover --to checkpoint`): start QEMU with the
//! same command line against the secondary's region file and disk, plus `-incoming defer`,
//! then `lockstep vm-resume --qmp SOCK --device-state PATH` (`migrate-incoming file:PATH`
//! with `x-ignore-shared`, then `cont`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkrep::epoch::{
    BoxFuture, Epoch, EpochError, EpochSummary, FailoverTarget, Latencies, Participant,
    PeerChannel, QmpGuest, SecondaryParticipant,
};
use serde_json::{json, Value};

/// The participant id of the device state (memory regions use 16 and up).
pub const DEVICE_ID: u16 = 8;
/// The largest device state accepted from QEMU or from the primary.
pub const MAX_DEVICE_STATE: u64 = 256 << 20;
/// Bytes per CHUNK message.
const CHUNK: usize = 4 << 20;
/// How long a capture may take before it is cancelled (and the checkpoint aborted).
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(10);

const BEGIN: &[u8; 2] = b"DB";
const DATA: &[u8; 2] = b"DC";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn digest(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

#[derive(Default)]
struct Captured {
    epoch: Option<Epoch>,
    blob: Vec<u8>,
    /// The last capture, for a VM left in `postmigrate` since.
    last: Option<Vec<u8>>,
    captures: u64,
    failures: u64,
    capture_time: Latencies,
    last_bytes: u64,
    last_error: Option<String>,
}

/// The primary's half: captures the device state at each cut and sends it at prepare.
pub struct DeviceState {
    qmp: Arc<QmpGuest>,
    scratch: PathBuf,
    st: Mutex<Captured>,
    channel: Mutex<Option<Arc<dyn PeerChannel>>>,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    /// The VM behind `qmp` (the same connection the guest hook stops it through: QEMU's QMP
    /// socket serves one client); QEMU writes each capture to `scratch`.
    pub fn new(qmp: Arc<QmpGuest>, scratch: &Path) -> DeviceState {
        DeviceState {
            qmp,
            scratch: scratch.to_path_buf(),
            st: Mutex::new(Captured::default()),
            channel: Mutex::new(None),
        }
    }

    async fn capture(&self) -> Result<Vec<u8>, String> {
        let st = self.qmp.execute("query-status", None).await?;
        match st.get("status").and_then(Value::as_str) {
            // The guest hook found it stopped, but a `cont` came since: stop it again (and
            // let the hook continue it), or the migration would stop it for good.
            Some("running") => {
                self.qmp.execute("stop", None).await?;
                self.qmp.stopped_for_checkpoint();
            }
            // Stopped since the last capture (which left it so): nothing ran, so its device
            // state is the one captured then; QEMU refuses to migrate it again.
            Some("postmigrate") => {
                if let Some(prev) = lock(&self.st).last.clone() {
                    return Ok(prev);
                }
            }
            _ => {}
        }
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        self.qmp
            .execute("migrate-set-capabilities", Some(caps))
            .await?;
        match std::fs::remove_file(&self.scratch) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("removing {}: {e}", self.scratch.display()))
            }
            _ => {}
        }
        let uri = format!("file:{}", self.scratch.display());
        self.qmp
            .execute("migrate", Some(json!({ "uri": uri })))
            .await?;
        let start = Instant::now();
        loop {
            let m = self.qmp.execute("query-migrate", None).await?;
            match m.get("status").and_then(Value::as_str) {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    let why = m.get("error-desc").and_then(Value::as_str).unwrap_or("?");
                    return Err(format!("QEMU's migration to {uri} failed: {why}"));
                }
                _ if start.elapsed() > CAPTURE_TIMEOUT => {
                    let _ = self.qmp.execute("migrate_cancel", None).await;
                    return Err(format!(
                        "QEMU's migration to {uri} took over {CAPTURE_TIMEOUT:?}"
                    ));
                }
                _ => tokio::time::sleep(Duration::from_micros(500)).await,
            }
        }
        let len = std::fs::metadata(&self.scratch)
            .map_err(|e| format!("{}: {e}", self.scratch.display()))?
            .len();
        if len > MAX_DEVICE_STATE {
            return Err(format!(
                "device state of {len} bytes is over the bound of {MAX_DEVICE_STATE} (is the guest's RAM not shared?)"
            ));
        }
        let blob =
            std::fs::read(&self.scratch).map_err(|e| format!("{}: {e}", self.scratch.display()))?;
        let _ = std::fs::remove_file(&self.scratch);
        Ok(blob)
    }

    fn failed(&self, epoch: Epoch, reason: String) -> EpochError {
        let mut st = lock(&self.st);
        st.failures += 1;
        st.last_error = Some(reason.clone());
        EpochError::Participant {
            epoch,
            participant: self.name().into(),
            reason,
        }
    }
}

impl Participant for DeviceState {
    fn name(&self) -> &str {
        "device"
    }

    fn peer_id(&self) -> Option<u16> {
        Some(DEVICE_ID)
    }

    fn connected(
        &self,
        channel: Arc<dyn PeerChannel>,
        _epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        *lock(&self.channel) = Some(channel);
        Box::pin(async { Ok(()) })
    }

    fn cut(&self, epoch: Epoch) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            let t = Instant::now();
            let blob = self.capture().await.map_err(|e| self.failed(epoch, e))?;
            let mut st = lock(&self.st);
            st.captures += 1;
            st.capture_time.record(t.elapsed());
            st.last_bytes = blob.len() as u64;
            st.epoch = Some(epoch);
            st.last = Some(blob.clone());
            st.blob = blob;
            Ok(())
        })
    }

    fn prepare(&self, epoch: Epoch) -> BoxFuture<'_, Result<EpochSummary, EpochError>> {
        Box::pin(async move {
            let blob = {
                let mut st = lock(&self.st);
                if st.epoch != Some(epoch) {
                    drop(st);
                    return Err(self.failed(epoch, format!("no device state captured for {epoch}")));
                }
                st.epoch = None;
                std::mem::take(&mut st.blob)
            };
            let channel = lock(&self.channel)
                .clone()
                .ok_or_else(|| self.failed(epoch, "no replication session".into()))?;
            let sum = digest(&blob);
            let mut begin = BEGIN.to_vec();
            for n in [epoch.0, blob.len() as u64, sum] {
                begin.extend_from_slice(&n.to_le_bytes());
            }
            channel
                .call(begin)
                .await
                .map_err(|e| self.failed(epoch, e))?;
            let mut items = 0;
            for (i, chunk) in blob.chunks(CHUNK).enumerate() {
                let mut m = DATA.to_vec();
                m.extend_from_slice(&epoch.0.to_le_bytes());
                m.extend_from_slice(&((i * CHUNK) as u64).to_le_bytes());
                m.extend_from_slice(chunk);
                channel.call(m).await.map_err(|e| self.failed(epoch, e))?;
                items += 1;
            }
            Ok(EpochSummary {
                participant: DEVICE_ID,
                items,
                bytes: blob.len() as u64,
                digest: sum,
            })
        })
    }

    fn commit(&self, _epoch: Epoch) {}

    fn abort(&self, _epoch: Epoch, _reason: &EpochError) {
        let mut st = lock(&self.st);
        st.epoch = None;
        st.blob = Vec::new();
    }

    fn status(&self) -> Value {
        let st = lock(&self.st);
        json!({
            "scratch": self.scratch,
            "captures": st.captures,
            "failures": st.failures,
            "last_bytes": st.last_bytes,
            "capture_us": st.capture_time.summary(),
            "last_error": st.last_error,
        })
    }
}

#[derive(Default)]
struct Staged {
    epoch: u64,
    len: u64,
    digest: u64,
    data: Vec<u8>,
}

#[derive(Default)]
struct ReplicaState {
    staged: Option<Staged>,
    committed: Option<u64>,
    commits: u64,
    last_bytes: u64,
}

/// The secondary's half: stages the device state of each epoch, writes it durably as
/// `PATH.<epoch>` at prepare, and at failover puts the committed epoch's at `PATH`.
pub struct DeviceReplica {
    path: PathBuf,
    st: Mutex<ReplicaState>,
}

impl std::fmt::Debug for DeviceReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceReplica")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DeviceReplica {
    /// Device state kept at `path` (and `path.<epoch>` per prepared epoch).
    pub fn new(path: &Path) -> DeviceReplica {
        DeviceReplica {
            path: path.to_path_buf(),
            st: Mutex::new(ReplicaState::default()),
        }
    }

    fn epoch_path(&self, epoch: u64) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{epoch}"));
        PathBuf::from(p)
    }

    /// Epoch files `PATH.<n>` in the directory, with their epochs.
    fn epoch_files(&self) -> Vec<(u64, PathBuf)> {
        let (Some(dir), Some(base)) = (self.path.parent(), self.path.file_name()) else {
            return Vec::new();
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let prefix = format!("{}.", base.to_string_lossy());
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix(&prefix)?;
                let n = n.strip_suffix(".tmp").unwrap_or(n);
                Some((n.parse().ok()?, e.path()))
            })
            .collect()
    }
}

fn le(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| "device state message too short".to_string())
}

fn fsync_dir(path: &Path) -> Result<(), String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))
}

impl SecondaryParticipant for DeviceReplica {
    fn id(&self) -> u16 {
        DEVICE_ID
    }

    fn name(&self) -> &str {
        "device"
    }

    fn resume(&self, _epoch: u64) {
        lock(&self.st).staged = None;
    }

    fn receive(&self, m: &[u8]) -> Result<Vec<u8>, String> {
        let mut st = lock(&self.st);
        match m.get(..2) {
            Some(k) if k == BEGIN => {
                let (epoch, len, digest) = (le(m, 2)?, le(m, 10)?, le(m, 18)?);
                if len > MAX_DEVICE_STATE {
                    return Err(format!(
                        "device state of {len} bytes is over the bound of {MAX_DEVICE_STATE}"
                    ));
                }
                st.staged = Some(Staged {
                    epoch,
                    len,
                    digest,
                    data: Vec::with_capacity(len as usize),
                });
                Ok(Vec::new())
            }
            Some(k) if k == DATA => {
                let (epoch, offset) = (le(m, 2)?, le(m, 10)?);
                let data = &m[18..];
                let s = st
                    .staged
                    .as_mut()
                    .filter(|s| s.epoch == epoch)
                    .ok_or_else(|| {
                        format!("device state data for epoch {epoch} without its BEGIN")
                    })?;
                if offset != s.data.len() as u64 || offset + data.len() as u64 > s.len {
                    return Err(format!(
                        "device state data at {offset}+{} does not follow {} of {} bytes",
                        data.len(),
                        s.data.len(),
                        s.len
                    ));
                }
                s.data.extend_from_slice(data);
                Ok(Vec::new())
            }
            _ => Err("not a device state message".into()),
        }
    }

    fn prepare<'a>(
        &'a self,
        epoch: u64,
        summary: &'a EpochSummary,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let data = {
                let mut st = lock(&self.st);
                let s = st
                    .staged
                    .take()
                    .filter(|s| s.epoch == epoch)
                    .ok_or_else(|| format!("no device state staged for epoch {epoch}"))?;
                let whole = s.data.len() as u64 == s.len;
                if !whole
                    || s.len != summary.bytes
                    || s.digest != summary.digest
                    || digest(&s.data) != s.digest
                {
                    return Err(format!(
                        "device state of epoch {epoch} is incomplete or corrupt ({} of {} bytes)",
                        s.data.len(),
                        s.len
                    ));
                }
                s.data
            };
            let fin = self.epoch_path(epoch);
            let mut tmp = fin.clone().into_os_string();
            tmp.push(".tmp");
            let tmp = PathBuf::from(tmp);
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &fin)
            };
            write().map_err(|e| format!("writing {}: {e}", fin.display()))?;
            fsync_dir(&fin)?;
            lock(&self.st).last_bytes = data.len() as u64;
            Ok(())
        })
    }

    fn commit(&self, epoch: u64) {
        {
            let mut st = lock(&self.st);
            st.committed = Some(epoch);
            st.commits += 1;
        }
        // The previous epoch's file stays until the next commit: until the commit of `epoch`
        // is durable everywhere, a failover may still pick it.
        for (e, p) in self.epoch_files() {
            if e + 1 < epoch {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn abort(&self, epoch: u64, _reason: &str) {
        let mut st = lock(&self.st);
        if st.staged.as_ref().is_some_and(|s| s.epoch == epoch) {
            st.staged = None;
        }
        drop(st);
        let _ = std::fs::remove_file(self.epoch_path(epoch));
    }

    fn failover(
        &self,
        target: FailoverTarget,
        committed: u64,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            lock(&self.st).staged = None;
            if target == FailoverTarget::Latest {
                tracing::warn!("failover --to latest: the VM's device state is the last checkpoint's, its disk is newer; restart the VM from its disk instead of resuming it");
            }
            let from = self.epoch_path(committed);
            if !from.exists() {
                tracing::warn!(path = %from.display(), epoch = committed, "no device state for the committed checkpoint: the VM cannot be resumed, only restarted");
                return Ok(());
            }
            std::fs::rename(&from, &self.path)
                .map_err(|e| format!("{} → {}: {e}", from.display(), self.path.display()))?;
            fsync_dir(&self.path)?;
            tracing::info!(path = %self.path.display(), epoch = committed, "device state of the committed checkpoint is in place");
            Ok(())
        })
    }

    fn status(&self) -> Value {
        let st = lock(&self.st);
        json!({
            "path": self.path,
            "committed_epoch": st.committed,
            "commits": st.commits,
            "last_bytes": st.last_bytes,
        })
    }
}

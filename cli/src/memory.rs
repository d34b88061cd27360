//! `--memory PATH[,writer=SOCKET]`: shared-memory regions replicated with the disk (memrep).
//!
//! On the primary each region gets a participant in the checkpoint epochs. Its dirty pages are
//! found by scanning (hashing every page) until a writer process hands over its userfaultfd on
//! `SOCKET`; from then on by userfaultfd write-protect and `PAGEMAP_SCAN`, and that writer is
//! paused at a consistent point around every cut. On the secondary each region is the copy
//! that holds the last committed checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkrep::epoch::{Participant, SecondaryParticipant};
use memrep::handoff::{answer, receive_handover};
use memrep::pause::WriterPause;
use memrep::primary::{MemoryOptions, MemoryParticipant};
use memrep::region::Region;
use memrep::secondary::MemoryReplica;
use memrep::track::scan::ScanTracker;
use memrep::track::softdirty::{find_writer, SoftDirtyTracker};
use memrep::track::uffd::UffdTracker;
use memrep::track::TrackerKind;

/// One `--memory` value.
#[derive(Debug, Clone)]
pub struct MemoryArg {
    path: PathBuf,
    writer: Option<PathBuf>,
}

impl std::str::FromStr for MemoryArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = PathBuf::from(parts.next().unwrap_or_default());
        if path.as_os_str().is_empty() {
            return Err("a memory region is PATH[,writer=SOCKET]".into());
        }
        let mut writer = None;
        for p in parts {
            match p.split_once('=') {
                Some(("writer", sock)) if !sock.is_empty() => writer = Some(PathBuf::from(sock)),
                _ => {
                    return Err(format!(
                        "unknown region option {p:?} (PATH[,writer=SOCKET])"
                    ))
                }
            }
        }
        Ok(MemoryArg { path, writer })
    }
}

/// How long a writer may take to reach a pause point.
const WRITER_PATIENCE: Duration = Duration::from_secs(2);
/// How long a writer may take to send its hand-over once connected.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The primary's regions: their participants, the hook that pauses their writers, and the
/// sockets writers hand over on.
pub struct PrimaryMemory {
    pub participants: Vec<Arc<dyn Participant>>,
    pub pause: Arc<WriterPause>,
    writers: Vec<(MemoryParticipant, PathBuf)>,
    /// Regions without a writer socket: a VM's RAM, tracked by soft-dirty bits once its
    /// QEMU is found ([`PrimaryMemory::follow_vm`]).
    others: Vec<MemoryParticipant>,
}

/// Open every region (a clear error for a missing or unusable file) and build its participant.
pub fn primary(args: &[MemoryArg]) -> anyhow::Result<PrimaryMemory> {
    let uffd = memrep::track::probe_uffd();
    let mut out = PrimaryMemory {
        participants: Vec::new(),
        pause: Arc::new(WriterPause::new(WRITER_PATIENCE)),
        writers: Vec::new(),
        others: Vec::new(),
    };
    for (i, a) in args.iter().enumerate() {
        let region = Arc::new(
            Region::open(&a.path).with_context(|| format!("--memory {}", a.path.display()))?,
        );
        let note = match (&a.writer, &uffd) {
            (Some(s), Ok(())) => format!(
                "scan: waiting for the writer to hand over its userfaultfd on {}",
                s.display()
            ),
            (Some(_), Err(why)) => format!("scan: userfaultfd tracking is unavailable here: {why}"),
            (None, _) => "scan: no writer socket (--memory PATH,writer=SOCKET), so lockstep cannot see the writer's page tables".to_string(),
        };
        let p = MemoryParticipant::new(
            region,
            Box::new(ScanTracker::new(memrep::digest::default_threads())),
            note,
            MemoryOptions::for_region(i),
        );
        if let (Some(s), Ok(())) = (&a.writer, &uffd) {
            out.writers.push((p.clone(), s.clone()));
        } else if a.writer.is_none() {
            out.others.push(p.clone());
        }
        out.participants.push(Arc::new(p));
    }
    Ok(out)
}

impl PrimaryMemory {
    /// Listen for writers' hand-overs (in the daemon's runtime).
    pub async fn serve_writers(&self) -> anyhow::Result<()> {
        for (p, sock) in &self.writers {
            // A socket left by an earlier run is ours to replace.
            let _ = std::fs::remove_file(sock);
            let l = tokio::net::UnixListener::bind(sock)
                .with_context(|| format!("listening for the writer on {}", sock.display()))?;
            tokio::spawn(accept_writers(l, p.clone(), self.pause.clone()));
        }
        Ok(())
    }
}

impl PrimaryMemory {
    /// With `--qmp` (the VM is stopped at every cut, which soft-dirty tracking needs): look for
    /// the process that maps each writer-less region (QEMU) every half second while the region
    /// is scanned, and track it by its soft-dirty bits once found. If it goes away, tracking
    /// falls back to scanning and the search resumes.
    pub fn follow_vm(&self) {
        if let Err(why) = memrep::track::softdirty::probe() {
            for p in &self.others {
                p.note(format!("scan: the VM's writes cannot be tracked: {why}"));
            }
            return;
        }
        for p in self.others.clone() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tick.tick().await;
                    if p.tracker() != TrackerKind::Scan {
                        continue;
                    }
                    let region = p.region().clone();
                    let found = tokio::task::spawn_blocking(move || {
                        let pid = find_writer(region.path())?;
                        Some((pid, SoftDirtyTracker::attach(pid, &region)))
                    })
                    .await
                    .ok()
                    .flatten();
                    match found {
                        Some((pid, Ok(t))) => p.set_tracker(
                            Box::new(t),
                            format!("soft-dirty: process {pid} maps the region (the VM's RAM)"),
                        ),
                        Some((pid, Err(e))) => {
                            p.note(format!("scan: process {pid} maps the region, but: {e}"))
                        }
                        None => p.note("scan: no other process maps the region yet"),
                    }
                }
            });
        }
    }
}

async fn accept_writers(
    l: tokio::net::UnixListener,
    p: MemoryParticipant,
    pause: Arc<WriterPause>,
) {
    loop {
        let Ok((s, _)) = l.accept().await else {
            return;
        };
        let (p, pause) = (p.clone(), pause.clone());
        tokio::task::spawn_blocking(move || {
            let r = s
                .into_std()
                .and_then(|s| s.set_nonblocking(false).map(|()| s));
            match r {
                Ok(s) => take_handover(&p, &pause, s),
                Err(e) => tracing::warn!("a writer's connection: {e}"),
            }
        });
    }
}

/// Check a writer's hand-over against the region and switch the region to uffd tracking.
fn take_handover(p: &MemoryParticipant, pause: &WriterPause, s: std::os::unix::net::UnixStream) {
    let r = (|| -> Result<u32, String> {
        let h = receive_handover(&s, HANDOVER_TIMEOUT).map_err(|e| e.to_string())?;
        let region = p.region();
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same(&h.path, region.path()) {
            return Err(format!(
                "the writer maps {}, this region is {}",
                h.path.display(),
                region.path().display()
            ));
        }
        if h.len != region.len() {
            return Err(format!(
                "the writer registered {} bytes, the region has {}",
                h.len,
                region.len()
            ));
        }
        let pid = h.pid;
        let t = UffdTracker::from_handover(h).map_err(|e| e.to_string())?;
        p.set_tracker(
            Box::new(t),
            format!("uffd: writer pid {pid} handed over its userfaultfd"),
        );
        Ok(pid)
    })();
    let _ = answer(&s, &r.as_ref().map(drop).map_err(Clone::clone));
    match r {
        Ok(pid) => {
            if let Err(e) = pause.add(pid, s) {
                tracing::warn!(pid, "cannot pause the writer at checkpoints: {e}");
            }
        }
        Err(e) => {
            tracing::warn!(region = %p.region().path().display(), "a writer's hand-over was refused: {e}");
            p.note(format!("scan: a writer's hand-over was refused: {e}"));
        }
    }
}

/// The secondary's regions.
pub fn secondary(args: &[MemoryArg]) -> anyhow::Result<Vec<Arc<dyn SecondaryParticipant>>> {
    args.iter()
        .enumerate()
        .map(|(i, a)| {
            if a.writer.is_some() {
                return Err(anyhow!(
                    "--memory {}: writer= is for the primary; the secondary's region has no writer until it takes over",
                    a.path.display()
                ));
            }
            let region = Region::open(&a.path).with_context(|| format!("--memory {}", a.path.display()))?;
            let r: Arc<dyn SecondaryParticipant> = Arc::new(MemoryReplica::new(
                memrep::primary::participant_id(i),
                format!("memory{i}"),
                Arc::new(region),
            ));
            Ok(r)
        })
        .collect()
}

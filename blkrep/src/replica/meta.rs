//! What a node keeps about its disk across restarts: generation identifiers and whether the
//! disk holds a checkpoint at rest.
//!
//! ```text
//!  DISK.lockstep-meta (JSON, replaced atomically: write tmp, fsync, rename, fsync dir)
//!    generation   the data lineage the disk belongs to (random u64, never 0)
//!    history      older generations this disk descends from, newest first
//!    clean        true: the disk is exactly a checkpoint, with nothing written after it
//!    committed    the last committed epoch this node knew of
//! ```
//!
//! Generations work as DRBD's data-generation UUIDs do. Two nodes in sync share one
//! generation. A node that starts writing as a primary without its peer (the link is down,
//! it failed over) starts a new generation whose parent is the old one. At connect time the
//! secondary compares the primary's generation and history with its own:
//!
//! | relation | meaning | what happens |
//! |---|---|---|
//! | equal | same lineage | resync what may differ (incremental if the primary tracked it) |
//! | secondary's is in the primary's history | the secondary is behind | resync |
//! | primary's is in the secondary's history | the secondary wrote as a primary later | refused |
//! | unrelated, or both moved on from a common parent | split-brain | refused, unless the secondary discards its data |

use crate::sync::Locked;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Most generations kept in the history.
pub const HISTORY: usize = 16;

/// A node's persistent replication metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeMeta {
    /// The current data generation.
    pub generation: u64,
    /// Earlier generations, newest first.
    pub history: Vec<u64>,
    /// The disk is exactly a checkpoint (or an unreplicated primary's disk at rest).
    pub clean: bool,
    /// The last committed epoch this node knew of.
    pub committed: u64,
}

/// Why metadata could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The file exists but is not ours.
    #[error("{path}: not lockstep metadata: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A fresh random generation id (never 0).
pub fn new_generation() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64 finaliser: spreads nearby clocks apart.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x.max(1)
}

impl NodeMeta {
    /// Metadata of a disk that starts a lineage of its own.
    pub fn fresh() -> Self {
        Self {
            generation: new_generation(),
            history: Vec::new(),
            clean: true,
            committed: 0,
        }
    }

    /// Start a new generation descending from the current one.
    pub fn bump(&mut self) {
        self.history.insert(0, self.generation);
        self.history.truncate(HISTORY);
        self.generation = new_generation();
    }

    /// Take over another node's lineage (after a complete sync from it).
    pub fn adopt(&mut self, generation: u64, history: &[u64]) {
        self.generation = generation;
        self.history = history.iter().copied().take(HISTORY).collect();
    }

    /// Whether `g` is this node's current generation or one it descends from.
    pub fn knows(&self, g: u64) -> bool {
        g == self.generation || self.history.contains(&g)
    }
}

/// Where the metadata of `disk` lives.
pub fn meta_path(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".lockstep-meta");
    p.into()
}

/// Read the metadata at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<NodeMeta>, MetaError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MetaError::Io {
                path: path.into(),
                source,
            })
        }
    };
    let m: NodeMeta = serde_json::from_str(&text).map_err(|e| MetaError::Corrupt {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if m.generation == 0 {
        return Err(MetaError::Corrupt {
            path: path.into(),
            reason: "generation 0".into(),
        });
    }
    Ok(Some(m))
}

/// Replace the metadata at `path` durably.
pub fn store(path: &Path, m: &NodeMeta) -> Result<(), MetaError> {
    let io = |source| MetaError::Io {
        path: path.into(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let mut text = serde_json::to_string_pretty(m).expect("metadata serialises");
    text.push('\n');
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable only once the directory is: without this a crash may bring the
    // old metadata back. A bare file name ("r.img.lockstep-meta") has the parent "", which
    // is the current directory.
    let dir = dir_of(path);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| MetaError::Io {
            path: dir.into(),
            source,
        })?;
    Ok(())
}

/// The directory holding `path` ("." for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A node's metadata and where it is kept (None: in memory only, for tests).
#[derive(Debug)]
pub struct MetaStore {
    path: Option<PathBuf>,
    meta: std::sync::Mutex<NodeMeta>,
}

impl MetaStore {
    /// Load `path`, or start fresh (and store it) when there is none. `existed` tells which.
    pub fn open(path: PathBuf) -> Result<(Self, bool), MetaError> {
        let (meta, existed) = match load(&path)? {
            Some(m) => (m, true),
            None => {
                let m = NodeMeta::fresh();
                store(&path, &m)?;
                (m, false)
            }
        };
        Ok((
            Self {
                path: Some(path),
                meta: std::sync::Mutex::new(meta),
            },
            existed,
        ))
    }

    /// Metadata that lives in memory only.
    pub fn in_memory(meta: NodeMeta) -> Self {
        Self {
            path: None,
            meta: std::sync::Mutex::new(meta),
        }
    }

    /// A copy of the metadata.
    pub fn get(&self) -> NodeMeta {
        self.meta.locked().clone()
    }

    /// Change the metadata and store it; an error leaves the stored copy as it was, and the
    /// change is kept in memory.
    pub fn update(&self, f: impl FnOnce(&mut NodeMeta)) -> Result<NodeMeta, MetaError> {
        let mut m = self.meta.locked();
        f(&mut m);
        let copy = m.clone();
        if let Some(p) = &self.path {
            store(p, &copy)?;
        }
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lineage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img.lockstep-meta");
        assert!(load(&p).unwrap().is_none());
        let (s, existed) = MetaStore::open(p.clone()).unwrap();
        assert!(!existed);
        let g0 = s.get().generation;
        s.update(|m| m.bump()).unwrap();
        let m = load(&p).unwrap().unwrap();
        assert_ne!(m.generation, g0);
        assert_eq!(m.history, vec![g0]);
        assert!(m.knows(g0) && m.knows(m.generation) && !m.knows(g0 ^ 1));
        std::fs::write(&p, "{nonsense").unwrap();
        assert!(matches!(load(&p), Err(MetaError::Corrupt { .. })));
    }

    #[test]
    fn a_bare_file_name_syncs_the_current_directory() {
        assert_eq!(dir_of(Path::new("r.img.lockstep-meta")), Path::new("."));
        assert_eq!(dir_of(Path::new("/r.img.lockstep-meta")), Path::new("/"));
        assert_eq!(dir_of(Path::new("a/r.img.lockstep-meta")), Path::new("a"));
        // A store through a relative path works (the test runs in the crate directory, so
        // the file goes to a temporary directory through a relative path from there).
        let dir = tempfile::tempdir_in(".").unwrap();
        let name = dir.path().file_name().unwrap();
        let rel = Path::new(name).join("r.img.lockstep-meta");
        store(&rel, &NodeMeta::fresh()).unwrap();
        assert!(load(&rel).unwrap().is_some());
    }
}

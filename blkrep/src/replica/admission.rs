//! The admission rule: may a primary that says HELLO replicate to this secondary, and how
//! must it bring the disk up to date? A pure function of this node's metadata, its standing
//! and the HELLO, in the spirit of DRBD's comparison of data generations: tested without
//! sockets or disks.
//!
//! | this node                          | the primary's data                   | decision        |
//! |------------------------------------|--------------------------------------|-----------------|
//! | busy (syncing, replicating, …)     | any                                  | refused: busy   |
//! | failed over (now a primary)        | an ancestor of ours / diverged       | refused         |
//! | disk size differs                  | any                                  | refused         |
//! | fresh (never in sync), empty disk  | any                                  | full sync       |
//! | fresh, disk has data               | any                                  | checksum sync   |
//! | same generation, or ours is in the primary's history | the primary tracked our generation | incremental |
//! | same lineage otherwise             |                                      | checksum sync   |
//! | ours is newer, or diverged         | …                                    | refused, unless `--discard-my-data` (checksum sync) |

use super::meta::NodeMeta;
use super::refusal::{Lineage, Refusal};
use super::wire::SyncKind;

/// Where this node stands when a HELLO arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Waiting for a primary, or paused after losing one: free to take a primary.
    Free,
    /// Failed over: serving as a primary itself.
    FailedOver,
    /// In a state that takes no primary (named).
    Busy(&'static str),
}

/// This node's side of the decision.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    /// Persistent metadata (generation, history).
    pub meta: &'a NodeMeta,
    /// Where the node stands.
    pub standing: Standing,
    /// The disk has never been in sync with a primary.
    pub fresh: bool,
    /// The disk's size in bytes.
    pub disk_size: u64,
    /// The disk holds no data (only read for a fresh disk).
    pub disk_empty: bool,
    /// `--discard-my-data`: accept a sync that overwrites data the primary does not know of.
    pub discard_my_data: bool,
}

/// What the primary says of its data in HELLO.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// Its disk size.
    pub size: u64,
    /// Its current generation.
    pub generation: u64,
    /// The generations its data descends from.
    pub history: &'a [u64],
    /// The generation its dirty bitmap tracks changes since (0: none).
    pub tracked: u64,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// How the disk is brought up to date.
    pub sync: SyncKind,
    /// This node's data the sync overwrites, when `--discard-my-data` allowed it: the refusal
    /// it would otherwise have been, for the log.
    pub discarding: Option<Refusal>,
}

impl Admission {
    fn plain(sync: SyncKind) -> Self {
        Self {
            sync,
            discarding: None,
        }
    }
}

/// Decide whether the primary of `claim` may replicate here, and how it syncs.
pub fn decide(local: &Local<'_>, claim: &Claim<'_>) -> Result<Admission, Refusal> {
    let m = local.meta;
    let lineage = Lineage {
        ours: m.generation,
        theirs: claim.generation,
    };
    match local.standing {
        Standing::Free => {}
        Standing::FailedOver if m.history.contains(&claim.generation) => {
            return Err(Refusal::FailedOver(lineage))
        }
        Standing::FailedOver => return Err(Refusal::FailedOverSplitBrain(lineage)),
        Standing::Busy(mode) => return Err(Refusal::Busy { mode }),
    }
    if claim.size != local.disk_size {
        return Err(Refusal::SizeMismatch {
            primary: claim.size,
            secondary: local.disk_size,
        });
    }
    if local.fresh {
        return Ok(Admission::plain(if local.disk_empty {
            SyncKind::Full
        } else {
            SyncKind::Checksum
        }));
    }
    if m.generation == claim.generation || claim.history.contains(&m.generation) {
        // Same lineage, or this disk is behind the primary's: nothing of ours is lost.
        return Ok(Admission::plain(
            if claim.tracked != 0 && claim.tracked == m.generation {
                SyncKind::Incremental
            } else {
                SyncKind::Checksum
            },
        ));
    }
    let refusal = if m.history.contains(&claim.generation) {
        Refusal::NewerHere(lineage)
    } else {
        Refusal::SplitBrain(lineage)
    };
    if local.discard_my_data {
        return Ok(Admission {
            sync: SyncKind::Checksum,
            discarding: Some(refusal),
        });
    }
    Err(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn meta(generation: u64, history: &[u64]) -> NodeMeta {
        NodeMeta {
            generation,
            history: history.to_vec(),
            ..NodeMeta::fresh()
        }
    }

    fn local(meta: &NodeMeta) -> Local<'_> {
        Local {
            meta,
            standing: Standing::Free,
            fresh: false,
            disk_size: SIZE,
            disk_empty: false,
            discard_my_data: false,
        }
    }

    fn claim(generation: u64, history: &[u64], tracked: u64) -> Claim<'_> {
        Claim {
            size: SIZE,
            generation,
            history,
            tracked,
        }
    }

    fn sync(r: Result<Admission, Refusal>) -> SyncKind {
        r.expect("admitted").sync
    }

    #[test]
    fn a_fresh_disk_syncs_fully_when_empty_else_by_checksum() {
        let m = meta(7, &[]);
        let mut l = local(&m);
        l.fresh = true;
        l.disk_empty = true;
        assert_eq!(sync(decide(&l, &claim(1, &[], 0))), SyncKind::Full);
        l.disk_empty = false;
        assert_eq!(sync(decide(&l, &claim(1, &[], 0))), SyncKind::Checksum);
    }

    #[test]
    fn the_same_lineage_syncs_incrementally_only_when_tracked_from_our_generation() {
        let m = meta(5, &[3]);
        let l = local(&m);
        assert_eq!(sync(decide(&l, &claim(5, &[3], 5))), SyncKind::Incremental);
        assert_eq!(sync(decide(&l, &claim(5, &[3], 0))), SyncKind::Checksum);
        // The primary moved on from our generation (it failed over and came back, say).
        assert_eq!(
            sync(decide(&l, &claim(9, &[5, 3], 5))),
            SyncKind::Incremental
        );
        assert_eq!(sync(decide(&l, &claim(9, &[5, 3], 8))), SyncKind::Checksum);
    }

    #[test]
    fn newer_or_diverged_data_is_refused_unless_discarded() {
        let m = meta(9, &[5]);
        let mut l = local(&m);
        assert!(matches!(
            decide(&l, &claim(5, &[], 5)),
            Err(Refusal::NewerHere(_))
        ));
        assert!(matches!(
            decide(&l, &claim(6, &[5], 6)),
            Err(Refusal::SplitBrain(_))
        ));
        l.discard_my_data = true;
        let a = decide(&l, &claim(6, &[5], 6)).unwrap();
        assert_eq!(a.sync, SyncKind::Checksum);
        assert!(matches!(a.discarding, Some(Refusal::SplitBrain(_))));
    }

    #[test]
    fn a_failed_over_or_busy_node_takes_no_primary() {
        let m = meta(9, &[5]);
        let mut l = local(&m);
        l.standing = Standing::FailedOver;
        assert!(matches!(
            decide(&l, &claim(5, &[], 5)),
            Err(Refusal::FailedOver(_))
        ));
        assert!(matches!(
            decide(&l, &claim(6, &[5], 6)),
            Err(Refusal::FailedOverSplitBrain(_))
        ));
        l.standing = Standing::Busy("syncing");
        assert_eq!(
            decide(&l, &claim(9, &[5], 9)),
            Err(Refusal::Busy { mode: "syncing" })
        );
    }

    #[test]
    fn sizes_must_match() {
        let m = meta(5, &[]);
        let l = local(&m);
        let mut c = claim(5, &[], 5);
        c.size = SIZE + 4096;
        assert_eq!(
            decide(&l, &c),
            Err(Refusal::SizeMismatch {
                primary: SIZE + 4096,
                secondary: SIZE
            })
        );
    }
}

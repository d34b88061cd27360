//! Why a secondary refuses a primary or ends its session: [`Refusal`], sent on the wire as a
//! code ([`RefusalCode`]) with a sentence for the operator.
//!
//! The code lets the primary decide without reading the sentence (a busy secondary is worth
//! retrying, a split-brain is not). The sentence the peer gets never names this node's
//! generations: a peer that learned them could pose as a primary of this node's lineage in
//! its next HELLO. The whole story, generations included, stays in this node's log
//! ([`Refusal::local`]).

/// The generations behind a lineage refusal; kept on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lineage {
    /// This node's generation.
    pub ours: u64,
    /// The connecting primary's.
    pub theirs: u64,
}

impl std::fmt::Display for Lineage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this node's generation {:016x}, the primary's {:016x}",
            self.ours, self.theirs
        )
    }
}

/// Why a primary may not replicate here (or may no longer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The secondary is in a state that takes no new primary (`mode`).
    Busy {
        /// The secondary's mode.
        mode: &'static str,
    },
    /// This node failed over; the connecting primary's data is an ancestor of its own.
    FailedOver(Lineage),
    /// This node failed over and the connecting primary has written since: split-brain.
    FailedOverSplitBrain(Lineage),
    /// The disks differ in size.
    SizeMismatch {
        /// The primary's size in bytes.
        primary: u64,
        /// This disk's.
        secondary: u64,
    },
    /// This disk holds data written after the primary's (it was a primary later).
    NewerHere(Lineage),
    /// Both disks were written since they were last in sync.
    SplitBrain(Lineage),
    /// This node's disk failed (reading for a comparison, rolling back).
    Disk(String),
    /// The HELLO was malformed or asked for something out of range.
    Hello(String),
    /// The primary broke the protocol during the session (unexpected message, a request
    /// out of range, a flood).
    Protocol(String),
}

/// A refusal's code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// See [`Refusal::Busy`].
    Busy,
    /// See [`Refusal::FailedOver`].
    FailedOver,
    /// See [`Refusal::FailedOverSplitBrain`].
    FailedOverSplitBrain,
    /// See [`Refusal::SizeMismatch`].
    SizeMismatch,
    /// See [`Refusal::NewerHere`].
    NewerHere,
    /// See [`Refusal::SplitBrain`].
    SplitBrain,
    /// See [`Refusal::Disk`].
    Disk,
    /// See [`Refusal::Hello`].
    Hello,
    /// See [`Refusal::Protocol`].
    Protocol,
    /// A code this version does not know (a newer peer).
    Other(u16),
}

impl RefusalCode {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Busy => 1,
            Self::FailedOver => 2,
            Self::FailedOverSplitBrain => 3,
            Self::SizeMismatch => 4,
            Self::NewerHere => 5,
            Self::SplitBrain => 6,
            Self::Disk => 7,
            Self::Hello => 8,
            Self::Protocol => 9,
            Self::Other(c) => c,
        }
    }

    /// The code read from the wire.
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::Busy,
            2 => Self::FailedOver,
            3 => Self::FailedOverSplitBrain,
            4 => Self::SizeMismatch,
            5 => Self::NewerHere,
            6 => Self::SplitBrain,
            7 => Self::Disk,
            8 => Self::Hello,
            9 => Self::Protocol,
            c => Self::Other(c),
        }
    }

    /// Whether retrying later can help without an operator: only a busy secondary or a
    /// disk error may go away by itself.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Busy | Self::Disk | Self::Other(_))
    }
}

impl Refusal {
    /// The code on the wire.
    pub fn code(&self) -> RefusalCode {
        match self {
            Self::Busy { .. } => RefusalCode::Busy,
            Self::FailedOver(_) => RefusalCode::FailedOver,
            Self::FailedOverSplitBrain(_) => RefusalCode::FailedOverSplitBrain,
            Self::SizeMismatch { .. } => RefusalCode::SizeMismatch,
            Self::NewerHere(_) => RefusalCode::NewerHere,
            Self::SplitBrain(_) => RefusalCode::SplitBrain,
            Self::Disk(_) => RefusalCode::Disk,
            Self::Hello(_) => RefusalCode::Hello,
            Self::Protocol(_) => RefusalCode::Protocol,
        }
    }

    fn lineage(&self) -> Option<&Lineage> {
        match self {
            Self::FailedOver(l)
            | Self::FailedOverSplitBrain(l)
            | Self::NewerHere(l)
            | Self::SplitBrain(l) => Some(l),
            _ => None,
        }
    }

    /// The sentence the peer gets: no generations.
    pub fn reason(&self) -> String {
        match self {
            Self::Busy { mode } => format!("this secondary is {mode} and takes no new primary"),
            Self::FailedOver(_) => "this node failed over and serves as the primary now, with data that descends from the connecting primary's; to re-protect it, restart the old primary's node as a secondary of this one".into(),
            Self::FailedOverSplitBrain(_) => "split-brain: this node failed over and the connecting primary has written data of its own since; neither disk is a copy of the other. Choose the survivor and restart the other node as its secondary with --discard-my-data".into(),
            Self::SizeMismatch { primary, secondary } => format!(
                "disk sizes differ: primary {}, secondary {}",
                crate::units::size(*primary),
                crate::units::size(*secondary)
            ),
            Self::NewerHere(_) => format!("this disk holds newer data than the primary's: it was written as a primary after the primary's data. {}", Self::DISCARD_HINT),
            Self::SplitBrain(_) => format!("split-brain: the primary's data and this disk's have both been written since they were last in sync. {}", Self::DISCARD_HINT),
            Self::Disk(e) | Self::Hello(e) | Self::Protocol(e) => e.clone(),
        }
    }

    const DISCARD_HINT: &'static str = "Refusing to replicate: restart this secondary with --discard-my-data to take the primary's data, or make this node the primary";

    /// The whole story, for this node's operator.
    pub fn local(&self) -> String {
        match self.lineage() {
            Some(l) => format!("{} ({l})", self.reason()),
            None => self.reason(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.local())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_survive() {
        for c in 0..=20u16 {
            assert_eq!(RefusalCode::from_u16(c).to_u16(), c);
        }
        assert_eq!(RefusalCode::from_u16(6), RefusalCode::SplitBrain);
        assert!(!RefusalCode::SplitBrain.is_transient());
        assert!(RefusalCode::Busy.is_transient());
    }

    #[test]
    fn the_peer_never_learns_generations() {
        let l = Lineage {
            ours: 0x1111_2222_3333_4444,
            theirs: 0x5555_6666_7777_8888,
        };
        for r in [
            Refusal::SplitBrain(l),
            Refusal::NewerHere(l),
            Refusal::FailedOver(l),
            Refusal::FailedOverSplitBrain(l),
        ] {
            assert!(!r.reason().contains("1111222233334444"), "{r:?}");
            assert!(!r.reason().contains("5555666677778888"), "{r:?}");
            assert!(r.local().contains("1111222233334444"), "{r:?}");
        }
    }
}

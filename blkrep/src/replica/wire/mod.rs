//! The replication control protocol between primary and secondary: a pure codec.
//!
//! A connection to the secondary's `--listen` port starts as NBD; the primary asks for the
//! lockstep option `NBD_OPT_LOCKSTEP_CONTROL`, and after the ACK both sides exchange frames:
//!
//! ```text
//!  0      4        6      8        12               12+len     20+len
//!  magic  version  kind   length   payload ...      crc64
//!  "LSTP" u16 = 3  u16    u32      (length bytes)   u64 over everything before it
//! ```
//!
//! All integers are big-endian (as in NBD). The crc64 (ECMA-182, as crc64fast computes it)
//! covers header and payload. A frame with a wrong magic, an unknown version, a payload over
//! [`MAX_PAYLOAD`] or a bad checksum is an error that ends the connection; an unknown kind
//! with a good checksum is reported as such. See `docs/protocol.md` for the message list.

mod decode;
mod encode;

pub use super::refusal::RefusalCode;
use crate::epoch::EpochSummary;
pub use decode::{decode_body, decode_frame, decode_header};

/// "LSTP".
pub const MAGIC: u32 = 0x4c53_5450;
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// Header bytes before the payload.
pub const HEADER_LEN: usize = 12;
/// Trailer bytes after the payload.
pub const TRAILER_LEN: usize = 8;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// Longest reason string.
const MAX_REASON: usize = 4096;
/// Most generations in a HELLO's history.
pub const MAX_HISTORY: usize = 64;
/// Most units one SUMS request may ask for (its answer stays far below [`MAX_PAYLOAD`]).
pub const MAX_SUM_UNITS: u64 = 4096;
/// The heartbeat periods a secondary accepts in HELLO, in milliseconds: the secondary waits
/// `period × misses` for the next message, so an unbounded period would let a peer hold the
/// session (and block every other primary) with one HELLO.
pub const HEARTBEAT_MS: std::ops::RangeInclusive<u32> = 10..=60_000;

/// Why a heartbeat period in milliseconds is out of [`HEARTBEAT_MS`], if it is.
pub fn check_heartbeat_ms(ms: u32) -> Result<(), String> {
    if HEARTBEAT_MS.contains(&ms) {
        Ok(())
    } else {
        Err(format!(
            "a heartbeat period of {ms} ms is outside the accepted {} ..= {} ms",
            HEARTBEAT_MS.start(),
            HEARTBEAT_MS.end()
        ))
    }
}

/// How the primary brings the secondary's disk up to date before replication (re)starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    /// Compare the blocks the primary recorded as possibly different, resend those that are.
    Incremental,
    /// Compare every chunk of the disk by digest, send the chunks that differ.
    Checksum,
    /// The secondary is empty: send every allocated block of the primary.
    Full,
}

impl SyncKind {
    fn to_u8(self) -> u8 {
        match self {
            SyncKind::Incremental => 1,
            SyncKind::Checksum => 2,
            SyncKind::Full => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => SyncKind::Incremental,
            2 => SyncKind::Checksum,
            3 => SyncKind::Full,
            _ => return None,
        })
    }
    /// The name used in logs and status.
    pub fn name(self) -> &'static str {
        match self {
            SyncKind::Incremental => "incremental",
            SyncKind::Checksum => "checksum",
            SyncKind::Full => "full",
        }
    }
}

/// What the primary waits for before it acknowledges a write to its client: DRBD's
/// protocols A, B and C, plus a mode that makes every write durable on both nodes.
///
/// The wire numbers are stable: 1 and 2 keep the meanings the modes called `received` and
/// `durable` had before the modes took DRBD's names, so a peer of that age that sends them
/// gets what it asked for under the new names (`durable`, `sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Protocol A: the local disk has it; forwarding is queued.
    Local,
    /// Protocol B: the secondary has received it (in its memory; it is applied after the
    /// answer, before any later FLUSH, checkpoint or failover completes there).
    Received,
    /// Protocol C: the secondary has written it to its disk as the primary wrote it to its
    /// own (both completed writes; neither is synced).
    Durable,
    /// Every write is on stable storage on both nodes before it completes (FUA on both).
    Sync,
}

impl AckMode {
    fn to_u8(self) -> u8 {
        match self {
            AckMode::Local => 0,
            AckMode::Durable => 1,
            AckMode::Sync => 2,
            AckMode::Received => 3,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => AckMode::Local,
            1 => AckMode::Durable,
            2 => AckMode::Sync,
            3 => AckMode::Received,
            _ => return None,
        })
    }
    /// The name used on the command line and in status.
    pub fn name(self) -> &'static str {
        match self {
            AckMode::Local => "local",
            AckMode::Received => "received",
            AckMode::Durable => "durable",
            AckMode::Sync => "sync",
        }
    }
    /// Every mode, in the order of the promise they make.
    pub const ALL: [AckMode; 4] = [
        AckMode::Local,
        AckMode::Received,
        AckMode::Durable,
        AckMode::Sync,
    ];
}

impl std::str::FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        AckMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown ack mode {s:?} (local, received, durable or sync)"))
    }
}

/// One control message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Primary → secondary, first message: who I am and what my disk is.
    Hello {
        /// Disk size in bytes.
        size: u64,
        /// The primary's data generation (see [`super::meta`]).
        generation: u64,
        /// Generations the primary's data descends from, newest first.
        history: Vec<u64>,
        /// The secondary generation since which the primary has recorded every block it
        /// wrote (its dirty bitmap is valid relative to it); 0: none.
        tracked: u64,
        /// The primary's last committed epoch.
        committed: u64,
        /// Random id of this replication session.
        session: u64,
        /// The primary's ack mode.
        ack: AckMode,
        /// Heartbeat period in milliseconds.
        heartbeat_ms: u32,
    },
    /// Secondary → primary: accepted; here is my side.
    Welcome {
        /// Disk size in bytes.
        size: u64,
        /// The secondary's data generation; sent as 0 (the peer must not learn it).
        generation: u64,
        /// The secondary's last committed epoch.
        committed: u64,
        /// How the primary must bring the secondary up to date.
        sync: SyncKind,
        /// Whether the secondary's disk holds a checkpoint it can fail over to.
        consistent: bool,
    },
    /// Primary → secondary: the digest of each `unit_blocks`-block unit in `units`.
    SumsRequest {
        /// Matches the answer.
        id: u64,
        /// Blocks (4 KiB) per unit.
        unit_blocks: u32,
        /// Unit indexes (unit `u` covers blocks `u * unit_blocks ..`).
        units: roaring::RoaringTreemap,
    },
    /// Secondary → primary: digests in the order of the request's units.
    Sums {
        /// The request's id.
        id: u64,
        /// One digest per unit.
        sums: Vec<u64>,
    },
    /// Primary → secondary: the sync's comparison is done; accept forwarded writes again,
    /// starting in `epoch`. Nothing before it in the interrupted epochs will be committed.
    Resume {
        /// The epoch replication continues in.
        epoch: u64,
    },
    /// Secondary → primary: ready for `epoch`.
    ResumeAck {
        /// The epoch of the RESUME.
        epoch: u64,
    },
    /// Either side: I refuse (and close).
    Refused {
        /// Why, for programs: see [`RefusalCode`].
        code: RefusalCode,
        /// Why, for the operator.
        reason: String,
    },
    /// Primary → secondary: commit `epoch`; these are the participants' summaries.
    Checkpoint {
        /// The epoch to commit.
        epoch: u64,
        /// One per participant.
        summaries: Vec<EpochSummary>,
    },
    /// Secondary → primary: `epoch` is committed.
    Committed {
        /// The committed epoch.
        epoch: u64,
    },
    /// Secondary → primary: `epoch` was not committed (the state stays at the previous one).
    Aborted {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Either side: I am alive.
    Heartbeat {
        /// Sequence number.
        seq: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
    },
    /// Primary → secondary: orderly end of replication (primary shutting down).
    Goodbye {
        /// Why.
        reason: String,
    },
}

mod kind {
    pub const HELLO: u16 = 1;
    pub const WELCOME: u16 = 2;
    pub const REFUSED: u16 = 3;
    pub const CHECKPOINT: u16 = 4;
    pub const COMMITTED: u16 = 5;
    pub const ABORTED: u16 = 6;
    pub const HEARTBEAT: u16 = 7;
    pub const HEARTBEAT_ACK: u16 = 8;
    pub const GOODBYE: u16 = 9;
    pub const SUMS_REQUEST: u16 = 10;
    pub const SUMS: u16 = 11;
    pub const RESUME: u16 = 12;
    pub const RESUME_ACK: u16 = 13;
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not our protocol.
    #[error("bad frame magic {0:#010x} (not a lockstep control frame)")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("control protocol version {0} is not supported (this build speaks {VERSION})")]
    Version(u16),
    /// Payload length over the limit.
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    /// Checksum mismatch: the frame was damaged.
    #[error("frame checksum mismatch (kind {kind}, {len} bytes): damaged in transit")]
    Checksum {
        /// Frame kind.
        kind: u16,
        /// Payload length.
        len: u32,
    },
    /// A well-formed frame of a kind we do not know.
    #[error("unknown control message kind {0}")]
    UnknownKind(u16),
    /// The payload does not match its kind.
    #[error("malformed {kind} message: {reason}")]
    Malformed {
        /// Message name.
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn crc64(parts: &[&[u8]]) -> u64 {
    let mut d = crc64fast::Digest::new();
    for p in parts {
        d.write(p);
    }
    d.sum64()
}

fn kind_name(k: u16) -> &'static str {
    match k {
        kind::HELLO => "HELLO",
        kind::WELCOME => "WELCOME",
        kind::REFUSED => "REFUSED",
        kind::CHECKPOINT => "CHECKPOINT",
        kind::COMMITTED => "COMMITTED",
        kind::ABORTED => "ABORTED",
        kind::HEARTBEAT => "HEARTBEAT",
        kind::HEARTBEAT_ACK => "HEARTBEAT_ACK",
        kind::GOODBYE => "GOODBYE",
        kind::SUMS_REQUEST => "SUMS_REQUEST",
        kind::SUMS => "SUMS",
        kind::RESUME => "RESUME",
        kind::RESUME_ACK => "RESUME_ACK",
        _ => "unknown",
    }
}

#[cfg(test)]
pub(crate) mod tests;

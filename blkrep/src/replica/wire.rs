//! The replication control protocol between primary and secondary: a pure codec.
//!
//! A connection to the secondary's `--listen` port starts as NBD; the primary asks for the
//! lockstep option `NBD_OPT_LOCKSTEP_CONTROL`, and after the ACK both sides exchange frames:
//!
//! ```text
//!  0      4        6      8        12               12+len     20+len
//!  magic  version  kind   length   payload ...      crc64
//!  "LSTP" u16 = 1  u16    u32      (length bytes)   u64 over everything before it
//! ```
//!
//! All integers are big-endian (as in NBD). The crc64 (ECMA-182, as crc64fast computes it)
//! covers header and payload. A frame with a wrong magic, an unknown version, a payload over
//! [`MAX_PAYLOAD`] or a bad checksum is an error that ends the connection; an unknown kind
//! with a good checksum is reported as such. See `docs/protocol.md` for the message list.

pub use super::refusal::RefusalCode;
use crate::epoch::EpochSummary;

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

/// What the primary waits for before it acknowledges a write to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// The local disk has it; forwarding is queued.
    Local,
    /// The secondary has received and applied it (page cache).
    Received,
    /// The secondary has it on stable storage.
    Durable,
}

impl AckMode {
    fn to_u8(self) -> u8 {
        match self {
            AckMode::Local => 0,
            AckMode::Received => 1,
            AckMode::Durable => 2,
        }
    }
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => AckMode::Local,
            1 => AckMode::Received,
            2 => AckMode::Durable,
            _ => return None,
        })
    }
    /// The name used on the command line and in status.
    pub fn name(self) -> &'static str {
        match self {
            AckMode::Local => "local",
            AckMode::Received => "received",
            AckMode::Durable => "durable",
        }
    }
}

impl std::str::FromStr for AckMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(AckMode::Local),
            "received" => Ok(AckMode::Received),
            "durable" => Ok(AckMode::Durable),
            _ => Err(format!(
                "unknown ack mode {s:?} (local, received or durable)"
            )),
        }
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

fn put_reason(out: &mut Vec<u8>, s: &str) {
    let mut s = s;
    if s.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s = &s[..end];
    }
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl Message {
    fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => kind::HELLO,
            Message::Welcome { .. } => kind::WELCOME,
            Message::Refused { .. } => kind::REFUSED,
            Message::Checkpoint { .. } => kind::CHECKPOINT,
            Message::Committed { .. } => kind::COMMITTED,
            Message::Aborted { .. } => kind::ABORTED,
            Message::Heartbeat { .. } => kind::HEARTBEAT,
            Message::HeartbeatAck { .. } => kind::HEARTBEAT_ACK,
            Message::Goodbye { .. } => kind::GOODBYE,
            Message::SumsRequest { .. } => kind::SUMS_REQUEST,
            Message::Sums { .. } => kind::SUMS,
            Message::Resume { .. } => kind::RESUME,
            Message::ResumeAck { .. } => kind::RESUME_ACK,
        }
    }

    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// Encode as one frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Message::Hello {
                size,
                generation,
                history,
                tracked,
                committed,
                session,
                ack,
                heartbeat_ms,
            } => {
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&generation.to_be_bytes());
                let h = &history[..history.len().min(MAX_HISTORY)];
                p.extend_from_slice(&(h.len() as u16).to_be_bytes());
                for g in h {
                    p.extend_from_slice(&g.to_be_bytes());
                }
                p.extend_from_slice(&tracked.to_be_bytes());
                p.extend_from_slice(&committed.to_be_bytes());
                p.extend_from_slice(&session.to_be_bytes());
                p.push(ack.to_u8());
                p.extend_from_slice(&heartbeat_ms.to_be_bytes());
            }
            Message::Welcome {
                size,
                generation,
                committed,
                sync,
                consistent,
            } => {
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&generation.to_be_bytes());
                p.extend_from_slice(&committed.to_be_bytes());
                p.push(sync.to_u8());
                p.push(u8::from(*consistent));
            }
            Message::SumsRequest {
                id,
                unit_blocks,
                units,
            } => {
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(&unit_blocks.to_be_bytes());
                units
                    .serialize_into(&mut p)
                    .expect("serialising into a Vec cannot fail");
            }
            Message::Sums { id, sums } => {
                p.extend_from_slice(&id.to_be_bytes());
                p.extend_from_slice(&(sums.len() as u32).to_be_bytes());
                for s in sums {
                    p.extend_from_slice(&s.to_be_bytes());
                }
            }
            Message::Resume { epoch } | Message::ResumeAck { epoch } => {
                p.extend_from_slice(&epoch.to_be_bytes())
            }
            Message::Refused { code, reason } => {
                p.extend_from_slice(&code.to_u16().to_be_bytes());
                put_reason(&mut p, reason)
            }
            Message::Goodbye { reason } => put_reason(&mut p, reason),
            Message::Checkpoint { epoch, summaries } => {
                p.extend_from_slice(&epoch.to_be_bytes());
                p.extend_from_slice(&(summaries.len() as u16).to_be_bytes());
                for s in summaries {
                    p.extend_from_slice(&s.participant.to_be_bytes());
                    p.extend_from_slice(&s.items.to_be_bytes());
                    p.extend_from_slice(&s.bytes.to_be_bytes());
                    p.extend_from_slice(&s.digest.to_be_bytes());
                }
            }
            Message::Committed { epoch } => p.extend_from_slice(&epoch.to_be_bytes()),
            Message::Aborted { epoch, reason } => {
                p.extend_from_slice(&epoch.to_be_bytes());
                put_reason(&mut p, reason);
            }
            Message::Heartbeat { seq } | Message::HeartbeatAck { seq } => {
                p.extend_from_slice(&seq.to_be_bytes())
            }
        }
        let mut out = Vec::with_capacity(HEADER_LEN + p.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.kind().to_be_bytes());
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(&p);
        let crc = crc64(&[&out]);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }
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

/// Check a frame header; returns (kind, payload length).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u16, u32), WireError> {
    let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16::from_be_bytes(h[4..6].try_into().expect("2"));
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
    let len = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge(len));
    }
    Ok((kind, len))
}

struct Cursor<'a> {
    b: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("truncated: {} bytes left, {n} needed", self.b.len()),
            });
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn reason(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_REASON {
            return Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("reason of {n} bytes"),
            });
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed {
            kind: self.kind,
            reason: "reason is not UTF-8".into(),
        })
    }
    fn malformed(&self, reason: String) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            reason,
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                kind: self.kind,
                reason: format!("{} trailing bytes", self.b.len()),
            })
        }
    }
}

/// Decode a frame's payload given its header fields and trailer.
pub fn decode_body(
    header: &[u8; HEADER_LEN],
    payload: &[u8],
    trailer: &[u8; TRAILER_LEN],
) -> Result<Message, WireError> {
    let (k, len) = decode_header(header)?;
    if payload.len() != len as usize {
        return Err(WireError::Malformed {
            kind: kind_name(k),
            reason: format!("payload of {} bytes, header says {len}", payload.len()),
        });
    }
    if crc64(&[header, payload]) != u64::from_be_bytes(*trailer) {
        return Err(WireError::Checksum { kind: k, len });
    }
    let mut c = Cursor {
        b: payload,
        kind: kind_name(k),
    };
    let m = match k {
        kind::HELLO => Message::Hello {
            size: c.u64()?,
            generation: c.u64()?,
            history: {
                let n = usize::from(c.u16()?);
                if n > MAX_HISTORY {
                    return Err(c.malformed(format!("history of {n} generations")));
                }
                let mut h = Vec::with_capacity(n);
                for _ in 0..n {
                    h.push(c.u64()?);
                }
                h
            },
            tracked: c.u64()?,
            committed: c.u64()?,
            session: c.u64()?,
            ack: {
                let v = c.u8()?;
                AckMode::from_u8(v).ok_or_else(|| WireError::Malformed {
                    kind: "HELLO",
                    reason: format!("unknown ack mode {v}"),
                })?
            },
            heartbeat_ms: c.u32()?,
        },
        kind::WELCOME => Message::Welcome {
            size: c.u64()?,
            generation: c.u64()?,
            committed: c.u64()?,
            sync: {
                let v = c.u8()?;
                SyncKind::from_u8(v).ok_or_else(|| c.malformed(format!("unknown sync kind {v}")))?
            },
            consistent: match c.u8()? {
                0 => false,
                1 => true,
                v => return Err(c.malformed(format!("consistent flag {v}"))),
            },
        },
        kind::SUMS_REQUEST => {
            let id = c.u64()?;
            let unit_blocks = c.u32()?;
            if unit_blocks == 0 || unit_blocks > 1 << 16 {
                return Err(c.malformed(format!("{unit_blocks} blocks per unit")));
            }
            let mut raw = c.rest();
            // A run container of a few bytes decodes to 65536 units: count before decoding,
            // so a hostile bitmap costs a walk over its 64 KiB and never a huge allocation.
            let n =
                treemap_cardinality(raw, MAX_SUM_UNITS).map_err(|reason| WireError::Malformed {
                    kind: "SUMS_REQUEST",
                    reason: format!("unit bitmap: {reason}"),
                })?;
            if n > MAX_SUM_UNITS {
                return Err(WireError::Malformed {
                    kind: "SUMS_REQUEST",
                    reason: format!("more than {MAX_SUM_UNITS} units"),
                });
            }
            let units = roaring::RoaringTreemap::deserialize_from(&mut raw).map_err(|e| {
                WireError::Malformed {
                    kind: "SUMS_REQUEST",
                    reason: format!("unit bitmap: {e}"),
                }
            })?;
            if units.len() > MAX_SUM_UNITS {
                return Err(WireError::Malformed {
                    kind: "SUMS_REQUEST",
                    reason: format!("{} units (at most {MAX_SUM_UNITS})", units.len()),
                });
            }
            // The bitmap must use every byte: anything hidden behind it is damage.
            if !raw.is_empty() {
                return Err(WireError::Malformed {
                    kind: "SUMS_REQUEST",
                    reason: format!("{} bytes after the unit bitmap", raw.len()),
                });
            }
            Message::SumsRequest {
                id,
                unit_blocks,
                units,
            }
        }
        kind::SUMS => {
            let id = c.u64()?;
            let n = c.u32()? as u64;
            if n > MAX_SUM_UNITS {
                return Err(c.malformed(format!("{n} sums (at most {MAX_SUM_UNITS})")));
            }
            let mut sums = Vec::with_capacity(n as usize);
            for _ in 0..n {
                sums.push(c.u64()?);
            }
            Message::Sums { id, sums }
        }
        kind::RESUME => Message::Resume { epoch: c.u64()? },
        kind::RESUME_ACK => Message::ResumeAck { epoch: c.u64()? },
        kind::REFUSED => Message::Refused {
            code: RefusalCode::from_u16(c.u16()?),
            reason: c.reason()?,
        },
        kind::GOODBYE => Message::Goodbye {
            reason: c.reason()?,
        },
        kind::CHECKPOINT => {
            let epoch = c.u64()?;
            let n = c.u16()?;
            let mut summaries = Vec::with_capacity(usize::from(n).min(64));
            for _ in 0..n {
                summaries.push(EpochSummary {
                    participant: c.u16()?,
                    items: c.u64()?,
                    bytes: c.u64()?,
                    digest: c.u64()?,
                });
            }
            Message::Checkpoint { epoch, summaries }
        }
        kind::COMMITTED => Message::Committed { epoch: c.u64()? },
        kind::ABORTED => Message::Aborted {
            epoch: c.u64()?,
            reason: c.reason()?,
        },
        kind::HEARTBEAT => Message::Heartbeat { seq: c.u64()? },
        kind::HEARTBEAT_ACK => Message::HeartbeatAck { seq: c.u64()? },
        other => return Err(WireError::UnknownKind(other)),
    };
    c.end()?;
    Ok(m)
}

/// The number of values in a serialized `RoaringTreemap` (roaring 0.10's portable format),
/// found by walking its headers without decoding it; the walk stops as soon as the count
/// passes `limit` (and then returns a count above it).
///
/// ```text
///  treemap  u64 LE bitmap count, then per bitmap: u32 LE key, RoaringBitmap
///  bitmap   cookie u32 LE: 12346 → u32 LE container count n, no run containers, offsets
///                          low u16 12347 → n = high u16 + 1, a run bitmap of (n+7)/8 bytes,
///                                          offsets only when n >= 4
///           n × (key u16, cardinality-1 u16), [n × u32 offsets], then each container:
///             run      u16 run count r, r × (start u16, length-1 u16)
///             array    cardinality ≤ 4096: cardinality × u16
///             bitmap   otherwise: 8192 bytes
/// ```
///
/// A run container's header cardinality is not what the decoder uses (it counts the runs),
/// so runs are counted here from the runs themselves; a bitmap container's from its bits.
/// Anything malformed is left for the real decoder to report, except what this walk cannot
/// step over (truncation, impossible sizes).
fn treemap_cardinality(b: &[u8], limit: u64) -> Result<u64, String> {
    struct Walk<'a>(&'a [u8]);
    impl<'a> Walk<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!(
                    "truncated: {} bytes left, {n} needed",
                    self.0.len()
                ));
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(a)
        }
        fn u16(&mut self) -> Result<u16, String> {
            Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
        }
        fn u32(&mut self) -> Result<u32, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
        }
    }
    const NO_RUNS: u32 = 12346;
    const WITH_RUNS: u16 = 12347;
    let mut w = Walk(b);
    let bitmaps = u64::from_le_bytes(w.take(8)?.try_into().expect("8"));
    let mut total = 0u64;
    // Every bitmap takes at least 8 bytes, so this loop ends with the payload.
    for _ in 0..bitmaps {
        let _key = w.u32()?;
        let cookie = w.u32()?;
        let (n, runs, offsets) = if cookie == NO_RUNS {
            (w.u32()? as usize, None, true)
        } else if cookie as u16 == WITH_RUNS {
            let n = (cookie >> 16) as usize + 1;
            (n, Some(w.take(n.div_ceil(8))?), n >= 4)
        } else {
            return Err(format!("unknown cookie {cookie:#x}"));
        };
        if n > 1 << 16 {
            return Err(format!("{n} containers"));
        }
        let descriptions = w.take(n * 4)?;
        if offsets {
            w.take(n * 4)?;
        }
        for i in 0..n {
            let card = u64::from(u16::from_le_bytes(
                descriptions[i * 4 + 2..i * 4 + 4].try_into().expect("2"),
            )) + 1;
            let is_run = runs.is_some_and(|r| r[i / 8] & (1 << (i % 8)) != 0);
            total += if is_run {
                let r = usize::from(w.u16()?);
                w.take(r * 4)?
                    .chunks_exact(4)
                    .map(|run| u64::from(u16::from_le_bytes([run[2], run[3]])) + 1)
                    .sum::<u64>()
            } else if card <= 4096 {
                w.take(card as usize * 2)?;
                card
            } else {
                w.take(8192)?
                    .iter()
                    .map(|x| u64::from(x.count_ones()))
                    .sum::<u64>()
            };
            if total > limit {
                return Ok(total);
            }
        }
    }
    Ok(total)
}

/// Decode one frame from the front of `b`: `Ok(None)` if more bytes are needed, else the
/// message and the bytes it took.
pub fn decode_frame(b: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    if b.len() < HEADER_LEN {
        return Ok(None);
    }
    let header: &[u8; HEADER_LEN] = b[..HEADER_LEN].try_into().expect("header");
    let (_, len) = decode_header(header)?;
    let total = HEADER_LEN + len as usize + TRAILER_LEN;
    if b.len() < total {
        return Ok(None);
    }
    let payload = &b[HEADER_LEN..HEADER_LEN + len as usize];
    let trailer: &[u8; TRAILER_LEN] = b[total - TRAILER_LEN..total].try_into().expect("trailer");
    decode_body(header, payload, trailer).map(|m| Some((m, total)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn summary() -> impl Strategy<Value = EpochSummary> {
        (any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(p, i, b, d)| {
            EpochSummary {
                participant: p,
                items: i,
                bytes: b,
                digest: d,
            }
        })
    }

    /// Any message, with any field values (the fuzz tests of the secondary use it too).
    pub(crate) fn message() -> impl Strategy<Value = Message> {
        let ack = prop_oneof![
            Just(AckMode::Local),
            Just(AckMode::Received),
            Just(AckMode::Durable)
        ];
        prop_oneof![
            (
                (
                    any::<u64>(),
                    any::<u64>(),
                    proptest::collection::vec(any::<u64>(), 0..5)
                ),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                ack,
                any::<u32>()
            )
                .prop_map(
                    |(
                        (size, generation, history),
                        tracked,
                        committed,
                        session,
                        ack,
                        heartbeat_ms,
                    )| {
                        Message::Hello {
                            size,
                            generation,
                            history,
                            tracked,
                            committed,
                            session,
                            ack,
                            heartbeat_ms,
                        }
                    }
                ),
            (
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                1u8..=3,
                any::<bool>()
            )
                .prop_map(|(size, generation, committed, sync, consistent)| {
                    Message::Welcome {
                        size,
                        generation,
                        committed,
                        sync: SyncKind::from_u8(sync).unwrap(),
                        consistent,
                    }
                }),
            (
                any::<u64>(),
                1u32..64,
                proptest::collection::vec(0u64..1 << 40, 0..50)
            )
                .prop_map(|(id, unit_blocks, v)| Message::SumsRequest {
                    id,
                    unit_blocks,
                    units: v.into_iter().collect(),
                }),
            (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..50))
                .prop_map(|(id, sums)| Message::Sums { id, sums }),
            any::<u64>().prop_map(|epoch| Message::Resume { epoch }),
            any::<u64>().prop_map(|epoch| Message::ResumeAck { epoch }),
            (any::<u16>(), ".{0,40}").prop_map(|(code, reason)| Message::Refused {
                code: RefusalCode::from_u16(code),
                reason
            }),
            ".{0,40}".prop_map(|reason| Message::Goodbye { reason }),
            (any::<u64>(), proptest::collection::vec(summary(), 0..4))
                .prop_map(|(epoch, summaries)| Message::Checkpoint { epoch, summaries }),
            any::<u64>().prop_map(|epoch| Message::Committed { epoch }),
            (any::<u64>(), ".{0,40}")
                .prop_map(|(epoch, reason)| Message::Aborted { epoch, reason }),
            any::<u64>().prop_map(|seq| Message::Heartbeat { seq }),
            any::<u64>().prop_map(|seq| Message::HeartbeatAck { seq }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in message()) {
            let b = m.encode();
            let (d, n) = decode_frame(&b).unwrap().unwrap();
            prop_assert_eq!(n, b.len());
            prop_assert_eq!(d, m);
            // Every strict prefix asks for more bytes.
            for cut in 0..b.len() {
                prop_assert_eq!(decode_frame(&b[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn any_flipped_bit_is_caught(m in message(), bit in any::<usize>()) {
            let mut b = m.encode();
            let bit = bit % (b.len() * 8);
            b[bit / 8] ^= 1 << (bit % 8);
            // Either an error, a request for more bytes (the length grew), but never a
            // different message accepted as valid.
            if let Ok(Some((d, _))) = decode_frame(&b) {
                prop_assert_eq!(d, m);
                prop_assert!(false, "a damaged frame was accepted");
            }
        }

        #[test]
        fn the_cardinality_walk_never_panics(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = treemap_cardinality(&b, MAX_SUM_UNITS);
        }

        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&b);
        }
    }

    /// A SUMS_REQUEST frame whose unit bitmap is `bitmap` (raw serialized bytes).
    fn sums_request_frame(bitmap: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&1u64.to_be_bytes());
        p.extend_from_slice(&16u32.to_be_bytes());
        p.extend_from_slice(bitmap);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_be_bytes());
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&kind::SUMS_REQUEST.to_be_bytes());
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(&p);
        let crc = crc64(&[&out]);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn hostile_run_containers_are_refused_before_decoding() {
        // One treemap bitmap with as many containers as fit in 64 KiB, each a single run of
        // 65536 values whose header claims a cardinality of 1: 4500 containers of 14 bytes
        // would decode to ~295 million units.
        let n: usize = 4500;
        let mut b = Vec::new();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&((((n - 1) as u32) << 16) | 12347).to_le_bytes());
        b.extend(std::iter::repeat_n(0xffu8, n.div_ceil(8)));
        for i in 0..n {
            b.extend_from_slice(&(i as u16).to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
        }
        for i in 0..n {
            b.extend_from_slice(&(i as u32).to_le_bytes());
        }
        for _ in 0..n {
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&0xffffu16.to_le_bytes());
        }
        assert!(b.len() <= MAX_PAYLOAD as usize - 12, "{} bytes", b.len());
        let f = sums_request_frame(&b);
        let t = std::time::Instant::now();
        let e = decode_frame(&f).unwrap_err();
        assert!(e.to_string().contains("more than 4096 units"), "{e}");
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        // The walk counts runs, not the header's claim, and so does the decoder: proof that
        // the hostile payload is real.
        assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), n as u64 * 65536);
    }

    /// A treemap of one bitmap whose containers are runs `(key, [(start, length - 1)])`.
    fn run_treemap(containers: &[(u16, &[(u16, u16)])]) -> Vec<u8> {
        let n = containers.len();
        let mut b = Vec::new();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&((((n - 1) as u32) << 16) | 12347).to_le_bytes());
        b.extend(std::iter::repeat_n(0xffu8, n.div_ceil(8)));
        for (key, _) in containers {
            b.extend_from_slice(&key.to_le_bytes());
            // A header cardinality that lies: the decoder does not use it for runs.
            b.extend_from_slice(&0u16.to_le_bytes());
        }
        if n >= 4 {
            b.extend(std::iter::repeat_n(0u8, n * 4));
        }
        for (_, runs) in containers {
            b.extend_from_slice(&(runs.len() as u16).to_le_bytes());
            for (start, len) in *runs {
                b.extend_from_slice(&start.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn run_containers_are_counted_as_roaring_decodes_them() {
        for containers in [
            &[(0u16, &[(0u16, 9u16), (100, 0)][..])][..],
            &[(1, &[(5, 1999)][..]), (3, &[(0, 2000), (4000, 94)][..])][..],
            &[
                (1, &[(0, 0)][..]),
                (2, &[(0, 0)][..]),
                (3, &[(0, 0)][..]),
                (9, &[][..]),
            ][..],
        ] {
            let b = run_treemap(containers);
            let t = roaring::RoaringTreemap::deserialize_from(&b[..]).unwrap();
            assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), t.len());
            let Message::SumsRequest { units, .. } =
                decode_frame(&sums_request_frame(&b)).unwrap().unwrap().0
            else {
                panic!("not a SUMS_REQUEST")
            };
            assert_eq!(units, t);
        }
        let over = run_treemap(&[(0, &[(0, 4095)]), (1, &[(0, 0)])]);
        assert!(decode_frame(&sums_request_frame(&over)).is_err());
        let limit = run_treemap(&[(0, &[(0, 4095)])]);
        assert!(decode_frame(&sums_request_frame(&limit)).is_ok());
    }

    #[test]
    fn the_cardinality_walk_agrees_with_roaring() {
        let cases: Vec<roaring::RoaringTreemap> = vec![
            roaring::RoaringTreemap::new(),
            (0..4096u64).collect(),
            (0..4096u64).map(|u| u * 3).collect(),
            (0..4096u64).map(|u| u << 20).collect(),
            (0..2000u64).map(|u| u << 33).collect(),
            [1u64, 2, 3, 70000, 1 << 40, u64::MAX].into_iter().collect(),
            (0..6000u64).filter(|u| u % 2 == 0).chain(0..1).collect(),
        ];
        for t in cases {
            let mut b = Vec::new();
            t.serialize_into(&mut b).unwrap();
            assert_eq!(treemap_cardinality(&b, u64::MAX).unwrap(), t.len());
            let within = t.len() <= MAX_SUM_UNITS;
            let decoded = decode_frame(&sums_request_frame(&b));
            assert_eq!(decoded.is_ok(), within, "{} units: {decoded:?}", t.len());
        }
    }

    #[test]
    fn clear_errors() {
        let mut b = Message::Heartbeat { seq: 1 }.encode();
        b[5] = 9;
        assert_eq!(
            decode_frame(&b).unwrap_err().to_string(),
            "control protocol version 9 is not supported (this build speaks 3)"
        );
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1\r\n\r\n"),
            Err(WireError::BadMagic(_))
        ));
        let mut big = Message::Heartbeat { seq: 1 }.encode();
        big[8..12].copy_from_slice(&(1u32 << 30).to_be_bytes());
        assert_eq!(decode_frame(&big), Err(WireError::TooLarge(1 << 30)));
    }
}

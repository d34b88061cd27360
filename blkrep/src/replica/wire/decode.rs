//! Decoding: bytes from a peer to a [`Message`], every length and count bounded before use.

use super::*;

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
pub(super) fn treemap_cardinality(b: &[u8], limit: u64) -> Result<u64, String> {
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

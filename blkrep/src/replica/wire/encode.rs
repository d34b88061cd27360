//! Encoding: a [`Message`] to the bytes of one frame.

use super::*;

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

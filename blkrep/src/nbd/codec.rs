//! The NBD wire codec: pure functions from bytes to messages and back.
//!
//! No sockets here. Transports read a fixed-size header, ask this module what it means (and how
//! many payload bytes follow), then read the payload. Every decoder takes untrusted bytes and
//! returns a [`CodecError`] rather than panicking; property tests feed them random input.

use super::proto::*;

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A magic number was wrong.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A message was shorter than its fields.
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A length field disagrees with the message.
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CodecError>;

/// A cursor over untrusted bytes that never panics.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Read `buf`, naming it `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Take the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated {
                what: self.what,
                need: n,
                have: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    /// Big-endian u16.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }

    /// Big-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// Big-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING`].
    pub fn string(&mut self, len: usize) -> Result<String> {
        if len > MAX_STRING {
            return Err(CodecError::Invalid(format!(
                "{}: string of {len} bytes exceeds {MAX_STRING}",
                self.what
            )));
        }
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| CodecError::Invalid(format!("{}: string is not UTF-8", self.what)))?;
        if s.contains('\0') {
            return Err(CodecError::Invalid(format!(
                "{}: string contains NUL",
                self.what
            )));
        }
        Ok(s.to_owned())
    }

    /// A u32 length followed by a string.
    pub fn lstring(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        self.string(n)
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fail unless everything was read.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Invalid(format!(
                "{}: {} trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}
fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Handshake

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;

/// The server's first message: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(GREETING_LEN);
    put64(&mut v, NBDMAGIC);
    put64(&mut v, IHAVEOPT);
    put16(&mut v, flags);
    v
}

/// Parse the server greeting; returns the handshake flags.
pub fn decode_greeting(b: &[u8]) -> Result<u16> {
    let mut r = Reader::new(b, "greeting");
    let m = r.u64()?;
    if m != NBDMAGIC {
        return Err(CodecError::BadMagic {
            what: "NBDMAGIC",
            got: m,
        });
    }
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(CodecError::BadMagic {
            what: "IHAVEOPT (only fixed newstyle is supported)",
            got: m,
        });
    }
    r.u16()
}

/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;

/// Parse an option header: returns (option, payload length).
pub fn decode_option_header(b: &[u8]) -> Result<(u32, u32)> {
    let mut r = Reader::new(b, "option header");
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(CodecError::BadMagic {
            what: "option",
            got: m,
        });
    }
    Ok((r.u32()?, r.u32()?))
}

/// Encode an option with its payload.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    put64(&mut v, IHAVEOPT);
    put32(&mut v, option);
    put32(&mut v, data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Information types the client asks for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parse the payload.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, "NBD_OPT_GO/INFO");
        let name = r.lstring()?;
        let n = r.u16()? as usize;
        if r.remaining() != n * 2 {
            return Err(CodecError::Invalid(format!(
                "NBD_OPT_GO/INFO: {n} info requests but {} bytes",
                r.remaining()
            )));
        }
        let requests = (0..n).map(|_| r.u16()).collect::<Result<_>>()?;
        r.finish()?;
        Ok(Self { name, requests })
    }

    /// Encode the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put32(&mut v, self.name.len() as u32);
        v.extend_from_slice(self.name.as_bytes());
        put16(&mut v, self.requests.len() as u16);
        for &q in &self.requests {
            put16(&mut v, q);
        }
        v
    }
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub name: String,
    /// Context queries (for example "base:allocation", or "base:" for all of a namespace).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parse the payload.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, "NBD_OPT_*_META_CONTEXT");
        let name = r.lstring()?;
        let n = r.u32()? as usize;
        // Each query takes at least 4 bytes: refuse counts the payload cannot hold.
        if n > r.remaining() / 4 {
            return Err(CodecError::Invalid(format!(
                "meta context: {n} queries do not fit in {} bytes",
                r.remaining()
            )));
        }
        let queries = (0..n).map(|_| r.lstring()).collect::<Result<_>>()?;
        r.finish()?;
        Ok(Self { name, queries })
    }

    /// Encode the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        put32(&mut v, self.name.len() as u32);
        v.extend_from_slice(self.name.as_bytes());
        put32(&mut v, self.queries.len() as u32);
        for q in &self.queries {
            put32(&mut v, q.len() as u32);
            v.extend_from_slice(q.as_bytes());
        }
        v
    }
}

/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Encode an option reply.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    put64(&mut v, REPLY_MAGIC);
    put32(&mut v, option);
    put32(&mut v, reply);
    put32(&mut v, data.len() as u32);
    v.extend_from_slice(data);
    v
}

/// Parse an option reply header: returns (option, reply type, payload length).
pub fn decode_option_reply_header(b: &[u8]) -> Result<(u32, u32, u32)> {
    let mut r = Reader::new(b, "option reply");
    let m = r.u64()?;
    if m != REPLY_MAGIC {
        return Err(CodecError::BadMagic {
            what: "option reply",
            got: m,
        });
    }
    Ok((r.u32()?, r.u32()?, r.u32()?))
}

/// NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    put16(&mut v, INFO_EXPORT);
    put64(&mut v, size);
    put16(&mut v, flags);
    v
}

/// NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    put16(&mut v, INFO_BLOCK_SIZE);
    put32(&mut v, min);
    put32(&mut v, preferred);
    put32(&mut v, max);
    v
}

/// NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    put16(&mut v, kind);
    v.extend_from_slice(s.as_bytes());
    v
}

/// A decoded NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// Size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// Canonical name.
    Name(String),
    /// Description.
    Description(String),
    /// Something this client does not know; ignored.
    Other(u16),
}

impl Info {
    /// Parse an NBD_REP_INFO payload.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data, "NBD_REP_INFO");
        let kind = r.u16()?;
        let info = match kind {
            INFO_EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            INFO_BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            INFO_NAME => Info::Name(r.string(r.remaining())?),
            INFO_DESCRIPTION => Info::Description(r.string(r.remaining())?),
            other => return Ok(Info::Other(other)),
        };
        r.finish()?;
        Ok(info)
    }
}

/// Export size and transmission flags, as sent after NBD_OPT_EXPORT_NAME.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    put64(&mut v, size);
    put16(&mut v, flags);
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`); unknown values are kept so the server can answer EINVAL.
    pub command: u16,
    /// The client's opaque handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for writes, the payload that follows).
    pub length: u32,
}

impl Request {
    /// Parse a request header.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, "request");
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(CodecError::BadMagic {
                what: "request",
                got: m.into(),
            });
        }
        Ok(Self {
            flags: r.u16()?,
            command: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// Encode a request header (the write payload is sent separately).
    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, REQUEST_MAGIC);
        put16(out, self.flags);
        put16(out, self.command);
        put64(out, self.cookie);
        put64(out, self.offset);
        put32(out, self.length);
    }

    /// Payload bytes that follow the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.command == CMD_WRITE {
            self.length as usize
        } else {
            0
        }
    }
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Encode a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    put32(out, SIMPLE_REPLY_MAGIC);
    put32(out, error);
    put64(out, cookie);
}

/// Encode a structured reply chunk header.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    put32(out, STRUCTURED_REPLY_MAGIC);
    put16(out, flags);
    put16(out, kind);
    put64(out, cookie);
    put32(out, length);
}

/// Encode a structured error chunk (always final).
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    encode_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    put32(out, error);
    put16(out, msg.len() as u16);
    out.extend_from_slice(msg);
}

/// The header of a reply, simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful read, `length` data bytes follow.
    Simple {
        /// Error (0 = success).
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// One chunk of a structured reply; `length` payload bytes follow.
    Chunk {
        /// `REPLY_FLAG_*`.
        flags: u16,
        /// `REPLY_TYPE_*`.
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

impl ReplyHeader {
    /// How many header bytes a reply starting with `magic` has.
    pub fn len_for_magic(magic: [u8; 4]) -> Result<usize> {
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
            m => Err(CodecError::BadMagic {
                what: "reply",
                got: m.into(),
            }),
        }
    }

    /// Parse a full reply header (as long as [`Self::len_for_magic`] said).
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, "reply");
        match r.u32()? {
            SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
                error: r.u32()?,
                cookie: r.u64()?,
            }),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Chunk {
                flags: r.u16()?,
                kind: r.u16()?,
                cookie: r.u64()?,
                length: r.u32()?,
            }),
            m => Err(CodecError::BadMagic {
                what: "reply",
                got: m.into(),
            }),
        }
    }

    /// The cookie this reply answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Encode a base:allocation block status chunk payload.
pub fn encode_block_status(out: &mut Vec<u8>, context_id: u32, extents: &[(u32, u32)]) {
    put32(out, context_id);
    for &(len, flags) in extents {
        put32(out, len);
        put32(out, flags);
    }
}

/// Parse a block status chunk payload: (context id, [(length, flags)]).
pub fn decode_block_status(b: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    let mut r = Reader::new(b, "block status");
    let id = r.u32()?;
    if r.remaining() % 8 != 0 || r.remaining() == 0 {
        return Err(CodecError::Invalid(format!(
            "block status: {} descriptor bytes",
            r.remaining()
        )));
    }
    let mut v = Vec::with_capacity(r.remaining() / 8);
    while r.remaining() > 0 {
        v.push((r.u32()?, r.u32()?));
    }
    Ok((id, v))
}

/// Parse a structured error chunk payload: (error, message).
pub fn decode_error_chunk(b: &[u8]) -> Result<(u32, String)> {
    let mut r = Reader::new(b, "error chunk");
    let err = r.u32()?;
    let n = r.u16()? as usize;
    let msg = String::from_utf8_lossy(r.bytes(n)?).into_owned();
    Ok((err, msg))
}

#[cfg(test)]
mod tests;

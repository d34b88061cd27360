//! The stream framing of `unix:` ports: each frame is a 4-byte big-endian length, then that many
//! bytes of Ethernet frame, and nothing else — no header, no vnet header. This is what QEMU's
//! `-netdev stream` sends and expects (`net/stream.c` writes `htonl(size)` then the frame;
//! `net_fill_rstate` in `net/net.c` reads them back), and what colo-compare's chardevs carry
//! when `vnet_hdr_support` is off.
//!
//! A length of 0 or over [`MAX_FRAME`] is hostile (QEMU never sends either; an Ethernet frame
//! is at least 14 bytes): the decoder reports it and the port drops the peer. The decoder's
//! buffer is fixed: twice the largest length-prefixed frame.

use std::fmt;

/// The largest frame a port takes: a 65535-byte MTU's payload plus room for an Ethernet
/// header with one 802.1Q tag (18 bytes), rounded to 65536 + 18. Larger is an error (a TAP
/// read that fills the buffer past it, a `unix:` length field above it).
pub const MAX_FRAME: usize = 65536 + 18;
/// The length prefix's size.
pub const LEN_PREFIX: usize = 4;

/// A length field no frame can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// A length of 0.
    Empty,
    /// A length over [`MAX_FRAME`].
    TooLong(u32),
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::Empty => write!(f, "a frame of length 0"),
            FramingError::TooLong(n) => write!(f, "a frame of length {n} (at most {MAX_FRAME})"),
        }
    }
}

/// Splits a byte stream into frames. Read into [`Decoder::space`], report the count with
/// [`Decoder::filled`], then take frames with [`Decoder::next_frame`] until `Ok(None)`.
#[derive(Debug)]
pub struct Decoder {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: vec![0; 2 * (LEN_PREFIX + MAX_FRAME)].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Decoder {
    /// Where to read next; never empty.
    pub fn space(&mut self) -> &mut [u8] {
        if self.start > 0 && self.buf.len() - self.end < LEN_PREFIX + MAX_FRAME {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Decoder::space`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the bad length field (the
    /// stream cannot be resynchronized after it).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        let have = &self.buf[self.start..self.end];
        let Some(prefix) = have.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len == 0 {
            return Err(FramingError::Empty);
        }
        let n = len as usize;
        if n > MAX_FRAME {
            return Err(FramingError::TooLong(len));
        }
        if have.len() < LEN_PREFIX + n {
            return Ok(None);
        }
        let frame = have[LEN_PREFIX..LEN_PREFIX + n].to_vec();
        self.start += LEN_PREFIX + n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(frame))
    }

    /// Bytes of an incomplete frame buffered (what a peer that left mid-frame leaves behind).
    pub fn partial(&self) -> usize {
        self.end - self.start
    }
}

/// A frame with its length prefix, ready to write.
pub fn encode(frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(LEN_PREFIX + frame.len());
    v.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    v.extend_from_slice(frame);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(d: &mut Decoder, mut bytes: &[u8], chunk: usize) -> Result<Vec<Vec<u8>>, FramingError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let space = d.space();
            let n = chunk.min(space.len()).min(bytes.len());
            space[..n].copy_from_slice(&bytes[..n]);
            d.filled(n);
            bytes = &bytes[n..];
            while let Some(f) = d.next_frame()? {
                out.push(f);
            }
        }
        Ok(out)
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let frames: Vec<Vec<u8>> = [14usize, 60, 1514, 9000, MAX_FRAME, 15]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let stream: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        for chunk in [1, 3, 4, 5, 1500, 65536, 1 << 20] {
            let mut d = Decoder::default();
            assert_eq!(
                feed(&mut d, &stream, chunk).unwrap(),
                frames,
                "chunk {chunk}"
            );
            assert_eq!(d.partial(), 0);
        }
    }

    #[test]
    fn bad_lengths_are_errors_and_a_partial_frame_is_counted() {
        let mut d = Decoder::default();
        assert_eq!(feed(&mut d, &[0, 0, 0, 0], 4), Err(FramingError::Empty));
        let mut d = Decoder::default();
        let big = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            feed(&mut d, &big, 4),
            Err(FramingError::TooLong(MAX_FRAME as u32 + 1))
        );
        let mut d = Decoder::default();
        let mut s = encode(&[7; 20]);
        s.extend_from_slice(&encode(&[8; 100])[..50]);
        assert_eq!(feed(&mut d, &s, 7).unwrap(), vec![vec![7; 20]]);
        assert_eq!(d.partial(), 50);
    }
}

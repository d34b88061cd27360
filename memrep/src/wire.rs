//! memrep's messages between a region's primary and secondary halves, carried by the
//! replication session's participant channel (`blkrep::epoch::PeerChannel`). Little-endian.
//!
//! ```text
//!  HELLO    1 | version u16 | page size u32 | pages u64          answer: pages u64 | digest fold u64
//!  DIGESTS  2 | first u64 | count u32                            answer: count × digest u64
//!  PAGES    3 | epoch u64 | count u32 | count × entry            answer: empty
//!           entry: page u64 | seq u64 | kind u8 (0 data, 1 zero) | 4096 bytes if data
//!  VERIFY   4 | first u64 | count u32                            answer: count × digest u64
//! ```
//!
//! VERIFY is DIGESTS with every page hashed from the region as it is, not taken from the
//! table (`lockstep verify`: it finds a region changed behind lockstep's back).
//!
//! HELLO compares the two regions before anything is sent (sizes must match). DIGESTS reads
//! the secondary's committed page digests, so that a new session resends only the pages that
//! differ (a restarted secondary is resynced by digest, not by a full copy). PAGES stages
//! pages for `epoch`; `seq` orders every page the primary ever read, so that of two stagings
//! of one page the later read wins whatever order the messages arrive in. Every number is
//! bounded before use on the receiving side ([`decode`]).

use crate::PAGE_SIZE;

/// The message format's version; HELLO refuses another.
pub const VERSION: u16 = 1;
/// The most pages one PAGES message carries (4 MiB of data).
pub const MAX_BATCH_PAGES: usize = 1024;
/// The most digests one DIGESTS request asks for (8 MiB of answer).
pub const MAX_DIGESTS: u32 = 1 << 20;

const HELLO: u8 = 1;
const DIGESTS: u8 = 2;
const PAGES: u8 = 3;
const VERIFY: u8 = 4;
/// Bytes of an entry's header (page, seq, kind).
const ENTRY_HEADER: usize = 17;

/// A decoded message from the primary half.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Compare regions.
    Hello {
        /// The primary's format version.
        version: u16,
        /// Its page size.
        page_size: u32,
        /// Its region's pages.
        pages: u64,
    },
    /// Read committed digests `first..first + count`.
    Digests {
        /// First page.
        first: u64,
        /// How many.
        count: u32,
    },
    /// Hash pages `first..first + count` of the region as it is.
    Verify {
        /// First page.
        first: u64,
        /// How many.
        count: u32,
    },
    /// Stage pages for `epoch`.
    Pages {
        /// The epoch they belong to.
        epoch: u64,
        /// The pages.
        entries: Vec<Entry<'a>>,
    },
}

/// One staged page of a PAGES message.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Page index.
    pub page: u64,
    /// The primary's read sequence number: later reads win.
    pub seq: u64,
    /// The content; None for a page of zeros.
    pub data: Option<&'a [u8]>,
}

/// HELLO.
pub fn hello(pages: u64) -> Vec<u8> {
    let mut m = vec![HELLO];
    m.extend_from_slice(&VERSION.to_le_bytes());
    m.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    m.extend_from_slice(&pages.to_le_bytes());
    m
}

/// HELLO's answer: the secondary's pages and committed digest fold.
pub fn hello_answer(pages: u64, fold: u64) -> Vec<u8> {
    let mut m = pages.to_le_bytes().to_vec();
    m.extend_from_slice(&fold.to_le_bytes());
    m
}

/// Read HELLO's answer.
pub fn decode_hello_answer(a: &[u8]) -> Result<(u64, u64), String> {
    if a.len() != 16 {
        return Err(format!("HELLO answer of {} bytes (expected 16)", a.len()));
    }
    Ok((le64(&a[..8]), le64(&a[8..])))
}

/// DIGESTS.
pub fn digests(first: u64, count: u32) -> Vec<u8> {
    let mut m = vec![DIGESTS];
    m.extend_from_slice(&first.to_le_bytes());
    m.extend_from_slice(&count.to_le_bytes());
    m
}

/// VERIFY (answered like DIGESTS).
pub fn verify(first: u64, count: u32) -> Vec<u8> {
    let mut m = digests(first, count);
    m[0] = VERIFY;
    m
}

/// DIGESTS's answer.
pub fn digests_answer(d: &[u64]) -> Vec<u8> {
    d.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Read DIGESTS's answer to a request for `count` digests.
pub fn decode_digests_answer(a: &[u8], count: u32) -> Result<Vec<u64>, String> {
    if a.len() != count as usize * 8 {
        return Err(format!(
            "DIGESTS answer of {} bytes for {count} digests",
            a.len()
        ));
    }
    Ok(a.chunks_exact(8).map(le64).collect())
}

/// Builds one PAGES message.
#[derive(Debug)]
pub struct PagesBuilder {
    buf: Vec<u8>,
    count: u32,
    data_pages: u64,
}

impl PagesBuilder {
    /// An empty PAGES message for `epoch`.
    pub fn new(epoch: u64) -> PagesBuilder {
        let mut buf = Vec::with_capacity(16 + 64 * (ENTRY_HEADER + PAGE_SIZE));
        buf.push(PAGES);
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        PagesBuilder {
            buf,
            count: 0,
            data_pages: 0,
        }
    }

    /// Add page `page` read as `seq`; `data` None for a page of zeros.
    pub fn push(&mut self, page: u64, seq: u64, data: Option<&[u8; PAGE_SIZE]>) {
        self.buf.extend_from_slice(&page.to_le_bytes());
        self.buf.extend_from_slice(&seq.to_le_bytes());
        match data {
            Some(d) => {
                self.buf.push(0);
                self.buf.extend_from_slice(d);
                self.data_pages += 1;
            }
            None => self.buf.push(1),
        }
        self.count += 1;
    }

    /// Pages in the message.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True before the first page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Pages that carry data (not zero pages).
    pub fn data_pages(&self) -> u64 {
        self.data_pages
    }

    /// Bytes of the message so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The finished message.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf[9..13].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Decode a message from the primary half of a region of `pages` pages; every count and page
/// number is checked against the message's length and the region before use.
pub fn decode(m: &[u8], pages: u64) -> Result<Message<'_>, String> {
    let (&kind, rest) = m.split_first().ok_or("an empty message")?;
    match kind {
        HELLO => {
            if rest.len() != 14 {
                return Err(format!("HELLO of {} bytes (expected 15)", m.len()));
            }
            Ok(Message::Hello {
                version: u16::from_le_bytes([rest[0], rest[1]]),
                page_size: le32(&rest[2..6]),
                pages: le64(&rest[6..14]),
            })
        }
        DIGESTS | VERIFY => {
            if rest.len() != 12 {
                return Err(format!("DIGESTS of {} bytes (expected 13)", m.len()));
            }
            let first = le64(&rest[..8]);
            let count = le32(&rest[8..12]);
            if count > MAX_DIGESTS {
                return Err(format!("DIGESTS of {count} pages (at most {MAX_DIGESTS})"));
            }
            if first
                .checked_add(u64::from(count))
                .is_none_or(|end| end > pages)
            {
                return Err(format!(
                    "DIGESTS of pages {first}+{count} beyond the region's {pages} pages"
                ));
            }
            Ok(if kind == VERIFY {
                Message::Verify { first, count }
            } else {
                Message::Digests { first, count }
            })
        }
        PAGES => {
            if rest.len() < 12 {
                return Err(format!("PAGES of {} bytes (at least 13)", m.len()));
            }
            let epoch = le64(&rest[..8]);
            let count = le32(&rest[8..12]) as usize;
            if count > MAX_BATCH_PAGES {
                return Err(format!(
                    "PAGES of {count} pages (at most {MAX_BATCH_PAGES})"
                ));
            }
            let mut body = &rest[12..];
            let mut entries = Vec::with_capacity(count);
            for n in 0..count {
                if body.len() < ENTRY_HEADER {
                    return Err(format!("PAGES cut short in entry {n} of {count}"));
                }
                let page = le64(&body[..8]);
                let seq = le64(&body[8..16]);
                let kind = body[16];
                body = &body[ENTRY_HEADER..];
                if page >= pages {
                    return Err(format!("page {page} beyond the region's {pages} pages"));
                }
                let data = match kind {
                    0 => {
                        if body.len() < PAGE_SIZE {
                            return Err(format!("PAGES cut short in the data of page {page}"));
                        }
                        let (d, tail) = body.split_at(PAGE_SIZE);
                        body = tail;
                        Some(d)
                    }
                    1 => None,
                    k => return Err(format!("page {page} of unknown kind {k}")),
                };
                entries.push(Entry { page, seq, data });
            }
            if !body.is_empty() {
                return Err(format!(
                    "{} bytes after the last of {count} pages",
                    body.len()
                ));
            }
            Ok(Message::Pages { epoch, entries })
        }
        k => Err(format!("unknown message kind {k}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        assert_eq!(
            decode(&hello(7), 7).unwrap(),
            Message::Hello {
                version: VERSION,
                page_size: PAGE_SIZE as u32,
                pages: 7
            }
        );
        assert_eq!(
            decode(&digests(2, 5), 7).unwrap(),
            Message::Digests { first: 2, count: 5 }
        );
        let mut b = PagesBuilder::new(9);
        let page = [7u8; PAGE_SIZE];
        b.push(3, 11, Some(&page));
        b.push(4, 12, None);
        assert_eq!((b.len(), b.data_pages()), (2, 1));
        let m = b.finish();
        let Message::Pages { epoch, entries } = decode(&m, 7).unwrap() else {
            panic!("not PAGES")
        };
        assert_eq!(epoch, 9);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].data, Some(&page[..]));
        assert_eq!(
            (entries[1].page, entries[1].seq, entries[1].data),
            (4, 12, None)
        );
        assert_eq!(decode_hello_answer(&hello_answer(7, 99)).unwrap(), (7, 99));
        assert_eq!(
            decode_digests_answer(&digests_answer(&[1, 2]), 2).unwrap(),
            vec![1, 2]
        );
    }

    #[test]
    fn hostile_messages_are_refused_before_use() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![9], "unknown message kind"),
            (hello(1)[..5].to_vec(), "HELLO of 5 bytes"),
            (digests(0, MAX_DIGESTS + 1), "at most"),
            (digests(5, 3), "beyond the region"),
            (digests(u64::MAX, 2), "beyond the region"),
            (
                {
                    let mut m = PagesBuilder::new(1).finish();
                    m[9..13].copy_from_slice(&(MAX_BATCH_PAGES as u32 + 1).to_le_bytes());
                    m
                },
                "at most",
            ),
            (
                {
                    let mut m = PagesBuilder::new(1).finish();
                    m[9..13].copy_from_slice(&2u32.to_le_bytes());
                    m
                },
                "cut short",
            ),
            (
                {
                    let mut b = PagesBuilder::new(1);
                    b.push(7, 1, None);
                    b.finish()
                },
                "beyond the region",
            ),
            (
                {
                    let mut b = PagesBuilder::new(1);
                    b.push(0, 1, Some(&[1; PAGE_SIZE]));
                    let mut m = b.finish();
                    m.truncate(m.len() - 1);
                    m
                },
                "cut short in the data",
            ),
            (
                {
                    let mut b = PagesBuilder::new(1);
                    b.push(0, 1, None);
                    let mut m = b.finish();
                    *m.last_mut().unwrap() = 5;
                    m
                },
                "unknown kind 5",
            ),
            (
                {
                    let mut b = PagesBuilder::new(1);
                    b.push(0, 1, None);
                    let mut m = b.finish();
                    m.push(0);
                    m
                },
                "after the last",
            ),
        ];
        for (m, want) in cases {
            let e = decode(&m, 7).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        assert!(decode_digests_answer(&[0; 15], 2).is_err());
        assert!(decode_hello_answer(&[0; 8]).is_err());
    }
}

//! Hand-over of a writer's tracking descriptors to lockstep over a unix socket.
//!
//! A cooperating writer process (one that maps the region itself, e.g. a library) cannot be
//! tracked from outside with uffd unless it registers its own mapping: userfaultfd works on the
//! calling process's address space. So the writer registers its mapping
//! ([`WriterRegistration::register`]) and passes the userfaultfd and its `/proc/self/pagemap`
//! descriptor to lockstep ([`WriterRegistration::hand_over`]); lockstep checks them
//! ([`receive_handover`]), answers ([`answer`]) and tracks with
//! [`crate::track::uffd::UffdTracker::from_handover`].
//!
//! The message is one write on a `SOCK_STREAM` unix socket, the two descriptors attached as
//! `SCM_RIGHTS` to its first byte:
//!
//! ```text
//! b"LSMEMHO1" | addr u64 LE | len u64 LE | pid u32 LE | path_len u16 LE | path (UTF-8)
//! ```
//!
//! The answer is one line: `ok\n` or `error: <text>\n`. The receiver treats the message as
//! hostile: at most [`MAX_MESSAGE`] bytes, exactly two descriptors (any received are closed
//! otherwise), the first a userfaultfd and the second a pagemap file, a page-aligned range.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::PAGE_SIZE;

/// Message magic.
pub const MAGIC: &[u8; 8] = b"LSMEMHO1";
/// Largest message accepted.
pub const MAX_MESSAGE: usize = 4096;
const HEADER: usize = 8 + 8 + 8 + 4 + 2;
/// How long the writer waits for lockstep's answer.
const WRITER_TIMEOUT: Duration = Duration::from_secs(30);
/// Most descriptors one receive accepts before reporting truncation.
const MAX_FDS: usize = 8;

/// The writer side: its range registered for async write-protect tracking.
#[derive(Debug)]
pub struct WriterRegistration {
    uffd: OwnedFd,
    pagemap: File,
    addr: u64,
    len: u64,
}

impl WriterRegistration {
    /// Create a userfaultfd with `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED` (and
    /// `WP_HUGETLBFS_SHMEM`), register `addr..addr+len` (page aligned, this process's mapping of
    /// the region) in write-protect mode, write-protect it, and open `/proc/self/pagemap`.
    pub fn register(addr: *mut u8, len: usize) -> io::Result<WriterRegistration> {
        let uffd = crate::track::uffd::arm(addr, len).map_err(io::Error::other)?;
        let pagemap = File::open("/proc/self/pagemap")?;
        Ok(WriterRegistration {
            uffd,
            pagemap,
            addr: addr as u64,
            len: len as u64,
        })
    }

    /// Send the descriptors to lockstep listening on `socket`, naming the region file, and wait
    /// (bounded) for its answer: `Ok` for `ok`, an error carrying lockstep's text otherwise.
    /// The connection stays open: lockstep pauses the writer through it around every
    /// checkpoint's cut, at the points where the writer calls
    /// [`WriterLink::pause_point`](crate::pause::WriterLink::pause_point).
    pub fn hand_over(
        &self,
        socket: &Path,
        region_path: &Path,
    ) -> io::Result<crate::pause::WriterLink> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(WRITER_TIMEOUT))?;
        stream.set_write_timeout(Some(WRITER_TIMEOUT))?;
        let path = region_path.to_str().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "region path is not UTF-8")
        })?;
        let msg = encode(self.addr, self.len, std::process::id(), path)?;
        send_with_fds(
            &stream,
            &msg,
            &[self.uffd.as_raw_fd(), self.pagemap.as_raw_fd()],
        )?;
        let line = read_line(&mut stream, 1024)?;
        if line == "ok" {
            Ok(crate::pause::WriterLink::new(stream))
        } else if let Some(text) = line.strip_prefix("error: ") {
            Err(io::Error::other(format!(
                "lockstep refused the hand-over: {text}"
            )))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected answer from lockstep: {line:?}"),
            ))
        }
    }
}

/// Encode a hand-over message (also used by tests to build bad ones).
pub fn encode(addr: u64, len: u64, pid: u32, path: &str) -> io::Result<Vec<u8>> {
    if HEADER + path.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "region path too long",
        ));
    }
    let mut msg = Vec::with_capacity(HEADER + path.len());
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&addr.to_le_bytes());
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(&pid.to_le_bytes());
    msg.extend_from_slice(&(path.len() as u16).to_le_bytes());
    msg.extend_from_slice(path.as_bytes());
    Ok(msg)
}

fn read_line(stream: &mut UnixStream, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the answer",
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer line too long",
            ));
        }
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "answer not UTF-8"))
}

/// Send `data` with `fds` attached as `SCM_RIGHTS` (all of `data`, looping on short writes;
/// the descriptors go with the first part).
#[allow(unsafe_code)]
pub fn send_with_fds(stream: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut sent = 0;
    while sent < data.len() {
        let mut iov = libc::iovec {
            iov_base: data[sent..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - sent,
        };
        // SAFETY: an all-zero msghdr is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points to `space` writable, 8-aligned bytes, enough for one
            // header carrying `fd_bytes` of data, so CMSG_FIRSTHDR is non-null and CMSG_DATA
            // has room for the descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: `msg` points to live buffers (iov over `data`, control over `cbuf`).
        let r = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += r as usize;
    }
    Ok(())
}

/// What lockstep received from a writer.
#[derive(Debug)]
pub struct Handover {
    /// The writer's userfaultfd (registered, async write-protect).
    pub uffd: OwnedFd,
    /// The writer's `/proc/self/pagemap`.
    pub pagemap: OwnedFd,
    /// Start of the writer's mapping of the region, in its address space.
    pub addr: u64,
    /// Length of that mapping.
    pub len: u64,
    /// The writer's pid.
    pub pid: u32,
    /// The region file the writer maps.
    pub path: PathBuf,
}

/// Why a hand-over was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-over: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over: no complete message within {0:?}")]
    Timeout(Duration),
    #[error("hand-over: connection closed after {0} bytes, before a complete message")]
    Truncated(usize),
    #[error("hand-over: wrong magic {0:?} (expected \"LSMEMHO1\")")]
    BadMagic(Vec<u8>),
    #[error("hand-over: message of {0} bytes exceeds {MAX_MESSAGE}")]
    TooLong(usize),
    #[error("hand-over: expected exactly 2 descriptors (userfaultfd, pagemap), got {0}")]
    Fds(usize),
    #[error("hand-over: region path is empty or not UTF-8")]
    BadPath,
    #[error("hand-over: range {addr:#x}+{len} is not page aligned and non-empty")]
    BadRange { addr: u64, len: u64 },
    #[error("hand-over: first descriptor is not a userfaultfd ({0})")]
    NotUffd(String),
    #[error("hand-over: second descriptor is not a pagemap file ({0})")]
    NotPagemap(String),
}

/// Receive one hand-over message from `stream` within `timeout` and check it. Descriptors that
/// arrive with a refused message are closed. Leaves a read timeout set on `stream`. The caller
/// then builds the tracker ([`crate::track::uffd::UffdTracker::from_handover`]) and sends the
/// outcome with [`answer`]; the writer waits for it.
pub fn receive_handover(stream: &UnixStream, timeout: Duration) -> Result<Handover, HandoffError> {
    let deadline = Instant::now() + timeout;
    let mut data: Vec<u8> = Vec::with_capacity(HEADER);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut want = HEADER;
    while data.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoffError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let mut buf = vec![0u8; want - data.len()];
        let n = match recv_with_fds(stream, &mut buf, &mut fds) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandoffError::Timeout(timeout));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(HandoffError::Truncated(data.len()));
        }
        data.extend_from_slice(&buf[..n]);
        if data.len() >= 8 && &data[..8] != MAGIC {
            return Err(HandoffError::BadMagic(data[..8].to_vec()));
        }
        if data.len() == HEADER && want == HEADER {
            let path_len = u16::from_le_bytes([data[28], data[29]]) as usize;
            want = HEADER + path_len;
            if want > MAX_MESSAGE {
                return Err(HandoffError::TooLong(want));
            }
        }
    }
    if fds.len() != 2 {
        return Err(HandoffError::Fds(fds.len()));
    }
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    let addr = u64_at(8);
    let len = u64_at(16);
    let pid = u32::from_le_bytes(data[24..28].try_into().expect("4 bytes"));
    let path = std::str::from_utf8(&data[HEADER..]).map_err(|_| HandoffError::BadPath)?;
    if path.is_empty() || path.contains('\0') {
        return Err(HandoffError::BadPath);
    }
    let page = PAGE_SIZE as u64;
    if addr % page != 0 || len == 0 || len % page != 0 || addr.checked_add(len).is_none() {
        return Err(HandoffError::BadRange { addr, len });
    }
    let pagemap = fds.pop().expect("two fds");
    let uffd = fds.pop().expect("two fds");
    let l = fd_link(&uffd);
    if l != "anon_inode:[userfaultfd]" {
        return Err(HandoffError::NotUffd(l));
    }
    let l = fd_link(&pagemap);
    if !l.ends_with("/pagemap") {
        return Err(HandoffError::NotPagemap(l));
    }
    Ok(Handover {
        uffd,
        pagemap,
        addr,
        len,
        pid,
        path: PathBuf::from(path),
    })
}

fn fd_link(fd: &OwnedFd) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => format!("readlink failed: {e}"),
    }
}

/// One `recvmsg` into `buf` with `MSG_CMSG_CLOEXEC`; descriptors received are appended to
/// `fds` (owned, so they are closed if the message is refused).
#[allow(unsafe_code)]
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let fd_size = std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * fd_size) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points to live buffers: `buf` through the iovec and `cbuf` (8-aligned,
    // `space` bytes) for control data.
    let r = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking control messages the kernel wrote into `cbuf`, within `msg_controllen`,
    // with the CMSG_* accessors; each SCM_RIGHTS payload holds whole `int`s, each a new
    // descriptor now owned by this process (read unaligned: CMSG_DATA need not be aligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c);
                for k in 0..payload / fd_size {
                    let fd = std::ptr::read_unaligned(p.add(k * fd_size).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        // More descriptors than we take: certainly not a valid hand-over.
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} descriptors attached (control data truncated)"),
        ));
    }
    Ok(r as usize)
}

/// Answer the writer: `ok\n` or `error: <text>\n` (newlines in the text become spaces).
pub fn answer(stream: &UnixStream, result: &Result<(), String>) -> io::Result<()> {
    let line = match result {
        Ok(()) => "ok\n".to_owned(),
        Err(e) => format!("error: {}\n", e.replace(['\n', '\r'], " ")),
    };
    let mut s = stream;
    s.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    fn open_fd_count() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn wrong_magic_is_refused() {
        let (a, b) = pair();
        let mut msg = encode(0, 4096, 1, "/dev/shm/x").unwrap();
        msg[..8].copy_from_slice(b"NOTMAGIC");
        let f1 = File::open("/dev/null").unwrap();
        send_with_fds(&a, &msg, &[f1.as_raw_fd(), f1.as_raw_fd()]).unwrap();
        let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HandoffError::BadMagic(_)), "{e}");
        assert!(e.to_string().contains("magic"), "{e}");
    }

    #[test]
    fn missing_fds_are_refused() {
        let (a, b) = pair();
        let msg = encode(0, 4096, 1, "/dev/shm/x").unwrap();
        send_with_fds(&a, &msg, &[]).unwrap();
        let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HandoffError::Fds(0)), "{e}");
        assert!(e.to_string().contains("exactly 2 descriptors"), "{e}");

        let (a, b) = pair();
        let f = File::open("/dev/null").unwrap();
        send_with_fds(&a, &msg, &[f.as_raw_fd()]).unwrap();
        let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HandoffError::Fds(1)), "{e}");
    }

    #[test]
    fn regular_file_instead_of_uffd_is_refused_and_closed() {
        let before = open_fd_count();
        {
            let (a, b) = pair();
            let msg = encode(0x10000, 4096, 1, "/dev/shm/x").unwrap();
            let f = File::open("/proc/self/status").unwrap();
            let pm = File::open("/proc/self/pagemap").unwrap();
            send_with_fds(&a, &msg, &[f.as_raw_fd(), pm.as_raw_fd()]).unwrap();
            let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
            assert!(matches!(e, HandoffError::NotUffd(_)), "{e}");
            assert!(e.to_string().contains("not a userfaultfd"), "{e}");
        }
        // Tests run in parallel threads, so the count is only roughly comparable.
        assert!(open_fd_count() <= before + 16);
    }

    #[test]
    fn bad_ranges_paths_and_sizes_are_refused() {
        let f = File::open("/dev/null").unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encode(0x1001, 4096, 1, "/p").unwrap(), "page aligned"),
            (encode(0x1000, 4095, 1, "/p").unwrap(), "page aligned"),
            (encode(0x1000, 0, 1, "/p").unwrap(), "page aligned"),
            (encode(0x1000, 4096, 1, "").unwrap(), "path"),
            (
                {
                    let mut m = encode(0x1000, 4096, 1, "/p").unwrap();
                    m.truncate(HEADER - 2);
                    m.extend_from_slice(&5000u16.to_le_bytes());
                    m
                },
                "exceeds",
            ),
            (
                {
                    let mut m = encode(0x1000, 4096, 1, "/pp").unwrap();
                    let n = m.len();
                    m[n - 1] = 0xff;
                    m
                },
                "UTF-8",
            ),
        ];
        for (msg, text) in cases {
            let (a, b) = pair();
            send_with_fds(&a, &msg, &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
            let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
    }

    #[test]
    fn truncated_and_silent_peers() {
        let (a, b) = pair();
        let msg = encode(0x1000, 4096, 1, "/dev/shm/x").unwrap();
        send_with_fds(&a, &msg[..10], &[]).unwrap();
        let e = receive_handover(&b, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, HandoffError::Timeout(_)), "{e}");
        drop(a);
        let e = receive_handover(&b, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HandoffError::Truncated(0)), "{e}");
    }

    #[test]
    fn answers_round_trip() {
        let (a, b) = pair();
        answer(&a, &Ok(())).unwrap();
        answer(&a, &Err("no\nway".into())).unwrap();
        let mut b = b;
        assert_eq!(read_line(&mut b, 100).unwrap(), "ok");
        assert_eq!(read_line(&mut b, 100).unwrap(), "error: no way");
    }
}

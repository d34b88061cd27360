//! Tools of the hostile-peer tests: peer key files, raw exchanges with a port, a flood of idle
//! connections from another host (127.0.0.2), and a process's resident memory.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The peer secret both nodes of the keyed pairs share.
pub const PEER_SECRET: &str = "a secret both nodes share, 32 bytes";

/// A `--psk-file` holding `secret`, mode 0600.
pub fn key_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).expect("key file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("VmRSS")
}

/// What a raw connection that sends `bytes` at once gets back before the port closes it.
pub fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = c.write_all(bytes);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    got
}

/// Keep up to `n` idle connections from 127.0.0.2 to `addr` open, reopening the ones the
/// port closes, until `stop`.
pub fn flood(addr: String, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let target: SocketAddr = addr.parse().expect("addr");
        let mut open: Vec<TcpStream> = Vec::new();
        let mut made = 0u64;
        while !stop.load(Ordering::Relaxed) {
            open.retain(|c| {
                let mut b = [0u8; 64];
                c.set_nonblocking(true).ok();
                !matches!(std::io::Read::read(&mut &*c, &mut b), Ok(0))
            });
            while open.len() < n {
                let sock = connect_from_other_host(target);
                match sock {
                    Some(c) => {
                        made += 1;
                        open.push(c)
                    }
                    None => break,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        made
    })
}

/// A TCP connection from 127.0.0.2 (another host, as far as the port can tell).
pub fn connect_from_other_host(to: SocketAddr) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2)/bind(2)/connect(2) on a descriptor this function owns; the
    // sockaddr structures live on the stack for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut src: libc::sockaddr_in = std::mem::zeroed();
        src.sin_family = libc::AF_INET as libc::sa_family_t;
        src.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 2]);
        let mut dst: libc::sockaddr_in = std::mem::zeroed();
        dst.sin_family = libc::AF_INET as libc::sa_family_t;
        dst.sin_port = to.port().to_be();
        dst.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &src as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(TcpStream::from_raw_fd(fd))
    }
}

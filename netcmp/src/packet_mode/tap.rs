//! Opening a TAP interface: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI`, bound to an interface by
//! name with the `TUNSETIFF` ioctl (which creates the interface, or attaches to an existing one
//! no other process holds), then registered with tokio's reactor. The crate's only `unsafe`:
//! that ioctl, and the registration (which tokio marks unsafe: the descriptor must stay open
//! and the same while registered).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags (a `short`) at the start
/// of the union, padded to the C struct's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; std::mem::size_of::<libc::ifreq>() - libc::IFNAMSIZ - 2],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());

/// Whether `name` can name a network interface: 1 to 15 bytes, none of them NUL, `/`, `:` or
/// whitespace, and not `.` or `..`. (`%d` is allowed: the kernel then picks the number.)
pub fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!(
            "interface name {name:?}: 1 to {} bytes",
            libc::IFNAMSIZ - 1
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(format!(
            "interface name {name:?}: not a valid interface name"
        ));
    }
    Ok(())
}

/// Open the TAP interface `name` (created if missing), non-blocking, frames without a packet
/// information header, registered for readability with the current tokio runtime. Returns it
/// and the interface's name as the kernel reports it.
pub fn open(name: &str) -> io::Result<(AsyncFd<File>, String)> {
    let (file, name) = attach(name)?;
    // SAFETY: the `File` owns its descriptor, which is open (it was just opened) and which
    // `as_raw_fd` returns unchanged for as long as the `File` lives; the `AsyncFd` owns the
    // `File`, so the descriptor stays open and the same while it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(|e| {
        let (_, e) = e.into_parts();
        io::Error::new(e.kind(), format!("TAP {name}: {e}"))
    })?;
    Ok((fd, name))
}

fn attach(name: &str) -> io::Result<(File, String)> {
    valid_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; std::mem::size_of::<libc::ifreq>() - libc::IFNAMSIZ - 2],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` at the pointer; `req` is a
    // properly sized (asserted above) and aligned `#[repr(C)]` value, exclusively borrowed for
    // the duration of the call, and the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => " (needs CAP_NET_ADMIN, or a TAP created for this user)",
            Some(libc::EBUSY) => " (another process holds it)",
            Some(libc::EINVAL) => " (an interface of that name exists and is not a TAP)",
            _ => "",
        };
        return Err(io::Error::new(e.kind(), format!("TAP {name}: {e}{hint}")));
    }
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(libc::IFNAMSIZ);
    Ok((file, String::from_utf8_lossy(&req.name[..end]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        assert!(valid_name("lsp0").is_ok());
        assert!(valid_name("tap%d").is_ok());
        assert!(valid_name("0123456789abcde").is_ok());
        assert!(valid_name("0123456789abcdef").is_err());
        for bad in ["", ".", "..", "a/b", "a b", "a:0", "a\0b"] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }
}

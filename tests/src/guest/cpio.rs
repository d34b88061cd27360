//! A writer of uncompressed newc cpio archives, the initramfs format.

use std::collections::BTreeSet;
use std::io::Write;

/// A writer of uncompressed newc ("070701") cpio archives, all entries owned by root.
pub(super) struct Cpio<W: Write> {
    out: std::io::BufWriter<W>,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    pub(super) fn new(w: W) -> Self {
        Self {
            out: std::io::BufWriter::with_capacity(1 << 20, w),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let mut hdr = String::with_capacity(110);
        hdr.push_str("070701");
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        for v in [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len()).expect("cpio entry over 4 GiB"),
            0,
            0,
            0,
            0,
            u32::try_from(name.len() + 1).expect("name"),
            0,
        ] {
            hdr.push_str(&format!("{v:08x}"));
        }
        self.ino += 1;
        let w = &mut self.out;
        w.write_all(hdr.as_bytes()).expect("write cpio");
        w.write_all(name.as_bytes()).expect("write cpio");
        w.write_all(&[0]).expect("write cpio");
        let pad = |n: usize| (4 - n % 4) % 4;
        w.write_all(&[0; 3][..pad(110 + name.len() + 1)])
            .expect("write cpio");
        w.write_all(data).expect("write cpio");
        w.write_all(&[0; 3][..pad(data.len())]).expect("write cpio");
    }

    /// A directory and its parents (once each).
    pub(super) fn dir(&mut self, path: &str, dirs: &mut BTreeSet<String>) {
        let path = path.trim_end_matches('/');
        if path.is_empty() || dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, dirs);
        }
        self.entry(path, 0o040755, &[]);
        dirs.insert(path.to_string());
    }

    fn parent(&mut self, path: &str, dirs: &mut BTreeSet<String>) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, dirs);
        }
    }

    pub(super) fn file_bytes(
        &mut self,
        path: &str,
        perm: u32,
        data: &[u8],
        dirs: &mut BTreeSet<String>,
    ) {
        self.parent(path, dirs);
        self.entry(path, 0o100000 | (perm & 0o7777), data);
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str, dirs: &mut BTreeSet<String>) {
        self.parent(path, dirs);
        self.entry(path, 0o120777, target.as_bytes());
    }

    pub(super) fn finish(mut self) {
        self.entry("TRAILER!!!", 0, &[]);
        self.out.flush().expect("flush cpio");
        let f = self.out.into_inner().map_err(|e| e.into_error());
        f.expect("flush cpio");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut v = Vec::new();
        {
            let mut c = Cpio::new(&mut v);
            let mut dirs = BTreeSet::new();
            c.file_bytes("/a/b", 0o644, b"hello", &mut dirs);
            c.finish();
        }
        assert!(v.starts_with(b"070701"));
        assert_eq!(v.len() % 4, 0);
        let text = String::from_utf8_lossy(&v);
        assert!(text.contains("a\0"));
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }
}

//! A protected VM for the failover tests: Debian's kernel under TCG with a small busybox
//! initramfs (busybox and the prepared modules) whose `/init` runs a counter, guest RAM in a shared file (`memory-backend-file,
//! share=on`, what `--memory` replicates), its disk over NBD from a lockstep node, a QMP
//! socket, and the guest's web server forwarded to a host port.
//!
//! The counter program: the disk (ext2, mounted `sync`) holds `/count`; each step drops the
//! page cache, reads `/count` from the disk, compares it with the counter in memory (a
//! mismatch prints `GUEST-MISMATCH memory M disk D`), increments the counter, writes it to the
//! disk, publishes it at `http://…/count`, prints `COUNT n`, sleeps 50 ms. A VM resumed
//! from a checkpoint whose memory and disk belong to different moments says so at its next
//! step. `GET /cgi-bin/stop` makes it unmount the disk (`GUEST-UNMOUNTED n` on the
//! console) and idle, so that the test can check the filesystem it leaves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cpio::Cpio;
use super::prepared;
use crate::Daemon;

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m.ko 2>/dev/null; done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
mkdir -p /mnt /www/cgi-bin
printf '#!/bin/sh\ntouch /tmp/stop\nprintf "Content-Type: text/plain\\r\\n\\r\\nstopping\\n"\n' > /www/cgi-bin/stop
chmod +x /www/cgi-bin/stop
mount -t ext2 -o sync /dev/vda /mnt || { echo GUEST-NO-DISK > /dev/ttyS0; sleep 3600; }
i=$(cat /mnt/count 2>/dev/null || echo 0)
echo $i > /www/count
httpd -p 80 -h /www
echo "GUEST-START $i" > /dev/ttyS0
while true; do
  if [ -e /tmp/stop ]; then
    umount /mnt && echo "GUEST-UNMOUNTED $i" > /dev/ttyS0
    sleep 3600
  fi
  echo 3 > /proc/sys/vm/drop_caches
  d=$(cat /mnt/count 2>/dev/null || echo 0)
  [ "$d" = "$i" ] || echo "GUEST-MISMATCH memory $i disk $d" > /dev/ttyS0
  i=$((i+1))
  echo $i > /mnt/count.new
  mv /mnt/count.new /mnt/count
  echo $i > /www/count.new
  mv /www/count.new /www/count
  echo "COUNT $i" > /dev/ttyS0
  sleep 0.05
done
"#;

/// Build the VM's initramfs in `dir` (busybox, the virtio modules, `/init`); returns its path.
pub fn vm_initrd(dir: &Path) -> PathBuf {
    let p = prepared();
    let path = dir.join("vm-initrd.cpio");
    let mut c = Cpio::new(std::fs::File::create(&path).expect("initrd"));
    let mut dirs = BTreeSet::new();
    for d in ["proc", "sys", "dev", "tmp", "mnt"] {
        c.dir(d, &mut dirs);
    }
    let bb = std::fs::read(&p.busybox).expect("busybox");
    c.file_bytes("bin/busybox", 0o755, &bb, &mut dirs);
    // Every prepared module (virtio, ext4 and what they need), loaded in dependency order.
    for m in &p.load_order {
        let ko = std::fs::read(p.modules.join(format!("{m}.ko")))
            .unwrap_or_else(|e| panic!("module {m}: {e}"));
        c.file_bytes(&format!("lib/modules/{m}.ko"), 0o644, &ko, &mut dirs);
    }
    let order = p.load_order.join("\n") + "\n";
    c.file_bytes("lib/modules/load-order", 0o644, order.as_bytes(), &mut dirs);
    c.file_bytes("init", 0o755, INIT.as_bytes(), &mut dirs);
    c.finish();
    path
}

/// One QEMU running (or waiting to receive) the protected VM.
#[derive(Debug)]
pub struct VmSpec {
    /// Guest RAM: a file of `ram_mib` MiB, shared.
    pub ram: PathBuf,
    /// Its size.
    pub ram_mib: u32,
    /// The disk: a lockstep export at `127.0.0.1:PORT` (NBD, export `lockstep`). QEMU
    /// reconnects for up to 30 s if the server goes away (a daemon restarted in place).
    pub disk: String,
    /// QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The host port forwarded to the guest's web server.
    pub http_port: u16,
    /// A second QMP socket, for the test while lockstep holds the first.
    pub admin_qmp: Option<PathBuf>,
    /// The serial console's file.
    pub console: PathBuf,
    /// Start with `-incoming defer` (to be resumed from a device state).
    pub incoming: bool,
}

/// Start QEMU for `spec` (initramfs from [`vm_initrd`]); its stderr goes to `dir`.
pub fn start_vm(spec: &VmSpec, initrd: &Path, dir: &Path, name: &str) -> Daemon {
    let p = prepared();
    let mem = format!(
        "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
        spec.ram_mib,
        spec.ram.display()
    );
    let qmp = format!("unix:{},server=on,wait=off", spec.qmp.display());
    let serial = format!("file:{}", spec.console.display());
    let (host, port) = spec.disk.rsplit_once(':').expect("HOST:PORT");
    let drive = format!(
        "driver=nbd,node-name=d0,server.type=inet,server.host={host},server.port={port},export=lockstep,reconnect-delay=30"
    );
    let net = format!(
        "user,id=n0,hostfwd=tcp:127.0.0.1:{}-10.0.2.15:80",
        spec.http_port
    );
    let m = spec.ram_mib.to_string();
    let mut args = vec![
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        &m,
        "-smp",
        "1",
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-object",
        &mem,
        "-machine",
        "pc,memory-backend=mem",
        "-kernel",
    ];
    let kernel = p.kernel.to_str().expect("utf-8 path");
    let initrd = initrd.to_str().expect("utf-8 path");
    args.extend([
        kernel,
        "-initrd",
        initrd,
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-serial",
        &serial,
        "-qmp",
        &qmp,
        "-blockdev",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0",
        "-netdev",
        &net,
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]);
    let admin = spec
        .admin_qmp
        .as_ref()
        .map(|p| format!("unix:{},server=on,wait=off", p.display()));
    if let Some(a) = &admin {
        args.extend(["-qmp", a]);
    }
    if spec.incoming {
        args.extend(["-incoming", "defer"]);
    }
    Daemon::start(name, &p.qemu, &args, dir)
}

/// The `COUNT n` values a console printed, in order, and whether it printed a mismatch.
pub fn counts(console: &Path) -> (Vec<u64>, Vec<String>) {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let mut counts = Vec::new();
    let mut bad = Vec::new();
    for l in text.lines() {
        if let Some(n) = l.strip_prefix("COUNT ") {
            if let Ok(n) = n.trim().parse() {
                counts.push(n);
            }
        } else if l.contains("GUEST-MISMATCH") || l.contains("GUEST-NO-DISK") {
            bad.push(l.to_string());
        }
    }
    (counts, bad)
}

/// Wait until the console shows a `COUNT` of at least `n`; panics with its tail after
/// `deadline` or if QEMU exits.
pub fn wait_count(console: &Path, n: u64, deadline: Duration, qemu: &mut Daemon) -> u64 {
    let start = Instant::now();
    loop {
        let (c, _) = counts(console);
        if let Some(&last) = c.last() {
            if last >= n {
                return last;
            }
        }
        if let Ok(Some(st)) = qemu.child.try_wait() {
            panic!("QEMU exited ({st}):\n{}", qemu.log_text());
        }
        if start.elapsed() > deadline {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            panic!(
                "no COUNT {n} within {deadline:?}; console tail:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

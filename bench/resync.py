#!/usr/bin/env python3
"""Resync benchmark: lockstep's sync throughput against the raw loopback link, and the time
to resume replication after a 1-second link cut under fio load.

Rows, all in one run on this machine:
  raw link       Python sockets blasting 1 MiB buffers over loopback TCP (the link's limit)
  local copy     dd of the primary image into a new file, ended by fdatasync as the sync
                 ends with a flushed checkpoint (the secondary disk's write limit)
  full sync      an empty secondary gets every block of a primary filled with random data
  checksum sync  a secondary holding the same data except 1% of its 64 KiB chunks
  cut 1 s        fio (randwrite, rated) through the primary; the link (a proxy) is cut for
                 1 s; time from the heal until replication resumed and until the resync
                 committed, and the bytes resent against the bytes written meanwhile

Usage: bench/resync.py [--size 1G] [--quick] (needs target/release/lockstep and fio)
"""

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import control, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("LOCKSTEP_BIN", os.path.join(ROOT, "target/release/lockstep"))


def wait(pred, what, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        try:
            v = pred()
            if v:
                return v
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    sys.exit(f"timed out waiting for {what}")


def raw_link(total):
    port = free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    got = [0]

    def sink():
        c, _ = srv.accept()
        buf = bytearray(1 << 20)
        while True:
            n = c.recv_into(buf)
            if not n:
                break
            got[0] += n
        c.close()

    th = threading.Thread(target=sink)
    th.start()
    c = socket.create_connection(("127.0.0.1", port))
    data = os.urandom(1 << 20)
    t = time.time()
    for _ in range(total >> 20):
        c.sendall(data)
    c.close()
    th.join()
    dt = time.time() - t
    srv.close()
    return got[0] / dt / 1e6


class Proxy:
    """Forwards a port to a target; cut() closes everything and refuses until heal()."""

    def __init__(self, target):
        self.target = target
        self.down = False
        self.open = []
        self.lock = threading.Lock()
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.addr = "127.0.0.1:%d" % self.ls.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            if self.down:
                c.close()
                continue
            h, p = self.target.split(":")
            try:
                s = socket.create_connection((h, int(p)))
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.open += [c, s]
            for a, b in ((c, s), (s, c)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(a, b):
        try:
            while True:
                d = a.recv(1 << 20)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.down = True
        with self.lock:
            for x in self.open:
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open = []

    def heal(self):
        self.down = False


def start(args, log):
    return subprocess.Popen([BIN] + args, stdout=log, stderr=log)


def stop(p):
    if p and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def pair(d, size, p_img, s_img, via_proxy=False, pflags=()):
    listen = "127.0.0.1:%d" % free_port()
    export = "127.0.0.1:%d" % free_port()
    ps, ss = os.path.join(d, "p.sock"), os.path.join(d, "s.sock")
    log = open(os.path.join(d, "daemons.log"), "ab")
    sec = start(["secondary", "--disk", s_img, "--size", size, "--listen", listen,
                 "--control", ss], log)
    wait(lambda: os.path.exists(ss) and control(ss, {"cmd": "status"})["mode"] == "waiting",
         "the secondary")
    proxy = Proxy(listen) if via_proxy else None
    target = proxy.addr if proxy else listen
    pri = start(["primary", "--disk", p_img, "--size", size, "--export", export,
                 "--secondary", target, "--control", ps, "--checkpoint-interval", "100ms",
                 *pflags], log)
    return pri, sec, ps, ss, export, proxy


def synced(ps, sessions=1):
    v = control(ps, {"cmd": "status"})
    r = v["resync"]
    ok = (v["mode"] == "replicating" and not v["resyncing"] and r["state"] == "done"
          and v["sessions"] >= sessions)
    return v if ok else None


def fill_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 << 20)
            f.write(os.urandom(n))
            left -= n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--quick", action="store_true", help="256 MiB disks")
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    if a.quick:
        a.size = "256M"
    size = int(a.size[:-1]) << {"M": 20, "G": 30}[a.size[-1]]
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: cargo build --release -p lockstep-cli")
    if not shutil.which("fio"):
        sys.exit("fio is missing: apt install fio")
    d = tempfile.mkdtemp(prefix="lockstep-resync-", dir=a.dir)
    rows = []
    try:
        raw = max(raw_link(min(size, 1 << 30)) for _ in range(2))
        rows.append(("raw link (python sockets)", f"{raw:.0f} MB/s", ""))

        p_img, s_img = os.path.join(d, "p.img"), os.path.join(d, "s.img")
        fill_random(p_img, size)
        # The other limit: writing the same data into a new file on this filesystem, flushed
        # (the sync is done when its checkpoint, which flushes the secondary's disk, commits).
        copy = os.path.join(d, "copy.img")

        def local_copy():
            t = time.time()
            subprocess.run(["dd", f"if={p_img}", f"of={copy}", "bs=1M", "conv=fdatasync",
                            "status=none"], check=True)
            rate = size / (time.time() - t) / 1e6
            os.remove(copy)
            return rate

        local = max(local_copy() for _ in range(2))
        rows.append(("local file copy (dd, fdatasync)", f"{local:.0f} MB/s", ""))
        pri, sec, ps, ss, export, _ = pair(d, a.size, p_img, s_img)
        v = wait(lambda: synced(ps), "the full sync", 600)
        r = v["resync"]
        send_s = r["total_s"] - r["compare_s"]
        full = r["sent_bytes"] / send_s / 1e6
        rows.append(("full sync", f"{full:.0f} MB/s",
                     f"{full / raw:.2f}x raw link, {full / local:.2f}x local copy, "
                     f"{full / min(raw, local):.2f}x the slower (goal 0.8x); "
                     f"{r['sent_bytes'] >> 20} MiB in {r['total_s']:.2f} s "
                     f"(sending at {r['throughput_mb_s']:.0f} MB/s, then the checkpoint)"))
        stop(pri)
        stop(sec)

        # Checksum: 1% of the chunks differ.
        os.remove(s_img + ".lockstep-meta")
        chunks = size // 65536
        changed = random.Random(1).sample(range(chunks), max(1, chunks // 100))
        with open(s_img, "r+b") as f:
            for c in changed:
                f.seek(c * 65536 + 100)
                f.write(b"\xff" * 16)
        pri, sec, ps, ss, export, _ = pair(d, a.size, p_img, s_img)
        v = wait(lambda: synced(ps), "the checksum sync", 600)
        r = v["resync"]
        rows.append(("checksum sync", f"{size / r['total_s'] / 1e6:.0f} MB/s compared",
                     f"{r['compared_units'] - r['equal_units']} of {r['compared_units']} chunks "
                     f"differed ({len(changed)} changed), {r['sent_bytes'] >> 10} KiB sent, "
                     f"{r['total_s']:.2f} s, comparing {r['compare_s']:.2f} s"))
        stop(pri)
        stop(sec)

        # A 1 s cut under fio load.
        for f in (p_img, s_img, p_img + ".lockstep-meta", s_img + ".lockstep-meta",
                  p_img + ".lockstep-bitmap"):
            if os.path.exists(f):
                os.remove(f)
        pri, sec, ps, ss, export, proxy = pair(d, a.size, p_img, s_img, via_proxy=True)
        wait(lambda: synced(ps), "the initial sync", 600)
        fio = subprocess.Popen(
            ["fio", "--name=load", "--ioengine=nbd", f"--uri=nbd://{export}/lockstep",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--rate=20m", "--size=" + a.size,
             "--time_based", "--runtime=12", "--norandommap"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        proxy.cut()
        time.sleep(1)
        healed = time.time()
        proxy.heal()
        wait(lambda: control(ps, {"cmd": "status"})["mode"] == "replicating"
             and control(ps, {"cmd": "status"})["sessions"] >= 2, "the resume", 60)
        resumed = time.time() - healed
        v = wait(lambda: synced(ps, 2), "the resync", 120)
        done = time.time() - healed
        r = v["resync"]
        fio.wait(60)
        rows.append(("cut 1 s under fio", f"resumed {resumed:.2f} s after the heal",
                     f"consistent again after {done:.2f} s; resent {r['sent_bytes'] >> 10} KiB "
                     f"of {r['dirty_at_start'] * 4} KiB dirty "
                     f"(ratio {r['sent_bytes'] / max(1, r['dirty_at_start'] * 4096):.2f})"))
        stop(pri)
        stop(sec)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    print(f"\nresync benchmark, {a.size} disks, loopback")
    for name, val, note in rows:
        print(f"  {name:<{w}}  {val:<28} {note}")


if __name__ == "__main__":
    main()

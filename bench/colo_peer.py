#!/usr/bin/env python3
"""QEMU's colo-compare run standalone as a packet comparator, and measured: throughput of one
TCP stream and per-packet release latency, so netcmp (same framing) can be measured the same way.

colo-compare is a QOM object of QEMU's COLO network proxy (net/colo-compare.c). It needs no
guest, no KVM and no COLO migration to run: `qemu-system-x86_64 -machine none` with an
iothread and four unix-socket chardevs (qemu listens, this script connects):

  primary_in     the primary's output frames           (this script writes)
  secondary_in   the secondary's output frames         (this script writes)
  outdev         released primary frames               (this script reads)
  notify_dev     "DO_CHECKPOINT" requests out, "COLO_CHECKPOINT" (= flush) in; optional

Framing on all four, both directions (net/net.c net_fill_rstate, vnet_hdr_support off, the
default): a 4-byte big-endian length, then the Ethernet frame (no FCS).

What colo-compare does (net/colo-compare.c and net/colo.c of QEMU 10.0; `--explore` shows
each point on the running binary):

  - Frames that are not IPv4 (ARP, IPv6, VLAN-tagged) from primary_in go to outdev at once,
    uncompared (parse_packet_early fails, compare_pri_rs_finalize sends them on); from
    secondary_in they are dropped. One such frame is the readiness probe here and the
    "no comparison" latency reference.
  - IPv4 is queued per connection (5-tuple as seen; no SYN, handshake or TCP state is
    needed), each side's queue sorted by TCP sequence number, and compared as soon as both
    queues of the connection hold something (colo_compare_connection).
  - TCP (colo_compare_tcp, colo_mark_tcp_pkt): only the payload is compared, by byte offset
    from the queue heads; IP/TCP headers, checksums, ACK, window, flags and even the
    sequence numbers themselves are not. Segments cut differently on the two sides still
    match. The primary's frame goes out as it came. A segment without payload (pure ACK) is
    released uncompared, but only when the secondary's queue of that connection is not
    empty. A primary segment that ends inside the secondary's is released only if its ACK
    is not above the smaller of the ACKs recorded per side (meant as each side's highest,
    in effect the last one queued; fill_pkt_tcp_info), else it is a mismatch.
  - UDP, ICMP, other IP protocols: whole packets, the IP payload must match (per packet).
  - A mismatch, or a queued frame older than compare_timeout (scanned every
    expired_scan_cycle), requests a checkpoint: "DO_CHECKPOINT" on notify_dev when there is
    one, otherwise a notifier that only a running COLO migration listens to
    (migration/colo.c colo_process_checkpoint). Until a checkpoint nothing of that
    connection is released: "COLO_CHECKPOINT" on notify_dev releases every queued primary
    frame and drops the secondary's (colo_flush_packets). Standalone without notify_dev a
    mismatching or unmatched frame is held forever (until qemu exits).
  - Comparison is eager: a primary segment arriving out of order while the secondary's
    queue holds an earlier one is a mismatch (a checkpoint request), even if all match later.
  - Each queue holds at most max_queue_size + 1 frames (one global value, default 1024);
    frames beyond it are dropped silently (colo_insert_packet), not released later.
  - Released frames wait in a send list that the writer coroutine takes from the tail
    (compare_chr_send / _compare_chr_send): while outdev's socket is full (the write sleeps
    100 µs per EAGAIN, chardev/char.c qemu_chr_write_buffer) frames pile up and leave in
    reverse order. Throughput runs are therefore windowed by default (a TCP-like bound on
    frames in flight keeps outdev from backing up) and must come out in order; the
    free-running run shows the reordering.

    python3 bench/colo_peer.py                   # 64 MiB stream, 2000 exchanges
    python3 bench/colo_peer.py --size 16M --exchanges 500 --explore

bench(tmp, size, n) returns the same numbers as a dict (bench/netcmp.py's "colo" row).
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RunError, die_with_parent, parse_size, spawn, stop_proc, tail  # noqa: E402
from frames import (  # noqa: E402
    CLIENT, SERVER, TCP_ACK, TCP_PSH, chunks, decode, drain, encode, frames_tcp_stream,
    ipv6_frame, payload_bytes, raw_frame, recv_exact, recv_frame, tcp_frame, udp_frame,
)
from packet_measure import (  # noqa: E402
    IO_TIMEOUT, best_of, fmt_lat, fmt_rate, lat_stats, measure_latency, measure_passthrough_latency,
)

QEMU = "qemu-system-x86_64"
START_DEADLINE = 15.0
LIFETIME = 600.0          # a qemu started here is killed after this, whatever happens
PROBE_WAIT = 0.2          # per readiness probe
MAX_BENCH_SIZE = 256 << 20  # bench(): frames are built in memory (about 3x the payload)


DO_CHECKPOINT = b"DO_CHECKPOINT"
COLO_CHECKPOINT = b"COLO_CHECKPOINT"
PROXY_INIT = b"COLO_USERSPACE_PROXY_INIT"
PROXY_INIT_REPLY = b"COLO_COMPARE_GET_XEN_INIT"


# ---------------------------------------------------------------------------------------
# peers: anything with .pri, .sec, .out sockets speaking the framing above


class Peer:
    """The harness's side of a comparator: .pri and .sec (we write), .out (we read)."""

    name = "peer"
    pri = sec = out = None

    def feed(self, primary_frames, secondary_frames, chunk=256):
        """Write the frames to primary_in and secondary_in alternately, `chunk` frames per
        sendall, so neither side runs more than a chunk (plus socket buffers) ahead."""
        self.feed_chunks(chunks(primary_frames, chunk), chunks(secondary_frames, chunk))

    def feed_chunks(self, pri_chunks, sec_chunks, before=None):
        """Write already encoded chunks alternately; before(i), when given, is called ahead
        of chunk pair i and stops the feed by returning False."""
        for i in range(max(len(pri_chunks), len(sec_chunks))):
            if before is not None and not before(i):
                return False
            if i < len(pri_chunks):
                self.pri.sendall(pri_chunks[i])
            if i < len(sec_chunks):
                self.sec.sendall(sec_chunks[i])
        return True

    def fail(self, msg):
        raise RunError(f"{self.name}: {msg}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for s in (self.pri, self.sec, self.out):
            if s is not None:
                s.close()


class ColoCompare(Peer):
    """`qemu-system-x86_64 -machine none` running one colo-compare object on unix-socket
    chardevs in a temporary directory; we connect to each as a client. Options map to the
    object's properties (None: QEMU's default: compare_timeout 3000 ms, expired_scan_cycle
    1000 ms, max_queue_size 1024). notify: add notify_dev, so checkpoint requests come to
    us (DO_CHECKPOINT) and checkpoint() can flush. qemu is killed by pid in close()."""

    name = "colo-compare"

    def __init__(self, *, qemu=QEMU, compare_timeout_ms=None, expired_scan_cycle_ms=None,
                 max_queue_size=None, notify=False, workdir=None, lifetime=LIFETIME):
        self.qemu = shutil.which(qemu) or qemu
        self.opts = {"compare_timeout": compare_timeout_ms, "expired_scan_cycle": expired_scan_cycle_ms,
                     "max_queue_size": max_queue_size}
        self.notify_enabled = notify
        self.lifetime = lifetime
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="colo-peer-"))
        self.log = self.dir / "qemu.log"
        self.proc = None
        self.notify = None
        self._watchdog = None
        self._probe_tag = 0

    def sock_path(self, name):
        return self.dir / f"{name}.sock"

    def command(self):
        names = ["pri", "sec", "out"] + (["notify"] if self.notify_enabled else [])
        cmd = [self.qemu, "-machine", "none", "-nodefaults", "-display", "none", "-nographic",
               "-object", "iothread,id=iothread1"]
        for n in names:
            cmd += ["-chardev", f"socket,id={n},path={self.sock_path(n)},server=on,wait=off"]
        obj = "colo-compare,id=cmp,primary_in=pri,secondary_in=sec,outdev=out,iothread=iothread1"
        if self.notify_enabled:
            obj += ",notify_dev=notify"
        for k, v in self.opts.items():
            if v is not None:
                obj += f",{k}={int(v)}"
        return cmd + ["-object", obj]

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def start(self):
        for n in ("pri", "sec", "out", "notify"):
            self.sock_path(n).unlink(missing_ok=True)
        self.proc = spawn(self.command(), self.log)
        self._watchdog = threading.Timer(self.lifetime, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        # outdev first: what colo-compare sends while nobody is connected there is lost
        self.out = self._connect("out")
        self.pri = self._connect("pri")
        self.sec = self._connect("sec")
        if self.notify_enabled:
            self.notify = self._connect("notify")
        self._wait_ready()

    def _connect(self, name):
        path = self.sock_path(name)
        end = time.monotonic() + START_DEADLINE
        while True:
            self._check_alive(f"connecting to {name}")
            if path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(path))
                    s.settimeout(IO_TIMEOUT)
                    return s
                except OSError:
                    s.close()
            if time.monotonic() > end:
                self.fail(f"{path} did not accept within {START_DEADLINE:.0f}s:\n{tail(self.log)}")
            time.sleep(0.01)

    def _check_alive(self, what):
        if self.proc.poll() is not None:
            self.fail(f"qemu exited with {self.proc.returncode} while {what}:\n{tail(self.log)}")

    def _wait_ready(self):
        """Send non-IP probe frames on primary_in (forwarded uncompared) until one comes out
        of outdev, then read up to the last one sent, so the stream starts clean. A probe
        sent before qemu accepted outdev is dropped, later ones all arrive in order."""
        end = time.monotonic() + START_DEADLINE
        first = self._probe_tag + 1
        buf = b""
        while True:
            self._check_alive("waiting for the first probe frame")
            self._probe_tag += 1
            self.pri.sendall(encode([raw_frame(self._probe_tag)]))
            buf += drain(self.out, PROBE_WAIT)
            frames, _ = decode(buf)
            if frames:
                break
            if time.monotonic() > end:
                self.fail(f"no probe frame came out of outdev within {START_DEADLINE:.0f}s:\n{tail(self.log)}")
        last = self._probe_tag
        while True:
            frames, rest = decode(buf)
            tags = [int.from_bytes(f[14:22], "big") for f in frames]
            bad = [t for t in tags if not first <= t <= last]
            if bad or len(frames) != len(set(tags)):
                self.fail(f"unexpected frames on outdev while starting: tags {tags}")
            if last in tags:
                if rest:
                    self.fail("stray bytes on outdev after the probe frames")
                break
            more = drain(self.out, PROBE_WAIT)
            if not more:
                self.fail(f"probe {last} did not come back (got {tags})")
            buf += more
        if self.notify_enabled:
            # notify_dev handshake (net/colo-compare.c compare_notify_rs_finalize)
            self.notify.sendall(encode([PROXY_INIT]))
            reply = recv_frame(self.notify)
            if reply != PROXY_INIT_REPLY:
                self.fail(f"notify_dev answered {reply!r} to {PROXY_INIT!r}")

    def checkpoint(self):
        """Tell colo-compare a checkpoint happened: it releases every queued primary frame
        and drops the queued secondary frames."""
        if not self.notify_enabled:
            self.fail("checkpoint() needs notify=True")
        self.notify.sendall(encode([COLO_CHECKPOINT]))

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def close(self):
        if self._watchdog is not None:
            self._watchdog.cancel()
        for s in (self.pri, self.sec, self.out, self.notify):
            if s is not None:
                s.close()
        stop_proc(self.proc)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def version(self):
        r = subprocess.run([self.qemu, "--version"], capture_output=True, text=True, timeout=30)
        return r.stdout.splitlines()[0] if r.stdout else "?"


class NetcmpPacket(ColoCompare):
    """lockstep netcmp's packet mode on the same three unix sockets and the same framing
    (netcmp listens, we connect; its client port plays outdev), so the same frames go through
    both comparators. No --control: comparison only, like colo-compare without a COLO
    migration."""

    name = "netcmp"

    def __init__(self, *, lockstep, workdir=None, lifetime=LIFETIME):
        super().__init__(workdir=workdir, lifetime=lifetime)
        self.lockstep = str(lockstep)
        self.log = self.dir / "netcmp.log"

    def command(self):
        p = self.sock_path
        return [self.lockstep, "netcmp", "--packet", "--client-port", f"unix:{p('out')}",
                "--primary-port", f"unix:{p('pri')}", "--secondary-port", f"unix:{p('sec')}"]

    def version(self):
        r = subprocess.run([self.lockstep, "--version"], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "?"


class LoopPeer(Peer):
    """No comparator: primary_in's bytes go straight to outdev (one socket pair), secondary_in
    is drained by `cat` into /dev/null. measure_throughput() on it is the harness's ceiling."""

    name = "socketpair"

    def __init__(self, lifetime=LIFETIME):
        self.lifetime = lifetime
        self.cat = None

    def __enter__(self):
        self.pri, self.out = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sec, sink = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with sink:
            self.cat = subprocess.Popen(["timeout", str(int(self.lifetime)), "cat"], stdin=sink,
                                        stdout=subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.out.settimeout(IO_TIMEOUT)
        return self

    def close(self):
        super().close()
        if self.cat is not None:
            try:
                self.cat.wait(5)  # EOF on its stdin once .sec is closed
            except subprocess.TimeoutExpired:
                stop_proc(self.cat)


def measure_timeout(peer, n=3, *, size=64):
    """n times: one primary frame on a fresh connection, no secondary frame. With notify_dev:
    (ms until DO_CHECKPOINT, ms until released after our COLO_CHECKPOINT). Without: None per
    try when nothing came out within compare_timeout + 2 scan cycles + 1 s (held forever)."""
    timeout_ms = peer.opts.get("compare_timeout") or 3000
    scan_ms = peer.opts.get("expired_scan_cycle") or 1000
    wait = (timeout_ms + 2 * scan_ms) / 1000 + 1
    res = []
    for i in range(n):
        f = frames_tcp_stream(size, size, dst=(CLIENT[0], 50000 + i), seed=100 + i)[0]
        e = encode([f])
        t0 = time.perf_counter()
        peer.pri.sendall(e)
        if not peer.notify_enabled:
            got = drain(peer.out, wait)
            res.append(None if not got else (None, (time.perf_counter() - t0) * 1000))
            continue
        peer.notify.settimeout(wait)
        try:
            msg = recv_frame(peer.notify)
        finally:
            peer.notify.settimeout(IO_TIMEOUT)
        t_req = time.perf_counter()
        if msg != DO_CHECKPOINT:
            peer.fail(f"notify_dev sent {msg!r}")
        peer.checkpoint()
        if recv_exact(peer.out, len(e)) != e:
            peer.fail("frame released after the checkpoint differs")
        res.append(((t_req - t0) * 1000, (time.perf_counter() - t0) * 1000))
        # later DO_CHECKPOINTs for the same packet may be queued: drop them
        drain(peer.notify, 0.05)
    return res


# ---------------------------------------------------------------------------------------
# behaviours (--explore): small scenarios, each on a fresh connection, what comes out


def _scenario(peer, first, second, *, second_side="sec", gap=0.05, wait=0.3):
    """Write `first` frames to the other side, `gap` s later `second` to `second_side`
    ("sec": primary first); returns (released, checkpoint requests, flushed): the frames out
    within `wait` s of quiet, the DO_CHECKPOINTs on notify_dev meanwhile, and the frames a
    checkpoint then released (what colo-compare was still holding)."""
    a, b = (peer.pri, peer.sec) if second_side == "sec" else (peer.sec, peer.pri)
    if first:
        a.sendall(encode(first))
        time.sleep(gap)
    if second:
        b.sendall(encode(second))
    released = decode(drain(peer.out, wait))[0]
    reqs = decode(drain(peer.notify, 0.02))[0]
    peer.checkpoint()
    flushed = decode(drain(peer.out, 0.1))[0]
    drain(peer.notify, 0.02)
    return released, reqs, flushed


def explore(peer):
    """Small scenarios on `peer` (a ColoCompare with notify=True), each on its own connection
    (client port) and followed by a checkpoint that flushes what is still held. Returns
    [(scenario, outcome)]."""
    if not peer.notify_enabled:
        peer.fail("explore() needs notify=True")
    out = []
    ports = iter(range(41000, 42000))

    def run(name, pri, sec, order="pri-first", expected=None, **kw):
        if order == "pri-first":
            r, q, f = _scenario(peer, pri, sec, second_side="sec", **kw)
        else:
            r, q, f = _scenario(peer, sec, pri, second_side="pri", **kw)
        expected = pri if expected is None else expected
        desc = f"{len(r)}/{len(pri)} released" + (" in order" if r and r == expected[:len(r)] else "")
        if q:
            desc += f", {len(q)} checkpoint request(s)"
        if f:
            desc += f", {len(f)} held until the checkpoint"
        if len(r) + len(f) < len(pri):
            desc += f", {len(pri) - len(r) - len(f)} LOST"
        out.append((name, desc))

    def stream(total, mss, **kw):
        return frames_tcp_stream(total, mss, dst=(CLIENT[0], next(ports)), **kw)

    f = stream(1000, 1000)
    run("data, identical, no SYN/handshake before", f, f)
    f = stream(1000, 1000)
    run("data, identical, secondary's first", f, f, order="sec-first")
    f = stream(1000, 1000, syn_ack=True)
    run("SYN-ACK + data, identical", f, f)
    d = (CLIENT[0], next(ports))
    p = frames_tcp_stream(1000, 1000, dst=d)
    s = [tcp_frame(SERVER, d, 1_000_000, 2_000_777, TCP_ACK, payload_bytes(1000), ident=999,
                   window=1234, ttl=33, bad_checksum=True)]
    run("same payload; other ACK, window, TTL, IP id, flags; bad TCP csum", p, s)
    d = (CLIENT[0], next(ports))
    p = frames_tcp_stream(1000, 1000, dst=d)
    s = frames_tcp_stream(1000, 1000, dst=d, seed=7)
    run("payload differs", p, s)
    d = (CLIENT[0], next(ports))
    p = frames_tcp_stream(1000, 1000, dst=d)
    s = frames_tcp_stream(1000, 1000, dst=d, isn=1_000_001)
    run("same payload, secondary's seq +1", p, s)
    d = (CLIENT[0], next(ports))
    a = [tcp_frame(SERVER, d, 1_000_000, 2_000_000, TCP_ACK)]
    run("pure ACK, primary only", a, [])
    d = (CLIENT[0], next(ports))
    a = [tcp_frame(SERVER, d, 1_000_000, 2_000_000, TCP_ACK)]
    b = [tcp_frame(SERVER, d, 1_000_000, 2_000_005, TCP_ACK | TCP_PSH, window=7)]
    run("pure ACK, then a different pure ACK from the secondary", a, b)
    for order in ("pri-first", "sec-first"):
        d = (CLIENT[0], next(ports))
        data = payload_bytes(2000, 3)
        p = frames_tcp_stream(2000, 1000, dst=d, payload=data)
        s = frames_tcp_stream(2000, 2000, dst=d, payload=data)
        run(f"same 2000 B: primary 2x1000, secondary 1x2000, {order}", p, s, order=order)
        d = (CLIENT[0], next(ports))
        p = frames_tcp_stream(2000, 2000, dst=d, payload=data)
        s = frames_tcp_stream(2000, 1000, dst=d, payload=data)
        run(f"same 2000 B: primary 1x2000, secondary 2x1000, {order}", p, s, order=order)
    d = (CLIENT[0], next(ports))
    p = frames_tcp_stream(2000, 1000, dst=d, payload=data, ack=2_000_100)
    s = frames_tcp_stream(2000, 2000, dst=d, payload=data)
    run("same 2000 B: primary 2x1000 with ACK +100, secondary 1x2000", p, s)
    for order in ("pri-first", "sec-first"):
        f = stream(4000, 1000)
        run(f"4 segments, the primary's in reverse order, {order}", f[::-1], f, order=order, expected=f)
    f = stream(2000, 1000)
    run("primary sends segment 1 twice (retransmit)", [f[0], f[0], f[1]], f, expected=[f[0], f[0], f[1]])
    f = stream(1000, 1000, isn=0xFFFFFE00)
    run("segment across the 2^32 sequence wrap", f, f)
    f = stream(1000, 1000)
    run("secondary's 0.5 s after the primary's", f, f, gap=0.5)
    d = (CLIENT[0], next(ports))
    u = [udp_frame(SERVER, d, b"x" * 100)]
    run("UDP, identical", u, u)
    d = (CLIENT[0], next(ports))
    run("UDP, payload differs", [udp_frame(SERVER, d, b"x" * 100)], [udp_frame(SERVER, d, b"x" * 99 + b"y")])
    v6 = [ipv6_frame(b"six" * 30)]
    run("IPv6, primary only", v6, [])
    run("IPv6, payloads differ", v6, [ipv6_frame(b"SIX" * 30)])
    qmax = peer.opts.get("max_queue_size") or 1024
    f = stream((qmax + 10) * 100, 100)
    run(f"{len(f)} primary frames before any secondary (max_queue_size {qmax})", f, f, gap=0.3, wait=0.5)
    return out


# ---------------------------------------------------------------------------------------


def bench(tmp, size, n, *, mss=1448, window=64, chunk=256, runs=None, qemu=QEMU, log=None):
    """Everything bench/netcmp.py shows for colo-compare, as one JSON-able dict: the stream
    (`size` bytes of payload, at most MAX_BENCH_SIZE) windowed and in order (best of `runs`,
    default 3 up to 64 MiB, else 1) as "gb_s"; free-running (with its reordering); the
    harness alone on a socket pair; `n` exchanges of per-packet latency and of the
    passthrough path. qemu's logs go to `tmp`. Each configuration that fails carries its
    error instead; RunError only when nothing could be measured. log(line): progress."""
    log = log or (lambda line: None)
    size = min(size, MAX_BENCH_SIZE)
    runs = runs or (3 if size <= 64 << 20 else 1)
    frames = frames_tcp_stream(size, mss)
    r = {"stream_bytes": size, "mss": mss, "window": window, "chunk": chunk, "exchanges": n}
    work = Path(tmp) / "colo"
    work.mkdir(parents=True, exist_ok=True)

    def colo(**kw):
        return lambda: ColoCompare(qemu=qemu, workdir=work, **kw)

    def attempt(key, fn):
        log(f"colo-compare: {key}")
        try:
            r[key] = fn()
        except RunError as e:
            r[key] = {"error": str(e)}

    attempt("windowed", lambda: best_of(colo(), frames, runs, chunk=chunk, window=window))
    attempt("free_running", lambda: best_of(colo(), frames, 1, chunk=chunk, window=None, ordered=False))
    attempt("harness_windowed", lambda: best_of(LoopPeer, frames, runs, chunk=chunk, window=window))
    attempt("harness_free_running", lambda: best_of(LoopPeer, frames, runs, chunk=chunk, window=None))

    def latency():
        with LoopPeer() as peer:
            floor = measure_passthrough_latency(peer, n)
        with ColoCompare(qemu=qemu, workdir=work) as peer:
            r["version"], r["command"] = peer.version(), " ".join(peer.command())
            measure_latency(peer, min(100, n), dst=(CLIENT[0], 39999))  # warm-up
            lat = measure_latency(peer, n)
            pas = measure_passthrough_latency(peer, n)
        return {"tcp_us": lat_stats(lat), "passthrough_us": lat_stats(pas), "harness_us": lat_stats(floor)}
    attempt("latency", latency)
    frames = None  # the lambdas above have run: free the frames before the summary

    w, lat = r["windowed"], r["latency"]
    if "error" in w and "error" in lat:
        raise RunError(f"colo-compare: throughput: {w['error']}; latency: {lat['error']}")
    parts = []
    if "gb_s" in w:
        r["gb_s"] = w["gb_s"]
        parts.append(f"{w['gb_s']:.3f} GB/s payload ({w['frames_s'] / 1e3:.0f} kframes/s, window {window}, "
                     f"in order)")
    f = r["free_running"]
    if "gb_s" in f:
        parts.append(f"free-running {f['gb_s']:.3f} GB/s, {f['out_of_order']} of {f['frames']} out of order")
    if "tcp_us" in lat:
        t, pt = lat["tcp_us"], lat["passthrough_us"]
        parts.append(f"per packet p50 {t['p50']:.1f} µs p99 {t['p99']:.1f} µs "
                     f"(uncompared passthrough {pt['p50']:.1f}/{pt['p99']:.1f} µs)")
    r["summary"] = "; ".join(parts)
    return r


def bench_netcmp(tmp, size, n, lockstep, *, mss=1448, window=64, chunk=256, runs=None, log=None):
    """The same stream (windowed, in order) and per-packet latency through netcmp's packet
    mode, for bench/netcmp.py to set beside bench(): "gb_s", "latency", "summary"."""
    log = log or (lambda line: None)
    size = min(size, MAX_BENCH_SIZE)
    runs = runs or (3 if size <= 64 << 20 else 1)
    frames = frames_tcp_stream(size, mss)
    work = Path(tmp) / "netcmp-packet"
    work.mkdir(parents=True, exist_ok=True)
    r = {"stream_bytes": size, "mss": mss, "window": window, "chunk": chunk, "exchanges": n}

    def peer():
        return NetcmpPacket(lockstep=lockstep, workdir=work)

    log("netcmp packet mode: windowed")
    try:
        r["windowed"] = best_of(peer, frames, runs, chunk=chunk, window=window)
    except RunError as e:
        r["windowed"] = {"error": str(e)}
    frames = None
    log("netcmp packet mode: latency")
    try:
        with peer() as p:
            r["version"], r["command"] = p.version(), " ".join(p.command())
            measure_latency(p, min(100, n), dst=(CLIENT[0], 39999))  # warm-up
            r["latency"] = {"tcp_us": lat_stats(measure_latency(p, n)),
                            "passthrough_us": lat_stats(measure_passthrough_latency(p, n))}
    except RunError as e:
        r["latency"] = {"error": str(e)}
    w, lat = r["windowed"], r["latency"]
    if "error" in w and "error" in lat:
        raise RunError(f"netcmp: throughput: {w['error']}; latency: {lat['error']}")
    parts = []
    if "gb_s" in w:
        r["gb_s"] = w["gb_s"]
        parts.append(f"{w['gb_s']:.3f} GB/s payload ({w['frames_s'] / 1e3:.0f} kframes/s, window {window}, in order)")
    if "tcp_us" in lat:
        t = lat["tcp_us"]
        parts.append(f"per packet p50 {t['p50']:.1f} µs p99 {t['p99']:.1f} µs")
    r["summary"] = "; ".join(parts)
    return r


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("64M"),
                    help=f"stream payload (default 64M, at most {MAX_BENCH_SIZE >> 20}M)")
    ap.add_argument("--mss", type=int, default=1448, help="segment payload size (default 1448)")
    ap.add_argument("--chunk", type=int, default=256, help="frames per write (default 256)")
    ap.add_argument("--window", type=int, default=64,
                    help="frames in flight in the windowed runs (default 64)")
    ap.add_argument("--exchanges", type=int, default=2000, help="latency exchanges (default 2000)")
    ap.add_argument("--runs", type=int, help="throughput runs, the best is shown (default 3; 1 above 64M)")
    ap.add_argument("--qemu", default=QEMU)
    ap.add_argument("--explore", action="store_true", help="also run the behaviour scenarios")
    ap.add_argument("--no-timeout", action="store_true", help="skip the compare-timeout measurement")
    return ap.parse_args()


def main():
    args = parse_args()
    if not shutil.which(args.qemu):
        sys.exit(f"colo_peer: error: {args.qemu} not found (Debian: apt-get install qemu-system-x86)")
    failed = False
    with tempfile.TemporaryDirectory(prefix="colo-peer-") as tmp:
        try:
            r = bench(tmp, args.size, args.exchanges, mss=args.mss, window=args.window, chunk=args.chunk,
                      runs=args.runs, qemu=args.qemu)
        except RunError as e:
            sys.exit(f"colo_peer: error: {e}")
        print(f"stream: {r['stream_bytes'] / 2**20:.0f} MiB payload, mss {r['mss']}, "
              f"chunks of {r['chunk']} frames")
        for key, label in [("harness_free_running", "harness (socketpair)"),
                           ("free_running", "colo-compare"),
                           ("harness_windowed", f"harness, window {args.window}"),
                           ("windowed", f"colo-compare, window {args.window}")]:
            failed |= "error" in r[key]
            print(f"throughput {label:29s} {fmt_rate(r[key])}")
        lat = r["latency"]
        if "error" in lat:
            failed = True
            print(f"latency: FAILED: {lat['error']}")
        else:
            print(f"latency    {'harness (socketpair)':29s} {fmt_lat(lat['harness_us'])}")
            print(f"latency    {'colo-compare, TCP 64 B':29s} {fmt_lat(lat['tcp_us'])}")
            print(f"latency    {'colo-compare, non-IP (no cmp)':29s} {fmt_lat(lat['passthrough_us'])}")

        if not args.no_timeout:
            try:
                with ColoCompare(qemu=args.qemu, compare_timeout_ms=100, expired_scan_cycle_ms=20,
                                 notify=True) as peer:
                    res = measure_timeout(peer, 3)
                print("timeout    compare_timeout=100,expired_scan_cycle=20,notify_dev: "
                      + "; ".join(f"DO_CHECKPOINT at {a:.0f} ms, released at {b:.0f} ms" for a, b in res))
                with ColoCompare(qemu=args.qemu, compare_timeout_ms=100, expired_scan_cycle_ms=20) as peer:
                    res = measure_timeout(peer, 1)
                print("timeout    same without notify_dev: "
                      + ("not released (held until a checkpoint; only a running COLO migration would ask)"
                         if res == [None] else f"released: {res}"))
            except RunError as e:
                failed = True
                print(f"timeout: FAILED: {e}")

        if args.explore:
            try:
                with ColoCompare(qemu=args.qemu, notify=True) as peer:
                    for name, what in explore(peer):
                        print(f"explore    {name:66s} {what}")
            except RunError as e:
                failed = True
                print(f"explore: FAILED: {e}")
        print(f"qemu: {r.get('version', '?')}\n  {r.get('command', '?')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

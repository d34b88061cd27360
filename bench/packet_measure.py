"""Measurements of a packet comparator (any peer with .pri, .sec and .out sockets speaking
the 4-byte length framing, see bench/colo_peer.py): in-order throughput of one TCP stream with
a bounded number of frames in flight, per-packet latency, the uncompared passthrough path, and
the compare-timeout path. Each checks that what comes out is exactly the primary's frames."""

import socket
import statistics
import threading
import time
from typing import NamedTuple

from benchlib import RunError, percentile, tail
from frames import (CLIENT, SERVER, chunks, decode, encode, frames_tcp_stream, raw_frame,
                    recv_exact, tcp_payload_len)

IO_TIMEOUT = 10.0         # one blocking read/write on a socket


class StreamReader(threading.Thread):
    """Reads `expected` bytes from `sock` into one preallocated buffer; .got counts them
    (wait_for() blocks on it), .done_at is the perf_counter() when the last one arrived."""

    def __init__(self, sock, expected, deadline):
        super().__init__(daemon=True)
        self.sock, self.expected, self.deadline = sock, expected, deadline
        self.buf = bytearray(expected)
        self.got = 0
        self.done_at = None
        self.error = None
        self.recvs = 0
        self.cpu = 0.0  # this thread's CPU seconds
        self.cond = threading.Condition()
        self.waiting = 0  # byte count a feeder waits for (0: nobody waits, no notify)

    def run(self):
        view = memoryview(self.buf)
        end = time.monotonic() + self.deadline
        cpu0 = time.thread_time()
        self.sock.settimeout(0.5)
        try:
            while self.got < self.expected:
                try:
                    k = self.sock.recv_into(view[self.got:])
                except socket.timeout:
                    if time.monotonic() > end:
                        self.error = "deadline"
                        return
                    continue
                if not k:
                    self.error = "EOF"
                    return
                self.got += k
                self.recvs += 1
                if self.waiting and self.got >= self.waiting:
                    with self.cond:
                        self.cond.notify()
            self.done_at = time.perf_counter()
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.cpu = time.thread_time() - cpu0
            view.release()
            with self.cond:
                self.cond.notify()

    def wait_for(self, n, timeout):
        """Block until `n` bytes arrived; False on timeout or when the reader stopped."""
        end = time.monotonic() + timeout
        with self.cond:
            self.waiting = n
            while self.got < n and self.is_alive():
                left = end - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.5))
            self.waiting = 0
        return self.got >= n


class Throughput(NamedTuple):
    payload_bytes: int   # TCP payload of the released frames
    seconds: float       # first write .. last released byte read
    frames: int          # frames released
    out_of_order: int    # released frames that came after a frame the primary sent later
    feeder_cpu: float    # CPU seconds of this script's feeding thread
    reader_cpu: float    # CPU seconds of this script's outdev reader thread
    reader_recvs: int    # recv calls the reader needed


def frame_order(expected_frames, got_bytes):
    """(frames released, frames missing, duplicated, not from the primary, out of order,
    first missing index, trailing bytes) of `got_bytes` against `expected_frames`."""
    got, rest = decode(got_bytes)
    want = {}
    for i, f in enumerate(expected_frames):
        want.setdefault(f, []).append(i)
    taken = {}
    idx = []
    for f in got:
        cands = want.get(f)
        k = taken.get(f, 0)
        if cands is None or k >= len(cands):
            idx.append(-1)
        else:
            idx.append(cands[k])
            taken[f] = k + 1
    seen = {i for i in idx if i >= 0}
    unknown = sum(1 for i in idx if i < 0)
    late, high = 0, -1
    for i in idx:
        if 0 <= i < high:
            late += 1
        high = max(high, i)
    first_missing = next((i for i in range(len(expected_frames)) if i not in seen), None)
    return (len(got), len(expected_frames) - len(seen), unknown, late, first_missing, len(rest))


def describe_order(expected_frames, got_bytes):
    n, missing, unknown, late, first_missing, rest = frame_order(expected_frames, got_bytes)
    return (f"{n} frames released of {len(expected_frames)}: {missing} missing"
            + (f" (first: #{first_missing})" if missing else "")
            + f", {unknown} not from the primary (or duplicated), {late} out of order"
            + (f", {rest} trailing bytes" if rest else ""))


def measure_throughput(peer, frames, *, secondary_frames=None, chunk=256, window=64, ordered=True,
                       deadline=120.0):
    """Write `frames` to primary_in and `secondary_frames` (default: the same) to secondary_in,
    alternately in chunks of `chunk` frames (one sendall each); a thread reads outdev until as
    many bytes came out as the primary's framed stream has. window: at most about this many
    frames written to primary_in and not yet read from outdev (chunks become window/2
    frames); None: free-running, only socket buffers and the comparator's queues bound it
    (colo-compare then reorders its output, see the module docstring).

    The released frames must be the primary's, each exactly once (RunError otherwise); with
    `ordered` also in the primary's order. Returns a Throughput (payload bytes, seconds,
    frames, out of order, and this script's own CPU use)."""
    secondary_frames = frames if secondary_frames is None else secondary_frames
    if window is not None:
        chunk = max(1, min(chunk, window // 2))
    pc = chunks(frames, chunk)
    sc = pc if secondary_frames is frames else chunks(secondary_frames, chunk)
    ends, pos = [], 0
    for c in pc:
        pos += len(c)
        ends.append(pos)
    lag = None if window is None else max(1, window // chunk)
    reader = StreamReader(peer.out, pos, deadline)
    reader.start()
    t0 = time.perf_counter()

    def window_open(i):
        return lag is None or i < lag or reader.wait_for(ends[i - lag], deadline)

    cpu0 = time.thread_time()
    try:
        peer.feed_chunks(pc, sc, window_open)
    except OSError as e:
        raise RunError(f"{peer.name}: feeding failed with {reader.got} bytes out: {e}") from None
    feeder_cpu = time.thread_time() - cpu0
    reader.join(deadline + 2)
    peer.out.settimeout(IO_TIMEOUT)
    got = memoryview(reader.buf)[:reader.got]
    if reader.done_at is None:
        extra = f"\n{tail(peer.log)}" if hasattr(peer, "log") else ""
        raise RunError(f"{peer.name}: outdev stopped ({reader.error}): {describe_order(frames, got)}{extra}")
    late = 0
    if any(got[a:b] != c for a, b, c in zip([0] + ends, ends, pc)):
        n, missing, unknown, late, _, rest = frame_order(frames, got)
        if missing or unknown or rest or ordered:
            raise RunError(f"{peer.name}: released frames are not the primary's"
                           f"{' in order' if ordered else ''}: {describe_order(frames, got)}")
    payload = sum(tcp_payload_len(f) for f in frames)
    return Throughput(payload, reader.done_at - t0, len(frames), late, feeder_cpu, reader.cpu, reader.recvs)


def measure_latency(peer, n, *, size=64, src=SERVER, dst=CLIENT, seed=1):
    """n exchanges of one `size`-byte segment of a fresh TCP stream: write the primary's
    frame, then the secondary's identical one, read the released frame from outdev. Returns
    the per-packet latencies in µs, each from the secondary's write to the frame read."""
    frames = frames_tcp_stream(n * size, size, src=src, dst=dst, seed=seed)
    enc = [encode([f]) for f in frames]
    lat = []
    for f, e in zip(frames, enc):
        peer.pri.sendall(e)
        t0 = time.perf_counter_ns()
        peer.sec.sendall(e)
        got = recv_exact(peer.out, len(e))
        lat.append((time.perf_counter_ns() - t0) / 1000)
        if got != e:
            raise RunError(f"{peer.name}: exchange {len(lat)} released a different frame")
    return lat


def measure_passthrough_latency(peer, n, size=78):
    """n non-IP frames written to primary_in alone, each read back from outdev: the
    comparator's forwarding path without comparison. Latencies in µs."""
    lat = []
    base = getattr(peer, "_probe_tag", 0) + 1_000_000
    for i in range(n):
        e = encode([raw_frame(base + i, size)])
        t0 = time.perf_counter_ns()
        peer.pri.sendall(e)
        got = recv_exact(peer.out, len(e))
        lat.append((time.perf_counter_ns() - t0) / 1000)
        if got != e:
            raise RunError(f"{peer.name}: passthrough frame {i} came back different")
    return lat


def lat_stats(lat):
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "mean": statistics.fmean(lat),
            "max": max(lat), "n": len(lat)}


def rate(r):
    return {"gb_s": r.payload_bytes / r.seconds / 1e9, "frames_s": r.frames / r.seconds,
            "payload_bytes": r.payload_bytes, "frames": r.frames, "seconds": r.seconds,
            "out_of_order": r.out_of_order, "harness_cpu_s": r.feeder_cpu + r.reader_cpu,
            "reader_recvs": r.reader_recvs}


def best_of(mk, frames, runs, **kw):
    res = []
    for _ in range(runs):
        with mk() as peer:
            res.append(measure_throughput(peer, frames, **kw))
    best = max(res, key=lambda r: r.payload_bytes / r.seconds)
    return dict(rate(best), runs_gb_s=[r.payload_bytes / r.seconds / 1e9 for r in res])


def fmt_rate(d):
    if "error" in d:
        return f"FAILED: {d['error']}"
    return (f"{d['gb_s'] * 1e3:7.1f} MB/s payload {d['frames_s'] / 1e3:6.1f} kframes/s"
            f"  ({d['payload_bytes'] / 2**20:.0f} MiB, {d['frames']} frames, {d['seconds']:.3f} s"
            + (f", {d['out_of_order']} out of order" if d["out_of_order"] else "")
            + f"; harness CPU {d['harness_cpu_s']:.2f} s)"
            + f"  [runs: {'/'.join(f'{g * 1e3:.0f}' for g in d['runs_gb_s'])} MB/s]")


def fmt_lat(s):
    return (f"p50 {s['p50']:6.1f} µs  p99 {s['p99']:6.1f} µs  mean {s['mean']:6.1f} µs  "
            f"max {s['max']:7.1f} µs  (n={s['n']})")

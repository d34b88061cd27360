#!/usr/bin/env python3
"""Memory replication benchmark: checkpoint pause, bytes per epoch and transfer throughput of a
shared-memory region replicated by `lockstep primary --memory`, for both dirty-page trackers.

For each tracker x dirty rate (0.1 %, 1 %, 10 % of the region's pages per 100 ms):

  uffd   `lockstep-memwriter --handover`: the writer hands its userfaultfd to the primary
         (write-protect tracking; the writer is paused at each cut)
  scan   the same writer without --handover: the primary hashes every page of the region
         at every collect and at the pause

fresh region files in /dev/shm (sparse, all zero), `lockstep secondary`, `lockstep primary
--checkpoint-interval 100ms`, then the writer; warm-up, then two status reads some seconds
apart (counters are deltas between the reads; the pause percentiles are the daemon's, over
the whole run). In the same run, as references:

  link       raw loopback TCP: one Python process sends 1 GiB in 4 MiB chunks to another
  drain      the primary's initial sync of a region full of non-zero data (no writer):
             bytes sent / time from the memory session's start until nothing is unsent
             and a checkpoint committed: the speed at which memory crosses the link
  copy       a naive full copy of the region (memcpy via memoryview slices of two mmaps of
             /dev/shm files; destination already faulted in): the pause of a checkpoint
             that copied the whole region
  read       one read of the region (`dd bs=1M` of the /dev/shm file to /dev/null)

Prints one table with ratios and writes raw numbers, commands and versions to
bench/out/memory-<timestamp>.json. Exits non-zero when a configuration could not run.

    bench/memory.py --quick          # 256 MiB region, 1 s warm-up, 2 s measured
    bench/memory.py                  # 1 GiB region, 2 s warm-up, 5 s measured
"""

import argparse
import datetime
import json
import math
import mmap
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from benchlib import RunError, control, cpu_seconds, die_with_parent, free_port, parse_size, rel, spawn, stop_proc, tail

REPO = Path(__file__).resolve().parent.parent
LOCKSTEP = REPO / "target" / "release" / "lockstep"
WRITER = REPO / "target" / "release" / "lockstep-memwriter"
OUT_DIR = REPO / "bench" / "out"
SHM = Path("/dev/shm")

TRACKERS = ["uffd", "scan"]
RATES = [0.1, 1.0, 10.0]
PAGE = 4096
START_DEADLINE = 15.0
STATUS_TIMEOUT = 10.0
TRACE_EVERY = 0.1  # status samples during a run (checkpoint count, max pause, unsent pages)
DRAIN_DEADLINE = 180.0
LINK_CHUNK = 4 << 20
# Goals from the issue.
GOAL_UFFD_PAUSE_MS = 5.0   # uffd, 1 % dirty
GOAL_DRAIN_OF_LINK = 0.80
QEMU_COLO_MS = "QEMU COLO's published memory checkpoint: 4.5 ms idle, 24 ms under load"

def die(msg):
    sys.exit(f"memory: error: {msg}")


def status(sock):
    try:
        return control(sock, {"cmd": "status"}, STATUS_TIMEOUT)
    except (OSError, ValueError) as e:
        raise RunError(f"status on {sock}: {type(e).__name__}: {e}") from None


def wait_for(pred, what, procs, deadline):
    """Poll pred() until truthy; fail when a process in `procs` ({name: (proc, log)}) exits."""
    end = time.monotonic() + deadline
    while True:
        for name, (p, log) in procs.items():
            if p.poll() is not None:
                raise RunError(f"{name} exited with {p.returncode} while waiting for {what}:\n{tail(log)}")
        try:
            v = pred()
            if v:
                return v
        except (OSError, ValueError, KeyError, RunError):
            pass
        if time.monotonic() > end:
            raise RunError(f"timed out after {deadline:.0f}s waiting for {what}")
        time.sleep(0.01)


def mem0(st):
    return st["participants"]["memory0"]


def make_region(path, size, fill=False):
    """A fresh region file: sparse zeros, or (fill) non-zero data (a 4 MiB random block
    repeated; lockstep neither compresses nor dedups, it only skips zero pages)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        if fill:
            blk = os.urandom(4 << 20)
            left = size
            while left:
                n = min(left, len(blk))
                f.write(blk[:n])
                left -= n
        else:
            f.truncate(size)


# ---------------------------------------------------------------------------------------
# references: link, copy, read

LINK_RECEIVER = r"""
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
buf = bytearray(4 << 20); n = 0
while True:
    k = c.recv_into(buf)
    if not k:
        break
    n += k
c.sendall(n.to_bytes(8, "little")); c.close()
"""


def link_capacity(total, tmp):
    """Raw loopback TCP: this process sends `total` bytes in 4 MiB sendall()s to a second
    Python process that recv_into()s a 4 MiB buffer; time from connect to the receiver's
    8-byte byte count after our SHUT_WR. Returns bytes/s."""
    log = tmp / "link.log"
    rx = subprocess.Popen([sys.executable, "-c", LINK_RECEIVER], stdout=subprocess.PIPE,
                          stderr=open(log, "ab"), preexec_fn=die_with_parent)
    try:
        port = int(rx.stdout.readline())
        data = os.urandom(LINK_CHUNK)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            t = time.monotonic()
            for _ in range(total // LINK_CHUNK):
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < 8:
                k = c.recv(8 - len(got))
                if not k:
                    break
                got += k
            dt = time.monotonic() - t
        n = int.from_bytes(got, "little")
        if n != total // LINK_CHUNK * LINK_CHUNK:
            raise RunError(f"link test: receiver got {n} bytes")
        return n / dt
    finally:
        stop_proc(rx)


def copy_and_read(size, tmp, passes=3):
    """Naive full copy (memoryview slice assignment between two mmaps of /dev/shm files, the
    destination faulted in by a first untimed pass) and one read of the region (dd bs=1M to
    /dev/null; and zlib.crc32 over the mmap, recorded only). Best of `passes`, seconds."""
    src, dst = SHM / f"lockstep-bench-copy-src-{os.getpid()}", SHM / f"lockstep-bench-copy-dst-{os.getpid()}"
    res = {}
    try:
        make_region(src, size, fill=True)
        make_region(dst, size)
        with open(src, "r+b") as fs, open(dst, "r+b") as fd:
            ms, md = mmap.mmap(fs.fileno(), size), mmap.mmap(fd.fileno(), size)
            vs, vd = memoryview(ms), memoryview(md)
            try:
                step = 64 << 20
                def copy():
                    t = time.monotonic()
                    for o in range(0, size, step):
                        vd[o:o + step] = vs[o:o + step]
                    return time.monotonic() - t
                res["copy_first_s"] = copy()  # includes faulting in the destination's pages
                res["copy_passes_s"] = [copy() for _ in range(passes)]
                crc = []
                for _ in range(passes):
                    t = time.monotonic()
                    zlib.crc32(vs)
                    crc.append(time.monotonic() - t)
                res["crc32_passes_s"] = crc
            finally:
                vs.release(); vd.release(); ms.close(); md.close()
        rd = []
        for _ in range(passes):
            t = time.monotonic()
            subprocess.run(["dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none"], check=True, timeout=120)
            rd.append(time.monotonic() - t)
        res["read_passes_s"] = rd
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    res["copy_s"] = min(res["copy_passes_s"])
    res["read_s"] = min(res["read_passes_s"])
    return res


# ---------------------------------------------------------------------------------------
# lockstep runs


def cmds(args, tmp, port, tracker, rate, regions):
    pri_mem = str(regions["pri"]) + (f",writer={tmp / 'writer.sock'}" if tracker == "uffd" else "")
    c = {
        "secondary": [LOCKSTEP, "secondary", "--disk", tmp / "sec.img", "--size", "16M",
                      "--listen", f"127.0.0.1:{port}", "--control", tmp / "sec.sock",
                      "--memory", regions["sec"]],
        "primary": [LOCKSTEP, "primary", "--disk", tmp / "pri.img", "--size", "16M",
                    "--export", f"unix:{tmp / 'export.sock'}", "--secondary", f"127.0.0.1:{port}",
                    "--control", tmp / "pri.sock", "--memory", pri_mem,
                    "--checkpoint-interval", f"{args.interval}ms"],
    }
    if rate is not None:
        c["writer"] = [WRITER, "--region", regions["pri"], *(["--handover", tmp / "writer.sock"]
                                                           if tracker == "uffd" else []),
                       "--dirty", str(rate), "--period-ms", "100"]
    return {k: [str(x) for x in v] for k, v in c.items()}


class Pair:
    """Secondary + primary (+ writer) on fresh files; everything stopped by pid in close()."""

    def __init__(self, args, tmp, name, rate, fill=False, tracker=None):
        tracker = tracker or name
        self.tmp = tmp
        for f in ("sec.img", "pri.img", "sec.img.lockstep-meta", "pri.img.lockstep-meta",
                  "sec.sock", "pri.sock", "export.sock", "writer.sock"):
            (tmp / f).unlink(missing_ok=True)
        tag = f"{os.getpid()}"
        self.regions = {"pri": SHM / f"lockstep-bench-mem-pri-{tag}", "sec": SHM / f"lockstep-bench-mem-sec-{tag}"}
        self.port = free_port()
        self.cmds = cmds(args, tmp, self.port, tracker, rate, self.regions)
        self.procs = {}
        self.logs = {k: tmp / f"{name}-{rate}-{k}.log" for k in ("secondary", "primary", "writer")}
        make_region(self.regions["pri"], args.region_size, fill=fill)
        make_region(self.regions["sec"], args.region_size)

    def start(self, name):
        self.procs[name] = (spawn(self.cmds[name], self.logs[name]), self.logs[name])
        return self.procs[name][0]

    def check_alive(self):
        for name, (p, log) in self.procs.items():
            if p.poll() is not None:
                raise RunError(f"{name} exited with {p.returncode} during the run:\n{tail(log)}")

    def start_daemons(self):
        self.start("secondary")
        wait_for(lambda: status(self.tmp / "sec.sock"), "the secondary's control socket",
                 self.procs, START_DEADLINE)
        self.spawned = time.time()
        self.start("primary")
        wait_for(lambda: mem0(status(self.tmp / "pri.sock"))["connected"], "the primary's memory session",
                 self.procs, START_DEADLINE)

    def start_writer_first(self):
        """Primary (it keeps trying to reach the secondary), writer hand-over, then secondary."""
        self.start("primary")
        wait_for(lambda: (self.tmp / "writer.sock").exists(), "the primary's writer socket",
                 self.procs, START_DEADLINE)
        self.start("writer")
        wait_for(lambda: "READY" in self.logs["writer"].read_text(errors="replace"), "the writer's READY",
                 self.procs, START_DEADLINE)
        wait_for(lambda: "handed over its userfaultfd" in self.logs["primary"].read_text(errors="replace"),
                 "the hand-over", self.procs, START_DEADLINE)
        self.spawned = time.time()
        self.start("secondary")
        wait_for(lambda: mem0(status(self.tmp / "pri.sock"))["connected"], "the primary's memory session",
                 self.procs, START_DEADLINE)

    def close(self):
        # Writer first (a handed-over writer may be standing at a pause), then primary, secondary.
        for name in ("writer", "primary", "secondary"):
            if name in self.procs:
                stop_proc(self.procs[name][0])
        for r in self.regions.values():
            r.unlink(missing_ok=True)


def cpu_of(pair):
    return {name: cpu_seconds(p.pid) for name, (p, _log) in pair.procs.items()}


def session_start(log_path):
    """Wall time of the primary's `memory session started` log line (None if absent)."""
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if "memory session started" in line:
            m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?)Z", line)
            if m:
                ts = m.group(1)
                if "." in ts:
                    head, frac = ts.split(".")
                    ts = f"{head}.{frac[:6]}"
                return datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc).timestamp()
    return None


def run_drain(args, tmp, tracker):
    """Initial sync of a region full of non-zero data.

    scan: no writer at all; the primary's tracker is "scan".
    uffd: an idle writer (`--dirty 0`) hands over its userfaultfd before the secondary is
    started (the primary keeps trying to reach it), so the whole sync runs with the uffd
    tracker and nothing is dirtied meanwhile."""
    pair = Pair(args, tmp, f"drain-{tracker}", 0.0 if tracker == "uffd" else None, fill=True, tracker=tracker)
    try:
        if tracker == "uffd":
            pair.start("primary")
            wait_for(lambda: (tmp / "writer.sock").exists(), "the primary's writer socket", pair.procs, START_DEADLINE)
            pair.start("writer")
            wait_for(lambda: "READY" in pair.logs["writer"].read_text(errors="replace"), "the writer's READY",
                     pair.procs, START_DEADLINE)
            wait_for(lambda: "handed over its userfaultfd" in pair.logs["primary"].read_text(errors="replace"),
                     "the hand-over", pair.procs, START_DEADLINE)
            spawned = time.time()
            pair.start("secondary")  # not start_writer_first(): the sync is timed from here
        else:
            pair.start("secondary")
            wait_for(lambda: status(tmp / "sec.sock"), "the secondary's control socket", pair.procs, START_DEADLINE)
            spawned = time.time()
            pair.start("primary")
        pages = args.region_size // PAGE

        def done():
            st = status(tmp / "pri.sock")
            m = mem0(st)
            # Everything sent and the checkpoint that carried the last pages committed.
            if (m["connected"] and m["unsent_pages"] == 0 and m["pages_sent"] >= pages
                    and m["committed_epoch"] >= m["epoch"] - 1):
                return time.time(), st
            return None

        cpu0 = cpu_of(pair)
        t_done, st = wait_for(done, "the memory initial sync", pair.procs, DRAIN_DEADLINE)
        cpu1 = cpu_of(pair)
        pair.check_alive()
        t0 = session_start(pair.logs["primary"])
        start_from = "memory session started (primary log)"
        if t0 is None or not spawned - 1 <= t0 <= t_done:
            t0, start_from = spawned, "second daemon spawned"
        m = mem0(st)
        if m["tracker"] != tracker:
            raise RunError(f"tracker is {m['tracker']!r}, expected {tracker!r}: {m.get('tracker_note')}")
        secs = t_done - t0
        return {
            "tracker": m["tracker"], "bytes_sent": m["bytes_sent"], "pages_sent": m["pages_sent"],
            "presend_pages": m["presend_pages"], "cut_pages": m["cut_pages"], "seconds": secs,
            "start_from": start_from, "throughput_Bps": m["bytes_sent"] / secs, "status": st,
            "cpu_s": {k: (cpu1[k] - cpu0[k]) if cpu1.get(k) is not None and cpu0.get(k) is not None else None
                      for k in cpu1},
            "cpu_note": "CPU seconds (utime+stime) of each process from the second daemon's start to the end",
            "commands": pair.cmds,
        }
    finally:
        pair.close()


def run_config(args, tmp, tracker, rate):
    pair = Pair(args, tmp, tracker, rate)
    trace = []

    def sample(phase):
        st = status(tmp / "pri.sock")
        m = mem0(st)
        trace.append({"t": round(time.monotonic() - t_start, 3), "phase": phase, "checkpoints": st["checkpoints"],
                      "pause_max_us": st["checkpoint_pause_us"]["max"], "cut_max_us": m["cut_pause_us"]["max"],
                      "unsent_pages": m["unsent_pages"], "bytes_sent": m["bytes_sent"], "tracker": m["tracker"]})
        return st

    def sleep_sampling(secs, phase):
        end = time.monotonic() + secs
        while time.monotonic() < end:
            time.sleep(min(TRACE_EVERY, max(0.0, end - time.monotonic())))
            pair.check_alive()
            sample(phase)

    try:
        if tracker == "uffd":
            # The writer hands over before the secondary exists, so that no checkpoint is taken
            # with the scan tracker the primary uses until a writer arrives (those pauses would
            # be in the daemon's percentiles). What the writer dirties until the session starts
            # goes in the initial sync, during the warm-up.
            pair.start_writer_first()
        else:
            pair.start_daemons()
            pair.start("writer")
            wait_for(lambda: "READY" in pair.logs["writer"].read_text(errors="replace"), "the writer's READY",
                     pair.procs, START_DEADLINE)
        wait_for(lambda: mem0(status(tmp / "pri.sock"))["tracker"] == tracker, f"tracker {tracker}",
                 pair.procs, START_DEADLINE)
        t_start = time.monotonic()
        sleep_sampling(args.warmup, "warm-up")
        a, ta, ca = sample("start"), time.monotonic(), cpu_of(pair)
        sleep_sampling(args.measure, "measure")
        b, tb, cb = sample("end"), time.monotonic(), cpu_of(pair)
        pair.check_alive()
        pri_cli = subprocess.run([str(LOCKSTEP), "status", "--control", str(tmp / "pri.sock"), "--json"],
                                 capture_output=True, text=True, timeout=STATUS_TIMEOUT).stdout
        ma, mb = mem0(a), mem0(b)
        if mb["tracker"] != tracker:
            raise RunError(f"tracker is {mb['tracker']!r}, expected {tracker!r}: {mb.get('tracker_note')}")
        d = lambda k: mb[k] - ma[k]
        ckpts = b["checkpoints"] - a["checkpoints"]
        secs = tb - ta
        # When did the whole-run maximum pause happen? The checkpoint count at the first trace
        # sample that shows it.
        at_max = next((x for x in trace if x["pause_max_us"] == b["checkpoint_pause_us"]["max"]), None)
        return {
            "seconds": secs, "checkpoints": ckpts, "stalled": ckpts == 0, "cuts": d("cuts"),
            "cpu_s": {k: (cb[k] - ca[k]) if cb.get(k) is not None and ca.get(k) is not None else None for k in cb},
            "checkpoint_failures": b.get("checkpoint_failures", 0) - a.get("checkpoint_failures", 0),
            "bytes_sent": d("bytes_sent"), "pages_sent": d("pages_sent"), "presend_pages": d("presend_pages"),
            "cut_pages": d("cut_pages"), "zero_pages_sent": d("zero_pages_sent"),
            "bytes_per_epoch": d("bytes_sent") / ckpts if ckpts else None,
            "pages_per_epoch": d("pages_sent") / ckpts if ckpts else None,
            "writer_pages_per_period": math.ceil(args.region_size // PAGE * rate / 100),
            "throughput_Bps": d("bytes_sent") / secs,
            "checkpoint_pause_us": b["checkpoint_pause_us"], "checkpoint_total_us": b.get("checkpoint_total_us"),
            "cut_pause_us": mb["cut_pause_us"], "last_collect_us": mb["last_collect_us"],
            "pause_window": "the daemon's percentiles over the whole run (warm-up included), not deltas",
            "pause_samples_total": b["checkpoint_pause_us"]["samples"],
            "pause_max_grew_in_window": b["checkpoint_pause_us"]["max"] > a["checkpoint_pause_us"]["max"],
            "cut_max_grew_in_window": mb["cut_pause_us"]["max"] > ma["cut_pause_us"]["max"],
            "pause_max_seen_at_checkpoint": at_max and at_max["checkpoints"],
            "unsent_pages_at_start": ma["unsent_pages"], "unsent_pages_at_end": mb["unsent_pages"],
            "last_error": mb.get("last_error"), "last_checkpoint_error": b.get("last_checkpoint_error"),
            "trace": trace, "status_before": a, "status_after": b, "status_cli": pri_cli[:200000],
            "commands": pair.cmds,
        }
    finally:
        pair.close()


# ---------------------------------------------------------------------------------------


def ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def human(n):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n:.0f} B"


def table(results, refs, args):
    head = ["tracker", "dirty", "ckpts", "pages/ep", "sent/ep", "MB/s", "/link", "unsent", "cut p50", "cut p99",
            "pause p50", "pause p99", "pause max", "p50/copy", "p50/read"]
    rows = []
    copy_ms = (refs.get("copy", {}).get("copy_s") or 0) * 1000
    read_ms = (refs.get("copy", {}).get("read_s") or 0) * 1000
    link = refs.get("link", {}).get("best_Bps")
    for tracker in args.trackers:
        for rate in args.rates:
            r = results.get(f"{tracker}-{rate}", {})
            if "checkpoints" not in r:
                rows.append([tracker, f"{rate:g}%", "FAILED"] + ["-"] * (len(head) - 3))
                continue
            p = r["checkpoint_pause_us"]
            c = r["cut_pause_us"]
            rows.append([
                tracker, f"{rate:g}%", str(r["checkpoints"]) + (" STALLED" if r["stalled"] else ""),
                "-" if r["pages_per_epoch"] is None else f"{r['pages_per_epoch']:,.0f}",
                "-" if r["bytes_per_epoch"] is None else human(r["bytes_per_epoch"]),
                f"{r['throughput_Bps'] / 1e6:,.1f}",
                f"{r['throughput_Bps'] / link:.3f}x" if link else "-",
                human(r["unsent_pages_at_end"] * PAGE) if r["unsent_pages_at_end"] else "0",
                ms(c["p50"]), ms(c["p99"]), ms(p["p50"]), ms(p["p99"]), ms(p["max"]),
                f"{p['p50'] / 1000 / copy_ms:.3f}x" if copy_ms else "-",
                f"{p['p50'] / 1000 / read_ms:.3f}x" if read_ms else "-",
            ])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda x: "  ".join(c.ljust(w) if i < 1 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def versions():
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    cpu = None
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "lockstep": first_line([str(LOCKSTEP), "--version"]),
        "lockstep_git": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "kernel": os.uname().release, "cpu": cpu, "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--region-size", type=parse_size, help="region size (default 1G; --quick: 256M)")
    ap.add_argument("--warmup", type=float, help="seconds before the first status read (default 2; --quick: 1)")
    ap.add_argument("--measure", type=float, help="seconds between the two status reads (default 5; --quick: 2)")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval in ms (default 100)")
    ap.add_argument("--trackers", default=",".join(TRACKERS), help="subset of uffd,scan (default both)")
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES),
                    help="dirty percentages per 100 ms (default 0.1,1,10)")
    ap.add_argument("--quick", action="store_true", help="256M region, 1 s warm-up, 2 s measured")
    args = ap.parse_args()
    args.region_size = args.region_size or parse_size("256M" if args.quick else "1G")
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.measure = args.measure if args.measure is not None else (2.0 if args.quick else 5.0)
    if args.region_size % (4 << 20):
        ap.error("--region-size must be a multiple of 4 MiB")
    args.trackers = [t.strip() for t in args.trackers.split(",") if t.strip()]
    if not args.trackers or any(t not in TRACKERS for t in args.trackers):
        ap.error(f"--trackers: choose from {','.join(TRACKERS)}")
    try:
        args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error("--rates: numbers, e.g. 0.1,1,10")
    return args


def main():
    args = parse_args()
    for b, how in ((LOCKSTEP, "-p lockstep-cli"), (WRITER, "-p lockstep-tests --bins")):
        if not os.access(b, os.X_OK):
            die(f"{rel(b)} missing: cargo build --release {how}")
    if not SHM.is_dir():
        die("/dev/shm is not a directory")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results, refs, failures = {}, {}, []
    t_run = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        tmp = Path(tmp)

        def attempt(name, fn):
            print(f"{name:<24}", end=" ", flush=True)
            try:
                return fn()
            except (RunError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
                if not isinstance(e, RunError):
                    e = RunError(f"{type(e).__name__}: {e}")
                print("FAILED")
                print("    " + str(e).replace("\n", "\n    "), flush=True)
                failures.append(f"{name}: {str(e).splitlines()[0]}")
                return {"error": str(e)}

        link = attempt("link (python tcp)", lambda: {"bytes": 1 << 30, "best_Bps": max(
            link_capacity(1 << 30, tmp) for _ in range(2))})
        refs["link"] = link
        if "best_Bps" in link:
            print(f"{link['best_Bps'] / 1e6:,.0f} MB/s (best of 2, 1 GiB each)", flush=True)
        cr = attempt("copy/read region", lambda: copy_and_read(args.region_size, tmp))
        refs["copy"] = cr
        if "copy_s" in cr:
            print(f"copy {cr['copy_s'] * 1000:.1f} ms, read {cr['read_s'] * 1000:.1f} ms "
                  f"(first copy {cr['copy_first_s'] * 1000:.0f} ms, crc32 {min(cr['crc32_passes_s']) * 1000:.0f} ms)",
                  flush=True)
        refs["drain"] = {}
        for tracker in args.trackers:
            dr = attempt(f"drain {tracker} (initial sync)", lambda: run_drain(args, tmp, tracker))
            refs["drain"][tracker] = dr
            if "throughput_Bps" in dr:
                cpu = ", ".join(f"{k} {v:.2f}" for k, v in dr["cpu_s"].items() if v is not None)
                print(f"{dr['throughput_Bps'] / 1e6:,.0f} MB/s ({human(dr['bytes_sent'])} in {dr['seconds']:.2f} s, "
                      f"from {dr['start_from']}; CPU s: {cpu})", flush=True)
        for tracker in args.trackers:
            for rate in args.rates:
                r = attempt(f"{tracker} {rate:g}%", lambda: run_config(args, tmp, tracker, rate))
                results[f"{tracker}-{rate}"] = r
                if "checkpoints" not in r:
                    continue
                line = (f"{r['checkpoints']} ckpts, {human(r['bytes_sent'])} sent, "
                        f"{r['throughput_Bps'] / 1e6:,.1f} MB/s, pause p50 {ms(r['checkpoint_pause_us']['p50'])} "
                        f"p99 {ms(r['checkpoint_pause_us']['p99'])} max {ms(r['checkpoint_pause_us']['max'])} ms "
                        f"(max at checkpoint {r['pause_max_seen_at_checkpoint']}, "
                        f"{'in' if r['pause_max_grew_in_window'] else 'before'} the measured window), "
                        f"cut p50 {ms(r['cut_pause_us']['p50'])} ms, unsent pages {r['unsent_pages_at_start']} -> "
                        f"{r['unsent_pages_at_end']}; CPU s in the window: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items() if v is not None))
                print(line, flush=True)
                if r["stalled"]:
                    print(f"    STALLED: no checkpoint in {r['seconds']:.1f} s (see last_checkpoint_error "
                          f"in the JSON)", flush=True)
                    failures.append(f"{tracker} {rate:g}%: stalled, no checkpoint in {r['seconds']:.1f} s, "
                                    f"{r['unsent_pages_at_end']} pages unsent")
                if r["checkpoint_failures"]:
                    failures.append(f"{tracker} {rate:g}%: {r['checkpoint_failures']} checkpoint(s) failed: "
                                    f"{r['last_checkpoint_error']}")

    print(f"\nmemory replication, {human(args.region_size)} region, checkpoint every {args.interval} ms, "
          f"{args.measure:g} s measured after {args.warmup:g} s warm-up (total {time.monotonic() - t_run:.0f} s)\n")
    print(table(results, refs, args))
    link_bps = refs["link"].get("best_Bps")
    copy_s, read_s = refs["copy"].get("copy_s"), refs["copy"].get("read_s")
    print("\n(ckpts: checkpoints in the measured window; pages/ep, sent/ep: pages and bytes sent per checkpoint "
          "(pre-send + pause copy);\n MB/s: memory bytes sent per second, /link: that over the raw link; unsent: "
          "pages waiting at the end;\n cut: the memory participant's cut inside the pause; pause: the whole "
          "client-visible pause; in ms, the daemon's\n percentiles over the whole run, warm-up included (fewer than "
          "100 samples: p99 is the max); p50/copy, p50/read:\n pause p50 divided by one naive copy / one read of "
          "the whole region)")
    print()
    if link_bps:
        print(f"link (Python TCP, 4 MiB sends, 1 GiB):   {link_bps / 1e6:8,.0f} MB/s")
    if copy_s:
        print(f"naive copy of the region (memcpy):       {copy_s * 1000:8.1f} ms")
        print(f"one read of the region (dd bs=1M):       {read_s * 1000:8.1f} ms")
    if link_bps:
        need = args.region_size // PAGE * PAGE / 100 * 1000 / 100
        print("  (the writer dirties 0.1/1/10 % of the region per 100 ms: "
              f"{need * 0.1 / 1e6:,.0f} / {need / 1e6:,.0f} / {need * 10 / 1e6:,.0f} MB/s of new pages at most)")
    goals = {}
    for tracker, dr in refs["drain"].items():
        drain = dr.get("throughput_Bps")
        if not drain:
            continue
        line = f"drain, {tracker:<4} (initial sync, full region): {drain / 1e6:8,.0f} MB/s"
        if link_bps:
            goals[f"drain_{tracker}_of_link"] = drain / link_bps
            line += (f"  = {drain / link_bps:.2f}x link (goal >= {GOAL_DRAIN_OF_LINK:.2f}x: "
                     f"{'met' if drain / link_bps >= GOAL_DRAIN_OF_LINK else 'MISSED'})")
        print(line)
    u1 = results.get("uffd-1.0", {})
    if "checkpoint_pause_us" in u1:
        p50, p99 = u1["checkpoint_pause_us"]["p50"] / 1000, u1["checkpoint_pause_us"]["p99"] / 1000
        goals["uffd_1pct_pause_ms"] = {"p50": p50, "p99": p99}
        print(f"uffd 1% pause p50 {p50:.2f} ms, p99 {p99:.2f} ms (goal < {GOAL_UFFD_PAUSE_MS:g} ms: "
              f"p50 {'met' if p50 < GOAL_UFFD_PAUSE_MS else 'MISSED'}, p99 {'met' if p99 < GOAL_UFFD_PAUSE_MS else 'MISSED'};"
              f" {QEMU_COLO_MS})")
        if copy_s:
            print(f"  = {p50 / (copy_s * 1000):.3f}x of a naive full copy ({copy_s * 1000:.1f} ms)")
    for rate in args.rates:
        s = results.get(f"scan-{rate}", {})
        if "checkpoint_pause_us" in s and read_s:
            p50 = s["checkpoint_pause_us"]["p50"] / 1000
            print(f"scan {rate:g}% pause p50 {p50:.1f} ms = {p50 / (read_s * 1000):.2f}x one read of the region "
                  f"({read_s * 1000:.1f} ms)")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"memory-{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp,
        "config": {"region_size": args.region_size, "warmup_s": args.warmup, "measure_s": args.measure,
                   "checkpoint_interval_ms": args.interval, "trackers": args.trackers, "rates_pct": args.rates,
                   "writer_period_ms": 100},
        "versions": versions(),
        "methods": {
            "link": "python: sender process sendall()s 4 MiB buffers (1 GiB) on 127.0.0.1 TCP to a receiver "
                    "process (recv_into 4 MiB); time from connect to the receiver's byte count; best of 2",
            "copy": "memoryview slice assignment (64 MiB slices) between mmaps of two /dev/shm files, after one "
                    "untimed pass that faults in the destination; best of 3",
            "read": "dd if=REGION of=/dev/null bs=1M; best of 3",
            "drain": "a region filled with non-zero data (a 4 MiB random block repeated), no writer; bytes_sent / "
                     "(time when unsent_pages == 0 and memory0.committed_epoch >= epoch - 1, polled every 10 ms) "
                     "- (the primary's 'memory session started' log time)",
            "configs": "counters: deltas between two status reads; pause percentiles: the daemon's (sliding window "
                       "of 4096 samples, i.e. the whole run including warm-up)",
            "status_command": "lockstep status --control PRI.sock --json (read over the control socket)",
        },
        "goals": goals,
        "references": refs,
        "results": results,
        "failures": failures,
    }, indent=2, default=str) + "\n")
    print(f"\nraw numbers: {rel(out)}")
    if failures:
        for f in failures:
            print(f"failed: {f}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

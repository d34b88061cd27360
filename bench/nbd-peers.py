#!/usr/bin/env python3
"""Benchmark `lockstep export` against other NBD servers with fio's nbd ioengine.

All peers serve the same backing file (random data, recreated each run):
lockstep export, qemu-nbd, nbdkit (file plugin), plus fio io_uring directly on
the file as the "local io_uring" limit. Workloads are 4k randread/randwrite and
1M sequential read/write, iodepth 32, one job. For each workload every peer is
run in turn (peers alternate) to reduce drift; each run gets a fresh server.

Prints one table (IOPS, MB/s, lockstep/peer ratios) and writes the raw numbers
to bench/out/nbd-peers-<timestamp>.json.

    bench/nbd-peers.py --quick
    bench/nbd-peers.py --runtime 10 --size 4G --only lockstep,qemu-nbd
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import free_port, parse_size, tail

REPO = Path(__file__).resolve().parent.parent
LOCKSTEP = REPO / "target" / "release" / "lockstep"
OUT_DIR = REPO / "bench" / "out"

# (label, fio rw, block size)
WORKLOADS = [
    ("4k randread", "randread", "4k"),
    ("4k randwrite", "randwrite", "4k"),
    ("1M seq read", "read", "1M"),
    ("1M seq write", "write", "1M"),
]
PEERS = ["lockstep", "qemu-nbd", "nbdkit", "local"]
LABELS = {"local": "local io_uring"}
# tool -> Debian/Ubuntu package that provides it
PACKAGES = {"fio": "fio", "qemu-nbd": "qemu-utils", "nbdkit": "nbdkit", "timeout": "coreutils"}

IODEPTH = 32
PORT_DEADLINE = 10.0
KILL_GRACE = 5.0


def die(msg):
    sys.exit(f"nbd-peers: error: {msg}")


def label(peer):
    return LABELS.get(peer, peer)


def check_tools(peers):
    needed = ["fio", "timeout"] + [p for p in peers if p in ("qemu-nbd", "nbdkit")]
    for tool in needed:
        if shutil.which(tool) is None:
            die(f"'{tool}' not found in PATH: apt install {PACKAGES[tool]}")
    if any(p != "local" for p in peers):
        if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode != 0:
            die("this fio has no 'nbd' ioengine (built without libnbd): apt install fio (>= 3.19)")
    if "lockstep" in peers and not os.access(LOCKSTEP, os.X_OK):
        die(f"{LOCKSTEP} missing: cargo build --release -p lockstep-cli")


def create_backing_file(path, size):
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        die(f"{path} exists and is not a regular file; refusing to overwrite it")
    chunk = 8 << 20
    print(f"writing {size >> 20} MiB of random data to {path} ...", flush=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def server_cmd(peer, path, port, qemu_cache):
    if peer == "lockstep":
        return [str(LOCKSTEP), "export", "--disk", str(path), "--listen", f"127.0.0.1:{port}"]
    if peer == "qemu-nbd":
        cache = ["--cache=none", "--aio=io_uring"] if qemu_cache == "none" else []
        return ["qemu-nbd", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", str(port), *cache, str(path)]
    if peer == "nbdkit":
        return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(path)]
    raise ValueError(peer)


def start_server(cmd, log_path):
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def wait_port(port, proc, log_path, deadline=PORT_DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            die(f"server {proc.args[0]} exited with {proc.returncode}:\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    die(f"server {proc.args[0]} not listening on port {port} after {deadline:.0f}s:\n{tail(log_path)}")


def stop_server(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve(peer, path, qemu_cache, tmp):
    """Yield the fio target arguments for `peer`, running its server meanwhile."""
    if peer == "local":
        yield ["--ioengine=io_uring", "--direct=0", f"--filename={path}"]
        return
    port = free_port()
    log_path = tmp / f"{peer}.log"
    proc = start_server(server_cmd(peer, path, port, qemu_cache), log_path)
    try:
        wait_port(port, proc, log_path)
        yield ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/"]
    finally:
        stop_server(proc)


def run_fio(name, rw, bs, target, size, runtime, tmp):
    out = tmp / "fio.json"
    out.unlink(missing_ok=True)
    cmd = [
        "timeout", "--kill-after=5", str(runtime + 60),
        "fio", f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={IODEPTH}",
        "--numjobs=1", "--time_based", f"--runtime={runtime}", f"--size={size}",
        "--group_reporting", "--output-format=json", f"--output={out}", *target,
    ]
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        why = "timed out" if res.returncode in (124, 137) else f"exit {res.returncode}"
        die(f"fio {why}: {' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    text = out.read_text()
    # Be lenient in case anything non-JSON ended up in the file before the object.
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        die(f"fio job error {job['error']}: {' '.join(cmd)}")
    r, w = job["read"], job["write"]
    return {
        "iops": r["iops"] + w["iops"],
        "mbps": (r["bw_bytes"] + w["bw_bytes"]) / 1e6,
        "read_iops": r["iops"], "write_iops": w["iops"],
        "read_bw_bytes": r["bw_bytes"], "write_bw_bytes": w["bw_bytes"],
        "read_clat_mean_ns": r["clat_ns"]["mean"], "write_clat_mean_ns": w["clat_ns"]["mean"],
        "cmd": cmd,
    }


def table(results, peers):
    head = ["workload"]
    for p in peers:
        head += [f"{label(p)} IOPS", f"{label(p)} MB/s"]
    ratio_peers = [p for p in peers if p not in ("lockstep", "local")] if "lockstep" in peers else []
    head += [f"ls/{p}" for p in ratio_peers]
    show_local = "lockstep" in peers and "local" in peers
    if show_local:
        head.append("ls % local")

    rows = []
    for name, rw, _bs in WORKLOADS:
        res = results[name]
        row = [name]
        for p in peers:
            row += [f"{res[p]['iops']:,.0f}", f"{res[p]['mbps']:,.1f}"]
        for p in ratio_peers:
            row.append(f"{res['lockstep']['iops'] / res[p]['iops']:.2f}x" if res[p]["iops"] else "-")
        if show_local:
            seq = rw in ("read", "write") and res["local"]["mbps"]
            row.append(f"{100 * res['lockstep']['mbps'] / res['local']['mbps']:.0f}%" if seq else "-")
        rows.append(row)

    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def versions(peers):
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return None

    v = {"fio": first_line(["fio", "--version"])}
    if "qemu-nbd" in peers:
        v["qemu-nbd"] = first_line(["qemu-nbd", "--version"])
    if "nbdkit" in peers:
        v["nbdkit"] = first_line(["nbdkit", "--version"])
    if "lockstep" in peers:
        v["lockstep_git"] = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return v


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, help="seconds per fio run (default 5; --quick: 2)")
    ap.add_argument("--size", type=parse_size, help="backing file size, e.g. 1G (default 1G; --quick: 256M)")
    ap.add_argument("--file", type=Path, default=Path("/var/tmp/lockstep-nbd-peers.img"),
                    help="backing file; overwritten with random data (default %(default)s)")
    ap.add_argument("--keep-file", action="store_true", help="do not delete the backing file at the end")
    ap.add_argument("--quick", action="store_true", help="runtime 2 s, size 256M")
    ap.add_argument("--only", default=",".join(PEERS),
                    help=f"comma-separated subset of {','.join(PEERS)} (default: all)")
    ap.add_argument("--qemu-cache", choices=["writeback", "none"], default="writeback",
                    help="qemu-nbd cache mode: writeback (its default, page cache like lockstep export) "
                         "or none (--cache=none --aio=io_uring)")
    args = ap.parse_args()
    args.runtime = args.runtime or (2 if args.quick else 5)
    args.size = args.size or parse_size("256M" if args.quick else "1G")
    peers = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in peers if p not in PEERS]
    if bad or not peers:
        ap.error(f"--only: unknown peer(s) {bad}; choose from {','.join(PEERS)}")
    args.peers = [p for p in PEERS if p in peers]  # canonical order, no duplicates
    return args


def main():
    args = parse_args()
    check_tools(args.peers)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {name: {} for name, _, _ in WORKLOADS}

    create_backing_file(args.file, args.size)
    try:
        with tempfile.TemporaryDirectory(prefix="nbd-peers-") as tmp:
            tmp = Path(tmp)
            for name, rw, bs in WORKLOADS:
                for peer in args.peers:
                    print(f"{name:<13} {label(peer):<15}", end=" ", flush=True)
                    with serve(peer, args.file, args.qemu_cache, tmp) as target:
                        r = run_fio(name.replace(" ", "-"), rw, bs, target, args.size, args.runtime, tmp)
                    results[name][peer] = r
                    print(f"{r['iops']:>10,.0f} IOPS {r['mbps']:>9,.1f} MB/s", flush=True)
    finally:
        if not args.keep_file:
            args.file.unlink(missing_ok=True)

    print()
    print(table(results, args.peers))

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"nbd-peers-{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp,
        "config": {
            "runtime_s": args.runtime, "size_bytes": args.size, "file": str(args.file),
            "iodepth": IODEPTH, "numjobs": 1, "qemu_cache": args.qemu_cache, "peers": args.peers,
        },
        "versions": versions(args.peers),
        "servers": {p: server_cmd(p, args.file, "PORT", args.qemu_cache) for p in args.peers if p != "local"},
        "results": results,
    }, indent=2) + "\n")
    print(f"\nraw numbers: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""VM protection benchmark: the test VM of tests/vm_failover.rs (Debian's kernel under TCG, a
busybox counter that reads, checks and rewrites its disk every step) run unprotected and
protected, side by side in one run.

  unprotected   `lockstep export` serves the disk (NBD), guest RAM in a /dev/shm file,
                no checkpoints
  protected     `lockstep secondary` + `lockstep primary --memory RAM --qmp SOCK
                --device-state FILE --checkpoint-interval 100ms`: the VM is stopped for every
                cut, its RAM and device state committed with the disk

For each: boot, wait for the counter, then measure for --measure seconds: guest steps per
second (each step is a sync write and a cache-dropping read of the disk, so it is disk- and
CPU-bound), and for the protected VM the guest stop per checkpoint (QMP stop to cont,
`participants.guest.stopped_us`), the whole pause, checkpoint totals and checkpoints
committed. RAM tracking is the soft-dirty tracker where the kernel keeps soft-dirty bits,
else scanning (the table says which).

Not measured: QEMU's own COLO (a second QEMU in lock-step with block replication, COLO
migration and colo-compare); this script does not set it up.

    cargo build --release -p lockstep-cli -p lockstep-tests --bin lockstep-vm-initrd
    bench/vm.py                    # 96 MiB guest, 20 s measured per configuration
"""

import argparse
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RunError, control, free_port, rel, spawn, stop_proc, tail

REPO = Path(__file__).resolve().parent.parent
LOCKSTEP = REPO / "target" / "release" / "lockstep"
INITRD_TOOL = REPO / "target" / "release" / "lockstep-vm-initrd"
OUT_DIR = REPO / "bench" / "out"
BOOT_DEADLINE = 180.0


def wait(pred, what, deadline, procs):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for p, log in procs:
            if p.poll() is not None:
                raise RunError(f"{what}: {p.args[0]} exited with {p.returncode}:\n{tail(log)}")
        try:
            v = pred()
            if v:
                return v
        except (OSError, RunError, ValueError):
            pass
        time.sleep(0.1)
    raise RunError(f"{what}: not within {deadline:.0f} s")


def counts(console):
    try:
        text = Path(console).read_text(errors="replace")
    except OSError:
        return []
    return [int(m) for m in re.findall(r"^COUNT (\d+)", text, re.M)]


def qemu_cmd(kernel, initrd, ram, mib, disk_port, qmp, console):
    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(mib), "-smp", "1",
            "-nodefaults", "-nographic", "-no-reboot",
            "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={ram},share=on",
            "-machine", "pc,memory-backend=mem", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet panic=-1 rdinit=/init", "-serial", f"file:{console}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-blockdev", f"driver=nbd,node-name=d0,server.type=inet,server.host=127.0.0.1,"
                         f"server.port={disk_port},export=lockstep,reconnect-delay=30",
            "-device", "virtio-blk-pci,drive=d0",
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile="]


def run_config(name, args, tmp, kernel, initrd):
    d = tmp / name
    d.mkdir()
    img = d / "disk.img"
    subprocess.run(["mkfs.ext2", "-q", "-F", str(img), "64M"], check=True, timeout=60,
                   stdout=subprocess.DEVNULL)
    ram = Path(f"/dev/shm/lockstep-bench-vm-{os.getpid()}-{name}")
    s_ram = Path(f"{ram}-s")
    for r in (ram, s_ram):
        with open(r, "wb") as f:
            f.truncate(args.ram_mib << 20)
    procs, sock = [], d / "primary.sock"
    port = free_port()
    try:
        if name == "unprotected":
            log = d / "export.log"
            procs.append((spawn([LOCKSTEP, "export", "--disk", img, "--name", "lockstep",
                                 "--listen", f"127.0.0.1:{port}"], log), log))
        else:
            s_img = d / "secondary.img"
            subprocess.run(["cp", "--sparse=always", str(img), str(s_img)], check=True)
            listen = free_port()
            slog, plog = d / "secondary.log", d / "primary.log"
            procs.append((spawn([LOCKSTEP, "secondary", "--disk", s_img, "--listen", f"127.0.0.1:{listen}",
                                 "--control", d / "secondary.sock", "--memory", s_ram,
                                 "--device-state", d / "secondary.device"], slog), slog))
            wait(lambda: (d / "secondary.sock").exists(), "secondary", 30, procs)
            procs.append((spawn([LOCKSTEP, "primary", "--disk", img, "--export", f"127.0.0.1:{port}",
                                 "--secondary", f"127.0.0.1:{listen}", "--control", sock,
                                 "--memory", ram, "--qmp", d / "vm.qmp", "--device-state", d / "vm.device",
                                 "--ack", "received", "--checkpoint-interval", f"{args.interval}ms"],
                                plog), plog))
        wait(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True,
             f"{name}: the export", 60, procs)
        console, qlog = d / "console.log", d / "qemu.log"
        procs.append((spawn(qemu_cmd(kernel, initrd, ram, args.ram_mib, port, d / "vm.qmp", console),
                            qlog), qlog))
        wait(lambda: len(counts(console)) >= 3, f"{name}: the guest's counter", BOOT_DEADLINE, procs)
        time.sleep(args.warmup)
        c0, t0 = counts(console)[-1], time.monotonic()
        st0 = control(sock, {"cmd": "status"}) if name == "protected" else None
        time.sleep(args.measure)
        c1, t1 = counts(console)[-1], time.monotonic()
        r = {"steps_per_s": (c1 - c0) / (t1 - t0), "steps": c1 - c0, "seconds": t1 - t0}
        if name == "protected":
            st = control(sock, {"cmd": "status"})
            p = st["participants"]
            r.update({
                "checkpoints": st["checkpoints"] - st0["checkpoints"],
                "checkpoint_failures": st["checkpoint_failures"] - st0["checkpoint_failures"],
                "guest_stop_us": p["guest"]["stopped_us"],
                "pause_us": st["checkpoint_pause_us"],
                "total_us": st["checkpoint_total_us"],
                "memory_cut_us": p["memory0"]["cut_pause_us"],
                "device_capture_us": p["device"]["capture_us"],
                "device_bytes": p["device"]["last_bytes"],
                "tracker": p["memory0"]["tracker"],
                "tracker_note": p["memory0"]["tracker_note"],
            })
        if re.search("GUEST-(MISMATCH|NO-DISK)", Path(console).read_text(errors="replace")):
            raise RunError(f"{name}: the guest reported a problem:\n{tail(console)}")
        return r
    finally:
        for p, _ in reversed(procs):
            stop_proc(p)
        for r in (ram, s_ram):
            r.unlink(missing_ok=True)


def table(res, args):
    rows = []
    u, p = res.get("unprotected"), res.get("protected")
    for name, r in (("unprotected", u), ("protected", p)):
        if isinstance(r, dict):
            rows.append(f"{name:<12} {r['steps_per_s']:6.2f} guest steps/s ({r['steps']} in {r['seconds']:.1f} s)")
        else:
            rows.append(f"{name:<12} FAILED: {r}")
    if isinstance(u, dict) and isinstance(p, dict):
        rows.append(f"throughput protected / unprotected: {p['steps_per_s'] / u['steps_per_s']:.2f}x")
        g, pa, t = p["guest_stop_us"], p["pause_us"], p["total_us"]
        rows.append(f"checkpoints: {p['checkpoints']} committed, {p['checkpoint_failures']} failed "
                    f"in {p['seconds']:.0f} s at {args.interval} ms")
        rows.append(f"guest stop per checkpoint  p50 {g['p50'] / 1e3:.1f} ms  p99 {g['p99'] / 1e3:.1f} ms")
        rows.append(f"  of which memory cut p50 {p['memory_cut_us']['p50'] / 1e3:.1f} ms, device state "
                    f"p50 {p['device_capture_us']['p50'] / 1e3:.1f} ms ({p['device_bytes'] / 1024:.0f} KiB)")
        rows.append(f"whole pause p50 {pa['p50'] / 1e3:.1f} ms; checkpoint to COMMITTED p50 "
                    f"{t['p50'] / 1e3:.1f} ms p99 {t['p99'] / 1e3:.1f} ms")
        rows.append(f"RAM tracking: {p['tracker']} ({p['tracker_note']})")
    rows.append("QEMU COLO: not measured (not set up by this script)")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-mib", type=int, default=96)
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval, ms")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--measure", type=float, default=20.0)
    args = ap.parse_args()
    for f in (LOCKSTEP, INITRD_TOOL):
        if not f.is_file():
            sys.exit(f"vm: error: {rel(f)} missing: cargo build --release -p lockstep-cli "
                     "-p lockstep-tests --bin lockstep-vm-initrd")
    results, failed = {"args": vars(args)}, False
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-vm-", dir="/var/tmp") as t:
        tmp = Path(t)
        out = subprocess.run([INITRD_TOOL, tmp / "initrd"], capture_output=True, text=True,
                             timeout=600, check=True).stdout
        paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        for name in ("unprotected", "protected"):
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                results[name] = run_config(name, args, tmp, paths["kernel"], paths["initrd"])
            except (RunError, OSError, subprocess.SubprocessError) as e:
                results[name] = f"{type(e).__name__}: {e}"
                failed = True
    print(table(results, args))
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"vm-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"raw results: {rel(out)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

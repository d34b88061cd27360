#!/usr/bin/env python3
"""Benchmark lockstep's replication against unreplicated lockstep and QEMU's block replication.

fio (nbd ioengine, one job, iodepth 32, time-based) writes through the primary's
NBD export while a checkpoint runs every 100 ms, for these configurations:

  export     `lockstep export`: no replication, the upper limit for the ratios
  export-wt  `lockstep export --writethrough`: every write durable (FUA), the
             unreplicated peer of `sync` (its ratios are against this one)
  local      `lockstep primary --ack local`     (+ `lockstep secondary`)   DRBD's A
  received   `lockstep primary --ack received`  (+ `lockstep secondary`)   DRBD's B
  durable    `lockstep primary --ack durable`   (+ `lockstep secondary`)   DRBD's C
  sync       `lockstep primary --ack sync`      (+ `lockstep secondary`)   FUA on both
  qemu       QEMU's block replication (quorum + replication filter + NBD, as COLO
             sets it up), two `qemu-system-x86_64 -machine none` processes driven
             over QMP; the replication link is a unix socket (see --help epilog)
  qemu-tcp   the same with the replication link on 127.0.0.1 TCP

Workloads: 4k randwrite and 1M sequential write. For each workload every
configuration runs in turn, each on fresh sparse disk files in /var/tmp.

Prints one table (IOPS, MB/s, ratios, checkpoint count and pause p50/p99) and
writes raw numbers, commands and versions to bench/out/replication-<timestamp>.json.
Exits non-zero when any configuration could not run.

    bench/replication.py --quick
    bench/replication.py --runtime 10 --only export,durable,qemu
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import RunError, free_port, parse_size, rel, spawn, stop_proc, tail
from fiolib import (IODEPTH, add_cpu, fio_result, run_fio_cmd, same_content, server_cpu, start_fio,
                    wait_listening)
from qemurep import (QEMU_CHECKPOINT_DOC, QEMU_PRIMARY_SETUP, QEMU_SECONDARY_SETUP, QEMU_START, qemu_cmd,
                     qemu_replication_support, run_qemu)

REPO = Path(__file__).resolve().parent.parent
# LOCKSTEP_BIN: another build to measure (e.g. an older commit's, side by side).
LOCKSTEP = Path(os.environ.get("LOCKSTEP_BIN", REPO / "target" / "release" / "lockstep"))
OUT_DIR = REPO / "bench" / "out"

# (label, fio rw, block size)
WORKLOADS = [
    ("4k randwrite", "randwrite", "4k"),
    ("1M seq write", "write", "1M"),
]
CONFIGS = ["export", "export-wt", "local", "received", "durable", "sync", "received-tls", "durable-tls",
           "qemu", "qemu-tcp"]
EXPORTS = ["export", "export-wt"]
ACK_MODES = ["local", "received", "durable", "sync"]
# Replication with certificates and the peer key on the link: "received-tls" is "received"
# over TLS (rustls) with --psk-file on top.
TLS_MODES = ["received-tls", "durable-tls"]
LABELS = {
    "export": "lockstep export",
    "export-wt": "lockstep export --writethrough",
    "sync": "lockstep ack=sync",
    "local": "lockstep ack=local",
    "received": "lockstep ack=received",
    "durable": "lockstep ack=durable",
    "received-tls": "lockstep received+TLS",
    "durable-tls": "lockstep durable+TLS",
    "qemu": "qemu replication",
    "qemu-tcp": "qemu replication tcp",
}
# tool -> Debian/Ubuntu package that provides it
PACKAGES = {"fio": "fio", "timeout": "coreutils", "qemu-system-x86_64": "qemu-system-x86",
            "qemu-img": "qemu-utils"}

STATUS_TIMEOUT = 10.0


def die(msg):
    sys.exit(f"replication: error: {msg}")


def label(cfg):
    return LABELS.get(cfg, cfg)


# ---------------------------------------------------------------------------------------
# lockstep


def lockstep_support():
    """(export_reason, replication_reason): None where available, else why not."""
    if not os.access(LOCKSTEP, os.X_OK):
        why = f"{rel(LOCKSTEP)} missing: cargo build --release -p lockstep-cli"
        return why, why
    missing = []
    for sub in ("primary", "secondary", "status"):
        r = subprocess.run([str(LOCKSTEP), sub, "--help"], capture_output=True, text=True)
        if r.returncode != 0:
            missing.append(sub)
    if missing:
        return None, (f"{rel(LOCKSTEP)} has no {'/'.join(repr(m) for m in missing)} "
                      f"subcommand yet")
    return None, None


def ack_of(cfg):
    """The ack mode of a lockstep replication configuration ("received-tls" -> "received")."""
    return cfg.split("-")[0]


def secure_flags(tmp):
    """The lockstep flags that use the files make_pki(tmp) writes."""
    pki = tmp / "pki"
    return ["--tls-cert", str(pki / "node-cert.pem"), "--tls-key", str(pki / "node-key.pem"),
            "--tls-ca", str(pki / "ca-cert.pem"), "--psk-file", str(pki / "peer.key")]


def make_pki(tmp):
    """A CA and one certificate (serverAuth + clientAuth, localhost/127.0.0.1) signed by it,
    and a peer key, for the TLS configurations."""
    pki = tmp / "pki"
    pki.mkdir(exist_ok=True)
    ext = pki / "ext.cnf"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=30)
    for k in ("ca", "node"):
        ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(pki / f"{k}-key.pem"))
    ossl("req", "-x509", "-new", "-key", str(pki / "ca-key.pem"), "-subj", "/CN=bench-ca", "-days", "2",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
         "-out", str(pki / "ca-cert.pem"))
    ossl("req", "-new", "-key", str(pki / "node-key.pem"), "-subj", "/CN=localhost", "-out", str(pki / "node.csr"))
    ossl("x509", "-req", "-in", str(pki / "node.csr"), "-CA", str(pki / "ca-cert.pem"), "-CAkey",
         str(pki / "ca-key.pem"), "-set_serial", "2", "-days", "2", "-extfile", str(ext),
         "-out", str(pki / "node-cert.pem"))
    key = pki / "peer.key"
    key.write_text(os.urandom(24).hex())
    key.chmod(0o600)


def lockstep_cmds(cfg, args, tmp, files, port, link_port):
    threads = ["--threads", str(args.threads)] if args.threads else []
    if cfg in EXPORTS:
        return {"export": [str(LOCKSTEP), "export", "--disk", str(files["pri"]), "--size", str(args.size),
                           "--listen", f"127.0.0.1:{port}", *(["--writethrough"] if cfg == "export-wt" else []),
                           *threads]}
    secure = secure_flags(tmp) if cfg in TLS_MODES else []
    return {
        "secondary": [str(LOCKSTEP), "secondary", "--disk", str(files["sec"]), "--size", str(args.size),
                      "--listen", f"127.0.0.1:{link_port}", "--control", str(tmp / "sec.sock"), *secure,
                      *threads],
        "primary": [str(LOCKSTEP), "primary", "--disk", str(files["pri"]), "--size", str(args.size),
                    "--export", f"127.0.0.1:{port}", "--secondary", f"127.0.0.1:{link_port}",
                    "--control", str(tmp / "pri.sock"), "--ack", ack_of(cfg),
                    "--checkpoint-interval", f"{args.interval}ms", *secure, *threads],
    }


def lockstep_status(tmp):
    cmd = [str(LOCKSTEP), "status", "--control", str(tmp / "pri.sock"), "--json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=STATUS_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RunError(f"{' '.join(cmd)}: no answer within {STATUS_TIMEOUT:.0f}s") from None
    # 3, 4, 5: answered, not protected right now (docs/operations.md, status exit codes).
    if r.returncode not in (0, 3, 4, 5):
        raise RunError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-1000:]}")
    text = r.stdout
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        raise RunError(f"{' '.join(cmd)}: not JSON: {text[:500]!r}") from None


def meta_of(img):
    """The replication metadata lockstep keeps beside a disk (DISK.lockstep-meta)."""
    return img.with_name(img.name + ".lockstep-meta")


def run_lockstep(cfg, rw, bs, args, tmp, files):
    port = free_port()
    link_port = free_port()
    for f in ("pri", "sec"):
        files[f].unlink(missing_ok=True)  # lockstep creates them (sparse) from --size
        meta_of(files[f]).unlink(missing_ok=True)  # a fresh disk has no replication metadata
        files[f].with_name(files[f].name + ".lockstep-bitmap").unlink(missing_ok=True)
    for s in ("sec.sock", "pri.sock"):
        (tmp / s).unlink(missing_ok=True)
    if cfg in TLS_MODES:
        make_pki(tmp)
    cmds = lockstep_cmds(cfg, args, tmp, files, port, link_port)
    procs = {}
    fio = None
    f_log = tmp / "fio.log"
    try:
        if cfg in EXPORTS:
            log = tmp / "export.log"
            procs["export"] = (spawn(cmds["export"], log), log)
            wait_listening(port, procs["export"][0], log, "lockstep export")
        else:
            log = tmp / f"{cfg}-secondary.log"
            procs["secondary"] = (spawn(cmds["secondary"], log), log)
            wait_listening(link_port, procs["secondary"][0], log, "lockstep secondary")
            log = tmp / f"{cfg}-primary.log"
            procs["primary"] = (spawn(cmds["primary"], log), log)
            wait_listening(port, procs["primary"][0], log, "lockstep primary")
        out = tmp / "fio.json"
        out.unlink(missing_ok=True)
        cmd = run_fio_cmd(f"{cfg}-{rw}", rw, bs, f"nbd://127.0.0.1:{port}/", args.size, args.runtime, out)
        cpu0 = server_cpu(p for p, _ in procs.values())
        fio = start_fio(cmd, f_log)
        fio.wait()
        cpu1 = server_cpu(p for p, _ in procs.values())
        for what, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise RunError(f"lockstep {what} exited with {proc.returncode} during the run:\n{tail(log)}")
        res = fio_result(fio, cmd, out, f_log)
        add_cpu(res, cpu0, cpu1)
        if cfg not in EXPORTS:
            st = lockstep_status(tmp)
            pause = st.get("checkpoint_pause_us") or {}
            total = st.get("checkpoint_total_us") or {}
            res.update({
                "checkpoints": st.get("checkpoints"),
                "pause_us": {k: pause.get(k) for k in ("p50", "p99", "max")},
                "total_us": {k: total.get(k) for k in ("p50", "p99")},
                "status": st,
            })
            if not st.get("checkpoints"):
                raise RunError(f"lockstep status reports no checkpoints: {json.dumps(st)[:1000]}")
        return res
    finally:
        if fio is not None and fio.poll() is None:
            stop_proc(fio)
        for what in ("primary", "secondary", "export"):
            if what in procs:
                stop_proc(procs[what][0])
        if args.verify and cfg not in EXPORTS and fio is not None:
            files["verified"] = same_content(files["pri"], files["sec"])


# ---------------------------------------------------------------------------------------


def fmt_ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def table(results, configs, unavailable):
    head = ["workload", "configuration", "IOPS", "MB/s", "/export", "/qemu", "CPU/w us", "CPU /export",
            "ckpts", "pause p50", "pause p99", "total p50", "total p99"]
    rows = []
    for name, _rw, _bs in WORKLOADS:
        res = results[name]
        plain = res.get("export")
        qemu = next((res[c] for c in ("qemu", "qemu-tcp") if res.get(c, {}).get("iops")), None)
        for cfg in configs:
            r = res.get(cfg)
            if r is None or "iops" not in r:
                why = "n/a" if cfg in unavailable else "FAILED"
                rows.append([name, label(cfg), why] + ["-"] * (len(head) - 3))
                continue
            repl = ack_of(cfg) in ACK_MODES
            # `sync` promises what a writethrough export does: compare like with like.
            base = res.get("export-wt") if cfg == "sync" else plain
            ratio_base = f"{r['iops'] / base['iops']:.2f}x" if repl and base and base.get("iops") else "-"
            ratio_qemu = f"{r['iops'] / qemu['iops']:.2f}x" if repl and qemu and qemu.get("iops") else "-"
            pause, total = r.get("pause_us") or {}, r.get("total_us") or {}
            ck = r.get("checkpoints")
            cpu = r.get("server_cpu_us_per_write")
            base_cpu = (base or {}).get("server_cpu_us_per_write")
            cpu_ratio = f"{cpu / base_cpu:.2f}x" if cpu and base_cpu and cfg not in EXPORTS else "-"
            rows.append([name, label(cfg), f"{r['iops']:,.0f}", f"{r['mbps']:,.1f}", ratio_base, ratio_qemu,
                         "-" if cpu is None else f"{cpu:.1f}", cpu_ratio,
                         "-" if ck is None else str(ck), fmt_ms(pause.get("p50")), fmt_ms(pause.get("p99")),
                         fmt_ms(total.get("p50")), fmt_ms(total.get("p99"))])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def versions(configs):
    def first_line(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    v = {"fio": first_line(["fio", "--version"]), "kernel": os.uname().release}
    if any(c.startswith("qemu") for c in configs):
        v["qemu-system-x86_64"] = first_line(["qemu-system-x86_64", "--version"])
        v["qemu-img"] = first_line(["qemu-img", "--version"])
    if any(not c.startswith("qemu") for c in configs):
        v["lockstep"] = first_line([str(LOCKSTEP), "--version"])
        v["lockstep_git"] = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return v


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="QEMU notes: QEMU only checkpoints a quiesced disk (COLO stops the VM first); the "
               "script pauses the export's clients during each checkpoint with a throttle-filter "
               "gate and times the whole pause. QEMU 7.2's NBD server does not set TCP_NODELAY, "
               "so its own NBD client stalls ~40 ms per round trip over TCP: 'qemu' therefore "
               "uses a unix socket for the replication link, 'qemu-tcp' shows the TCP setup.")
    ap.add_argument("--runtime", type=int, help="seconds per fio run (default 5; --quick: 2)")
    ap.add_argument("--size", type=parse_size, help="disk size, e.g. 1G (default 1G; --quick: 256M)")
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                    help="directory for the primary and secondary disk files (default %(default)s)")
    ap.add_argument("--buffer-dir", type=Path, default=Path("/dev/shm"),
                    help="directory for QEMU's active and hidden disk (the secondary's disk buffer; "
                         "QEMU's docs recommend a ramdisk; default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="runtime 2 s, size 256M")
    ap.add_argument("--only", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)} (default: all)")
    ap.add_argument("--interval", type=int, default=100, help="checkpoint interval in ms (default 100)")
    ap.add_argument("--qemu-pause", choices=["drain", "stop"], default="drain",
                    help="how QEMU's checkpoint waits for admitted writes: drain (QMP transaction with "
                         "no actions: drain only) or stop (QMP stop/cont, COLO's vm_stop: drain and "
                         "flush both disks)")
    ap.add_argument("--threads", type=int,
                    help="worker threads of every lockstep daemon (--threads N; default: theirs)")
    ap.add_argument("--verify", action="store_true",
                    help="after each replicated run compare the primary and secondary disk files")
    args = ap.parse_args()
    args.runtime = args.runtime or (2 if args.quick else 5)
    args.size = args.size or parse_size("256M" if args.quick else "1G")
    if args.interval <= 0:
        ap.error("--interval must be positive")
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in wanted if c not in CONFIGS]
    if bad or not wanted:
        ap.error(f"--only: unknown configuration(s) {bad}; choose from {','.join(CONFIGS)}")
    args.configs = [c for c in CONFIGS if c in wanted]  # canonical order, no duplicates
    return args


def main():
    args = parse_args()
    for tool in ("fio", "timeout"):
        if shutil.which(tool) is None:
            die(f"'{tool}' not found in PATH: apt install {PACKAGES[tool]}")
    if subprocess.run(["fio", "--enghelp=nbd"], capture_output=True).returncode != 0:
        die("this fio has no 'nbd' ioengine (built without libnbd): apt install fio (>= 3.19)")
    for d in (args.dir, args.buffer_dir):
        if not d.is_dir():
            die(f"{d} is not a directory")

    unavailable = {}
    if any(not c.startswith("qemu") for c in args.configs):
        export_why, repl_why = lockstep_support()
        if export_why and any(c in args.configs for c in EXPORTS):
            for c in EXPORTS:
                if c in args.configs:
                    unavailable[c] = export_why
            print(f"lockstep export: not available ({export_why})")
        if repl_why and any(ack_of(c) in ACK_MODES for c in args.configs):
            for c in ACK_MODES + TLS_MODES:
                if c in args.configs:
                    unavailable[c] = repl_why
            print(f"lockstep primary/secondary: not available ({repl_why})")
    if any(c.startswith("qemu") for c in args.configs):
        why = qemu_replication_support()
        if why:
            for c in ("qemu", "qemu-tcp"):
                if c in args.configs:
                    unavailable[c] = why
            print(f"QEMU block replication: not available ({why})")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {name: {} for name, _, _ in WORKLOADS}
    failures = []
    files = {
        "pri": args.dir / "lockstep-replication-primary.img",
        "sec": args.dir / "lockstep-replication-secondary.img",
        "active": args.buffer_dir / "lockstep-replication-active.qcow2",
        "hidden": args.buffer_dir / "lockstep-replication-hidden.qcow2",
    }
    runnable = [c for c in args.configs if c not in unavailable]
    try:
        with tempfile.TemporaryDirectory(prefix="replication-bench-") as tmp:
            tmp = Path(tmp)
            for name, rw, bs in WORKLOADS:
                for cfg in runnable:
                    print(f"{name:<13} {label(cfg):<21}", end=" ", flush=True)
                    files.pop("verified", None)
                    try:
                        if cfg.startswith("qemu"):
                            r = run_qemu(cfg, rw, bs, args, tmp, files)
                        else:
                            r = run_lockstep(cfg, rw, bs, args, tmp, files)
                    except (RunError, OSError, ValueError, KeyError) as e:
                        if not isinstance(e, RunError):
                            e = RunError(f"{type(e).__name__}: {e}")
                        print("FAILED")
                        print("    " + str(e).replace("\n", "\n    "), flush=True)
                        results[name][cfg] = {"error": str(e)}
                        failures.append(f"{name} / {label(cfg)}: {str(e).splitlines()[0]}")
                        continue
                    if "verified" in files:
                        r["disks_equal_after_run"] = files["verified"]
                    results[name][cfg] = r
                    line = f"{r['iops']:>10,.0f} IOPS {r['mbps']:>9,.1f} MB/s"
                    if r.get("pause_us"):
                        line += (f"  {r.get('checkpoints')} checkpoints, pause p50 {fmt_ms(r['pause_us'].get('p50'))}"
                                 f" p99 {fmt_ms(r['pause_us'].get('p99'))} ms")
                    if "disks_equal_after_run" in r:
                        line += "  disks equal" if r["disks_equal_after_run"] else "  DISKS DIFFER"
                        if not r["disks_equal_after_run"]:
                            failures.append(f"{name} / {label(cfg)}: primary and secondary disks differ")
                    print(line, flush=True)
    finally:
        for f in ("pri", "sec", "active", "hidden"):
            files[f].unlink(missing_ok=True)
            meta_of(files[f]).unlink(missing_ok=True)

    print()
    print(table(results, args.configs, unavailable))
    print("\n(/export and /qemu: IOPS of the lockstep ack mode divided by unreplicated lockstep (for ack=sync: "
          "by the writethrough export, which syncs every write too) and by QEMU "
          "replication; CPU/w: the servers' CPU time (every process and thread of the configuration, user "
          "and system) per write during the fio run, and its ratio to the export's; pause and total in ms)")
    for name, _rw, _bs in WORKLOADS:
        for cfg in TLS_MODES:
            tls, plain = results[name].get(cfg, {}), results[name].get(ack_of(cfg), {})
            if tls.get("iops") and plain.get("iops"):
                print(f"TLS cost, {name}, {ack_of(cfg)}: {tls['iops'] / plain['iops']:.2f}x of the same mode "
                      f"without TLS ({tls['iops']:,.0f} vs {plain['iops']:,.0f} IOPS)")
    for cfg, why in unavailable.items():
        print(f"{label(cfg)}: not available ({why})")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"replication-{stamp}.json"
    placeholder = Path(tempfile.gettempdir()) / "TMP"
    out.write_text(json.dumps({
        "timestamp": stamp,
        "config": {
            "runtime_s": args.runtime, "size_bytes": args.size, "dir": str(args.dir),
            "buffer_dir": str(args.buffer_dir), "iodepth": IODEPTH, "numjobs": 1,
            "checkpoint_interval_ms": args.interval, "qemu_pause": args.qemu_pause,
            "configs": args.configs, "verify": args.verify, "threads": args.threads,
        },
        "versions": versions(args.configs),
        "commands": {
            "lockstep": {c: lockstep_cmds(c, args, placeholder, files, "PORT", "PORT2")
                         for c in args.configs if not c.startswith("qemu")},
            "qemu": {
                "processes": {w: qemu_cmd(f"lockstep-bench-{w}", f"{w}.qmp") for w in ("secondary", "primary")},
                "buffer_images": "qemu-img create -f qcow2 {ACTIVE|HIDDEN} SIZE",
                "secondary_setup": QEMU_SECONDARY_SETUP,
                "primary_setup": QEMU_PRIMARY_SETUP,
                "start": QEMU_START,
                "checkpoint": QEMU_CHECKPOINT_DOC,
                "fio_target": "nbd://127.0.0.1:PORT/colo",
            },
        },
        "unavailable": unavailable,
        "failures": failures,
        "results": results,
    }, indent=2) + "\n")
    print(f"\nraw numbers: {rel(out)}")
    if unavailable or failures:
        for f in failures:
            print(f"failed: {f}", file=sys.stderr)
        print(f"replication: {len(unavailable)} configuration(s) not available, {len(failures)} run(s) failed",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

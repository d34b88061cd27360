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
import contextlib
import datetime
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import RunError, cpu_seconds, free_port, parse_size, percentile, rel, spawn, stop_proc, tail

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

IODEPTH = 32
PORT_DEADLINE = 10.0
QMP_TIMEOUT = 30.0
STATUS_TIMEOUT = 10.0

# QMP sequence for QEMU's block replication (see docs/block-replication.txt in QEMU).
# Placeholders: {SEC} {PRI} {ACTIVE} {HIDDEN} {LINK} {LINK_CLIENT} {PORT}.
QEMU_SECONDARY_SETUP = [
    ("blockdev-add", {"driver": "raw", "node-name": "sdisk",
                      "file": {"driver": "file", "filename": "{SEC}"}}),
    # The primary writes into the secondary disk through this export (it must exist
    # before replication starts: the replication filter wants a block backend on it).
    ("nbd-server-start", {"addr": "{LINK}"}),
    ("nbd-server-add", {"device": "sdisk", "writable": True}),
    # Disk buffer: active disk -> hidden disk -> secondary disk (backing chain).
    ("blockdev-add", {"driver": "replication", "node-name": "srep", "mode": "secondary",
                      "top-id": "srep",
                      "file": {"driver": "qcow2", "node-name": "active",
                               "file": {"driver": "file", "filename": "{ACTIVE}"},
                               "backing": {"driver": "qcow2", "node-name": "hidden",
                                           "file": {"driver": "file", "filename": "{HIDDEN}"},
                                           "backing": "sdisk"}}}),
]
QEMU_PRIMARY_SETUP = [
    ("blockdev-add", {"driver": "raw", "node-name": "pdisk",
                      "file": {"driver": "file", "filename": "{PRI}"}}),
    ("blockdev-add", {"driver": "replication", "node-name": "prep", "mode": "primary",
                      "file": {"driver": "nbd", "server": "{LINK_CLIENT}", "export": "sdisk"}}),
    # Writes go to both children and complete when both did; reads come from pdisk.
    ("blockdev-add", {"driver": "quorum", "node-name": "colo", "vote-threshold": 1,
                      "read-pattern": "fifo", "children": ["pdisk", "prep"]}),
    # Benchmark harness, not replication: a throttle filter used as an I/O gate to
    # pause the client during a checkpoint, as COLO's vm_stop pauses the guest.
    ("object-add", {"qom-type": "throttle-group", "id": "gate0", "limits": {}}),
    ("blockdev-add", {"driver": "throttle", "node-name": "gate", "throttle-group": "gate0",
                      "file": "colo"}),
    ("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "{PORT}"}}}),
    ("nbd-server-add", {"device": "gate", "writable": True, "name": "colo"}),
]
QEMU_START = [
    ("secondary", "xen-set-replication", {"enable": True, "primary": False}),
    ("primary", "xen-set-replication", {"enable": True, "primary": True}),
]
QEMU_CHECKPOINT_DOC = [
    "pause starts",
    "primary: qom-set /objects/gate0 limits {bps-total: 1}   (close the gate: new requests queue in it)",
    "side NBD connection: READ 4k at 0   (primes the throttle bucket so that no write slips past the gate)",
    "primary: transaction {actions: []}   (drain: every admitted write is done on both disks)"
    "   [--qemu-pause stop: 'stop' instead, which also flushes both disks, like COLO's vm_stop]",
    "side NBD connection: wait for the READ reply (if it has not come within 20 ms, drain once more)",
    "primary: xen-colo-do-checkpoint; secondary: xen-colo-do-checkpoint   (drop the disk buffer)",
    "[--qemu-pause stop: primary: cont]",
    "primary: qom-set /objects/gate0 limits {bps-total: 0}   (open the gate)",
    "pause ends",
    "primary: transaction {actions: []}   (releases the writes held at the gate; total ends)",
]


def die(msg):
    sys.exit(f"replication: error: {msg}")


def label(cfg):
    return LABELS.get(cfg, cfg)


def listening(port):
    """True when something listens on 127.0.0.1:port (or 0.0.0.0:port). Reads
    /proc/net/tcp instead of connecting, so no daemon sees a stray connection."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] in want and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def wait_listening(port, proc, log_path, what, deadline=PORT_DEADLINE):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RunError(f"{what} exited with {proc.returncode}:\n{tail(log_path)}")
        if listening(port):
            return
        time.sleep(0.02)
    raise RunError(f"{what} not listening on 127.0.0.1:{port} after {deadline:.0f}s:\n{tail(log_path)}")


def run_fio_cmd(name, rw, bs, uri, size, runtime, out):
    return [
        "timeout", "--kill-after=5", str(runtime + 60),
        "fio", f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={IODEPTH}",
        "--numjobs=1", "--time_based", f"--runtime={runtime}", f"--size={size}",
        "--group_reporting", "--output-format=json", f"--output={out}",
        "--ioengine=nbd", f"--uri={uri}",
    ]


def start_fio(cmd, log_path):
    return spawn(cmd, log_path)


def fio_result(proc, cmd, out, log_path):
    if proc.returncode != 0:
        why = "timed out" if proc.returncode in (124, 137) else f"exit {proc.returncode}"
        raise RunError(f"fio {why}: {' '.join(cmd)}\n{tail(log_path)}")
    text = out.read_text()
    # Be lenient in case anything non-JSON ended up in the file before the object.
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    if job.get("error"):
        raise RunError(f"fio job error {job['error']}: {' '.join(cmd)}\n{tail(log_path)}")
    w = job["write"]
    return {
        "iops": w["iops"], "mbps": w["bw_bytes"] / 1e6, "write_bw_bytes": w["bw_bytes"],
        "writes": w.get("total_ios"),
        "write_clat_mean_ns": w["clat_ns"]["mean"],
        "write_clat_p99_ns": w["clat_ns"].get("percentile", {}).get("99.000000"),
        "cmd": cmd,
    }


def server_cpu(procs):
    """CPU seconds used so far by the servers of a configuration (every thread, user and
    system); None if one is gone."""
    total = 0.0
    for p in procs:
        c = cpu_seconds(p.pid)
        if c is None:
            return None
        total += c
    return total


def add_cpu(res, cpu0, cpu1):
    """The servers' CPU time during the fio run, in all and per write."""
    if cpu0 is None or cpu1 is None or not res.get("writes"):
        return
    res["server_cpu_s"] = cpu1 - cpu0
    res["server_cpu_us_per_write"] = (cpu1 - cpu0) * 1e6 / res["writes"]


def sparse_file(path, size):
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


# ---------------------------------------------------------------------------------------
# QMP and a minimal NBD client (for QEMU)


class QMP:
    def __init__(self, path, proc, log_path, deadline=PORT_DEADLINE):
        end = time.monotonic() + deadline
        while True:
            if proc.poll() is not None:
                raise RunError(f"qemu exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > end:
                    raise RunError(f"no QMP socket {path} after {deadline:.0f}s:\n{tail(log_path)}")
                time.sleep(0.02)
        self.sock.settimeout(QMP_TIMEOUT)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.greeting = json.loads(self._readline())
        self.log = []
        self.cmd("qmp_capabilities")

    def _readline(self):
        try:
            line = self.file.readline()
        except socket.timeout:
            raise RunError(f"QMP: no answer within {QMP_TIMEOUT:.0f}s") from None
        if not line:
            raise RunError("QMP: connection closed (qemu died?)")
        return line

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self._readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RunError(f"QMP {name} {json.dumps(args)}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self):
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class NBDClient:
    """Just enough NBD (fixed newstyle, NBD_OPT_EXPORT_NAME, READ) for the gate's priming read."""

    def __init__(self, port, name):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hello = self._recv(18)
        if hello[:16] != b"NBDMAGICIHAVEOPT":
            raise RunError(f"NBD: unexpected greeting {hello!r}")
        (sflags,) = struct.unpack(">H", hello[16:])
        no_zeroes = sflags & 2
        self.sock.sendall(struct.pack(">I", 1 | (2 if no_zeroes else 0)))
        n = name.encode()
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(n)) + n)
        self.size, _ = struct.unpack(">QH", self._recv(10))
        if not no_zeroes:
            self._recv(124)
        self.handle = 0

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RunError("NBD: connection closed")
            buf += chunk
        return bytes(buf)

    def send_read(self, offset, length):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, self.handle, offset, length))

    def reply_ready(self, timeout):
        return bool(select.select([self.sock], [], [], timeout)[0])

    def recv_read_reply(self, length, timeout=10.0):
        if not self.reply_ready(timeout):
            raise RunError(f"NBD: no reply to the gate's READ within {timeout:.0f}s")
        magic, err, _handle = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or err:
            raise RunError(f"NBD: bad reply magic {magic:#x} error {err}")
        self._recv(length)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
            self.sock.close()


def fill(template, values):
    """Replace "{KEY}" strings (whole values) in a QMP argument template."""
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if isinstance(template, str) and template.startswith("{") and template.endswith("}"):
        return values.get(template[1:-1], template)
    return template


def qemu_cmd(name, qmp_sock):
    return ["qemu-system-x86_64", "-machine", "none", "-accel", "tcg", "-nodefaults",
            "-display", "none", "-name", name, "-qmp", f"unix:{qmp_sock},server=on,wait=off"]


def qemu_replication_support():
    """None if this QEMU can do block replication, else the reason it cannot."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not found: apt install qemu-system-x86"
    if shutil.which("qemu-img") is None:
        return "qemu-img not found: apt install qemu-utils"
    with tempfile.TemporaryDirectory(prefix="replication-probe-") as tmp:
        sock, log = Path(tmp) / "qmp.sock", Path(tmp) / "qemu.log"
        proc = spawn(qemu_cmd("lockstep-bench-probe", sock), log)
        try:
            qmp = QMP(sock, proc, log)
            commands = {c["name"] for c in qmp.cmd("query-commands")}
            missing = [c for c in ("xen-set-replication", "xen-colo-do-checkpoint") if c not in commands]
            drivers = set()
            for t in qmp.cmd("query-qmp-schema"):
                if t.get("meta-type") == "enum" and "quorum" in t.get("values", []):
                    drivers |= set(t["values"])
            missing += [d for d in ("replication", "quorum", "throttle", "nbd") if d not in drivers]
            qmp.close()
            if missing:
                return f"this QEMU build lacks {', '.join(missing)} (built without CONFIG_REPLICATION?)"
            return None
        except RunError as e:
            return f"cannot start qemu-system-x86_64: {e}"
        finally:
            stop_proc(proc)


def run_qemu(cfg, rw, bs, args, tmp, files):
    """One QEMU replication run: secondary + primary QEMU, fio, QMP checkpoints."""
    link_tcp = cfg == "qemu-tcp"
    port = free_port()
    link_port = free_port()
    pri, sec = files["pri"], files["sec"]
    active, hidden = files["active"], files["hidden"]
    sparse_file(pri, args.size)
    sparse_file(sec, args.size)
    for img in (active, hidden):
        img.unlink(missing_ok=True)
        r = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(args.size)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RunError(f"qemu-img create {img}: {r.stderr.strip()}")
    link_sock = tmp / "link.sock"
    link_sock.unlink(missing_ok=True)
    if link_tcp:
        link = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(link_port)}}
        link_client = {"type": "inet", "host": "127.0.0.1", "port": str(link_port)}
    else:
        link = {"type": "unix", "data": {"path": str(link_sock)}}
        link_client = {"type": "unix", "path": str(link_sock)}
    values = {"SEC": str(sec), "PRI": str(pri), "ACTIVE": str(active), "HIDDEN": str(hidden),
              "LINK": link, "LINK_CLIENT": link_client, "PORT": str(port)}

    s_log, p_log, f_log = tmp / f"{cfg}-secondary.log", tmp / f"{cfg}-primary.log", tmp / "fio.log"
    s_sock, p_sock = tmp / "qmp-secondary.sock", tmp / "qmp-primary.sock"
    for p in (s_sock, p_sock):
        p.unlink(missing_ok=True)
    s_proc = p_proc = fio = side = None
    s_qmp = p_qmp = None
    pauses, totals, rounds, phases, extra_drains = [], [], [], [], 0
    try:
        s_proc = spawn(qemu_cmd("lockstep-bench-secondary", s_sock), s_log)
        p_proc = spawn(qemu_cmd("lockstep-bench-primary", p_sock), p_log)
        s_qmp = QMP(s_sock, s_proc, s_log)
        p_qmp = QMP(p_sock, p_proc, p_log)
        for name, a in QEMU_SECONDARY_SETUP:
            s_qmp.cmd(name, fill(a, values))
        for name, a in QEMU_PRIMARY_SETUP:
            p_qmp.cmd(name, fill(a, values))
        for side_name, name, a in QEMU_START:
            (s_qmp if side_name == "secondary" else p_qmp).cmd(name, a)
        side = NBDClient(port, "colo")

        def drain():
            if args.qemu_pause == "stop":
                p_qmp.cmd("stop")
            else:
                p_qmp.cmd("transaction", {"actions": []})

        out = tmp / "fio.json"
        out.unlink(missing_ok=True)
        cmd = run_fio_cmd(f"{cfg}-{rw}", rw, bs, f"nbd://127.0.0.1:{port}/colo", args.size, args.runtime, out)
        cpu0 = server_cpu([p_proc, s_proc])
        fio = start_fio(cmd, f_log)
        interval = args.interval / 1000
        next_at = time.monotonic() + interval
        while True:
            while fio.poll() is None and time.monotonic() < next_at:
                time.sleep(min(0.005, max(0.0, next_at - time.monotonic())))
            if fio.poll() is not None:
                break
            for proc, what, log in ((s_proc, "secondary qemu", s_log), (p_proc, "primary qemu", p_log)):
                if proc.poll() is not None:
                    raise RunError(f"{what} exited with {proc.returncode} during the run:\n{tail(log)}")
            t0 = time.monotonic()
            p_qmp.cmd("qom-set", {"path": "/objects/gate0", "property": "limits", "value": {"bps-total": 1}})
            side.send_read(0, 4096)
            drain()
            t1 = time.monotonic()
            if not side.reply_ready(0.02):
                # A write reached the gate first and may have slipped past it after the
                # drain; drain again so it is done before the secondary checkpoints.
                extra_drains += 1
                p_qmp.cmd("transaction", {"actions": []})
            side.recv_read_reply(4096)
            t2 = time.monotonic()
            p_qmp.cmd("xen-colo-do-checkpoint")
            s_qmp.cmd("xen-colo-do-checkpoint")
            t3 = time.monotonic()
            if args.qemu_pause == "stop":
                p_qmp.cmd("cont")
            # Reopen: unlimited again, and a drain to restart the writes held at the gate
            # (a throttle group releases its queue only on a drain). The client waits for
            # nothing after the qom-set; the drain that follows is the harness's cost:
            # the NBD server reads no new request until the released ones are done.
            p_qmp.cmd("qom-set", {"path": "/objects/gate0", "property": "limits", "value": {"bps-total": 0}})
            t4 = time.monotonic()
            p_qmp.cmd("transaction", {"actions": []})
            t5 = time.monotonic()
            pauses.append((t4 - t0) * 1e6)
            totals.append((t5 - t0) * 1e6)
            rounds.append((t3 - t2) * 1e6)
            phases.append([(t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6, (t4 - t3) * 1e6, (t5 - t4) * 1e6])
            next_at = max(t0 + interval, time.monotonic())
        fio.wait()
        cpu1 = server_cpu([p_proc, s_proc])
        res = fio_result(fio, cmd, out, f_log)
        add_cpu(res, cpu0, cpu1)
        status = {"primary": p_qmp.cmd("query-xen-replication-status"),
                  "secondary": s_qmp.cmd("query-xen-replication-status")}
        for where, st in status.items():
            if st.get("error"):
                raise RunError(f"QEMU replication reports an error on the {where}: {st.get('desc')}")
        res.update({
            "checkpoints": len(pauses),
            "pause_us": {"p50": percentile(pauses, 50), "p99": percentile(pauses, 99),
                         "max": max(pauses, default=None)},
            "total_us": {"p50": percentile(totals, 50), "p99": percentile(totals, 99)},
            "qmp_checkpoint_round_us": {"p50": percentile(rounds, 50), "p99": percentile(rounds, 99)},
            "phase_p50_us": {k: percentile([p[i] for p in phases], 50) for i, k in
                             enumerate(["close_and_drain", "prime_wait", "checkpoint_both", "reopen",
                                        "reopen_drain"])},
            "extra_drains": extra_drains,
            "replication_status": status,
            "link": "tcp" if link_tcp else "unix",
            "qemu_pause": args.qemu_pause,
        })
        return res
    finally:
        if fio is not None and fio.poll() is None:
            stop_proc(fio)
        if side is not None:
            side.close()
        for q in (p_qmp, s_qmp):
            if q is not None:
                q.close()
        # Primary first (it is the NBD client of the secondary), then the secondary.
        stop_proc(p_proc)
        stop_proc(s_proc)
        if args.verify and fio is not None:
            files["verified"] = same_content(pri, sec)
        for f in (active, hidden, link_sock):
            f.unlink(missing_ok=True)


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
    if cfg in EXPORTS:
        return {"export": [str(LOCKSTEP), "export", "--disk", str(files["pri"]), "--size", str(args.size),
                           "--listen", f"127.0.0.1:{port}", *(["--writethrough"] if cfg == "export-wt" else [])]}
    secure = secure_flags(tmp) if cfg in TLS_MODES else []
    return {
        "secondary": [str(LOCKSTEP), "secondary", "--disk", str(files["sec"]), "--size", str(args.size),
                      "--listen", f"127.0.0.1:{link_port}", "--control", str(tmp / "sec.sock"), *secure],
        "primary": [str(LOCKSTEP), "primary", "--disk", str(files["pri"]), "--size", str(args.size),
                    "--export", f"127.0.0.1:{port}", "--secondary", f"127.0.0.1:{link_port}",
                    "--control", str(tmp / "pri.sock"), "--ack", ack_of(cfg),
                    "--checkpoint-interval", f"{args.interval}ms", *secure],
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


def same_content(a, b):
    r = subprocess.run(["cmp", "-s", str(a), str(b)])
    return r.returncode == 0


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
            "configs": args.configs, "verify": args.verify,
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

"""QEMU's block replication (quorum + replication filter + NBD, as COLO sets it up), driven
over QMP as the peer that bench/replication.py measures lockstep against."""

import contextlib
import json
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import RunError, free_port, percentile, spawn, stop_proc, tail
from fiolib import (PORT_DEADLINE, add_cpu, fio_result, run_fio_cmd, same_content, server_cpu,
                    sparse_file, start_fio)

QMP_TIMEOUT = 30.0

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

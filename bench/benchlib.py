"""What the benchmark scripts in bench/ share: the repository root, size parsing, the error
one configuration raises while the others still run, percentiles, and starting and stopping
processes that never outlive the script."""

import argparse
import ctypes
import json
import math
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
KILL_GRACE = 5.0

REPO = Path(__file__).resolve().parent.parent


class RunError(Exception):
    """One configuration failed; the others still run."""


def rel(path):
    """`path` relative to the repository when it lies inside it."""
    try:
        return Path(path).relative_to(REPO)
    except ValueError:
        return path


def parse_size(text):
    """A size such as 256M or 1G, in bytes (powers of 1024)."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 256M, 1G)")
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")


def tail(path, lines=20):
    """The last `lines` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_NEXT_PORT = [None]


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on now.

    Taken from below the kernel's ephemeral range, so no outgoing connection can grab it
    between this probe and the daemon's own bind; never the same port twice per run."""
    import os
    import socket
    import time

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, min(max(ephemeral_low, 12000), 65536)
    span = high - low
    if _NEXT_PORT[0] is None:
        _NEXT_PORT[0] = (os.getpid() * 7919 + time.time_ns()) % span
    for _ in range(span):
        port = low + _NEXT_PORT[0] % span
        _NEXT_PORT[0] += 1
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {low}..{high}")


def percentile(values, p):
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s), math.ceil(p / 100 * len(s))) - 1)]


def die_with_parent():
    """For `preexec_fn`: the child gets SIGKILL when this script dies."""
    # PR_SET_PDEATHSIG: children get SIGKILL if this script dies, so nothing outlives it.
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def spawn(cmd, log_path):
    """Start `cmd` (stdout and stderr appended to `log_path`), killed if the script dies."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)


def stop_proc(proc, grace=KILL_GRACE):
    """SIGTERM to the process's pid, SIGKILL after `grace` seconds. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    return proc.returncode


def control(sock, req, timeout=30):
    """One request on a lockstep daemon's control socket (JSON lines; what `lockstep status
    --json` sends): the parsed answer, RunError when it says `"ok": false`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    v = json.loads(buf)
    if not v.get("ok"):
        raise RunError(f"{req} on {sock}: {v}")
    return v


def cpu_seconds(pid):
    """utime + stime of a running process (all its threads), seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None

"""fio runs and daemon processes for the benchmarks that drive NBD servers with fio's nbd
engine: waiting for a port, the fio command and its JSON result, the servers' CPU time."""

import json
import subprocess
import time

from benchlib import RunError, cpu_seconds, spawn, tail

IODEPTH = 32
PORT_DEADLINE = 10.0


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


def same_content(a, b):
    r = subprocess.run(["cmp", "-s", str(a), str(b)])
    return r.returncode == 0

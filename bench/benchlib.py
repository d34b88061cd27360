"""What the benchmark scripts in bench/ share: the repository root, size parsing, and the
error one configuration raises while the others still run."""

import argparse
import re
from pathlib import Path

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


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

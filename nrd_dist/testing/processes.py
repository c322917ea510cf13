"""Processes and ports for tests and benchmarks: a free loopback port, killing a process
and all its descendants by PID, the tail of a log file."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, found by PID: launchers start their
    workers in sessions of their own, so killing the launcher's group is not enough."""
    import psutil

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)


def read_tail(path: str | Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a text file (undecodable bytes replaced)."""
    return Path(path).read_text(errors="replace")[-chars:]

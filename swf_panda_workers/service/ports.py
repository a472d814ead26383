"""Who answers on a local TCP port: whether anything does, and which
processes hold its listening socket (Linux /proc; None where it cannot be
told, e.g. another user's process without privileges)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

_LISTEN = "0A"  # the TCP state in /proc/net/tcp


def port_answers(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def listening_pids(port: int, proc: Path = Path("/proc")) -> set[int] | None:
    """The processes holding a socket listening on ``port``; None when
    /proc does not say (not Linux, or the holder's fds are not readable)."""
    inodes = _listening_inodes(port, proc)
    if inodes is None:
        return None
    sockets = {f"socket:[{inode}]" for inode in inodes}
    holders = {
        int(fd_dir.parent.name) for fd_dir in proc.glob("[0-9]*/fd") if sockets & _links(fd_dir)
    }
    return holders if holders or not inodes else None


def _links(fd_dir: Path) -> set[str]:
    """What a process's file descriptors point at (those still open and
    readable: the process may be another user's, or exiting)."""
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return set()
    links = set()
    for fd in fds:
        try:
            links.add(os.readlink(fd))
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, for one)
    return links


def command_line(pid: int, proc: Path = Path("/proc")) -> str | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def describe_holders(port: int) -> str:
    """``pid 123: python -m prefect server start ...`` for each holder, or
    what can be said when /proc does not tell."""
    pids = listening_pids(port)
    if not pids:
        return "a process this user cannot see"
    return "; ".join(
        f"pid {pid}: {command_line(pid) or '(command line unreadable)'}" for pid in sorted(pids)
    )


def _listening_inodes(port: int, proc: Path) -> set[str] | None:
    inodes: set[str] = set()
    tables = [proc / "net" / name for name in ("tcp", "tcp6")]
    if not any(table.exists() for table in tables):
        return None
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes

"""Reading back from /proc what a test's process did on the network: the
remote ports of its established TCP connections (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

_ESTABLISHED = "01"


def connected_ports(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Remote ports of the TCP connections ``pid`` holds open, established."""
    inodes = set()
    for fd in (proc / str(pid) / "fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = proc / str(pid) / "net" / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = line.split()
            if fields[3] == _ESTABLISHED and fields[9] in inodes:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports

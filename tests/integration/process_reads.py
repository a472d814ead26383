"""Reading back from /proc (Linux only) what a test's processes did: the
remote ports of a process's established TCP connections, and a process's
tree, start time and command line (to tell a pid reused later from the
process that had it)."""

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


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = stat_fields(stat)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def stat_fields(stat: Path) -> list[str] | None:
    """The fields after the command name: state, ppid, ... (None: gone)."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None if it is gone
    or a zombie (dead, its status not yet collected)."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def still_alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    return {(pid, started) for pid, started in processes if start_time(pid) == started}

"""The process groups of a process's children, killed when that process ends,
however it ends (SIGKILL included).

A child's parent-death signal (``processes.launch``) reaches the child only,
not what the child started itself: the flow-run processes of Prefect's runner
(``prefect.flow_runs: subprocess``), say. Each child is the leader of a process
group holding those, so this reaper, a small process of its own, keeps the
groups' ids and a pipe from the parent. When the pipe closes, the parent has
ended, and the reaper SIGKILLs every group still registered, then exits.

    python -m swf_panda_workers.service.group_reaper    (stdin: +PGID / -PGID lines)

Only the standard library is imported here: the reaper starts in a few tens
of milliseconds.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO

log = logging.getLogger(__name__)


def reap_on_eof(commands: IO[str]) -> set[int]:
    """Follow ``commands`` (``+PGID`` registers a group, ``-PGID`` forgets
    it) to their end, then SIGKILL the groups still registered; returns them."""
    groups: set[int] = set()
    for line in commands:
        sign, number = line[:1], line[1:].strip()
        if sign in "+-" and number.isdigit():
            (groups.add if sign == "+" else groups.discard)(int(number))
    for group in groups:
        kill_group(group, signal.SIGKILL)
    return groups


def kill_group(group: int, signum: int) -> bool:
    """Signal a process group; False if no process of it is left."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # pgid reused by a process of another user: not ours to kill.
        return False
    return True


class GroupReaper:
    """This process's reaper: started at the first registration, started
    again if it ever dies (its pipe then breaks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._groups: set[int] = set()

    def register(self, group: int) -> None:
        with self._lock:
            self._groups.add(group)
            self._send(f"+{group}\n")

    def forget(self, group: int) -> None:
        with self._lock:
            self._groups.discard(group)
            self._send(f"-{group}\n")

    def _send(self, line: str) -> None:
        if self._process is None or self._process.poll() is not None:
            self._start()
            return  # the new reaper was told every group at its start
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(line)
            self._process.stdin.flush()
        except BrokenPipeError:
            log.warning("the process-group reaper %d is gone; starting another", self._process.pid)
            self._start()

    def _start(self) -> None:
        if self._process is not None:
            self._process.wait()  # gone already: only its exit status is left
        # Its own session: a Ctrl-C meant for the terminal's foreground group
        # must not end it before the parent ends.
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )
        assert self._process.stdin is not None
        self._process.stdin.write("".join(f"+{group}\n" for group in self._groups))
        self._process.stdin.flush()


if __name__ == "__main__":
    # A SIGPIPE or a terminal's signal must not cut the wait for the end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reap_on_eof(sys.stdin)

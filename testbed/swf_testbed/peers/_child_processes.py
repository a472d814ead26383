"""Child processes that never outlive the process that started them: the real
peers (iDDS's agent, the transformers) the tests and the demo run.

Each child gets PR_SET_PDEATHSIG (SIGKILL) between fork and exec, so it is
killed however its parent ends, SIGKILL included. The kernel sends that
signal when the *thread* that forked the child exits, not the process: a
child forked by a short-lived thread (an HTTP handler's, a timer's) would be
killed as soon as that thread ends. So children are forked by a
``ChildLauncher``, one long-lived thread that lives until ``close()``;
closing it kills whatever it started and is still running, which is the
last resort of a stop, after the polite one (``stop_process``).

Each child runs in its own session (its process group is its pid), with
stdout and stderr to its log file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls it


def _die_with(parent: int) -> Callable[[], None]:
    """The preexec_fn: in the child, between fork and exec."""

    def preexec() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the signal was armed

    return preexec


@dataclass(frozen=True)
class _Spawn:
    argv: tuple[str, ...]
    env: dict[str, str]
    log_path: Path
    cwd: Path | None


_CLOSE = object()


class ChildLauncher:
    """Forks children from its own thread (see the module docstring).
    ``spawn`` may be called from any thread; it returns once the child runs."""

    def __init__(self, name: str = "child-launcher") -> None:
        self._requests: queue.Queue[
            tuple[_Spawn, concurrent.futures.Future[subprocess.Popen[bytes]]] | object
        ] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        if not self._thread.is_alive():
            raise RuntimeError("the child launcher is closed")
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._requests.put((_Spawn(tuple(argv), dict(env), log_path, cwd), future))
        return future.result()

    def close(self) -> None:
        """End the thread: children still running get SIGKILL."""
        if self._thread.is_alive():
            self._requests.put(_CLOSE)
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        while (item := self._requests.get()) is not _CLOSE:
            assert isinstance(item, tuple)
            request, future = item
            try:
                future.set_result(_popen(request))
            except BaseException as exc:  # handed to the caller of spawn, who raises it
                future.set_exception(exc)


def _popen(request: _Spawn) -> subprocess.Popen[bytes]:
    request.log_path.parent.mkdir(parents=True, exist_ok=True)
    with request.log_path.open("ab") as log:
        return subprocess.Popen(
            request.argv,
            env=request.env,
            cwd=request.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )


def stop_process(process: subprocess.Popen[bytes], grace: float) -> float:
    """SIGTERM to the child's process group, SIGKILL after ``grace`` seconds;
    returns the seconds it took to end (0 if it had already ended)."""
    if process.poll() is not None:
        return 0.0
    started = time.monotonic()
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
    return time.monotonic() - started


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended between the poll and the signal
        os.killpg(process.pid, signum)


def rss_kb(pid: int) -> int | None:
    """The process's resident memory (kB), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeerProcess:
    """One real peer's long-running process (iDDS's agent, its REST app):
    forked by a launcher (its own when none is given), logging to
    ``log_path``, stopped with SIGTERM, then SIGKILL. The log is appended to
    across starts in one work directory: ``log_text`` is this start's part."""

    def __init__(self, name: str, log_path: Path, launcher: ChildLauncher | None) -> None:
        self.name = name
        self.log_path = log_path
        self._own_launcher = launcher is None
        self._launcher = launcher or ChildLauncher(f"{name}-launcher")
        self._process: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this start's part of the log begins
        self.stopped_in: float | None = None  # seconds from SIGTERM to its end

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> None:
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._process = self._launcher.spawn(argv, env, self.log_path, cwd)

    def stop(self, grace: float = 15.0) -> float:
        """SIGTERM, then SIGKILL after ``grace`` seconds; the seconds it took."""
        if self._process is not None:
            self.stopped_in = stop_process(self._process, grace)
            log.info(
                "%s stopped in %.1fs (exit %s)",
                self.name,
                self.stopped_in,
                self._process.returncode,
            )
        if self._own_launcher:
            self._launcher.close()
        return self.stopped_in or 0.0

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def exit_code(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def rss_kb(self) -> int | None:
        return rss_kb(self.pid) if self.alive and self.pid is not None else None

    def log_text(self) -> str:
        """What the process logged since this start."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_start)
                return log_file.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

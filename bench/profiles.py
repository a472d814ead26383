"""Optional: py-spy profiles of the system's processes while the load runs
(``--profile DIR``), to see where the time goes before optimizing: one
file of folded stacks per process (flamegraph.pl or speedscope read them)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path


class Profiles:
    def __init__(self, directory: Path, pids: Mapping[str, int], seconds: float) -> None:
        self._py_spy = shutil.which("py-spy")
        if self._py_spy is None:
            raise SystemExit("--profile needs py-spy on the PATH (pip install py-spy)")
        directory.mkdir(parents=True, exist_ok=True)
        self._argvs = [
            [
                self._py_spy,
                "record",
                "--pid",
                str(pid),
                "--subprocesses",
                "--nonblocking",
                "--duration",
                str(max(1, round(seconds))),
                "--format",
                "raw",
                "--output",
                str(directory / f"{name.replace(' ', '-')}.folded.txt"),
            ]
            for name, pid in pids.items()
        ]
        self._running: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self._running = [
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for argv in self._argvs
        ]

    def wait(self) -> None:
        for process in self._running:
            process.wait()

"""PanDA pilots running the real transformer: for each job of a task PanDA
accepted, one process of idds-prompt's ``run_prompt`` (through
``peers_venv_scripts/run_prompt_payload.py``, which simulates only the
payload, as ``PayloadSchedule`` says) in the real peers' interpreter, with the
job's arguments (``--run_id N --idle_timeout S``) and the environment a pilot
gives its payload: ``PanDA_TaskID``, ``PANDAID``, ``HARVESTER_WORKER_ID``, and
panda-client's settings for the PanDA server (where the transformer asks for
its broker information).

Every process is recorded (start and exit times, exit code, log file) and
ends when ``stop_all`` is called, or, whatever happens to this process, when
it dies (see ``_child_processes``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen

from swf_testbed.peers._bus import Notifier
from swf_testbed.peers._child_processes import ChildLauncher, rss_kb, stop_process
from swf_testbed.peers.panda_server import TaskSubmission, option
from swf_testbed.peers.peers_venv import TRANSFORMER_SCRIPT, peer_env, peers_python
from swf_testbed.peers.peers_venv_scripts.payload_schedule import ENV as SCHEDULE_ENV
from swf_testbed.peers.peers_venv_scripts.payload_schedule import PayloadSchedule

log = logging.getLogger(__name__)


@dataclass
class Pilot:
    """One transformer process. ``exited_at`` and ``exit_code`` are set when
    it ends (guarded by the owning ``Pilots``' lock)."""

    task_id: int
    panda_id: int
    harvester_id: int
    arguments: tuple[str, ...]
    log_path: Path
    pid: int
    started_at: float  # epoch seconds
    exited_at: float | None = None
    exit_code: int | None = None
    process: Popen[bytes] | None = field(default=None, repr=False)

    @property
    def run_id(self) -> str | None:
        return option(list(self.arguments), "--run_id")

    @property
    def alive(self) -> bool:
        return self.exited_at is None

    @property
    def lifetime(self) -> float | None:
        return None if self.exited_at is None else self.exited_at - self.started_at

    def rss_kb(self) -> int | None:
        """Resident memory now (kB); None once it has ended."""
        return rss_kb(self.pid) if self.alive else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Pilots:
    """``panda_env``: panda-client's settings (``PandaServerStandIn.client_env()``).
    ``schedule``: the payload's times and failures (None: no delay); each
    process reads it when it starts, so ``set_schedule`` affects later ones.
    ``launcher``: the thread that forks the processes (one of its own when
    None; closed with ``close``)."""

    def __init__(
        self,
        workdir: Path,
        panda_env: Mapping[str, str],
        *,
        schedule: PayloadSchedule | None = None,
        launcher: ChildLauncher | None = None,
        python: Path | None = None,
        first_panda_id: int = 7_000_001,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._python = python or peers_python()
        self._panda_env = dict(panda_env)
        self._schedule_path = self.workdir / "payload-schedule.json"
        self.set_schedule(schedule or PayloadSchedule())
        self._own_launcher = launcher is None
        self._launcher = launcher or ChildLauncher("pilot-launcher")
        self._panda_ids = itertools.count(first_panda_id)
        self._harvester_ids = itertools.count(48_001)
        self._state = Notifier()
        self._stopping = threading.Event()
        self._pilots: list[Pilot] = []  # guarded by self._state.lock

    def set_schedule(self, schedule: PayloadSchedule) -> None:
        schedule.write(self._schedule_path)

    # --- starting ---------------------------------------------------------------

    def start_task(self, submission: TaskSubmission) -> list[Pilot]:
        """PanDA's jobs for a task: ``submission.jobs`` transformers, each
        with the task's job arguments."""
        return [
            self.start_job(submission.task_id, submission.job_arguments)
            for _ in range(submission.jobs)
        ]

    def start_job(self, task_id: int, arguments: list[str]) -> Pilot:
        if self._stopping.is_set():
            raise RuntimeError("the pilots are stopping: no new job starts")
        panda_id, harvester_id = next(self._panda_ids), next(self._harvester_ids)
        env = peer_env(
            {
                **self._panda_env,
                "PanDA_TaskID": str(task_id),
                "PANDAID": str(panda_id),
                "HARVESTER_WORKER_ID": str(harvester_id),
                SCHEDULE_ENV: str(self._schedule_path),
                # A pilot's idds-prompt has no idds-server beside it, so iDDS's code
                # runs as a client, needing no server configuration; here both share
                # one interpreter, and without this idds-prompt refuses to start.
                "IDDS_CLIENT_MODE": "1",
                "IDDS_LOCAL_CONFIG_ROOT": str(self.workdir / "idds-local"),  # not ~/.idds
            }
        )
        log_path = self.workdir / f"transformer-{task_id}-{panda_id}.log"
        process = self._launcher.spawn(
            [str(self._python), str(TRANSFORMER_SCRIPT), *arguments],
            env,
            log_path,
            cwd=self.workdir,
        )
        pilot = Pilot(
            task_id,
            panda_id,
            harvester_id,
            tuple(arguments),
            log_path,
            process.pid,
            time.time(),
            process=process,
        )
        with self._state.lock:
            self._pilots.append(pilot)
            self._state.notify()
        threading.Thread(
            target=self._await_exit,
            args=(pilot, process),
            name=f"pilot-{panda_id}-exit",
            daemon=True,
        ).start()
        log.info(
            "pilot %s (task %s) started: pid %s, %s",
            panda_id,
            task_id,
            process.pid,
            " ".join(arguments),
        )
        return pilot

    def _await_exit(self, pilot: Pilot, process: Popen[bytes]) -> None:
        code = process.wait()
        with self._state.lock:
            pilot.exited_at, pilot.exit_code = time.time(), code
            self._state.notify()
        log.info(
            "pilot %s (task %s) exited with %s after %.1fs",
            pilot.panda_id,
            pilot.task_id,
            code,
            pilot.lifetime or 0.0,
        )

    # --- records ------------------------------------------------------------------

    @property
    def pilots(self) -> list[Pilot]:
        with self._state.lock:
            return list(self._pilots)

    def of_run(self, run_id: str | int) -> list[Pilot]:
        return [p for p in self.pilots if p.run_id == str(run_id)]

    def live(self, run_id: str | int | None = None) -> int:
        """Transformers running now (of the run, when given)."""
        return sum(
            1 for p in self.pilots if p.alive and (run_id is None or p.run_id == str(run_id))
        )

    def live_by_run(self) -> dict[str | None, int]:
        return dict(Counter(p.run_id for p in self.pilots if p.alive))

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (woken by each start and exit) until ``predicate`` holds."""
        return self._state.wait_for(predicate, timeout)

    # --- stopping -----------------------------------------------------------------

    def stop_all(self, grace: float = 10.0) -> None:
        """No new job starts; each running transformer gets SIGTERM, then
        SIGKILL after ``grace`` seconds. Waits until all have ended."""
        self._stopping.set()
        running = [p for p in self.pilots if p.alive and p.process is not None]
        threads = [
            threading.Thread(target=stop_process, args=(p.process, grace), daemon=True)
            for p in running
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.wait_for(lambda: all(not p.alive for p in self._pilots), grace)

    def close(self) -> None:
        """``stop_all``, and the launcher's thread ends (if it is ours)."""
        self.stop_all()
        if self._own_launcher:
            self._launcher.close()

    def __enter__(self) -> Pilots:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

"""Where `serve` keeps its state: the home of the Prefect server it starts
(the database holding every run's flow runs, events, journal and artifacts)
and the service's logs. A directory that survives a reboot, never a
temporary one: a reboot or a tmp cleaner would take every run's history.

Chosen in this order: ``prefect.state_dir`` in the configuration (or
``SWF_STATE_DIR``), else ``PREFECT_HOME`` (where Prefect's own commands look
too), else the user's XDG state directory, ``$XDG_STATE_HOME/swf-panda-workers``
(``~/.local/state/swf-panda-workers``). Pure: the environment is passed in.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from swf_panda_workers.config.schema import Settings

APP_DIR = "swf-panda-workers"


@dataclass(frozen=True)
class StateDir:
    path: Path
    chosen_by: str  # the setting or variable it comes from, for `config` and the logs

    @property
    def prefect_home(self) -> Path:
        """PREFECT_HOME of `serve`'s Prefect server: prefect.db is here."""
        return self.path

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def temporary(self, temp_root: Path | None = None) -> bool:
        """Under the system's temporary directory: lost at a reboot or a cleanup."""
        root = (temp_root or Path(tempfile.gettempdir())).resolve()
        return self.path.resolve().is_relative_to(root)


def earlier_databases(environ: Mapping[str, str], temp_root: Path | None = None) -> list[Path]:
    """Databases where earlier versions kept serve's: under
    ``$SWF_STATE_DIR`` (then a parent of the state) or the temporary directory,
    in ``swf-panda-workers/prefect/prefect.db``."""
    roots = [Path(environ["SWF_STATE_DIR"])] if environ.get("SWF_STATE_DIR") else []
    roots.append(temp_root or Path(tempfile.gettempdir()))
    return [
        database
        for root in roots
        if (database := root / APP_DIR / "prefect" / "prefect.db").is_file()
    ]


def state_dir(settings: Settings, environ: Mapping[str, str], home: Path | None = None) -> StateDir:
    """``home``: the user's home directory (default: Path.home())."""
    configured = settings.prefect.state_dir
    if configured is not None:
        source = "SWF_STATE_DIR" if environ.get("SWF_STATE_DIR") else "prefect.state_dir"
        return StateDir(configured.expanduser(), source)
    if environ.get("PREFECT_HOME"):
        return StateDir(Path(environ["PREFECT_HOME"]).expanduser(), "PREFECT_HOME")
    xdg = environ.get("XDG_STATE_HOME")
    # The XDG spec: a relative value is invalid and is to be ignored.
    if xdg and Path(xdg).is_absolute():
        return StateDir(Path(xdg) / APP_DIR, "XDG_STATE_HOME")
    return StateDir(
        (home or Path.home()) / ".local" / "state" / APP_DIR, "the XDG default, ~/.local/state"
    )

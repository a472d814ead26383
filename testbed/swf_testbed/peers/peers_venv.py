"""Where the real peers' interpreter is (``.venv-peers``, made by
scripts/bootstrap.sh), the scripts we run in it, and the environment their
processes start with."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PYTHON_ENV = "SWF_PEERS_PYTHON"  # another interpreter with the real peers installed
CHECKOUT = Path(__file__).resolve().parents[3]  # peers, swf_testbed, testbed, the checkout
SCRIPTS = Path(__file__).resolve().parent / "peers_venv_scripts"
IDDS_SCRIPT = SCRIPTS / "idds_transceiver.py"
TRANSFORMER_SCRIPT = SCRIPTS / "run_prompt_payload.py"

# Variables of ours (or of an activated virtualenv) that would change where
# the peers look for their configuration: iDDS reads $VIRTUAL_ENV/etc/idds,
# panda-client reads PANDA_*, X509_*, and idds-client IDDS_*.
_NOT_INHERITED_PREFIXES = ("IDDS_", "PANDA_", "X509_", "ALEMBIC_", "SWF_", "PREFECT_")
_NOT_INHERITED = frozenset({"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "STOMP_DEBUG"})


class PeersNotInstalled(RuntimeError):
    pass


def peers_python() -> Path:
    """$SWF_PEERS_PYTHON, else the checkout's .venv-peers/bin/python."""
    named = os.environ.get(PYTHON_ENV)
    python = Path(named) if named else CHECKOUT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        raise PeersNotInstalled(
            f"the real peers' interpreter {python} is missing: run `bash scripts/bootstrap.sh` "
            f"(it makes .venv-peers), or set {PYTHON_ENV}"
        )
    return python


def peer_env(extra: Mapping[str, str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A peer process's environment: ours (``base``, default os.environ)
    without what would steer the peers elsewhere, plus ``extra``."""
    inherited = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if k not in _NOT_INHERITED and not k.startswith(_NOT_INHERITED_PREFIXES)
    }
    return {**inherited, "PYTHONUNBUFFERED": "1", **extra}

"""The container image's files, read as Docker and Compose would (Docker does
not run on this machine): deployments/Containerfile parsed by
dockerfile-parse, deployments/compose.listener.yaml by PyYAML, and the
.dockerignore patterns applied to what the image copies, and the image's
install step reproduced (what it puts in site-packages: the product, no
simulator). Running the image's entrypoint as a plain process is
tests/integration/test_observability.py."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from swf_panda_workers.config.loading import ENV_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deployments" / "Containerfile"
COMPOSE = REPO / "deployments" / "compose.listener.yaml"
SERVICE = "panda-workers-listener"
# What the listener needs from the testbed's environment.
LISTENER_ENV = {
    "ACTIVEMQ_HOST",
    "ACTIVEMQ_PORT",
    "ACTIVEMQ_USER",
    "ACTIVEMQ_PASSWORD",
    "ACTIVEMQ_USE_SSL",
    "SWF_MONITOR_URL",
    "SWF_API_TOKEN",
    "PREFECT_API_URL",
}
# What production runs, and what must never ship: the testbed's package and
# the names its parts had when they lived in the product.
PRODUCT_PACKAGES = {"swf_panda_workers", "flows", "listeners", "deployments"}
NEVER_SHIPPED = {"swf_testbed", "peers", "embedded", "launchers", "peers_venv_scripts"}


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    with CONTAINERFILE.open("rb") as source:
        parsed = DockerfileParser(fileobj=source)
        return [
            (i["instruction"], i["value"])
            for i in parsed.structure
            if i["instruction"] != "COMMENT"
        ]


@pytest.fixture(scope="module")
def image_env() -> dict[str, str]:
    with CONTAINERFILE.open("rb") as source:
        return dict(DockerfileParser(fileobj=source).envs)


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"][SERVICE]


def values(instructions: list[tuple[str, str]], name: str) -> list[str]:
    return [value for instruction, value in instructions if instruction == name]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``relative`` (or a folder above it) out
    of the build context: Go's filepath.Match per pattern, ``**/`` for any
    depth, a later ``!pattern`` taking it back."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        forms = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            out = not keep
    return out


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_the_image_is_slim_and_runs_as_a_user_that_is_not_root(
    instructions: list[tuple[str, str]],
) -> None:
    [base] = values(instructions, "FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base), base
    users = values(instructions, "USER")
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    # The user exists by the time it is switched to.
    names = [name for name, _ in instructions]
    assert any(
        "useradd" in value and users[-1] in value
        for value in values(instructions[: names.index("USER")], "RUN")
    )
    assert values(instructions, "WORKDIR") == ["/app"]


def test_the_image_starts_the_listener_and_checks_its_health(
    instructions: list[tuple[str, str]],
    image_env: dict[str, str],
) -> None:
    assert json.loads(values(instructions, "ENTRYPOINT")[-1]) == ["swf-panda-workers"]
    assert json.loads(values(instructions, "CMD")[-1]) == ["listen"]
    [check] = values(instructions, "HEALTHCHECK")
    options, _, command = check.partition("CMD")
    assert json.loads(command) == ["swf-panda-workers", "healthcheck"]
    timeout = re.search(r"--timeout=(\d+)s", options)
    assert timeout and int(timeout.group(1)) > 3  # the check's own deadline is 3 s
    assert values(instructions, "EXPOSE") == [image_env["SWF_METRICS_PORT"]]
    assert image_env["SWF_METRICS_HOST"] == "0.0.0.0"


def test_everything_the_image_copies_is_in_the_build_context(
    instructions: list[tuple[str, str]],
    image_env: dict[str, str],
) -> None:
    patterns = dockerignore()
    copied: dict[str, str] = {}  # in the image -> from the checkout
    for value in values(instructions, "COPY"):
        *sources, target = shlex.split(value)
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the checkout"
            assert not ignored(source, patterns), f"COPY {source}: left out by .dockerignore"
            where = target.rstrip("/") + "/" + Path(source).name if target.endswith("/") else target
            copied[str(Path("/app") / where)] = source
    # The configuration the image defaults to is one it copied; the packages
    # pyproject.toml installs are all there.
    config = image_env["SWF_PANDA_WORKERS_CONFIG"]
    assert any(config.startswith(f"{target}/") or config == target for target in copied)
    assert {
        "pyproject.toml",
        "README.md",
        "swf_panda_workers",
        "listeners",
        "flows",
        "deployments",
        "config",
    } <= set(copied.values())


def build_context_copy(instructions: list[tuple[str, str]], context: Path, app: Path) -> None:
    """Into ``app`` (the image's WORKDIR), what the image's COPY instructions
    take from ``context``, as Docker copies them: a folder's contents into the
    target, a file into a target ending in ``/``, .dockerignore applied."""
    patterns = [
        line.strip()
        for line in (context / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for value in values(instructions, "COPY"):
        *sources, target = shlex.split(value)
        for source in sources:
            origin = context / source
            if origin.is_dir():
                destination = app / target
                for path in sorted(origin.rglob("*")):
                    relative = path.relative_to(context).as_posix()
                    if path.is_file() and not ignored(relative, patterns):
                        copied = destination / path.relative_to(origin)
                        copied.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, copied)
            else:
                destination = app / target / origin.name if target.endswith("/") else app / target
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination)


def image_install(instructions: list[tuple[str, str]], context: Path, tmp: Path) -> set[str]:
    """The image's install step, reproduced: its COPYs into a folder, then its
    ``pip install .`` there (no dependencies, offline) into a target folder;
    every path that lands there, relative to it."""
    [install] = [value for value in values(instructions, "RUN") if "pip install" in value]
    assert re.search(r"pip install \.(\s|$)", install), install  # the WORKDIR's project
    app, target = tmp / "app", tmp / "site-packages"
    build_context_copy(instructions, context, app)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--no-compile",
            "--target",
            str(target),
            str(app),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {path.relative_to(target).as_posix() for path in target.rglob("*")}


def test_the_image_installs_the_product_and_no_simulator(
    instructions: list[tuple[str, str]],
    tmp_path: Path,
) -> None:
    installed = image_install(instructions, REPO, tmp_path)
    top = {path.split("/")[0] for path in installed}
    assert top >= PRODUCT_PACKAGES
    assert "bin/swf-panda-workers" in installed
    shipped = sorted(
        path for path in installed if NEVER_SHIPPED & set(path.split("/")) or "demo" in path.lower()
    )
    assert shipped == [], f"the image would install the testbed's {shipped[:5]}"
    assert "swf_panda_workers/cli.py" in installed  # the product's code, not just its folders


@pytest.mark.parametrize(
    ("path", "left_out"),
    [
        (".venv/bin/python", True),
        (".venv-peers/bin/python", True),
        (".git/HEAD", True),
        (".swf-local/demo/x", True),
        ("bench-results/a.json", True),
        ("listeners/__pycache__/x.pyc", True),
        ("__pycache__/x.pyc", True),
        ("swf_panda_workers.egg-info/PKG-INFO", True),
        ("listeners/bus_listener.py", False),
        ("config/swf_panda_workers.yaml", False),
    ],
)
def test_dockerignore_leaves_out_what_is_local(path: str, left_out: bool) -> None:
    assert ignored(path, dockerignore()) is left_out


def test_the_compose_service_drops_into_the_testbed(service: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert service["build"]["dockerfile"] == "deployments/Containerfile"
    assert (
        REPO
        / "deployments"
        / service["build"]["context"].split(":-")[-1].rstrip("}")
        / service["build"]["dockerfile"]
    ).resolve() == CONTAINERFILE
    assert "activemq" in service["depends_on"]
    [network] = service["networks"]
    assert compose["networks"][network]["external"] is True
    assert "SWF_TESTBED_NETWORK" in compose["networks"][network]["name"]
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service["init"] is True  # SIGTERM reaches the listener, not a shell
    assert service["healthcheck"]["test"] == ["CMD", "swf-panda-workers", "healthcheck"]
    assert grace_seconds(service["stop_grace_period"]) >= 10


def test_the_compose_service_configures_the_listener_by_environment_only(
    service: dict[str, Any],
    image_env: dict[str, str],
) -> None:
    environment = service["environment"]
    assert set(environment) >= LISTENER_ENV
    assert "SWF_PANDA_WORKERS_CONFIG" not in environment  # the image's packaged default
    # Each variable is one the service reads: a setting's override, or
    # Prefect's, or the monitor's (read by the monitor reporter).
    known = set(ENV_OVERRIDES) | {"PREFECT_API_URL", "SWF_MONITOR_URL", "SWF_API_TOKEN"}
    assert set(environment) <= known
    # The metrics port the service sets is the one the image exposes.
    assert str(environment["SWF_METRICS_PORT"]) == image_env["SWF_METRICS_PORT"]
    assert str(environment["SWF_METRICS_PORT"]) in service["expose"]


def grace_seconds(period: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", period)
    assert match, period
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)

"""The service configuration from one YAML file, overridden by the environment.

Secrets (broker user and password, the swf-monitor API token) and hosts come
from the environment in the testbed, or from files the environment names
(``ACTIVEMQ_PASSWORD_FILE``, as Docker and Kubernetes secrets are mounted);
see ENV_OVERRIDES and SECRET_FILE_VARIANTS. A password or token written into
the file still works, with a warning. No error message carries a secret's
value: they name keys, variables and files. What the file may hold, and its
checks, is ``swf_panda_workers.config.schema``'s.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from swf_panda_workers.config.schema import Settings

log = logging.getLogger(__name__)

CONFIG_ENV = "SWF_PANDA_WORKERS_CONFIG"
REPLICA_ENV = "SWF_LISTENER_REPLICA"
CONFIG_NAME = "swf_panda_workers.yaml"
# config/ at the top of the source tree (this file is swf_panda_workers/config/loading.py).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / CONFIG_NAME


class ConfigError(ValueError):
    """The configuration cannot be used; the text names the file and key."""


# environment variable -> (section, key). The ACTIVEMQ_* names are the ones
# the swf-testbed compose file already sets for its agents.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "ACTIVEMQ_HOST": ("brokers", "host"),
    "ACTIVEMQ_PORT": ("brokers", "port"),
    "ACTIVEMQ_USER": ("brokers", "username"),
    "ACTIVEMQ_PASSWORD": ("brokers", "password"),
    "ACTIVEMQ_USE_SSL": ("brokers", "use_ssl"),
    "ACTIVEMQ_SSL_CA_CERTS": ("brokers", "ssl_ca_certs"),
    "ACTIVEMQ_SSL_CERT_FILE": ("brokers", "ssl_cert_file"),
    "ACTIVEMQ_SSL_KEY_FILE": ("brokers", "ssl_key_file"),
    "SWF_NAMESPACE": ("transceiver", "namespace"),
    "SWF_PANDA_MODE": ("transceiver", "mode"),
    REPLICA_ENV: ("transceiver", "replica"),
    # the names swf-common-lib's agents read
    "SWF_MONITOR_URL": ("monitor", "url"),
    "SWF_API_TOKEN": ("monitor", "token"),
    "SWF_MONITOR_INTERVAL": ("monitor", "interval"),
    "SWF_METRICS_HOST": ("metrics", "host"),
    "SWF_METRICS_PORT": ("metrics", "port"),
    "SWF_STATE_DIR": ("prefect", "state_dir"),
    "IDDS_CA_CERTS": ("idds", "ca_certs"),
}

# <VARIABLE>_FILE names a file holding the value of <VARIABLE> (one trailing
# newline stripped), for secrets mounted as files; setting both is an error.
SECRET_FILE_VARIANTS = ("ACTIVEMQ_USER", "ACTIVEMQ_PASSWORD", "SWF_API_TOKEN")

# Secrets that work when written in the file, with a warning: (section, key, variable).
SECRETS_IN_THE_FILE = (
    ("brokers", "password", "ACTIVEMQ_PASSWORD"),
    ("monitor", "token", "SWF_API_TOKEN"),
)


def config_path(
    explicit: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The configuration file, searched as the seed agent did: --config, else
    $SWF_PANDA_WORKERS_CONFIG (either must exist: a typo is an error, not a
    silent fall-back), else the first that exists of the user's file
    ($XDG_CONFIG_HOME or ~/.config)/swf_panda_workers/swf_panda_workers.yaml
    and the installation's <prefix>/etc/swf_panda_workers/swf_panda_workers.yaml,
    else the packaged default."""
    environ = os.environ if environ is None else environ
    named = explicit or environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    return next((path for path in config_candidates(environ) if path.is_file()), DEFAULT_CONFIG)


def config_candidates(environ: Mapping[str, str]) -> list[Path]:
    """Where a configuration file is looked for when none is named."""
    user = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [
        user / "swf_panda_workers" / CONFIG_NAME,
        Path(sys.prefix) / "etc" / "swf_panda_workers" / CONFIG_NAME,
        DEFAULT_CONFIG,
    ]


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    source = config_path(path)
    try:
        raw = yaml.safe_load(source.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return settings_from(raw, environ if environ is not None else os.environ, str(source))


def settings_from(
    raw: dict[str, Any], environ: Mapping[str, str], source: str = "configuration"
) -> Settings:
    # A section that is not a mapping is left as it is for validation to name.
    merged = {
        section: {} if values is None else dict(values) if isinstance(values, Mapping) else values
        for section, values in raw.items()
    }
    values = _environment_values(environ)
    for variable, (section, key) in ENV_OVERRIDES.items():
        if values.get(variable) and isinstance(merged.setdefault(section, {}), dict):
            merged[section][key] = values[variable]
    for section, key, variable in SECRETS_IN_THE_FILE:
        written = raw.get(section)
        if isinstance(written, Mapping) and written.get(key) and not values.get(variable):
            log.warning(
                "%s: %s.%s is written in the configuration; keep it out of the "
                "file, in %s or %s_FILE",
                source,
                section,
                key,
                variable,
                variable,
            )
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ConfigError(f"{source}: {problems}") from None


def _environment_values(environ: Mapping[str, str]) -> dict[str, str]:
    """The override variables' values, with each <VARIABLE>_FILE read in."""
    values = {name: environ[name] for name in ENV_OVERRIDES if environ.get(name)}
    for name in SECRET_FILE_VARIANTS:
        file_variable = f"{name}_FILE"
        if not environ.get(file_variable):
            continue
        if environ.get(name):
            raise ConfigError(f"both {name} and {file_variable} are set; set one")
        values[name] = read_secret_file(environ[file_variable], file_variable)
    return values


def read_secret_file(path: str | Path, variable: str) -> str:
    """A secret from a file: its text less one trailing newline (which editors
    and `echo` add). Errors name the variable and the file, never the content."""
    try:
        # Bytes, then decoded: text mode would turn a '\r' inside the secret into '\n'.
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {path} is not UTF-8 text") from None
    for newline in ("\r\n", "\n"):
        if text.endswith(newline):
            text = text[: -len(newline)]
            break
    if not text:
        raise ConfigError(f"{variable}: {path} is empty")
    return text


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's excerpt of the offending
    line: that line may hold a password."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return type(exc).__name__

"""Policy specs: the settings a replay is run with, from a short text such as
``proportional:max_workers=20,slice.cooldown=30``, read and validated as a
configuration file is."""

from __future__ import annotations

from typing import Any

import yaml

from swf_panda_workers.config.loading import ConfigError, settings_from
from swf_panda_workers.config.schema import Settings


def settings_with(settings: Settings, spec: str) -> tuple[str, Settings]:
    """A label and the settings a policy spec asks for: ``NAME[:KEY=VALUE,...]``.

    NAME is ``reference`` or ``proportional``; a KEY without a dot is in the
    ``scaling`` section (``max_workers=20``), one with a dot names its section
    (``slice.cooldown=30``); VALUEs are YAML scalars. The result is validated
    as a configuration file is, so errors read the same."""
    label = spec.strip()
    name, _, overrides = label.partition(":")
    raw = settings.model_dump(mode="json", exclude={"brokers": {"password"}})
    raw["scaling"]["policy"] = name.strip()
    for item in (part.strip() for part in overrides.split(",")):
        if not item:
            continue
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"policy {label!r}: {item!r} is not KEY=VALUE")
        section, _, option = key.rpartition(".")
        section = section or "scaling"
        if (section, option) == ("scaling", "policy"):
            raise ConfigError(f"policy {label!r}: name the policy before the ':', not as a key")
        try:
            value: Any = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"policy {label!r}: {key}: {text!r} is not a YAML value") from None
        target = raw.setdefault(section, {})
        if not isinstance(target, dict) or "." in section:
            raise ConfigError(f"policy {label!r}: {key}: no such setting")
        target[option] = value
    # No environment: its overrides are in `settings` already.
    chosen = settings_from(raw, {}, f"policy {label!r}")
    # The dump masks the password; the replay never uses it, but the settings
    # handed back must not carry a false one.
    brokers = chosen.brokers.model_copy(update={"password": settings.brokers.password})
    return label, chosen.model_copy(update={"brokers": brokers})

"""What a run flow starts from: its configuration and its announcement."""

from typing import Any

from swf_panda_workers.config.loading import load_settings
from swf_panda_workers.config.schema import Settings
from swf_panda_workers.core.messages import RunImminent, parse_message


def settings_for(namespace: str) -> Settings:
    """The configured settings, in the namespace this run belongs to."""
    settings = load_settings()
    transceiver = settings.transceiver.model_copy(update={"namespace": namespace})
    return settings.model_copy(update={"transceiver": transceiver})


def announced_run(announcement: dict[str, Any], run_id: str) -> RunImminent:
    """The run_imminent the flow run was started with, checked against its run id."""
    message = parse_message(announcement)
    if not isinstance(message, RunImminent) or message.run_id != run_id:
        raise ValueError(
            f"announcement must be the run_imminent of run {run_id}, got "
            f"{type(message).__name__} for run {getattr(message, 'run_id', None)}"
        )
    return message

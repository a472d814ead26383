"""What an operator is shown of one run (``swf-panda-workers show``): its flow
run as Prefect has it, and its state folded from the run's stored messages
and journaled effects. Pure: the caller reads Prefect."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from swf_panda_workers.core.run_state import RunState


@dataclass(frozen=True)
class FlowRunSummary:
    id: str
    name: str
    state: str
    started: datetime | None
    ended: datetime | None


@dataclass(frozen=True)
class RunReport:
    run_id: str
    namespace: str
    flow_run: FlowRunSummary
    sub_flow_runs: tuple[FlowRunSummary, ...]
    state: RunState
    parameters: dict[str, Any]
    ui_url: str | None = None

    @property
    def recorded_parameters(self) -> dict[str, Any]:
        """The run's own parameters, without ``dry_run``: whether to send is
        the replay's choice (the dry-run deployment's default), not the
        record's, and the live run's ``dry_run: false`` would override it."""
        return {k: v for k, v in self.parameters.items() if k != "dry_run"}

    def text(self) -> str:
        s, fr = self.state, self.flow_run
        lines = [
            f"run {self.run_id} (namespace {self.namespace})",
            f"  flow run   {fr.name}  {fr.state}  {_when(fr.started)} .. {_when(fr.ended)}",
            *(f"  sub-flow   {sub.name}  {sub.state}" for sub in self.sub_flow_runs),
        ]
        if self.ui_url:
            lines.append(f"  in the UI  {self.ui_url}/runs/flow-run/{fr.id}")
        ids = s.ids
        lines += [
            "  iDDS       "
            + (
                f"request {ids.request_id}, transform {ids.transform_id}, "
                f"workload {ids.workload_id}"
                if ids
                else "no ids yet"
            ),
            f"  steps      {_steps(s)}",
            f"  slices     {s.slices_done} done, {s.slices_failed} failed, "
            f"{len(s.workers_seen)} workers seen"
            + (f", slowest {s.slowest_slice:.1f} s" if s.slowest_slice is not None else ""),
            f"  workers    started with {s.plan.initial.target_worker_count}, "
            f"asked {s.plan.current.target_worker_count}, confirmed by iDDS "
            + (str(s.applied.target_worker_count) if s.applied else "-"),
        ]
        lines += [
            f"  adjust     {a.sent_at:%Y-%m-%d %H:%M:%S} -> {a.size.target_worker_count} "
            f"workers: {a.reason}"
            for a in s.adjustments
        ]
        return "\n".join(lines)


def _steps(s: RunState) -> str:
    done = [
        ("create sent", s.create_sent),
        ("ids", s.ids is not None),
        ("ended", s.ended),
        ("stop sent", s.stop_sent),
        ("close sent", s.close_sent),
        (f"closed ({s.closed_status})", s.closed),
    ]
    return ", ".join(name if ok else f"no {name.split(' (')[0]}" for name, ok in done)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"


def artifact_key(kind: str, namespace: str, run_id: str, dry_run: bool = False) -> str:
    """A run's artifact key (``run-...``: its summary; ``scaling-...``: its
    decisions): stable, so the UI shows each run's latest; a dry run's apart
    from the live run's. Prefect takes lowercase letters, digits and dashes."""
    key = f"{kind}-{namespace}-{run_id}{'-dry-run' if dry_run else ''}"
    return re.sub(r"[^a-z0-9-]", "-", key.lower())

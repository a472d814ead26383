"""swf-panda-workers: the command line.

    swf-panda-workers serve     the service against the configured broker
    swf-panda-workers listen    the STOMP listener alone (container entrypoint)
    swf-panda-workers runner    the Prefect runner serving the run flows alone
    swf-panda-workers show      a run's state: its flow run, iDDS ids, steps, slices, workers
    swf-panda-workers dry-run   a recorded run again, in Prefect, sending nothing
    swf-panda-workers replay    a recorded run replayed offline through scaling policies
    swf-panda-workers send      a test message to the broker
    swf-panda-workers healthcheck  exit 0 if the listener's /healthz says healthy
    swf-panda-workers config    which configuration file is used, and its settings

The configuration file: --config, else $SWF_PANDA_WORKERS_CONFIG, else
~/.config/swf_panda_workers/swf_panda_workers.yaml, else
<prefix>/etc/swf_panda_workers/swf_panda_workers.yaml, else the packaged one.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from swf_panda_workers.config.loading import CONFIG_ENV, ConfigError, config_path, load_settings

if TYPE_CHECKING:
    from swf_panda_workers.core.recording import RunRecording


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swf-panda-workers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, text, aliases in (
        (
            "serve",
            "Prefect server (unless PREFECT_API_URL is set), runner and listener, "
            "against the configured broker",
            [],
        ),
        ("listen", "the STOMP listener alone (the container's command)", []),
        ("runner", "the Prefect runner serving the run flows alone", ["serve-flows"]),
    ):
        command = commands.add_parser(name, help=text, description=text, aliases=aliases)
        _add_config(command)
    _add_run_commands(commands)
    _add_replay(commands)
    _add_send(commands)
    check = commands.add_parser(
        "healthcheck",
        help="exit 0 if the listener's /healthz answers 200 within 3 s, else 1 "
        "(the container's HEALTHCHECK)",
        description="Exit 0 if the listener's /healthz answers 200 within 3 s, else 1 with "
        "one line on stderr (the container's HEALTHCHECK).",
    )
    check.add_argument(
        "--url", help="default: /healthz on this host at the configuration's metrics.port"
    )
    _add_config(check)
    config = commands.add_parser(
        "config",
        help="which configuration file is used, and its settings",
        description="Print the configuration file the search path finds and the settings it "
        "gives, with the environment's overrides (secrets masked).",
    )
    _add_config(config)
    return parser


def _add_config(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config",
        help=f"configuration file (or ${CONFIG_ENV}, or the "
        "user's, the installation's, the packaged one)",
    )


def _add_run_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = commands.add_parser(
        "show",
        help="a run's state: flow run, iDDS ids, steps done, slices, workers",
        description="Show one run as Prefect holds it: its flow run and sub-flow run, and "
        "its state folded from the run's stored messages and the effects its "
        "flow journaled (iDDS ids, create/stop/close sent, slices, workers "
        "asked for and confirmed, every adjustment).",
    )
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--namespace", help="the run's namespace (default: the configuration's)")
    show.add_argument(
        "--parameters",
        action="store_true",
        help="print only the flow run's parameters, as JSON for `prefect deployment run --params`",
    )
    _add_config(show)
    dry = commands.add_parser(
        "dry-run",
        help="run a recorded run again in Prefect, sending nothing",
        description="Start a new flow run of the run deployment with the recorded run's "
        "parameters and dry_run=true: the flows replay the run's stored "
        "messages with today's configuration and decide everything the live "
        "run would, but send nothing (each message withheld is in the flow "
        "run's log) and journal nothing. Prints the dry run's summary.",
    )
    dry.add_argument("run_id", metavar="RUN_ID")
    dry.add_argument("--namespace", help="the run's namespace (default: the configuration's)")
    dry.add_argument("--deployment", help="deployment to run (default: prefect.deployment)")
    dry.add_argument(
        "--wait",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="wait this long for the dry run to finish (0: do not wait)",
    )
    _add_config(dry)


def _add_send(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    send = commands.add_parser(
        "send",
        help="send a test message to the broker",
        description="Send one message to the configured broker, as its sender would, and "
        "wait for the broker's receipt.",
    )
    kinds = send.add_subparsers(dest="kind", required=True, metavar="KIND")
    imminent = kinds.add_parser(
        "run_imminent",
        help="announce a run (as the control system)",
        description="Announce a run, as the control system does.",
    )
    imminent.add_argument("--workers", type=int, default=1, help="target_worker_count")
    imminent.add_argument("--cores", type=int, default=1, help="core_count")
    end = kinds.add_parser(
        "end_run",
        help="end a run (as the control system)",
        description="End a run, as the control system does.",
    )
    result = kinds.add_parser(
        "slice_result",
        help="a slice result (as a transformer)",
        description="A slice result, as a transformer sends it, to the results queue.",
    )
    result.add_argument("--seconds", type=float, default=1.0, help="processing time")
    result.add_argument("--slice", type=int, default=0, help="slice_id")
    result.add_argument("--failed", action="store_true", help="a failed slice")
    for kind in (imminent, end, result):
        kind.add_argument("run_id", metavar="RUN_ID")
    for kind in (imminent, end):
        kind.add_argument("--namespace", help="default: the configuration's")
        kind.add_argument(
            "--shape",
            choices=["testbed", "seed"],
            default="testbed",
            help="the testbed's message types and timestamps, or the seed's",
        )
    raw = kinds.add_parser(
        "file",
        help="a body from a file, sent as it is",
        description="Send a file's bytes (- for stdin) as a message body, "
        "as they are, even what the listener will set aside.",
    )
    raw.add_argument("path", metavar="FILE")
    for kind in (imminent, end, result, raw):
        kind.add_argument("--destination", help="default: where that message type goes")
        _add_config(kind)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "healthcheck":
        return _healthcheck(args.url, args.config)
    if args.command == "replay":
        return _replay(args)
    if args.command in ("show", "dry-run", "send", "config"):
        return _operate(args)
    os.environ[CONFIG_ENV] = str(config_path(args.config).resolve())
    load_settings()  # a bad file fails here, with its reason, before anything starts
    if args.command == "listen":
        from listeners.__main__ import main as listen

        listen([])
        return 0
    if args.command in ("runner", "serve-flows"):
        from deployments.serve import main as serve_runner

        serve_runner([])
        return 0
    return _serve()


def _operate(args: argparse.Namespace) -> int:
    from swf_panda_workers import operator_commands
    from swf_panda_workers.core import sample_messages
    from swf_panda_workers.core.timestamps import utc_now

    path = config_path(args.config)
    settings = load_settings(path)
    if args.command == "config":
        from swf_panda_workers.state_dir import state_dir

        state = state_dir(settings, os.environ)
        print(f"# {path.resolve()}")
        print(
            f"# serve's state directory (Prefect database, logs): {state.path} "
            f"(from {state.chosen_by})"
        )
        print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    namespace = getattr(args, "namespace", None) or settings.transceiver.namespace
    if args.command == "show":
        return operator_commands.show(settings, args.run_id, namespace, args.parameters)
    if args.command == "dry-run":
        return operator_commands.dry_run(
            settings, args.run_id, namespace, args.deployment, args.wait
        )
    now, brokers = utc_now(), settings.brokers
    if args.kind == "file":
        try:
            raw = operator_commands.read_body(args.path)
        except OSError as exc:
            return operator_commands.fail("send", f"cannot read {args.path}: {exc.strerror}")
        return operator_commands.send(settings, None, raw, args.destination)
    samples = {
        "run_imminent": lambda: sample_messages.run_imminent(
            args.run_id, namespace, brokers, now, args.workers, args.cores, args.shape
        ),
        "end_run": lambda: sample_messages.end_run(
            args.run_id, namespace, brokers, now, args.shape
        ),
        "slice_result": lambda: sample_messages.slice_result(
            args.run_id, brokers, now, args.seconds, args.slice, args.failed
        ),
    }
    return operator_commands.send(settings, samples[args.kind](), None, args.destination)


def _serve() -> int:
    """Run until SIGTERM/SIGINT, then stop everything started here."""
    from swf_panda_workers.service.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return serve(load_settings(), Path(os.environ[CONFIG_ENV]))


def _healthcheck(url: str | None, config: str | None) -> int:
    """0 or 1 (never 2: Docker reserves it), with one line on stderr if 1."""
    from swf_panda_workers.healthcheck import default_url, problem

    def fail(text: str) -> int:
        print(f"healthcheck: {text}", file=sys.stderr)
        return 1

    if url is None:
        try:
            url = default_url(load_settings(config).metrics)
        except ConfigError as exc:
            return fail(f"configuration error: {exc}")
        if url is None:
            return fail("metrics.port is 0: the listener serves no /healthz")
    wrong, answer = problem(url)
    if wrong is not None:
        return fail(wrong)
    print(answer)
    return 0


REPLAY_HELP = """\
Replay a recorded run offline through one or more scaling policies and compare
them: worker-hours, time the backlog was over its deadline, adjustments. The
recorded slices arrive when they were queued and take the time they took; each
policy decides as the live service would, with the configuration's settings
and what the policy spec changes. Writes a plot of workers, processing time and
backlog over the run.

A policy spec is NAME[:KEY=VALUE,...]: NAME is reference or proportional; a KEY
without a dot is in the scaling section, one with a dot names its section.
  --policy reference --policy proportional:max_workers=20,up_window=10
  --policy proportional:end=stop,slice.cooldown=30
"""


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay a recorded run through scaling policies, side by side",
        description=REPLAY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = replay.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a recording (JSON), e.g. from --save")
    source.add_argument("--run", metavar="RUN_ID", help="fetch the run's recording from Prefect")
    replay.add_argument("--namespace", help="the run's namespace (default: the configuration's)")
    replay.add_argument(
        "--policy",
        action="append",
        metavar="SPEC",
        help="a policy to replay; repeat to compare (default: reference and proportional)",
    )
    replay.add_argument("--config", help=f"configuration file (or ${CONFIG_ENV})")
    replay.add_argument(
        "--worker-startup",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="seconds from asking for workers to their start (default 30)",
    )
    replay.add_argument("--plot", type=Path, help="PNG to write (default replay-<run_id>.png)")
    replay.add_argument(
        "--save",
        type=Path,
        metavar="FILE",
        help="write the recording replayed, as JSON (to replay again with --file)",
    )


def _replay(args: argparse.Namespace) -> int:
    from swf_panda_workers.adapters.plots import timeline_png
    from swf_panda_workers.config.policy_specs import settings_with
    from swf_panda_workers.core.recording import RunRecording
    from swf_panda_workers.core.replay import comparison_table, replay

    def fail(text: str) -> int:
        print(f"replay: {text}", file=sys.stderr)
        return 2

    if args.worker_startup < 0:
        return fail("--worker-startup must not be negative")
    settings = load_settings(args.config)
    # Every spec is checked before the recording is fetched: a typo fails at once.
    chosen = [
        settings_with(settings, spec) for spec in args.policy or ["reference", "proportional"]
    ]
    if args.file is not None:
        try:
            recording = RunRecording.model_validate_json(args.file.read_bytes())
        except OSError as exc:
            return fail(f"cannot read {args.file}: {exc.strerror}")
        except ValidationError as exc:
            return fail(f"{args.file} is not a run recording: {_first_problem(exc)}")
    else:
        namespace = args.namespace or settings.transceiver.namespace
        try:
            recording = _fetch(args.run, namespace)
        # Whatever stops the fetch (no server, no such run, no adapter) is the
        # operator's to fix: one line, not a traceback.
        except Exception as exc:
            return fail(f"cannot fetch run {args.run} ({namespace}) from Prefect: {exc}")
    if args.save is not None:
        try:
            args.save.write_text(recording.model_dump_json(indent=1))
        except OSError as exc:
            return fail(f"cannot write {args.save}: {exc.strerror}")
    try:
        results = [
            replay(recording, policy, label, args.worker_startup) for label, policy in chosen
        ]
    except ValidationError as exc:  # the announcement, read only now
        return fail(f"the recording's announcement is not usable: {_first_problem(exc)}")
    print(f"run {recording.run_id} ({recording.namespace}): {len(recording.slices)} slices")
    print(comparison_table(results))
    # The run id comes from a file: it must not lead the plot elsewhere.
    plot = args.plot or Path(f"replay-{re.sub(r'[^A-Za-z0-9_.-]', '_', recording.run_id)}.png")
    try:
        plot.write_bytes(
            timeline_png(f"run {recording.run_id}: replay", [result.trace() for result in results])
        )
    except OSError as exc:
        return fail(f"cannot write {plot}: {exc.strerror}")
    print(f"plot: {plot}")
    return 0


def _fetch(run_id: str, namespace: str) -> RunRecording:
    import asyncio

    from swf_panda_workers.adapters.prefect_recordings import fetch_recording

    return asyncio.run(fetch_recording(run_id, namespace))


def _first_problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc)
    where = ".".join(str(part) for part in errors[0]["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {errors[0]['msg']}{more}"

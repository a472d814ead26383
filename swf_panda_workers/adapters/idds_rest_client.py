"""REST mode: a run's requests to iDDS as HTTP calls, answered at once.

Two routes to the same iDDS workflow-task API, chosen by ``idds.route``:
``direct`` with idds-client's ClientManager, and ``panda_relay`` through the
PanDA server with panda-client. Both clients read their credentials from
their own environment variables, so no secret passes through this service's
configuration, logs or Prefect parameters.

iDDS 2.6.21 answers every create with HTTP 500 *after* it made the task and
its PanDA task (its REST handler fails unpacking its own result), and a
retried create would make another. So a create first looks for the run's
task by its workflow name (unique per run), and after a failed answer looks
again: the task found is the answer; only when iDDS has none is the failure
raised (and the create retried). A close without the task's ids is never
sent: iDDS's REST close ignores the run id and, given no ids, would cancel
every processing it has; the task is looked up by name instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from swf_panda_workers.config.schema import Idds, Settings
from swf_panda_workers.core import outbound
from swf_panda_workers.core.idds_gateway import (
    IddsRequestFailed,
    adjusted_answer,
    client_result,
    closed_answer,
    created_answer,
    not_found_answer,
    relay_result,
    task_of_run,
)
from swf_panda_workers.core.messages import (
    AdjustedWorker,
    ClosedWorkflowTask,
    CreatedWorkflowTask,
    RunImminent,
    WorkerSize,
    WorkflowIds,
)

log = logging.getLogger(__name__)


class IddsNotConfigured(RuntimeError):
    """REST mode cannot start: no iDDS host, or the client's credentials are
    missing. Not retried: only the operator can fix it."""


class WorkflowTaskApi(Protocol):
    """The calls both iDDS clients offer for workflow tasks, and the two
    lookups that find a run's task by its workflow name."""

    def create_workflow_task(self, workflow: dict[str, Any]) -> object: ...

    def adjust_worker(
        self,
        request_id: int,
        transform_id: int,
        workload_id: int | None,
        parameters: dict[str, Any],
    ) -> object: ...

    def close_workflow_task(self, request_id: int, parameters: dict[str, Any]) -> object: ...

    def get_request_id_by_name(self, name: str) -> object: ...

    def get_requests(self, request_id: int, with_detail: bool = False) -> object: ...


Unwrap = Callable[[object, str], object]


class RestGateway:
    """Each request is one call; its answer (or IddsRequestFailed with iDDS's
    words) comes back at once."""

    def __init__(
        self, api: Callable[[], WorkflowTaskApi], unwrap: Unwrap, settings: Settings
    ) -> None:
        self._connect = api
        self._api: WorkflowTaskApi | None = None
        self._unwrap = unwrap
        self._settings = settings

    def create_workflow_task(
        self, run: RunImminent, workflow: dict[str, Any], now: datetime
    ) -> CreatedWorkflowTask:
        name = str(workflow["name"])
        earlier = self._task_named(name, run.run_id)  # an earlier attempt's, answered in error
        if earlier is not None:
            log.info("run %s: iDDS already has its task %s (%s)", run.run_id, name, earlier)
            return created_answer(run.run_id, earlier, now)
        try:
            result = self._call(
                "create_workflow_task", lambda api: api.create_workflow_task(workflow)
            )
        except IddsRequestFailed as failure:
            made = self._task_named(name, run.run_id)
            if made is None:
                raise
            log.warning(
                "run %s: iDDS answered the create with an error (%s), but made the task: %s",
                run.run_id,
                failure,
                made,
            )
            return created_answer(run.run_id, made, now)
        return created_answer(run.run_id, result, now)

    def adjust_worker(
        self, run_id: str, ids: WorkflowIds, size: WorkerSize, now: datetime
    ) -> AdjustedWorker:
        content = outbound.adjust_content(run_id, ids, size, now)
        # The parameters iDDS's adjust handler reads, with the whole request
        # (target worker count included) under "content", as on the bus.
        parameters = {
            **size.model_dump(include={"core_count", "memory_per_core", "site"}),
            "content": content,
        }
        self._call(
            "adjust_worker",
            lambda api: api.adjust_worker(
                ids.request_id, ids.transform_id, ids.workload_id, parameters
            ),
        )
        return adjusted_answer(run_id, ids, size, now)

    def close_workflow_task(
        self, run_id: str, ids: WorkflowIds | None, workflow_name: str, now: datetime
    ) -> ClosedWorkflowTask:
        if ids is None:
            found = self._task_named(workflow_name, run_id)
            if found is None:
                return not_found_answer(run_id, now)
            ids = WorkflowIds.model_validate(found)
        parameters = outbound.close_content(run_id, ids, now)
        result = self._call(
            "close_workflow_task", lambda api: api.close_workflow_task(ids.request_id, parameters)
        )
        return closed_answer(run_id, ids, result, now)

    def _task_named(self, name: str, run_id: str) -> dict[str, Any] | None:
        """The ids of the run's task, looked up by its workflow name; None if
        iDDS has none. Raises IddsRequestFailed when iDDS cannot say."""
        requests = self._call(
            "get_request_id_by_name", lambda api: api.get_request_id_by_name(name)
        )
        return task_of_run(
            requests,
            lambda request_id: self._call(
                "get_requests",
                lambda api: api.get_requests(request_id=request_id, with_detail=True),
            ),
            name,
            run_id,
        )

    def _call(self, request: str, call: Callable[[WorkflowTaskApi], object]) -> object:
        if self._api is None:
            self._api = self._connect()
        return self._unwrap(call(self._api), request)


def rest_gateway(settings: Settings) -> RestGateway:
    """The gateway for ``idds.route``; its client is made on first use."""
    return RestGateway(
        partial(_ROUTES[settings.idds.route], settings.idds), _UNWRAP[settings.idds.route], settings
    )


def check_rest_client(settings: Settings) -> None:
    """Make the configured client once, without calling iDDS, so a missing
    host or credential stops the runner at start-up instead of a run later.
    Raises IddsNotConfigured. Warns when iDDS's certificate goes unverified."""
    api = _ROUTES[settings.idds.route](settings.idds)
    host = str(getattr(api, "host", "") or "")
    if settings.idds.ca_certs is None and host.startswith("https:"):
        log.warning(
            "iDDS's server certificate at %s is not verified (idds-client never "
            "verifies it): set idds.ca_certs or IDDS_CA_CERTS to the CAs it chains to",
            host,
        )


def direct_api(idds: Idds) -> WorkflowTaskApi:
    """idds-client's ClientManager, set up from its usual environment
    (IDDS_HOST wins over ``idds.host``, as the client decides)."""
    from idds.client.clientmanager import ClientManager
    from idds.common.exceptions import IDDSException

    manager = ClientManager(host=idds.host, timeout=idds.timeout)
    try:
        manager.setup_client()
    except IDDSException as exc:
        raise IddsNotConfigured(f"idds-client cannot start: {exc}") from None
    if not manager.host:
        raise IddsNotConfigured(
            "REST mode needs the iDDS server: set idds.host in the configuration or IDDS_HOST"
        )
    # The client retries a refused connection three times after random sleeps
    # of up to 30 s each, unseen; the flow's task retries instead, visibly.
    manager.client.retries = 1
    if idds.ca_certs is not None:
        verify_server(manager.client.session, idds.ca_certs)
    return manager


def verify_server(session: Any, ca_certs: Path) -> None:
    """Make idds-client's requests session verify iDDS's server certificate
    (chain and host name) against ``ca_certs``: idds-client 2.6.21 passes
    ``verify=False`` with every request, so only a transport adapter that
    puts the CAs back can. Raises IddsNotConfigured if they are missing."""
    from requests import PreparedRequest, Response
    from requests.adapters import HTTPAdapter

    if not ca_certs.exists():
        raise IddsNotConfigured(f"idds.ca_certs (IDDS_CA_CERTS) {ca_certs} does not exist")
    ca_bundle = str(ca_certs)

    class VerifyingAdapter(HTTPAdapter):
        def send(
            self,
            request: PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: dict[str, str] | None = None,
        ) -> Response:
            # Whatever the caller asked for (idds-client: False), the CAs.
            return super().send(
                request,
                stream=stream,
                timeout=timeout,
                verify=ca_bundle,
                cert=cert,
                proxies=proxies,
            )

    session.mount("https://", VerifyingAdapter())


def relay_api(idds: Idds) -> WorkflowTaskApi:
    """panda-client's relay to iDDS through the PanDA server, an optional
    dependency configured by its own environment (PANDA_URL_SSL, PANDA_AUTH,
    PANDA_AUTH_VO, PANDA_AUTH_ID_TOKEN or OIDC_AUTH_TOKEN_FILE, X509_USER_PROXY).
    Its timeout is fixed by panda-client (600 s); ``idds.timeout`` does not apply."""
    try:
        from pandaclient import idds_api
    except ImportError:
        raise IddsNotConfigured(
            "idds.route panda_relay needs panda-client: pip install 'swf-panda-workers[panda]'"
        ) from None
    except OSError as exc:  # it resolves PanDA's cache host while importing
        raise IddsNotConfigured(
            f"panda-client cannot start ({exc}): check PANDA_URL_SSL and DNS, or set "
            "PANDA_BEHIND_REAL_LB=1 behind a load balancer"
        ) from None
    return _Relay(idds_api.get_api(json.dumps, idds_host=idds.host, compress=True, manager=True))


_ROUTES: dict[str, Callable[[Idds], WorkflowTaskApi]] = {
    "direct": direct_api,
    "panda_relay": relay_api,
}
_UNWRAP: dict[str, Unwrap] = {"direct": client_result, "panda_relay": relay_result}


class _Relay:
    """panda-client exits the process (SystemExit) when its OIDC settings are
    incomplete; that must fail the request, not the flow-run process."""

    def __init__(self, api: WorkflowTaskApi) -> None:
        self._api = api

    def create_workflow_task(self, workflow: dict[str, Any]) -> object:
        return self._guarded(lambda: self._api.create_workflow_task(workflow))

    def adjust_worker(
        self,
        request_id: int,
        transform_id: int,
        workload_id: int | None,
        parameters: dict[str, Any],
    ) -> object:
        return self._guarded(
            lambda: self._api.adjust_worker(request_id, transform_id, workload_id, parameters)
        )

    def close_workflow_task(self, request_id: int, parameters: dict[str, Any]) -> object:
        return self._guarded(lambda: self._api.close_workflow_task(request_id, parameters))

    def get_request_id_by_name(self, name: str) -> object:
        return self._guarded(lambda: self._api.get_request_id_by_name(name))

    def get_requests(self, request_id: int, with_detail: bool = False) -> object:
        return self._guarded(
            lambda: self._api.get_requests(request_id=request_id, with_detail=with_detail)
        )

    @staticmethod
    def _guarded(call: Callable[[], object]) -> object:
        try:
            return call()
        except SystemExit as exc:
            raise IddsNotConfigured(
                f"panda-client gave up (exit {exc.code}): check PANDA_AUTH, PANDA_AUTH_VO "
                "and the token"
            ) from None

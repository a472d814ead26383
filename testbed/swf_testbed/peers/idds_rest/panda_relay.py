"""PanDA's relay to the simulated iDDS REST server, as panda-client's
``idds_api`` (``Client.call_idds_command``) reaches it through PanDA:
``POST /server/panda/relay_idds_command`` (``relay_url`` is what
``PANDA_URL_SSL`` takes). The body is gzip-compressed JSON (Content-Type
application/json) or a form, ``{command_name, args, kwargs, manager}`` with
``args``/``kwargs`` as JSON text and ``command_name`` optionally
``"<command>+<idds host>"``. ``create_workflow_task``, ``adjust_worker`` and
``close_workflow_task`` go to the same handling as the direct endpoints (same
tasks, records, faults and callbacks; the records say ``route="panda_relay"``),
as the iDDS request PanDA's own ClientManager would send. The answer is what
PanDA's ``relay_idds_command`` returns, 200 text/plain:

- ``[true, <iDDS's answer>]``;
- ``[true, [false, "<text>"]]`` when iDDS failed (an injected fault, a bad
  request), the text being what ClientManager returns for that iDDS answer;
  ``[true, [-1, "<text>"]]`` when ClientManager's own guards refuse the call;
- ``[false, "<cmd> is not a command of iDDS ClientManager"]`` for an unknown
  command; ``[false, "failed to execute command with ..."]`` when the relay
  itself fails: undecodable args, an iDDS command the simulator does not
  serve, or (with ``manager`` false, iDDS's Client, which raises) any failure;
- 500 text/plain with the error for a body PanDA's entry cannot read.

With a ``token``, the relay wants panda-client's OIDC headers
(``Authorization: Bearer <token>``, ``Origin: <vo>``) as PanDA's WSGI entry
checks them: a wrong token, VO or missing Origin is 403 text/plain ``ERROR :
Token authentication failed. <reason>``; no Authorization at all means a
client certificate, of which plain HTTP has none, so the relay answers
``[false, "SSL secure connection is required"]``. PanDA authenticates to iDDS
with its own credentials, so relayed calls skip the iDDS-side check.
"""

from __future__ import annotations

import hmac
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

from idds.common import exceptions as idds_exceptions
from idds.common.utils import json_loads as idds_json_loads

from swf_testbed.peers._panda_relay import (
    NOT_SECURE,
    RELAY_METHOD,
    RELAY_PREFIX,
    TEXT_PLAIN,
    entry_failure,
    panda_error_text,
    relay_command,
    relay_json,
    relay_params,
    relay_record,
    relay_text,
)
from swf_testbed.peers.idds_rest.api import PREFIX, Answer, Endpoint, header_safe, readable_body

# The server's handling of one iDDS request, as PanDA's relay reaches it:
# (endpoint, path ids, body, path) -> iDDS's answer.
RelayedServe = Callable[[Endpoint, dict[str, str], bytes, str], Answer]

_RELAYED: dict[str, Endpoint] = {
    "create_workflow_task": "create",
    "adjust_worker": "adjust",
    "close_workflow_task": "close",
    "get_request_id_by_name": "lookup",
    "get_requests": "requests",
}
# The three methods' parameters (the same in ClientManager and Client), to
# bind relayed args and kwargs as the call would.
_SIGNATURES: dict[Endpoint, inspect.Signature] = {
    "create": inspect.signature(lambda workflow: None),
    "adjust": inspect.signature(lambda request_id, transform_id, workload_id, parameters: None),
    "close": inspect.signature(lambda request_id, parameters: None),
    "lookup": inspect.signature(lambda name: None),
    "requests": inspect.signature(
        lambda request_id=None, workload_id=None, with_detail=False, with_metadata=False: None
    ),
}


class PandaRelay:
    """PanDA's ``relay_idds_command`` in front of the simulated iDDS: reads
    panda-client's call, checks its token as PanDA does, and hands the iDDS
    request to ``serve`` (the server's own handling, without iDDS's
    authentication: PanDA uses its own credentials). ``token``/``vo``: what
    PanDA's entry wants (None: anything, as if TLS had brought a certificate)."""

    def __init__(self, serve: RelayedServe, token: str | None, vo: str | None) -> None:
        self._serve = serve
        self._token = token
        self._vo = vo

    def answer(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> tuple[Endpoint | None, Any, Answer]:
        """PanDA's relay_idds_command: the endpoint reached (None: none), the
        request as recorded, and PanDA's answer."""
        name = path[len(RELAY_PREFIX) + 1 :]
        if name != RELAY_METHOD:
            # PanDA's entry refuses any method it does not export.
            return None, readable_body(body), _panda_error(403, f"{name} is forbidden", "no_api")
        if method != "POST":
            # The simulator's own answer: panda-client only ever POSTs here.
            return None, readable_body(body), _panda_error(405, f"{name} takes POST", "no_api")
        lowered = {k.lower(): v for k, v in headers.items()}
        params: dict[str, Any] | None = None
        unreadable = ""
        try:
            params = relay_params(lowered.get("content-type"), body)
        except ValueError as exc:
            unreadable = str(exc)
        recorded: Any = (
            relay_record(params) if params is not None else (f"<unreadable body: {unreadable}>")
        )
        command, manager = relay_command(params or {})
        endpoint = _RELAYED.get(command)
        # PanDA checks the token before it reads the body.
        refusal = self._authenticate(lowered)
        if refusal is not None:
            return endpoint, recorded, refusal
        failure = entry_failure(params, unreadable)
        if params is None or failure is not None:
            # The entry's answer to a call it cannot make: 500, the error's text.
            return (
                endpoint,
                recorded,
                Answer(500, "bad_request", (failure or "").encode(), TEXT_PLAIN),
            )
        api = "ClientManager" if manager else "Client"
        if endpoint is None:
            if _is_idds_command(command, manager):
                return (
                    None,
                    recorded,
                    _relay_answer(
                        [
                            False,
                            f"failed to execute command with the simulated iDDS serves only "
                            f"{', '.join(_RELAYED)}, not {command}",
                        ],
                        "relay_failed",
                    ),
                )
            return (
                None,
                recorded,
                _relay_answer(
                    [False, f"{command} is not a command of iDDS {api}"], "not_a_command"
                ),
            )
        try:
            args = relay_json(params.get("args"), list)
            kwargs = relay_json(params.get("kwargs"), dict)
        except ValueError as exc:
            return (
                endpoint,
                recorded,
                _relay_answer([False, f"failed to execute command with {exc}"], "relay_failed"),
            )
        try:
            arguments = _SIGNATURES[endpoint].bind(*args, **kwargs).arguments
        except TypeError as exc:
            return (
                endpoint,
                recorded,
                _relayed_failure(manager, f"{command}(): {exc}", "bad_request"),
            )
        refused = _client_manager_guard(endpoint, arguments) if manager else None
        if refused is not None:
            # ClientManager's own guard: iDDS is never asked.
            return endpoint, recorded, _relay_answer([True, [-1, refused]], "refused")
        ids, api_path, data = _idds_request(endpoint, arguments)
        answer = self._serve(
            endpoint, ids, json.dumps(data, default=str).encode(), PREFIX + api_path
        )
        ok, result = _as_client_sees(answer)
        if ok:
            return endpoint, recorded, _relay_answer([True, result], answer.outcome, answer.then)
        return endpoint, recorded, _relayed_failure(manager, result, answer.outcome)

    def _authenticate(self, headers: Mapping[str, str]) -> Answer | None:
        """PanDA's checks, None when they pass: its WSGI entry's on a token
        (panda_request.decode_token), then relay_idds_command's isSecure."""
        if self._token is None:
            return None  # as if TLS had brought a client certificate
        authorization = headers.get("authorization")
        if not authorization:
            # No token means x509, and plain HTTP brings no certificate.
            return _relay_answer([False, NOT_SECURE], "unauthorized")
        parts = authorization.split()
        token = parts[1] if len(parts) == 2 and parts[0].lower() == "bearer" else ""
        origin = headers.get("origin")
        if origin is None:
            reason = "Token decode failure. no HTTP_ORIGIN to identify the VO"
        elif not hmac.compare_digest(token.encode(), self._token.encode()):
            reason = "Invalid token. Signature verification failed"
        elif self._vo is not None and origin != self._vo:
            reason = f"Unknown vo : {origin}"
        else:
            return None
        return _panda_error(403, f"Token authentication failed. {reason}", "unauthorized")


def _is_idds_command(command: str, manager: bool) -> bool:
    """Whether PanDA would find ``command`` on its iDDS client object."""
    # Imported here: importing the iDDS clients creates their local config
    # directory (~/.idds unless IDDS_LOCAL_CONFIG_ROOT), unwanted on the common path.
    if manager:
        from idds.client.clientmanager import ClientManager

        return hasattr(ClientManager, command)
    from idds.client.client import Client

    return hasattr(Client, command)


def _client_manager_guard(endpoint: Endpoint, arguments: Mapping[str, Any]) -> str | None:
    """What ClientManager (idds-client 2.6.21) refuses by itself, returning
    ``(-1, text)`` without asking iDDS."""
    if (
        endpoint == "adjust"
        and arguments["request_id"] is None
        and arguments["workload_id"] is None
    ):
        return "Both request_id and workload_id are None. One of them should not be None"
    if endpoint == "close" and arguments["request_id"] is None:
        return "request_id is None"
    return None


def _idds_request(
    endpoint: Endpoint, arguments: Mapping[str, Any]
) -> tuple[dict[str, str], str, dict[str, Any]]:
    """The path ids, API path and body of the iDDS request that idds-client's
    WorkflowTaskClient makes of a call (a None id as "null")."""
    if endpoint == "create":
        return {}, "/workflow_task", {"workflow": arguments["workflow"]}
    if endpoint == "lookup":
        return {"name": str(arguments["name"])}, f"/request/name/{arguments['name']}", {}
    if endpoint == "requests":
        ids = {
            key: "null" if arguments.get(key) is None else str(arguments[key])
            for key in ("request_id", "workload_id")
        }
        detail = str(bool(arguments.get("with_detail")))
        return (
            {**ids, "with_detail": detail},
            f"/request/{ids['request_id']}/{ids['workload_id']}/{detail}/"
            f"{bool(arguments.get('with_metadata'))}/False/False",
            {},
        )
    ids = {
        key: "null" if arguments[key] is None else str(arguments[key])
        for key in ("request_id", "transform_id", "workload_id")
        if key in arguments
    }
    if endpoint == "adjust":
        api_path = (
            f"/workflow_task/{ids['request_id']}/{ids['transform_id']}/{ids['workload_id']}/adjust"
        )
    else:
        api_path = f"/workflow_task/{ids['request_id']}/close"
    return ids, api_path, {"parameters": arguments["parameters"]}


def _as_client_sees(answer: Answer) -> tuple[bool, Any]:
    """What the iDDS client on PanDA's side makes of an iDDS answer: (True,
    the decoded body) on 200, else (False, the text of the exception it
    raises), which ClientManager's exception_handler returns. As idds-client
    2.6.21's BaseRestClient.get_request_response, branch by branch."""
    text = answer.body.decode(errors="replace")
    if answer.status == 200:
        return True, idds_json_loads(text) if text else None
    headers = dict(answer.headers)
    try:
        if "ExceptionClass" in headers:
            cls = getattr(idds_exceptions, headers["ExceptionClass"], None)
            if cls is None:
                raise idds_exceptions.IDDSException(text)
            # As sent on the wire, one latin-1 line.
            raise cls(header_safe(headers.get("ExceptionMessage", "")))
        if answer.status in (400, 401, 403, 404, 405, 500):
            raise idds_exceptions.IDDSException(text)
        if not text:
            raise idds_exceptions.IDDSException(f"Unknow exception: {text}")  # sic
        raise idds_exceptions.IDDSException(**idds_json_loads(text))
    except Exception as exc:  # any of them, as exception_handler catches any
        return False, str(exc)


def _relayed_failure(manager: bool, text: str, outcome: str) -> Answer:
    # ClientManager returns the failure, which PanDA relays as a result;
    # Client raises it, which fails the relay itself.
    if manager:
        return _relay_answer([True, [False, text]], outcome)
    return _relay_answer([False, f"failed to execute command with {text}"], outcome)


def _relay_answer(
    payload: list[Any], outcome: str, then: Callable[[], None] | None = None
) -> Answer:
    # relay_idds_command's json.dumps((ok, ...)), which PanDA sends as text.
    return Answer(200, outcome, relay_text(payload), TEXT_PLAIN, then)


def _panda_error(status: int, message: str, outcome: str) -> Answer:
    # How PanDA's WSGI entry refuses a request.
    return Answer(status, outcome, panda_error_text(message), TEXT_PLAIN)

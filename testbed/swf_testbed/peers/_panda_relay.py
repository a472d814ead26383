"""PanDA's ``relay_idds_command`` as the PanDA server reads a call and words its
answer, shared by the stand-ins that serve it (the simulated iDDS REST server
in ``idds_rest.panda_relay``, the PanDA server stand-in in ``panda_server``).

panda-client (``Client.call_idds_command``) POSTs to
``<PANDA_URL_SSL>/relay_idds_command`` a body of ``{command_name, args,
kwargs, manager[, json_outputs]}``: gzip-compressed JSON with Content-Type
application/json, or a form; ``args`` and ``kwargs`` are JSON text and
``command_name`` may be ``"<command>+<idds host>"``. PanDA answers 200
text/plain with ``json.dumps((ok, result))``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from idds.common.utils import json_dumps as idds_json_dumps
from idds.common.utils import json_loads as idds_json_loads

RELAY_PREFIX = "/server/panda"  # what PANDA_URL_SSL ends with
RELAY_METHOD = "relay_idds_command"
TEXT_PLAIN: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)
# relay_idds_command's answer to a caller without a client certificate (isSecure).
NOT_SECURE = "SSL secure connection is required"
# relay_idds_command's parameters: anything else fails the call itself.
RELAY_PARAMS = frozenset({"command_name", "args", "kwargs", "manager", "json_outputs"})


def relay_params(content_type: str | None, body: bytes) -> dict[str, Any]:
    """The parameters as PanDA's entry reads them: gzip-compressed JSON when
    the Content-Type is exactly application/json (true/false becoming
    "True"/"False"), else a form. ValueError when unreadable."""
    if content_type == "application/json":
        try:
            data = json.loads(gzip.decompress(body))
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise ValueError(f"not gzip-compressed JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("the JSON body is not an object")
        return {k: str(v) if isinstance(v, bool) else v for k, v in data.items()}
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"not a form: {exc}") from None
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def relay_record(params: Mapping[str, Any]) -> dict[str, Any]:
    """The relayed request as recorded: args and kwargs decoded when JSON."""
    record = dict(params)
    for key in ("args", "kwargs"):
        value = record.get(key)
        if isinstance(value, str) and value:
            with contextlib.suppress(ValueError):  # else recorded as sent
                record[key] = json.loads(value)
    return record


def relay_command(params: Mapping[str, Any]) -> tuple[str, bool]:
    """The command (without PanDA's "+<idds host>") and whether ClientManager
    (else Client) runs it, as relay_idds_command's resolve_bool reads it."""
    command = str(params.get("command_name") or "").partition("+")[0]
    return command, str(params.get("manager")) in ("True", "true")


def relay_json(text: Any, kind: type) -> Any:
    """args (a list) or kwargs (a dict) as the relay decodes them; empty when
    not sent. ValueError when unreadable."""
    if not text:
        return kind()
    try:
        value = idds_json_loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(value, kind):
        raise ValueError(f"{text!r} is not a JSON {'list' if kind is list else 'object'}")
    return value


def entry_failure(params: Mapping[str, Any] | None, unreadable: str) -> str | None:
    """Why PanDA's entry cannot make the call at all (its 500, with this
    text), or None: an unreadable body, no command_name, an unknown parameter."""
    if params is None:
        return unreadable
    if "command_name" not in params:
        return f"{RELAY_METHOD}() missing 1 required positional argument: 'command_name'"
    unknown = sorted(set(params) - RELAY_PARAMS)
    if unknown:
        return f"{RELAY_METHOD}() got an unexpected keyword argument '{unknown[0]}'"
    return None


def relay_text(payload: list[Any]) -> bytes:
    """relay_idds_command's json.dumps((ok, ...)), which PanDA sends as text;
    when that fails, iDDS's own json_dumps, as PanDA falls back to (iDDS's
    answers decode into its enums, which only iDDS's encoder writes)."""
    try:
        return json.dumps(payload).encode()
    except TypeError:
        return idds_json_dumps(payload).encode()


def panda_error_text(message: str) -> bytes:
    """How PanDA's WSGI entry words a refusal."""
    return f"ERROR : {message}".encode()

"""``swf-panda-workers healthcheck``: is the listener healthy? Asks its
``/healthz`` (listeners/status_server.py): healthy when that answers 200
within TIMEOUT seconds. The container's HEALTHCHECK runs it every interval,
so it stays on the standard library (no Prefect import, well under a second).
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request

from swf_panda_workers.config.schema import Metrics

TIMEOUT = 3.0  # s for the whole exchange
# The listener's own answer: no proxy from the environment may stand between.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def default_url(metrics: Metrics) -> str | None:
    """/healthz on this host at the configured port; None when the port is 0
    (no endpoint). A wildcard address is asked on the loopback."""
    if not metrics.port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(metrics.host, metrics.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{metrics.port}/healthz"


def problem(url: str, timeout: float = TIMEOUT) -> tuple[str | None, str]:
    """(None, the answer) when ``url`` answered 200 within ``timeout``, else
    (one line saying what is wrong, "")."""
    outcome: list[tuple[str | None, str]] = []
    # In a thread, so the deadline covers connect, request and answer together.
    asking = threading.Thread(target=lambda: outcome.append(_ask(url, timeout)), daemon=True)
    asking.start()
    asking.join(timeout)
    if not outcome:
        return _no_answer(url, timeout), ""
    return outcome[0]


def _ask(url: str, timeout: float) -> tuple[str | None, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return None, _line(response.read())
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}: {_line(exc.read())}", ""
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):  # its own deadline, before the caller's
            return _no_answer(url, timeout), ""
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        return f"nothing answers at {url}: {reason}", ""
    except TimeoutError:  # connected, but no answer in time
        return _no_answer(url, timeout), ""
    except (OSError, ValueError) as exc:  # a connection cut mid-answer; a malformed URL
        return f"cannot ask {url}: {exc}", ""


def _no_answer(url: str, timeout: float) -> str:
    return f"no answer from {url} within {timeout:g} s"


def _line(body: bytes) -> str:
    """The body on one short line: the JSON compacted, anything else cut."""
    text = body.decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError):  # not JSON (not our listener?): shown as it is
        text = json.dumps(json.loads(text), separators=(",", ":"))
    return " ".join(text.split())[:300]

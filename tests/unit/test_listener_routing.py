"""The listener's decisions, without a broker: parse_message and decide.

Examples pin what each kind of bad input becomes; properties (hypothesis)
check, for any bytes and any JSON, that parse_message raises nothing but
InvalidMessage and that what it accepts can be written out again for Prefect;
that a valid message survives a round trip; and that decide never raises and
gives every delivery exactly one outcome, a set-aside one with a one-line
reason.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from listeners.routing import (
    FROM_RESULTS,
    IDDS_REPLIES,
    MAX_BODY_BYTES,
    MAX_REASON_CHARS,
    Decision,
    IddsReply,
    Ignore,
    Inbox,
    LookUpRun,
    Record,
    RejectKind,
    SetAside,
    StartRun,
    decide,
    one_line,
)
from swf_panda_workers.adapters.prefect_events.schema import message_event
from swf_panda_workers.core.messages import (
    MAX_DEPTH,
    AdjustWorker,
    CloseWorkflowTask,
    CreateWorkflowTask,
    InvalidMessage,
    RunEnd,
    RunImminent,
    SliceResult,
    StopTransformer,
    parse_message,
)

NS = "itest"
TOPIC = "/topic/panda.workers"
RESULTS = "/queue/panda.results.worker"
ECHOES = (CreateWorkflowTask, AdjustWorker, CloseWorkflowTask, StopTransformer)
IDDS_NS = "idds"
INBOX = Inbox(NS, RESULTS, IDDS_NS)


def on_topic(body: bytes, owned: frozenset[str] = frozenset()) -> Decision:
    return decide(body, {"destination": TOPIC, "namespace": NS}, INBOX, owned)


def on_results(
    body: bytes, owned: frozenset[str] = frozenset(), namespace: str | None = None
) -> Decision:
    headers = {"destination": RESULTS} | ({"namespace": namespace} if namespace else {})
    return decide(body, headers, INBOX, owned)


def wire(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def nested(levels: int) -> Any:
    """``levels`` lists, one inside the other."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


# --- valid messages, every type ------------------------------------------------

RUN_IDS = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z") | st.integers(0, 10**12)
COUNTS = st.none() | st.integers(0, 10_000)
IDS = st.integers(0, 10**9)
TEXT = st.text(max_size=20)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SECONDS = st.floats(min_value=0, max_value=1e6, allow_nan=False)
TIMES = (
    st.none()
    | st.sampled_from(
        [
            "2026-01-20T12:00:00",
            "2026-01-20T12:00:00.123Z",
            "2026-01-20T12:00:00+02:00",
            "Fri, 02 Jan 2026 03:04:05 UTC",
        ]
    )
    | st.floats(0, 4e9, allow_nan=False)
    | st.integers(0, 4_000_000_000)
)
# Fields a peer may add: kept, never fatal. Prefixed so as not to collide with
# a model field or one of its alias names.
JSON_LEAVES = st.none() | st.booleans() | st.integers() | FINITE | TEXT
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
EXTRAS = st.dictionaries(st.text(max_size=8).map(lambda k: f"x_{k}"), JSON_VALUES, max_size=3)


def envelope(
    msg_type: st.SearchStrategy[str],
    run_id: st.SearchStrategy[Any],
    content: st.SearchStrategy[Any] | None,
) -> st.SearchStrategy[dict[str, Any]]:
    required: dict[str, st.SearchStrategy[Any]] = {"msg_type": msg_type, "run_id": run_id}
    if content is not None:
        required["content"] = content
    return st.builds(
        lambda fixed, optional, extra: {**extra, **optional, **fixed},
        st.fixed_dictionaries(required),
        st.fixed_dictionaries(
            {},
            optional={
                "created_at": TIMES,
                "namespace": st.none() | TEXT,
                "instance": st.none() | TEXT,
                "sender": st.none() | TEXT,
            },
        ),
        EXTRAS,
    )


def content(
    required: dict[str, st.SearchStrategy[Any]] | None = None, **optional: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda fixed, extra: {**extra, **fixed},
        st.fixed_dictionaries(required or {}, optional=optional),
        EXTRAS,
    )


RUN_SPEC = content(
    target_worker_count=COUNTS,
    num_cores_per_worker=COUNTS,
    memory_per_core=COUNTS,
    site=st.none() | TEXT,
    slice_processing_time=st.none() | st.floats(0.001, 1e6),
    worker_rampup_time=st.none() | SECONDS,
)
WORKFLOW_IDS = {"request_id": IDS, "transform_id": IDS}
VALID_MESSAGES = st.one_of(
    envelope(st.sampled_from(["run_imminent", "run_imminent_worker"]), RUN_IDS, RUN_SPEC),
    envelope(
        st.sampled_from(["end_run", "run_end", "run_stop"]),
        RUN_IDS,
        st.dictionaries(TEXT, JSON_VALUES, max_size=3),
    ),
    envelope(
        st.just("created_workflow_task"),
        RUN_IDS,
        content(WORKFLOW_IDS, workload_id=st.none() | IDS, processing_id=IDS),
    ),
    envelope(
        st.just("adjusted_worker"),
        RUN_IDS,
        content(request_id=IDS, core_count=COUNTS, target_worker_count=COUNTS),
    ),
    envelope(
        st.just("closed_workflow_task"),
        RUN_IDS,
        content({"status": st.sampled_from(["ToCancel", "NotFound"])}, request_id=IDS),
    ),
    envelope(
        st.just("create_workflow_task"),
        RUN_IDS,
        content({"run_id": RUN_IDS, "workflow": st.dictionaries(TEXT, JSON_VALUES, max_size=3)}),
    ),
    envelope(
        st.just("adjust_worker"),
        RUN_IDS,
        content({"run_id": RUN_IDS, **WORKFLOW_IDS}, target_worker_count=COUNTS),
    ),
    envelope(st.just("close_workflow_task"), RUN_IDS, content(WORKFLOW_IDS)),
    envelope(
        st.just("stop_transformer"),
        st.integers(0, 10**9) | TEXT,
        st.just({"requested_at": "2026-01-20T12:00:00"}),
    ),
    envelope(
        st.just("slice_result"),
        RUN_IDS,
        content(
            state=st.sampled_from(["done", "failed"]),
            processing_time=st.none() | SECONDS,
            processing_start_at=TIMES,
            processed_at=TIMES,
            hostname=st.none() | TEXT,
            panda_id=st.none() | IDS | TEXT,
            result=st.fixed_dictionaries(
                {
                    "state": st.none() | TEXT,
                    "result": st.none() | st.just({"actual_processing_time": 3.5}),
                    "error": st.none() | TEXT,
                }
            ),
        ),
    ),
    envelope(
        st.just("transformer_heartbeat"),
        st.none() | RUN_IDS,
        content(id=st.none() | TEXT | IDS, hostname=st.none() | TEXT),
    ),
    envelope(st.just("heartbeat"), st.none() | RUN_IDS, None).map(
        lambda m: {**m, "internal_id": "tf-1", "timestamp": 1768910400.25}
    ),
)


# --- parse_message: properties ----------------------------------------------------


def strictly_json(data: object) -> bytes:
    """What Prefect's client does with a body it forwards (httpx's encoding)."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8")


def parses_or_says_why(body: bytes | dict[str, Any]) -> None:
    try:
        message = parse_message(body)
    except InvalidMessage as exc:
        assert str(exc).strip(), "a rejection must give its reason"
        return
    data = json.loads(body) if isinstance(body, bytes) else body
    assert message.msg_type == data["msg_type"]
    # Accepted means it can be handed on: re-encoded for Prefect, and wrapped
    # in an event that serializes (pydantic's depth limit, surrogates).
    strictly_json(data)
    run_id = getattr(message, "run_id", None)  # stop_transformer keeps an int
    message_event(
        data, message.msg_type, NS, None if run_id is None else str(run_id), "m-1"
    ).model_dump_json()


# JSON text close to a message: real field names and tokens, with the edges
# that once got through (huge integers, NaN, lone surrogates, deep nesting).
TOKENS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b'"msg_type"',
        b'"run_id"',
        b'"content"',
        b'"end_run"',
        b'"run_imminent"',
        b'"slice_result"',
        b'"1"',
        b"1",
        b"-1",
        b"1e999",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"null",
        b"true",
        b'"\\ud800"',
        b'"\\ud83d\\ude00"',
        b'"\xff"',
        b'"\x00"',
        b'"a\\nb"',
        b"1" * 5000,
        b"[" * 40,
        b"]" * 40,
    ]
)
JSON_ISH = st.lists(TOKENS, max_size=30).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000) | JSON_ISH)
@example(b'{"msg_type": "end_run", "run_id": "1", "n": ' + b"1" * 5000 + b"}")
@example(b'{"msg_type": "end_run", "run_id": "1", "n": NaN}')
@example(b'{"msg_type": "end_run", "run_id": "1", "s": "\\udc00"}')
@example(b'{"msg_type": "end_run", "run_id": "1", "c": ' + b"[" * 300 + b"]" * 300 + b"}")
def test_any_bytes_parse_or_are_invalid(body: bytes) -> None:
    parses_or_says_why(body)


# Any JSON value, the awkward ones included: non-finite floats, lone
# surrogates (json.dumps escapes them as \udxxx), integers of any size.
ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None), max_size=10)
    | st.sampled_from(["run_imminent", "end_run", "slice_result", "heartbeat", "100123", "\ud800"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "msg_type",
                    "run_id",
                    "content",
                    "created_at",
                    "request_id",
                    "transform_id",
                    "status",
                    "state",
                    "timestamp",
                ]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANY_JSON)
def test_any_json_parses_or_is_invalid(value: object) -> None:
    body = json.dumps(value).encode()
    parses_or_says_why(body)
    if isinstance(value, dict):
        parses_or_says_why(value)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALID_MESSAGES)
def test_a_valid_message_survives_a_round_trip(data: dict[str, Any]) -> None:
    body = json.dumps(data).encode()
    message = parse_message(body)
    again = parse_message(strictly_json(message.model_dump(mode="json")))
    assert again == message
    assert type(again) is type(message)


@pytest.mark.parametrize("levels", [2, MAX_DEPTH, MAX_DEPTH + 1, 300])
def test_nesting_is_bounded_at_max_depth(levels: int) -> None:
    inner = nested(levels - 2)  # the body and its content are two levels
    body = wire(msg_type="end_run", run_id="1", content={"deep": inner})
    if levels <= MAX_DEPTH:
        parsed = parse_message(body)
        assert isinstance(parsed, RunEnd)
        assert parsed.content == {"deep": inner}
    else:
        with pytest.raises(InvalidMessage, match=f"deeper than {MAX_DEPTH} levels"):
            parse_message(body)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "n": ' + b"9" * 5000 + b"}",
            "body is not JSON: Exceeds the limit (4300 digits)",
            id="huge integer",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "n": NaN}',
            "body is not JSON: NaN is not a JSON number",
            id="NaN",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "n": -Infinity}',
            "body is not JSON: -Infinity is not a JSON number",
            id="-Infinity",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "s": "a\\ud800b"}',
            "lone surrogate \\ud800",
            id="lone surrogate",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "1", "\\udfff": 1}',
            "lone surrogate \\udfff",
            id="lone surrogate in a key",
        ),
    ],
)
def test_bodies_that_could_not_be_handed_on_are_invalid(body: bytes, says: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_message(body)
    assert says in str(caught.value)


def test_paired_surrogate_escapes_are_text() -> None:
    message = parse_message(b'{"msg_type": "end_run", "run_id": "1", "s": "\\ud83d\\ude00"}')
    assert message.model_extra == {"s": "\U0001f600"}


# --- decide: each case ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "kind"),
    [
        pytest.param(
            b"{not json",
            "body is not JSON: Expecting property name enclosed in double quotes at line 1",
            "bad_json",
            id="malformed JSON",
        ),
        pytest.param(b"[1, 2]", "body is a JSON list, not an object", "bad_json", id="array"),
        pytest.param(b"42", "body is a JSON int, not an object", "bad_json", id="number"),
        pytest.param(
            wire(msg_type="end_run"),
            "run_id: Field required",
            "invalid_message",
            id="missing run_id",
        ),
        pytest.param(
            wire(msg_type="end_run", run_id=""),
            "run_id: Value error, run_id must be 1-64 characters of letters, digits, '_', '.', '-'",
            "invalid_message",
            id="empty run_id",
        ),
        pytest.param(
            wire(msg_type="no_such_type", run_id="1"),
            "msg_type: unknown message type 'no_such_type'",
            "invalid_message",
            id="unknown msg_type",
        ),
        pytest.param(
            wire(
                msg_type="created_workflow_task",
                run_id="1",
                content={"request_id": "abc", "transform_id": 1},
            ),
            "content.request_id: Input should be a valid integer, unable to parse string "
            "as an integer",
            "invalid_message",
            id="wrong field type",
        ),
        pytest.param(
            b'{"msg_type": "end_run", "run_id": "\xff\xfe"}',
            "body is not UTF-8: invalid start byte at byte 35",
            "bad_json",
            id="invalid UTF-8",
        ),
        pytest.param(
            b"x" * (MAX_BODY_BYTES + 1),
            f"body of {MAX_BODY_BYTES + 1} bytes is over the {MAX_BODY_BYTES} byte limit",
            "too_large",
            id="over the size limit",
        ),
    ],
)
def test_bad_input_is_set_aside_with_its_reason(body: bytes, reason: str, kind: RejectKind) -> None:
    assert on_topic(body) == SetAside(reason, kind)
    assert on_results(body) == SetAside(reason, kind)


@pytest.mark.parametrize(
    "run_id",
    [
        "1' OR '1'='1",
        "1' OR namespace<>'x",
        "../../etc",
        "x/../y",
        "1\n2",
        "a\\b",
        "1;2",
        "",
        " ",
        "-1",
        "x" * 65,
        "1\x00",
    ],
)
def test_injection_in_the_run_id_is_set_aside(run_id: str) -> None:
    decision = on_topic(wire(msg_type="end_run", run_id=run_id))
    assert isinstance(decision, SetAside)
    assert decision.reason.startswith("run_id: ")


def test_the_10_mb_body_is_refused_unread() -> None:
    # Valid JSON, so it is the size that refuses it, before any parsing.
    body = wire(msg_type="end_run", run_id="1", pad="x" * 10_000_000)
    assert on_topic(body) == SetAside(
        f"body of {len(body)} bytes is over the {MAX_BODY_BYTES} byte limit", "too_large"
    )


def test_a_body_at_the_size_limit_is_read() -> None:
    body = wire(msg_type="end_run", run_id="1", pad="")
    body = body[:-3] + b'"' + b"x" * (MAX_BODY_BYTES - len(body)) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    assert isinstance(on_topic(body), Record)


def test_input_quoted_in_a_reason_cannot_break_its_line() -> None:
    msg_type = "x\nswf_reject_reason:forged\r\x00" + "y" * 5000
    decision = on_topic(wire(msg_type=msg_type, run_id="1"))
    assert isinstance(decision, SetAside)
    assert decision.reason.startswith(
        r"msg_type: unknown message type 'x\nswf_reject_reason:forged\r\x00yyy"
    )
    assert decision.reason.isprintable()
    assert decision.reason.endswith("characters in all)")
    assert len(decision.reason) <= MAX_REASON_CHARS + 40


def test_a_run_announcement_starts_the_run() -> None:
    data = {
        "msg_type": "run_imminent_worker",
        "run_id": "100123",
        "content": {"target_worker_count": 3},
    }
    decision = on_topic(json.dumps(data).encode())
    assert isinstance(decision, StartRun)
    assert decision.data == data
    assert decision.message.run_id == "100123"


def test_a_message_about_a_run_is_recorded() -> None:
    decision = on_topic(wire(msg_type="end_run", run_id=7))
    assert isinstance(decision, Record)
    assert decision.run_id == "7"


def test_a_heartbeat_naming_no_run_is_recorded_with_the_namespace() -> None:
    decision = on_topic(wire(msg_type="heartbeat", internal_id="tf-1"))
    assert isinstance(decision, Record)
    assert decision.run_id is None


@pytest.mark.parametrize(
    "msg_type", ["create_workflow_task", "adjust_worker", "close_workflow_task", "stop_transformer"]
)
def test_our_own_requests_echoed_by_the_topic_are_ignored(msg_type: str) -> None:
    body = wire(
        msg_type=msg_type,
        run_id="1",
        content={"run_id": "1", "request_id": 1, "transform_id": 2, "workflow": {}},
    )
    # Carrying the message: the metrics read each run's workers from adjust_worker.
    assert on_topic(body) == Ignore(
        f"{msg_type} is a request to a peer, echoed by the topic", parse_message(body)
    )


def test_results_of_runs_this_listener_owns_are_recorded_others_looked_up() -> None:
    body = wire(msg_type="slice_result", run_id="5", content={"state": "done"})
    assert isinstance(on_results(body, owned=frozenset({"5"})), Record)
    # Another replica of the namespace may have started run 5: Prefect knows.
    result = parse_message(body)
    assert isinstance(result, SliceResult)
    assert on_results(body, owned=frozenset({"6"})) == LookUpRun(result, json.loads(body))


def test_whatever_names_another_namespace_is_ignored_even_for_an_owned_run() -> None:
    # Run numbers come from the testbed: two namespaces may both have run 5.
    result = wire(msg_type="slice_result", run_id="5", content={"state": "done"})
    assert on_results(result, owned=frozenset({"5"}), namespace="prod") == Ignore(
        "namespace prod is not itest"
    )
    # Not ours to judge either: another namespace's garbage is not set aside here.
    assert on_results(b"{not json", namespace="prod") == Ignore("namespace prod is not itest")


@pytest.mark.parametrize("msg_type", ["run_imminent", "end_run", "created_workflow_task"])
def test_the_results_queue_carries_only_what_transformers_send(msg_type: str) -> None:
    body = wire(msg_type=msg_type, run_id="5", content={"request_id": 1, "transform_id": 2})
    assert on_results(body, owned=frozenset({"5"})) == SetAside(
        f"{msg_type} does not belong on {RESULTS}, which carries no namespace",
        "wrong_queue",
        parse_message(body),
    )


# --- decide: properties -----------------------------------------------------------


def mutated(data: dict[str, Any], key: str, value: object) -> dict[str, Any]:
    """A valid message with one field replaced (or added) at the top or in content."""
    copy = dict(data)
    if key.startswith("content.") and isinstance(copy.get("content"), dict):
        copy["content"] = {**copy["content"], key.removeprefix("content."): value}
    else:
        copy[key] = value
    return copy


INJECTIONS = st.sampled_from(
    [
        "1' OR '1'='1",
        "../../etc",
        "x/../y",
        "1\n2",
        "",
        "\x00",
        "\ud800",
        "é",
        "9" * 70,
    ]
)
# Values parse_message must refuse wherever they are, even in a free field.
UNFORWARDABLE = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        "\ud800",
        "a\udfffb",
        {"\udc00": 1},
        nested(MAX_DEPTH),  # deeper than MAX_DEPTH once inside a message
    ]
)
FIELD_NAMES = st.sampled_from(
    [
        "x_free",
        "content.x_free",
        "msg_type",
        "run_id",
        "created_at",
        "content",
        "content.request_id",
        "content.transform_id",
        "content.workload_id",
        "content.status",
        "content.state",
        "content.processing_time",
        "content.target_worker_count",
        "content.num_workers",
        "content.run_id",
        "content.workflow",
        "content.result",
        "timestamp",
        "internal_id",
    ]
)
MUTANTS = st.builds(mutated, VALID_MESSAGES, FIELD_NAMES, ANY_JSON | INJECTIONS | UNFORWARDABLE)
BODIES = st.one_of(
    st.binary(max_size=500),
    JSON_ISH,
    VALID_MESSAGES.map(lambda d: json.dumps(d).encode()),
    MUTANTS.map(lambda d: json.dumps(d).encode()),
)
HEADERS = st.fixed_dictionaries(
    {"destination": st.sampled_from([TOPIC, RESULTS, "/queue/elsewhere", ""])},
    optional={
        "namespace": st.sampled_from([NS, "prod", "", "itest' OR '1'='1"]) | TEXT,
        "run_id": INJECTIONS,
        "swf_reject_reason": TEXT,
    },
)
OWNED = st.frozensets(st.sampled_from(["0", "1", "5", "7", "100123"]), max_size=3)
OUTCOMES = get_args(Decision)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MUTANTS)
def test_any_mutated_message_parses_or_is_invalid(data: dict[str, Any]) -> None:
    parses_or_says_why(json.dumps(data).encode())
    parses_or_says_why(data)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES, HEADERS, OWNED)
def test_decide_gives_every_delivery_exactly_one_outcome(
    body: bytes,
    headers: dict[str, str],
    owned: frozenset[str],
) -> None:
    decision = decide(body, headers, INBOX, owned)

    assert sum(isinstance(decision, kind) for kind in OUTCOMES) == 1
    assert decide(body, headers, INBOX, owned) == decision  # a function of its input
    sender = headers.get("namespace") or None
    foreign = sender not in (None, NS, IDDS_NS) or (
        sender == IDDS_NS and headers["destination"] == RESULTS
    )
    if foreign:
        assert isinstance(decision, Ignore)
    try:
        message = parse_message(body)
    except InvalidMessage:
        message = None
    match decision:
        case SetAside(reason=reason, kind=kind):
            assert kind in get_args(RejectKind)  # a metric label: one of a fixed few
            assert decision.message in (None, message)
            assert reason and reason.strip()
            assert reason.isprintable()  # one line: no newline, NUL or other control
            assert len(reason) <= MAX_REASON_CHARS + 40
        case Ignore(why=why):
            assert why
            assert decision.message in (None, message)
        case StartRun() | Record() | LookUpRun():
            # Only what parses is acted on, from our namespace (iDDS's
            # replies from outside it too), and the hand-off cannot fail on
            # what it carries.
            assert not foreign and message is not None and len(body) <= MAX_BODY_BYTES
            if sender != NS and headers["destination"] != RESULTS:
                assert type(message) in IDDS_REPLIES
            assert decision.message == message
            assert decision.data == json.loads(body)
            strictly_json({"announcement": decision.data})
            if isinstance(decision, Record | LookUpRun):
                message_event(
                    decision.data, message.msg_type, NS, getattr(message, "run_id", None), "m-1"
                ).model_dump_json()
    if message is None and not foreign:
        assert isinstance(decision, SetAside)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALID_MESSAGES, st.sampled_from([TOPIC, RESULTS]), OWNED)
def test_valid_messages_from_our_namespace_go_where_their_type_says(
    data: dict[str, Any],
    destination: str,
    owned: frozenset[str],
) -> None:
    message = parse_message(data)
    headers = {"destination": destination} | ({"namespace": NS} if destination == TOPIC else {})
    decision = decide(json.dumps(data).encode(), headers, INBOX, owned)

    if destination == RESULTS and type(message) not in FROM_RESULTS:
        assert isinstance(decision, SetAside)
    elif isinstance(message, RunImminent):
        assert decision == StartRun(message, data)
    elif isinstance(message, ECHOES):
        assert isinstance(decision, Ignore)
    elif isinstance(message, SliceResult | IddsReply) and message.run_id not in owned:
        assert decision == LookUpRun(message, data)
    else:
        assert decision == Record(message, data, getattr(message, "run_id", None))


@given(st.text(st.characters(codec=None)), st.integers(1, 2000))
def test_one_line_is_one_printable_bounded_line(text: str, limit: int) -> None:
    line = one_line(text, limit)
    assert line.isprintable()
    # an escape is at most 10 characters (\U0001f266)
    assert len(line) <= limit + len(f"... ({10 * len(text)} characters in all)")
    if text.isprintable() and len(text) <= limit:
        assert line == text

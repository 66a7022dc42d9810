"""Properties (hypothesis): session ids and their keys, event payloads through Redis, stream ids.

The payload round trips run on fakeredis, each example on its own fresh server and event loop
(``asyncio.run`` inside a synchronous ``@given`` test: pytest-asyncio's per-test loops do not
mix with hypothesis's examples).
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from runstate import AgentEvent, Coordinator, Reserved, StreamEvent
from runstate.codec import parse_stream_id
from runstate.events import TaskListUpdated, TokenBudgetUpdated, ToolComplete, ToolStart
from runstate.keys import SESSION_ID_MAX_LEN, Keys, validate_session_id
from runstate.subscription import normalize_stream_id

ALPHABET = string.ascii_letters + string.digits + "._:@-"
PREFIX_ALPHABET = string.ascii_letters + string.digits + "._:-"
MAX_ID = 2**64 - 1  # Redis stream ids are two unsigned 64-bit numbers

session_ids = st.text(alphabet=ALPHABET, min_size=1, max_size=SESSION_ID_MAX_LEN)
prefixes = st.text(alphabet=PREFIX_ALPHABET, min_size=1, max_size=20)
forbidden_chars = st.characters(exclude_characters=ALPHABET, exclude_categories=("Cs",))


@st.composite
def ids_with_a_forbidden_character(draw: st.DrawFn) -> str:
    """A session id of allowed length holding at least one character outside the alphabet."""
    head = draw(st.text(alphabet=ALPHABET, max_size=60))
    bad = draw(st.text(alphabet=forbidden_chars, min_size=1, max_size=3))
    tail = draw(st.text(alphabet=ALPHABET, max_size=60))
    return head + bad + tail


bad_session_ids = st.one_of(
    st.just(""),
    st.text(alphabet=ALPHABET, min_size=SESSION_ID_MAX_LEN + 1, max_size=400),
    ids_with_a_forbidden_character(),
)


# ---- session ids ------------------------------------------------------------------------------


@given(session_ids, prefixes)
def test_any_well_formed_session_id_is_accepted_and_round_trips_through_its_keys(
    session_id: str, prefix: str
) -> None:
    # Given a session id of 1-128 allowed characters, and any prefix
    keys = Keys(prefix)
    # Then it is accepted as is
    assert validate_session_id(session_id) == session_id
    # And each of its keys names it back, under the prefix, in one hash slot (Redis Cluster)
    session_keys = keys.session_keys(session_id)
    assert keys.session_of(keys.runner(session_id)) == session_id
    assert [keys.session_of(k) for k in session_keys] == [session_id] * 5
    assert all(k.startswith(f"{prefix}:{{{session_id}}}:") for k in session_keys)
    assert len({key_slot(k.encode()) for k in session_keys}) == 1
    assert len(set(session_keys)) == 5


@given(session_ids, session_ids)
def test_distinct_sessions_never_share_a_key(a: str, b: str) -> None:
    keys = Keys("p")
    if a != b:
        assert not set(keys.session_keys(a)) & set(keys.session_keys(b))


@given(bad_session_ids)
def test_any_malformed_session_id_is_refused_naming_it(session_id: str) -> None:
    # Given an empty, too long, or forbidden-character id
    keys = Keys("p")
    # Then validating it, or making any of its keys, raises a ValueError naming it
    for call in (validate_session_id, keys.runner, keys.events, keys.session_keys):
        with pytest.raises(ValueError) as refused:
            call(session_id)
        assert repr(session_id) in str(refused.value)


# ---- event payloads ---------------------------------------------------------------------------

json_scalars = st.one_of(
    st.text(max_size=20),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (1 is not 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _payloads(event: AgentEvent) -> dict[str, Any]:
    names = ("arguments", "result", "task_list", "usage")
    return {name: getattr(event, name) for name in names if hasattr(event, name)}


async def _round_trip(events: list[AgentEvent]) -> tuple[list[StreamEvent], list[StreamEvent]]:
    """Emit ``events`` in a run on a fresh fake server; what a resume from "0" and a late
    subscriber (the snapshot replay) get back."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    coord = Coordinator(client, prefix="prop")
    try:
        reserved = await coord.try_reserve("s1")
        assert isinstance(reserved, Reserved)
        run = await coord.claim("s1", reserved.run_id, "w1")
        await run.emit_many(events)
        await run.complete()
        coord.release(run)
        resumed = [item async for item in coord.subscribe("s1", last_event_id="0")]
        late = [item async for item in coord.subscribe("s1")]
        return resumed, late
    finally:
        with contextlib.suppress(Exception):
            await coord.aclose()
        await client.aclose()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arguments=json_objects,
    result=json_values,
    task_list=json_values,
    usage=json_objects,
)
def test_any_json_payload_round_trips_exactly_through_emit_and_subscribe(
    arguments: dict[str, Any], result: Any, task_list: Any, usage: dict[str, Any]
) -> None:
    # Given events whose free-form payloads are arbitrary JSON
    events: list[AgentEvent] = [
        ToolStart(tool_call_id="c1", tool_name="search", arguments=arguments),
        ToolComplete(tool_call_id="c1", result=result),
        TaskListUpdated(task_list=task_list),
        TokenBudgetUpdated(usage=usage),
    ]
    # When a run emits them and completes, and subscribers read the session back
    resumed, late = asyncio.run(_round_trip(events))
    # Then a resume from "0" gets each event back, payloads identical to the last type
    got = [item.event for item in resumed[1:-1]]
    assert [type(e) for e in got] == [type(e) for e in events]
    for sent, back in zip(events, got, strict=True):
        assert same(_payloads(sent), _payloads(back)), (sent, back)
        assert back == sent
    # And a late subscriber's replay (the critical task list, the last budget) is exact too
    task_event, budget_event = late[0].event, late[1].event
    assert isinstance(task_event, TaskListUpdated) and same(task_event.task_list, task_list)
    assert isinstance(budget_event, TokenBudgetUpdated) and same(budget_event.usage, usage)
    assert late[-1].event.type == "complete"


# ---- stream ids -------------------------------------------------------------------------------

id_parts = st.integers(min_value=0, max_value=MAX_ID)


@given(id_parts, id_parts)
def test_any_stream_id_is_accepted_as_is(ms: int, n: int) -> None:
    # Given "<ms>-<n>" and "<ms>" with numbers a stream id can hold
    full, short = f"{ms}-{n}", str(ms)
    # Then both parse to their numbers, and normalise to "<ms>-<n>" ("<ms>" is "<ms>-0")
    assert parse_stream_id(full) == (ms, n)
    assert parse_stream_id(short) == (ms, 0)
    assert normalize_stream_id(full) == full
    assert normalize_stream_id(short) == f"{ms}-0"


@given(st.tuples(id_parts, id_parts), st.tuples(id_parts, id_parts))
def test_parsed_stream_ids_order_as_redis_orders_them(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    # Redis orders stream ids by milliseconds, then sequence number: tuple order
    pa, pb = parse_stream_id(f"{a[0]}-{a[1]}"), parse_stream_id(f"{b[0]}-{b[1]}")
    assert (pa < pb) == (a < b) and (pa == pb) == (a == b)


def _is_stream_id(text: str) -> bool:
    ms, sep, n = text.partition("-")
    parts = [ms, n] if sep else [ms]
    return all(p.isascii() and p.isdigit() and int(p) <= MAX_ID for p in parts)


not_stream_ids = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789-+_ ", max_size=12),
    st.sampled_from(
        ["-1", "1--1", "1-", "-", "+1-0", "1_000", "\u0661-\u0662", "0x10", "1.5", "1-2-3"]
    ),
    st.integers(min_value=MAX_ID + 1).map(str),
    st.integers(min_value=MAX_ID + 1).map(lambda n: f"0-{n}"),
).filter(lambda text: not _is_stream_id(text))


@given(not_stream_ids)
def test_anything_else_is_refused_naming_it(text: str) -> None:
    # Then parsing it raises a ValueError naming it
    with pytest.raises(ValueError) as refused:
        parse_stream_id(text)
    assert repr(text) in str(refused.value)
    # And so does normalising it (which forgives surrounding whitespace only)
    if not _is_stream_id(text.strip()):
        with pytest.raises(ValueError) as refused:
            normalize_stream_id(text)
        assert repr(text.strip()) in str(refused.value)

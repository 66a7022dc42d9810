"""Bad input (DESIGN §3, §5, §7): session ids, prefixes, events, payloads, schedules, junk.

Every test that takes ``coord`` or ``redis`` runs against fakeredis and against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import pytest
from redis.asyncio import Redis

from runstate import (
    AgentEvent,
    Coordinator,
    EventTooLarge,
    Reserved,
    UnknownEventType,
)
from runstate.events import (
    Complete,
    GenericEvent,
    TaskListUpdated,
    Token,
    TokenBudgetUpdated,
    event_types,
    parse_event,
    register_event,
)
from tests.helpers import (
    client_like,
    data_of,
    entries,
    eventually,
    next_event,
    settle,
    start_run,
    take,
)


class MyCustom(AgentEvent):
    """An application's own event type, added without editing the library."""

    type: Literal["my_custom"] = "my_custom"
    note: str
    is_critical: ClassVar[bool] = True


BAD_SESSION_IDS = ["", "a" * 129, "a b", "a{b", "a}b", "a*", "a\nb", "a/b", "é"]


# ---- session ids and prefixes ----------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_SESSION_IDS, ids=repr)
async def test_bad_session_ids_are_refused_naming_the_id(
    coord: Coordinator, redis: Redis, prefix: str, bad: str
) -> None:
    # Given a malformed session id
    calls: list[tuple[str, Any]] = [
        ("execute", lambda: coord.execute(bad, {"q": 1})),
        ("try_reserve", lambda: coord.try_reserve(bad)),
        ("cancel", lambda: coord.cancel(bad)),
        ("runner", lambda: coord.runner(bad)),
        ("claim", lambda: coord.claim(bad, "0" * 32, "w1")),
        ("subscribe", lambda: anext(coord.subscribe(bad))),
    ]
    for name, call in calls:
        # When it is used
        with pytest.raises(ValueError) as refused:
            await call()

        # Then the error names it, and nothing was written
        assert repr(bad) in str(refused.value), (name, str(refused.value))
    assert [key async for key in redis.scan_iter(match=f"{prefix}:*")] == []


@pytest.mark.parametrize("bad", [None, 42, b"s1", ["s1"]], ids=repr)
async def test_session_id_must_be_a_str(coord: Coordinator, bad: Any) -> None:
    for call in (
        lambda: coord.execute(bad),
        lambda: coord.try_reserve(bad),
        lambda: coord.cancel(bad),
        lambda: coord.runner(bad),
    ):
        with pytest.raises(TypeError, match="session id must be a str"):
            await call()
    with pytest.raises(TypeError):
        coord.subscribe(bad)


@pytest.mark.parametrize("good", ["a", "a" * 128, "user@example.com:thread-1.2_x", "A-9"])
async def test_well_formed_session_ids_are_accepted(coord: Coordinator, good: str) -> None:
    # Given well-formed ids, up to 128 characters
    # When they are reserved
    result = await coord.try_reserve(good)

    # Then it works
    assert isinstance(result, Reserved)
    state = await coord.runner(good)
    assert state is not None and state.session_id == good


@pytest.mark.parametrize("bad", ["", "a b", "p{x}", "p*", "p\n", "é"], ids=repr)
def test_bad_prefix_is_refused(redis: Redis, bad: str) -> None:
    with pytest.raises(ValueError) as refused:
        Coordinator(redis, prefix=bad)
    assert repr(bad) in str(refused.value)


async def test_client_without_decode_responses_is_refused(redis: Redis, prefix: str) -> None:
    # Given a client of the same server that returns bytes
    raw = client_like(redis, decode_responses=False)
    try:
        # When a Coordinator is made on it
        # Then it is refused with a message that says what to do
        with pytest.raises(ValueError, match="decode_responses=True"):
            Coordinator(raw, prefix=prefix)
    finally:
        await raw.aclose()


# ---- events ----------------------------------------------------------------------------------


async def test_unknown_event_type_is_refused(coord: Coordinator, redis: Redis) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits an event whose type no model is registered for, as a dict or a model
    for bad in ({"type": "no_such_event", "x": 1}, GenericEvent(type="no_such_event")):
        with pytest.raises(UnknownEventType) as refused:
            await handle.emit(bad)

        # Then the error names the type, and nothing was written
        assert "'no_such_event'" in str(refused.value)
    assert await redis.xlen(coord.keys.events("s1")) == 1
    # (UnknownEventType is a ValueError, so callers validating input catch it too)
    assert issubclass(UnknownEventType, ValueError)


async def test_oversized_event_is_refused_and_nothing_of_its_batch_is_written(
    redis: Redis, prefix: str
) -> None:
    coord = Coordinator(redis, prefix=prefix, max_event_bytes=1000)
    try:
        # Given a running run with a 1000-byte event limit
        handle = await start_run(coord, "s1")
        big = Token(content="x" * 2000)
        size = len(big.model_dump_json().encode())
        before = await entries(redis, coord, "s1")

        # When a batch holding a 2000-character token is emitted
        with pytest.raises(EventTooLarge) as refused:
            await handle.emit_many([Token(content="small"), big])

        # Then the error names the size and the limit, and nothing of the batch was written
        assert str(size) in str(refused.value)
        assert "1000" in str(refused.value)
        assert await entries(redis, coord, "s1") == before
        assert (await redis.hgetall(coord.keys.runner("s1")))["seq"] == "1"

        # and the run goes on: its next event is written, alone, and it can complete
        await handle.emit(Token(content="next"))
        await handle.complete()
        written = await entries(redis, coord, "s1")
        assert [f["type"] for _, f in written] == ["execution_started", "token", "complete"]
        assert data_of(written[1][1])["content"] == "next"
    finally:
        await coord.aclose()


async def test_event_with_a_non_json_field_is_refused_and_the_run_goes_on(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits an event whose free-form payload is not JSON
    with pytest.raises((TypeError, ValueError), match="object"):
        await handle.emit(TaskListUpdated(task_list=[object()]))

    # Then nothing was written, and its next event is written alone
    assert await redis.xlen(coord.keys.events("s1")) == 1
    await handle.emit(Token(content="next"))
    written = await entries(redis, coord, "s1")
    assert [f["type"] for _, f in written] == ["execution_started", "token"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "complete"},
        {"type": "cancelled", "message": "x"},
        {"type": "error", "message": "x"},
        {"type": "gap", "missed": 1},
        {"type": "execution_started", "run_id": "x"},
        Complete(),
    ],
    ids=lambda e: e["type"] if isinstance(e, dict) else type(e).__name__,
)
async def test_library_only_events_cannot_be_emitted(
    coord: Coordinator, redis: Redis, event: Any
) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits an event that only the library writes
    with pytest.raises(ValueError) as refused:
        await handle.emit(event)

    # Then it is refused naming the type, and nothing was written
    name = event["type"] if isinstance(event, dict) else event.type
    assert repr(name) in str(refused.value)
    assert not isinstance(refused.value, UnknownEventType)
    assert await redis.xlen(coord.keys.events("s1")) == 1


async def test_malformed_events_are_refused(coord: Coordinator, redis: Redis) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits a dict without a type, with a bad type, or with invalid fields
    for bad in (
        {"content": "x"},
        {"type": 3},
        {"type": "Not Snake"},
        {"type": "token"},
        {"type": "runner_progress", "round_count": -1},
    ):
        # Then each is a ValueError
        with pytest.raises(ValueError):
            await handle.emit(bad)
    with pytest.raises(ValueError, match="'token'"):
        await handle.emit({"type": "token", "content": 5})

    # When it emits something that is neither a dict nor an event
    with pytest.raises(TypeError, match="'token'"):
        await handle.emit("token")  # type: ignore[arg-type]

    # Then nothing was written
    assert await redis.xlen(coord.keys.events("s1")) == 1


# ---- payloads and schedules ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["execute", "try_reserve"])
async def test_payload_must_be_json(coord: Coordinator, redis: Redis, how: str) -> None:
    # Given a payload that JSON cannot carry
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque payload>"

    # When a run is started with it
    with pytest.raises(TypeError) as refused:
        await getattr(coord, how)("s1", {"thing": Opaque()})

    # Then the error names it and no run was reserved
    assert "<Opaque payload>" in str(refused.value)
    assert "JSON" in str(refused.value)
    assert await coord.runner("s1") is None
    assert await redis.xlen(coord.keys.queue) == 0


async def test_oversized_payload_is_refused(redis: Redis, prefix: str) -> None:
    coord = Coordinator(redis, prefix=prefix, max_event_bytes=1000)
    try:
        # When a run is executed with a payload over the limit
        with pytest.raises(ValueError) as refused:
            await coord.execute("s1", {"blob": "x" * 2000})

        # Then the error names the size and the limit, and nothing was reserved
        assert "1000" in str(refused.value)
        assert str(len(json.dumps({"blob": "x" * 2000}, separators=(",", ":")))) in str(
            refused.value
        )
        assert await coord.runner("s1") is None
    finally:
        await coord.aclose()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"delay": -1}, "-1"),
        ({"delay": -0.5}, "-0.5"),
        ({"delay": math.nan}, "nan"),
        ({"delay": math.inf}, "inf"),
        ({"at": datetime(2030, 1, 1, 12, 0)}, repr(datetime(2030, 1, 1, 12, 0))),
        ({"delay": 5, "at": datetime(2030, 1, 1, tzinfo=UTC)}, "delay=5"),
    ],
    ids=["negative", "negative-float", "nan", "inf", "naive-at", "both"],
)
async def test_bad_schedule_is_refused_naming_the_value(
    coord: Coordinator, redis: Redis, kwargs: dict[str, Any], named: str
) -> None:
    # When a run is executed with a bad delay or time
    with pytest.raises(ValueError) as refused:
        await coord.execute("s1", **kwargs)

    # Then the error names the value, and nothing was reserved or scheduled
    assert named in str(refused.value)
    assert await coord.runner("s1") is None
    assert await redis.zcard(coord.keys.schedule) == 0


@pytest.mark.parametrize("bad", ["abc", "1-x", "-1-0"])
async def test_bad_last_event_id_is_refused(coord: Coordinator, bad: str) -> None:
    with pytest.raises(ValueError) as refused:
        await anext(coord.subscribe("s1", last_event_id=bad))
    assert repr(bad) in str(refused.value)


# ---- application event types -----------------------------------------------------------------


async def test_application_event_types_are_emitted_and_replayed(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits the application's own critical event, as a model and as a dict
    await handle.emit(MyCustom(note="a"))
    await handle.emit({"type": "my_custom", "note": "b"})

    # Then it is in the stream and in the critical list
    written = await entries(redis, coord, "s1")
    assert [f["type"] for _, f in written] == ["execution_started", "my_custom", "my_custom"]
    state = await coord.runner("s1")
    assert state is not None
    assert state.last_critical_events == [MyCustom(note="a"), MyCustom(note="b")]

    # and a new subscriber gets both replayed as the application's model, then live ones
    async with contextlib.aclosing(coord.subscribe("s1")) as events:
        replayed = await take(events, 2)
        assert [type(item.event) for item in replayed] == [MyCustom, MyCustom]
        assert [item.event.note for item in replayed] == ["a", "b"]  # type: ignore[attr-defined]
        live_id = await handle.emit(MyCustom(note="c"))
        live = await next_event(events)
        assert (live.id, live.event) == (live_id, MyCustom(note="c"))
    await settle(coord)


def test_a_taken_type_name_cannot_be_registered_again() -> None:
    # When another class claims a built-in type name, or the application's
    with pytest.raises(ValueError, match="'token' is already registered"):

        class Impostor(AgentEvent):
            type: Literal["token"] = "token"

    with pytest.raises(ValueError, match="'my_custom' is already registered"):
        register_event(GenericEvent, "my_custom")

    # Then the registry still maps the names to their first classes
    assert event_types()["token"] is Token
    assert event_types()["my_custom"] is MyCustom


def test_a_same_named_class_of_another_module_cannot_take_a_builtin_type() -> None:
    # Given an application module that defines its own class named Token
    source = "class Token(AgentEvent):\n    type: Literal['token'] = 'token'\n    content: str\n"
    namespace: dict[str, Any] = {
        "__name__": "myapp.events",
        "AgentEvent": AgentEvent,
        "Literal": Literal,
    }
    try:
        # When the module is imported, Then the duplicate registration is refused
        with pytest.raises(ValueError, match="'token' is already registered"):
            exec(source, namespace)
        assert event_types()["token"] is Token
    finally:
        if event_types()["token"] is not Token:  # undo the takeover for the other tests
            register_event(Token, "token")


async def test_unregistered_type_from_another_producer_reads_as_generic_event(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run, and a producer with a model this process does not have
    handle = await start_run(coord, "s1")
    foreign = GenericEvent(type="from_elsewhere", detail={"k": 1})
    [event_id] = await coord.store.emit(
        "s1", handle.run_id, handle.attempt, 2, coord.store.encode([foreign])
    )

    # When this process reads the session
    async with contextlib.aclosing(coord.subscribe("s1", last_event_id="0")) as events:
        items = await take(events, 2)
    await settle(coord)

    # Then the event is delivered as a GenericEvent with its fields
    assert [item.event.type for item in items] == ["execution_started", "from_elsewhere"]
    item = items[1]
    assert item.id == event_id
    assert isinstance(item.event, GenericEvent)
    assert item.event.model_extra == {"detail": {"k": 1}}
    # and so is one parsed directly
    assert isinstance(parse_event('{"type": "from_elsewhere", "x": 1}'), GenericEvent)
    with pytest.raises(UnknownEventType, match="'from_elsewhere'"):
        parse_event('{"type": "from_elsewhere"}', strict=True)


# ---- junk written by hand --------------------------------------------------------------------


async def test_junk_stream_entries_are_skipped_with_a_warning(
    coord: Coordinator, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runstate")
    # Given a running run followed by a subscriber (resuming after execution_started, so that
    # it cannot miss what follows) that has seen its first event
    handle = await start_run(coord, "s1")
    [(started_id, _)] = await entries(redis, coord, "s1")
    received: list[Any] = []

    async def follow() -> None:
        async with contextlib.aclosing(coord.subscribe("s1", started_id, follow=True)) as events:
            async for item in events:
                received.append(item)

    task = asyncio.create_task(follow())
    try:
        first = await handle.emit(Token(content="before"))
        await eventually(lambda: [i for i in received if i.id == first], what="live subscriber")

        # When junk is XADDed by hand, with ids past the session's position
        key = coord.keys.events("s1")
        top_ms = int(first.split("-")[0])
        junk: list[dict[str, str]] = [
            {"hello": "world"},
            {"run": handle.run_id, "seq": "90", "type": "token", "data": "{not json"},
            {"run": handle.run_id, "seq": "91", "type": "token", "data": '{"type": "token"}'},
            {"run": handle.run_id, "seq": "x", "type": "token", "data": '{"type": "t"}'},
            {"run": handle.run_id, "seq": "92", "type": "?", "data": "[1, 2]"},
            {"run": handle.run_id, "seq": "93", "type": "?", "data": '{"type": "Bad Type"}'},
        ]
        junk_ids = [
            await redis.xadd(key, fields, id=f"{top_ms + 1000 + i}-{i}")
            for i, fields in enumerate(junk)
        ]

        # and the run emits after them
        after = await handle.emit_many([Token(content="after-1"), Token(content="after-2")])

        # Then the emits succeed, with ids after the junk
        assert all(_id_key(a) > _id_key(junk_ids[-1]) for a in after)
        # and the subscriber skips the junk and delivers the real events after it
        await eventually(lambda: [i for i in received if i.id == after[-1]], what="after-2")
        assert [i.event.content for i in received] == ["before", "after-1", "after-2"]
        assert [i.id for i in received] == [first, *after]
        # with a warning naming each junk entry
        warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        for junk_id in junk_ids:
            assert junk_id in warned
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await settle(coord)

    # And the session's diagnostics are intact
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert (fields["seq"], fields["status"]) == ("4", "running")


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n)


async def test_junk_in_the_critical_list_and_budget_is_skipped(
    coord: Coordinator, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="runstate")
    # Given a run whose critical list and last budget event hold junk written by hand
    handle = await start_run(coord, "s1")
    await handle.emit(TaskListUpdated(task_list=["real"]))
    await redis.rpush(coord.keys.critical("s1"), "{not json", '{"type": "token"}', "[]")
    await redis.hset(coord.keys.runner("s1"), "last_budget_event", "{broken")

    # When the runner is read and a new subscriber arrives
    state = await coord.runner("s1")
    async with contextlib.aclosing(coord.subscribe("s1")) as events:
        replayed = await next_event(events)
        live_id = await handle.emit(TokenBudgetUpdated(usage={"t": 1}))
        live = await next_event(events)
    await settle(coord)

    # Then the junk is skipped with warnings and the real events come through
    assert state is not None
    assert state.last_critical_events == [TaskListUpdated(task_list=["real"])]
    assert state.last_budget_event is None
    assert replayed.event == TaskListUpdated(task_list=["real"])
    assert (live.id, live.event) == (live_id, TokenBudgetUpdated(usage={"t": 1}))
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_every_event_the_writer_accepts_is_read_back() -> None:
    # The read side parses with pydantic-core first, which refuses nesting past ~200 levels
    # and lone surrogates; json.loads, which the writer's output always satisfied, decides then.
    from runstate.codec import decode_entry
    from runstate.events import GenericEvent, dump_event, parse_event

    nested: Any = "leaf"
    for _ in range(250):  # the writer takes it (its own limit is a little further)
        nested = [nested]
    deep = dump_event(GenericEvent(type="deep_result", payload=nested))
    assert getattr(parse_event(deep), "payload") == nested  # noqa: B009 (an extra field)
    # A lone surrogate (a client decoding with surrogateescape) is read, not a TypeError that
    # would stop the event reader
    data = b'{"type":"token","content":"\xff"}'.decode("utf-8", "surrogateescape")
    entry = decode_entry("1-1", {"data": data, "run": "r1", "seq": "1"})
    assert entry is not None and entry.event.type == "token"

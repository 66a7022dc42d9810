"""Batched writes for token streaming: RunHandle.stream (ordered, fenced, few round trips)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from runstate import Coordinator, RunCancelled, RunHandle, UnknownEventType
from runstate.events import Token, ToolStart
from runstate.models import Reserved
from tests.helpers import eventually


async def start(coord: Coordinator, **kw: Any) -> RunHandle:
    reserved = await coord.try_reserve("s1")
    assert isinstance(reserved, Reserved)
    handle = await coord.claim("s1", reserved.run_id, "w1")
    for name, value in kw.items():
        setattr(handle, name, value)
    return handle


def count_writes(coord: Coordinator, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every emit round trip."""
    sizes: list[int] = []
    real = coord.store.emit

    async def emit(*args: Any) -> list[str]:
        sizes.append(len(args[-1]))
        return await real(*args)

    monkeypatch.setattr(coord.store, "emit", emit)
    return sizes


async def contents(redis: Redis, coord: Coordinator) -> list[tuple[str, str]]:
    import json

    raw = await redis.xrange(coord.keys.events("s1"))
    return [(f["seq"], json.loads(f["data"]).get("content", f["type"])) for _, f in raw]


async def test_streamed_tokens_are_written_in_batches_in_order(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run streaming 100 tokens with batches of 16
    run = await start(coord, batch_size=16, batch_delay=10.0)
    sizes = count_writes(coord, monkeypatch)
    for i in range(100):
        await run.stream(Token(content=str(i)))
    await run.complete()
    # Then they were written in 7 round trips (6 full batches, the rest with the terminal
    # event's settle), in order, numbered 2..101 after execution_started
    assert sizes == [16] * 6 + [4]
    got = await contents(redis, coord)
    assert [c for _, c in got[1:-1]] == [str(i) for i in range(100)]
    assert [int(seq) for seq, _ in got] == list(range(1, 103))
    assert got[-1][1] == "complete"


async def test_emit_writes_queued_tokens_first(coord: Coordinator, redis: Redis) -> None:
    # Given tokens queued, then an immediate emit
    run = await start(coord, batch_delay=10.0)
    await run.stream(Token(content="a"))
    await run.stream(Token(content="b"))
    await run.emit(ToolStart(tool_call_id="1", tool_name="search"))
    # Then the stream keeps the order they were given in
    assert [c for _, c in await contents(redis, coord)][1:] == ["a", "b", "tool_start"]
    await run.close()


async def test_queued_tokens_are_written_after_the_delay(coord: Coordinator, redis: Redis) -> None:
    # Given one token queued with a short delay and nothing else happening
    run = await start(coord, batch_delay=0.01)
    await run.stream(Token(content="late"))
    # Then it is written by itself, shortly
    await eventually(lambda: redis.xlen(coord.keys.events("s1")), what="written")
    await eventually(lambda: _has(redis, coord, "late"), what="the queued token reached the stream")
    await run.complete()


async def _has(redis: Redis, coord: Coordinator, content: str) -> bool:
    return content in [c for _, c in await contents(redis, coord)]


async def test_a_bad_event_is_refused_at_once_and_nothing_is_queued(coord: Coordinator) -> None:
    run = await start(coord, batch_delay=10.0)
    with pytest.raises(UnknownEventType, match="'no_such_event'"):
        await run.stream({"type": "no_such_event"})
    assert await run.flush() == []
    await run.close()


async def test_a_cancelled_run_stops_streaming(coord: Coordinator, redis: Redis) -> None:
    # Given a streaming run that gets cancelled while tokens are queued
    run = await start(coord, batch_delay=0.01)
    await run.stream(Token(content="x"))
    assert await coord.cancel("s1")
    # Then the background write is refused by the fence, and the run learns it at its next
    # call (or checkpoint): nothing is written after the cancelled event
    await eventually(lambda: run.token.cancel_called, what="the token was cancelled")
    with pytest.raises(RunCancelled):
        await run.checkpoint()
        await run.stream(Token(content="y"))
    await run.close()  # the run is over: its batched writes are settled
    types = [c for _, c in await contents(redis, coord)]
    assert types[-1] == "cancelled"

"""Helpers shared by the core tests: waiting on state, starting runs, reading streams.

Also holds the child side of the multi-process reservation test, so it must stay cheap to import.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from runstate import Coordinator, RunHandle, StreamEvent

T = TypeVar("T")


def client_like(redis: Any, **options: Any) -> Any:
    """A client of the same server as ``redis`` (fake, real or cluster), with other options."""
    from redis.asyncio import Redis, RedisCluster

    from runstate.client import _Cluster

    if isinstance(redis, RedisCluster):
        node = next(iter(redis.nodes_manager.startup_nodes.values()))
        decode = {"decode_responses": redis.get_encoder().decode_responses}
        return _Cluster(host=node.host, port=node.port, **{**decode, **options})
    pool = redis.connection_pool
    kwargs = {**pool.connection_kwargs, **options}
    return Redis.from_pool(type(pool)(connection_class=pool.connection_class, **kwargs))


async def eventually(
    predicate: Callable[[], Any],
    limit: float = 5.0,
    interval: float = 0.005,
    what: str = "",
) -> Any:
    """Poll ``predicate`` (sync or async) until it is truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {limit}s: {what or predicate!r}")
        await asyncio.sleep(interval)


async def within(awaitable: Awaitable[T], limit: float = 5.0) -> T:
    """Await ``awaitable``, failing the test if it takes longer than ``limit`` seconds."""
    async with asyncio.timeout(limit):
        return await awaitable


async def next_event(events: AsyncIterator[StreamEvent], limit: float = 5.0) -> StreamEvent:
    """The next item of a subscription, or a test failure after ``limit`` seconds."""
    return await within(anext(events), limit)


async def take(events: AsyncIterator[StreamEvent], n: int, limit: float = 5.0) -> list[Any]:
    """The next ``n`` items of a subscription."""
    return [await next_event(events, limit) for _ in range(n)]


async def claim(coord: Coordinator, session_id: str, run_id: str, worker: str = "w1") -> RunHandle:
    """``coord.claim``, returning once this process's cancel watcher is subscribed.

    So that a cancel published by the test reaches the run through pub/sub.
    """
    handle = await coord.claim(session_id, run_id, worker)
    await eventually(coord.cancel_watcher.listening.is_set, what="the cancel watcher listens")
    await coord.client.ping()  # let the watcher's first marker poll finish
    return handle


async def start_run(
    coord: Coordinator, session_id: str, worker: str = "w1", payload: Any = None
) -> RunHandle:
    """Reserve ``session_id`` and claim the new run (see :func:`claim`): a running run."""
    from runstate import Reserved

    reserved = await coord.try_reserve(session_id, payload)
    assert isinstance(reserved, Reserved), reserved
    return await claim(coord, session_id, reserved.run_id, worker)


async def settle(coord: Coordinator) -> None:
    """Let the coordinator's event reader reach its blocking XREAD before the test ends.

    Works around a lost cancel: when pytest-asyncio stops the loop at the end of a test while
    the reader is sending its next XREAD, the cancel of ``Coordinator.aclose()`` in the fixture
    teardown lands in redis-py's ``asyncio.wait_for`` (Python 3.11 swallows it there), and the
    close then waits for the XREAD to time out (``block_ms``, 5 s). A library bug, pinned by
    ``test_aclose_after_a_subscription_is_prompt_*`` in test_core_lifecycle.py.
    """
    await coord.client.ping()


async def entries(redis: Redis, coord: Coordinator, session_id: str) -> list[tuple[str, dict]]:
    """Every entry of the session's stream as ``(id, fields)``."""
    return list(await redis.xrange(coord.keys.events(session_id)))


async def stream_types(redis: Redis, coord: Coordinator, session_id: str) -> list[str]:
    """The ``type`` field of every entry of the session's stream, in order."""
    return [fields.get("type", "") for _, fields in await entries(redis, coord, session_id)]


def data_of(fields: dict[str, str]) -> dict[str, Any]:
    """The decoded ``data`` JSON of a stream entry."""
    value: dict[str, Any] = json.loads(fields["data"])
    return value


# ---- child process side of the multi-process reservation test ---------------------------------


def reserve_in_process(
    url: str, prefix: str, session_id: str, how: str, barrier: Any, results: Any
) -> None:
    """Connect, wait for every sibling at ``barrier``, reserve, report ``(pid, kind, run_id)``."""

    async def main() -> tuple[str, str]:
        from runstate import Coordinator, Reserved

        async with Coordinator.from_url(url, prefix=prefix) as coord:
            await coord.client.ping()  # connected before the race starts
            barrier.wait(timeout=30)
            if how == "execute":
                result = await coord.execute(session_id, {"pid": os.getpid()})
            else:
                result = await coord.try_reserve(session_id)
        return ("reserved" if isinstance(result, Reserved) else "already", result.run_id)

    try:
        results.put((os.getpid(), *asyncio.run(main())))
    except BaseException as exc:
        results.put((os.getpid(), "error", repr(exc)))

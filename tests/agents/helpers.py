"""Waiting helpers for the worker tests: poll Redis state against a deadline, never bare sleeps."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from runstate import Coordinator, RunnerState

T = TypeVar("T")

# Knobs that keep in-process workers fast in tests.
FAST: dict[str, Any] = {
    "heartbeat_interval": 0.05,
    "lost_after": 3.0,
    "reaper_interval": 0.2,
    "scan_interval": 0.2,
    "schedule_interval": 0.05,
    "block_ms": 100,
    "shutdown_grace": 5.0,
    "shutdown_cancel_wait": 1.0,
}


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool] = bool,
    *,
    limit: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``probe()`` until ``check`` accepts its value; fail with the last value on timeout."""
    deadline = time.monotonic() + limit
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


async def wait_status(
    coord: Coordinator, session_id: str, *statuses: str, limit: float = 10.0
) -> RunnerState:
    """Wait until the session's run has one of ``statuses``; returns its state."""

    async def probe() -> RunnerState | None:
        return await coord.runner(session_id)

    state = await eventually(
        probe,
        lambda s: s is not None and s.status in statuses,
        limit=limit,
        what=f"session {session_id!r} to be {'/'.join(statuses)}",
    )
    assert state is not None
    return state


async def stream_types(coord: Coordinator, session_id: str) -> list[str]:
    """The ``type`` of every event in the session's stream, oldest first."""
    entries = await coord.client.xrange(coord.keys.events(session_id))
    return [fields["type"] for _, fields in entries]


async def stream_events(coord: Coordinator, session_id: str) -> list[dict[str, Any]]:
    """Every event in the session's stream as ``{run, seq, type, data}`` dicts."""
    entries = await coord.client.xrange(coord.keys.events(session_id))
    return [
        {
            "id": eid,
            "run": f["run"],
            "seq": int(f["seq"]),
            "type": f["type"],
            **json.loads(f["data"]),
        }
        for eid, f in entries
    ]

"""Transient Redis errors (DESIGN §7): retried, never written twice; a lasting outage is an error.

Every test that takes ``coord`` or ``redis`` runs against fakeredis and against a real server.
Lost answers are simulated by wrapping a registered Lua script: the script runs, then the call
raises ``ConnectionError`` as if the reply had been lost on the way back.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio import Redis

from runstate import (
    Coordinator,
    RedisUnavailable,
    Reserved,
    RetryPolicy,
    RunstateError,
)
from runstate.codec import utcnow
from runstate.events import Token
from tests.helpers import claim, data_of, entries, start_run, stream_types

FAST = RetryPolicy(attempts=5, deadline=5, initial=0.001, max_wait=0.01)


class FlakyScript:
    """Wraps the store's tries of one script: fails some before or after running it."""

    def __init__(
        self,
        script: Any,
        run: Callable[[Any, list[str], Sequence[Any]], Awaitable[Any]],
        *,
        fail_before: int = 0,
        fail_after: int = 0,
        error: Exception | None = None,
    ) -> None:
        self.script = script
        self.run = run  # the store's own way of running a script once
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.error = error or rexc.ConnectionError("injected: connection reset")
        self.calls = 0
        self.ran = 0

    async def __call__(self, script: Any, keys: list[str], args: Sequence[Any]) -> Any:
        if script is not self.script:
            return await self.run(script, keys, args)
        self.calls += 1
        if self.fail_before > 0:
            self.fail_before -= 1
            raise self.error
        result = await self.run(script, keys, args)
        self.ran += 1
        if self.fail_after > 0:
            self.fail_after -= 1
            raise self.error
        return result


class FlakyPipelines:
    """Wraps a client's pipelines: fails some executes before or after they reach Redis."""

    def __init__(
        self,
        client: Any,
        *,
        fail_before: int = 0,
        fail_after: int = 0,
        error: Exception | None = None,
    ) -> None:
        self.make = client.pipeline
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.error = error or rexc.ConnectionError("injected: connection reset")
        self.calls = 0
        self.ran = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.make(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **kw: Any) -> Any:
            self.calls += 1
            if self.fail_before > 0:
                self.fail_before -= 1
                raise self.error
            result = await real_execute(*a, **kw)
            self.ran += 1
            if self.fail_after > 0:
                self.fail_after -= 1
                raise self.error
            return result

        pipe.execute = execute
        return pipe


async def flaky_pipelines(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> FlakyPipelines:
    await coord.try_reserve("warm-up")  # loads the reserve script: no NOSCRIPT round to count
    wrapper = FlakyPipelines(coord.client, **kw)
    monkeypatch.setattr(coord.client, "pipeline", wrapper)
    return wrapper


async def flaky_round_trip(
    coord: Coordinator, name: str, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> FlakyScript | FlakyPipelines:
    """The round trip of a script that also updates global keys made flaky: the script itself
    on a single server, its pipeline (script + global commands) on a cluster."""
    if coord.store.cluster:
        return await flaky_pipelines(coord, monkeypatch, **kw)
    return flaky(coord, name, monkeypatch, **kw)


def flaky(coord: Coordinator, name: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> FlakyScript:
    store = coord.store
    wrapper = FlakyScript(store._scripts[name], store._run_script, **kw)
    monkeypatch.setattr(store, "_run_script", wrapper)
    return wrapper


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---- the policy ------------------------------------------------------------------------------


async def test_lasting_outage_is_a_clear_error_not_a_hang() -> None:
    # Given a coordinator whose server does not exist
    policy = RetryPolicy(attempts=3, deadline=1, initial=0.01)
    coord = Coordinator.from_url(f"redis://127.0.0.1:{_closed_port()}/0", retry=policy)
    try:
        # When it reads a session
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as failed:
            await coord.runner("s1")

        # Then it gives up quickly with a message naming the operation and the tries
        assert time.monotonic() - started < 2
        message = str(failed.value)
        assert "runner 's1'" in message
        assert "3 tries" in message
        assert isinstance(failed.value.__cause__, rexc.ConnectionError)
        assert isinstance(failed.value, RunstateError)

        # and so do writes
        with pytest.raises(RedisUnavailable, match="reserve 's1'"):
            await coord.execute("s1")
    finally:
        await coord.aclose()


async def test_transient_errors_are_retried() -> None:
    # Given an operation that fails twice with a connection error, then succeeds
    calls = 0

    async def operation() -> str:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise rexc.ConnectionError("connection reset")
        return "answer"

    # When it runs under a retry policy
    result = await FAST.call("op", operation)

    # Then its result is returned after three tries
    assert (result, calls) == ("answer", 3)


@pytest.mark.parametrize(
    "error", [rexc.TimeoutError("slow"), rexc.BusyLoadingError("loading")], ids=type
)
async def test_other_transient_errors_are_retried(error: Exception) -> None:
    calls = 0

    async def operation() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return calls

    assert await FAST.call("op", operation) == 2


async def test_non_transient_errors_are_not_retried() -> None:
    # Given an operation that Redis refuses
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")

    # When it runs under a retry policy
    # Then the error is raised at once, untouched
    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
        await FAST.call("op", operation)
    assert calls == 1


async def test_transient_errors_of_a_script_are_retried(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reservation (one round trip) whose first two tries fail before Redis
    script = await flaky_round_trip(coord, "reserve", monkeypatch, fail_before=2)

    # When a run is reserved
    result = await coord.try_reserve("s1")

    # Then it was reserved by the third call
    assert isinstance(result, Reserved)
    assert (script.calls, script.ran) == (3, 1)


async def test_non_transient_errors_of_a_script_are_not_retried(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reservation that Redis refuses
    script = await flaky_round_trip(
        coord,
        "reserve",
        monkeypatch,
        fail_before=5,
        error=rexc.ResponseError("ERR injected refusal"),
    )

    # When a run is reserved, Then the refusal is raised after one call
    with pytest.raises(rexc.ResponseError, match="injected refusal"):
        await coord.try_reserve("s1")
    assert script.calls == 1


# ---- retried writes are not written twice ----------------------------------------------------


async def test_reserve_script_retried_with_the_same_run_id_is_reserved(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a reservation whose answer was lost
    run_id = uuid.uuid4().hex
    args = [run_id, utcnow(), "", "", "", "local"]
    first = await coord.store._script("reserve", "s1", args)

    # When the same reservation (same run_id) is sent again
    again = await coord.store._script("reserve", "s1", args)

    # Then both are answered 'reserved', not AlreadyRunning
    assert first == ["reserved", run_id]
    assert again == ["reserved", run_id]
    # while another run_id is told the session is taken
    other = await coord.store._script(
        "reserve", "s1", [uuid.uuid4().hex, utcnow(), "", "", "", "local"]
    )
    assert other[:2] == ["already", run_id]
    assert (await redis.hgetall(coord.keys.runner("s1")))["run_id"] == run_id


async def test_reserve_whose_answer_was_lost_is_reserved(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reservation whose first answer is lost
    script = await flaky_round_trip(coord, "reserve", monkeypatch, fail_after=1)

    # When a run is reserved
    result = await coord.try_reserve("s1")

    # Then the caller is told it reserved the run, which the session holds
    assert isinstance(result, Reserved)
    assert script.ran == 2
    assert (await redis.hgetall(coord.keys.runner("s1")))["run_id"] == result.run_id


async def test_claim_whose_answer_was_lost_starts_the_run_once(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reserved run and a claim script whose first answer is lost
    reserved = await coord.try_reserve("s1")
    flaky(coord, "claim", monkeypatch, fail_after=1)

    # When a worker claims it
    handle = await claim(coord, "s1", reserved.run_id, "w1")

    # Then it owns attempt 1, and the run started once
    assert (handle.attempt, handle.seq) == (1, 1)
    assert await stream_types(redis, coord, "s1") == ["execution_started"]


async def test_emit_whose_answer_was_lost_is_written_once(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running run and an emit script whose first answer is lost
    handle = await start_run(coord, "s1")
    flaky(coord, "emit", monkeypatch, fail_after=1)

    # When it emits an event
    event_id = await handle.emit(Token(content="once"))

    # Then the event was written once, and the caller got its stream id
    written = await entries(redis, coord, "s1")
    assert [f["type"] for _, f in written] == ["execution_started", "token"]
    assert event_id == written[-1][0]
    assert handle.seq == 2


async def test_emit_batch_whose_answer_was_lost_returns_every_id(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running run and an emit script whose first answer is lost
    handle = await start_run(coord, "s1")
    flaky(coord, "emit", monkeypatch, fail_after=1)

    # When it emits a batch
    ids = await handle.emit_many([Token(content="a"), Token(content="b")])

    # Then the batch was written once, and the caller got one id per event
    written = await entries(redis, coord, "s1")
    assert [data_of(f).get("content") for _, f in written] == [None, "a", "b"]
    assert ids == [eid for eid, _ in written[1:]]


async def test_events_of_a_write_that_gave_up_are_written_once_later(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = Coordinator(redis, prefix=prefix, retry=RetryPolicy(attempts=2, initial=0.001))
    try:
        # Given a running run whose emits reach Redis but whose answers are all lost
        handle = await start_run(coord, "s1")
        script = flaky(coord, "emit", monkeypatch, fail_after=100)

        # When an emit gives up
        with pytest.raises(RedisUnavailable, match="emit 's1'"):
            await handle.emit(Token(content="a"))
        assert script.ran == 2

        # and Redis answers again, and the run emits its next event
        script.fail_after = 0
        await handle.emit(Token(content="b"))

        # Then both events are in the stream once, in order
        written = await entries(redis, coord, "s1")
        assert [data_of(f).get("content") for _, f in written] == [None, "a", "b"]
        assert [f["seq"] for _, f in written] == ["1", "2", "3"]
    finally:
        await coord.aclose()


async def test_events_of_a_write_that_never_reached_redis_are_sent_with_the_next(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = Coordinator(redis, prefix=prefix, retry=RetryPolicy(attempts=2, initial=0.001))
    try:
        # Given a running run whose emits do not reach Redis
        handle = await start_run(coord, "s1")
        script = flaky(coord, "emit", monkeypatch, fail_before=2)

        # When an emit gives up, then Redis comes back and the run completes
        with pytest.raises(RedisUnavailable):
            await handle.emit(Token(content="a"))
        assert script.ran == 0
        await handle.complete()

        # Then the event was written before the terminal event, once
        assert await stream_types(redis, coord, "s1") == ["execution_started", "token", "complete"]
    finally:
        await coord.aclose()


async def test_finish_whose_answer_was_lost_ends_the_run_once(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running run and a finish (script and index update, one round trip) whose first
    # answer is lost
    handle = await start_run(coord, "s1")
    script = await flaky_round_trip(coord, "finish", monkeypatch, fail_after=1)

    # When the run completes
    await handle.complete()

    # Then it completed with one complete event (the finish was sent again), and left the
    # active index
    assert script.calls >= 2
    assert await stream_types(redis, coord, "s1") == ["execution_started", "complete"]
    assert await redis.zscore(coord.keys.active, "s1") is None
    assert (await redis.hgetall(coord.keys.runner("s1")))["status"] == "completed"


async def test_cancel_whose_answer_was_lost_cancels_once(
    coord: Coordinator, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running run and a cancel script whose first answer is lost
    handle = await start_run(coord, "s1")
    flaky(coord, "cancel", monkeypatch, fail_after=1)

    # When it is cancelled
    result = await coord.cancel("s1")

    # Then the caller is told it cancelled the run, and there is one cancelled event
    assert result is True
    assert await stream_types(redis, coord, "s1") == ["execution_started", "cancelled"]
    assert await redis.get(coord.keys.cancel("s1")) == handle.run_id

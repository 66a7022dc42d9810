"""The Worker in-process, with small knobs: runs, errors, cancel, shutdown, spawn, schedule."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import workers
from runstate import Coordinator, Reserved, RunCancelled
from runstate.queue import Queue
from runstate.queue_records import RunOwner
from tests.agents import basic
from tests.agents.helpers import FAST, eventually, stream_events, stream_types, wait_status
from workers import RunContext, Worker

StartWorker = Callable[..., Awaitable[Worker]]


@contextlib.asynccontextmanager
async def running_workers(default: Coordinator) -> AsyncIterator[StartWorker]:
    """Start in-process workers; all are stopped (and awaited) on exit."""
    started: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(
        agent: Any = basic.agent, coordinator: Coordinator | None = None, **kw: Any
    ) -> Worker:
        worker = Worker(coordinator or default, agent, **{**FAST, **kw})
        task = asyncio.create_task(worker.run())
        started.append((worker, task))
        await asyncio.wait_for(worker.ready.wait(), 10)
        return worker

    try:
        yield start
    finally:
        for worker, _ in started:
            worker.stop("test over")
        for _, task in started:
            try:
                await asyncio.wait_for(task, 15)
            except BaseException:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise


@pytest.fixture
async def start_worker(coord: Coordinator) -> AsyncIterator[StartWorker]:
    async with running_workers(coord) as start:
        yield start


async def logged(caplog: pytest.LogCaptureFixture, line: str, limit: float = 10) -> None:
    """Wait for ``line`` in the log (a worker logs a run's end after writing it)."""
    await eventually(lambda: asyncio.sleep(0, line in caplog.text), limit=limit, what=repr(line))


def records(folder: Path) -> list[dict[str, Any]]:
    return basic.read_records(str(folder)) if folder.exists() else []


async def test_runs_complete_and_are_logged(
    coord: Coordinator, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers")
    # Given a worker
    await start_worker(concurrency=2)
    # When three runs are executed
    runs = {sid: await coord.execute(sid, {"steps": 3}) for sid in ("a", "b", "c")}
    # Then each completes with its events, started and ended in the log
    for sid, res in runs.items():
        state = await wait_status(coord, sid, "completed")
        assert state.run_id == res.run_id and state.attempt == 1
        assert await stream_types(coord, sid) == ["execution_started", *["token"] * 3, "complete"]
        assert f"run started: session={sid} run={res.run_id}" in caplog.text
        await logged(
            caplog, f"run ended: session={sid} run={res.run_id} attempt=1 outcome=completed"
        )
    assert await coord.client.xlen(coord.keys.queue) == 0
    assert await coord.store.active_sessions() == []


async def test_an_agent_that_raises_ends_in_error_and_the_worker_keeps_serving(
    coord: Coordinator, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    await start_worker(concurrency=1)
    # When a run raises
    await coord.execute("bad", {"kind": "boom", "message": "the model said no (42)"})
    # Then it ends as error with the exception's message, logged with its traceback
    state = await wait_status(coord, "bad", "error")
    assert state.error == "the model said no (42)"
    events = await stream_events(coord, "bad")
    assert [e["type"] for e in events] == ["execution_started", "token", "error"]
    assert events[-1]["message"] == "the model said no (42)"
    assert "Traceback" in caplog.text and "ValueError: the model said no (42)" in caplog.text
    # And the same worker runs the next one
    await coord.execute("good", {"steps": 1})
    await wait_status(coord, "good", "completed")


async def test_a_complete_event_that_cannot_be_written_ends_the_run_as_error(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await start_worker()
    await coord.execute("s1", {"kind": "bad_usage"})
    state = await wait_status(coord, "s1", "error")
    assert state.error is not None
    assert state.error.startswith("the run returned, but its complete event was refused")


async def test_a_cancel_interrupts_an_agent_waiting_in_ctx_sleep(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    # Given an agent waiting on a long call, through ctx.sleep / ctx.cancellable
    waiting = asyncio.Event()
    outcome: list[str] = []

    async def slow_agent(ctx: RunContext) -> None:
        waiting.set()
        try:
            await ctx.cancellable(ctx.sleep(3600))
        except RunCancelled:
            outcome.append("interrupted")
            raise

    await start_worker(slow_agent)
    await coord.execute("s1")
    await asyncio.wait_for(waiting.wait(), 10)
    # When the run is cancelled, the wait ends at once and the run ends cancelled
    assert await coord.cancel("s1", "user pressed stop")
    await eventually(lambda: asyncio.sleep(0, outcome), what="the agent to be interrupted")
    assert outcome == ["interrupted"]
    await wait_status(coord, "s1", "cancelled")
    events = await stream_events(coord, "s1")
    assert events[-1]["type"] == "cancelled" and events[-1]["message"] == "user pressed stop"


async def test_cancel_stops_the_run_at_its_next_safe_point(
    coord: Coordinator, start_worker: StartWorker, tmp_path: Path
) -> None:
    await start_worker()
    res = await coord.execute("s1", {"steps": 500, "delay": 0.01, "record_dir": str(tmp_path)})
    await wait_status(coord, "s1", "running")
    await eventually(lambda: stream_types(coord, "s1"), lambda t: "token" in t, what="a token")
    # When the run is cancelled
    assert await coord.cancel("s1", "user pressed stop")
    # Then the agent sees it at a safe point, and nothing follows the cancelled event
    await eventually(
        lambda: asyncio.sleep(0, records(tmp_path)),
        lambda rs: any(r["what"] == "cancelled" for r in rs),
        what="the agent to see the cancel",
    )
    events = await stream_events(coord, "s1")
    assert events[-1]["type"] == "cancelled" and events[-1]["message"] == "user pressed stop"
    state = await coord.runner("s1")
    assert state is not None and state.status == "cancelled" and state.run_id == res.run_id
    # And the session takes a new run at once
    await coord.execute("s1", {"steps": 1})
    await wait_status(coord, "s1", "completed")


@pytest.mark.parametrize("kind", ["steps", "quiet"])
async def test_a_run_whose_attempt_was_taken_over_stops_as_superseded(
    coord: Coordinator, start_worker: StartWorker, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # A run that emits is stopped by the fence; one that only checkpoints, by the heartbeat
    caplog.set_level(logging.INFO, logger="workers")
    worker = await start_worker(concurrency=2)
    res = await coord.execute("s1", {"kind": kind, "steps": 3000, "delay": 0.01})
    await wait_status(coord, "s1", "running")
    # When a reaper decides the attempt is lost (as if the worker had stalled) and requeues it
    outcome = await Queue(coord.store).recover(
        "s1",
        res.run_id,
        status="running",
        attempt=1,
        worker=worker.id,
        max_attempts=3,
        message="lost",
    )
    assert outcome == "requeued"
    # Then the old attempt stops long before its 30 s of work, writing nothing more
    await logged(caplog, f"run={res.run_id} attempt=1 outcome=superseded", limit=5)
    # And attempt 2 runs in its place
    state = await eventually(
        lambda: coord.runner("s1"),
        lambda s: s is not None and (s.status, s.attempt) == ("running", 2),
        what="attempt 2",
    )
    assert state is not None and state.worker == worker.id
    assert await coord.cancel("s1")
    types = await stream_types(coord, "s1")
    assert types.count("execution_started") == 2 and "error" not in types


async def test_a_heartbeat_that_sees_the_runs_own_end_does_not_stop_it(
    coord: Coordinator, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a run in flight on a worker
    worker = await start_worker()
    res = await coord.execute("s1", {"kind": "quiet", "steps": 3000, "delay": 0.01})
    running = await eventually(
        lambda: asyncio.sleep(0, worker._running.get(("s1", res.run_id))), what="the run"
    )
    assert running is not None
    # When a heartbeat reads the run as ended by this very attempt (its finish landed while
    # the beat was reading, before the worker marked the run ended)
    worker._check_owners([RunOwner("s1", res.run_id, res.run_id, "completed", 1, worker.id)])
    # Then that is no takeover: nothing is logged and the run is not stopped
    assert "taken over" not in caplog.text
    assert not running.handle.token.cancel_called
    # While an end written by another worker is one
    worker._check_owners([RunOwner("s1", res.run_id, res.run_id, "completed", 1, "other")])
    assert "taken over" in caplog.text and running.handle.token.cancel_called


async def test_stop_lets_runs_in_flight_finish_within_the_grace_period(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    worker = await start_worker(shutdown_grace=10)
    await coord.execute("s1", {"steps": 10, "delay": 0.03})
    await wait_status(coord, "s1", "running")
    worker.stop()
    await eventually(lambda: asyncio.sleep(0, worker.runs_in_flight), lambda r: not r, what="drain")
    state = await wait_status(coord, "s1", "completed")
    assert state.attempt == 1
    queue = Queue(coord.store)
    await eventually(queue.worker_deadlines, lambda d: worker.id not in d, what="unregistered")


@pytest.mark.parametrize("mode", ["requeue", "error"])
async def test_runs_still_running_after_the_grace_period(
    coord: Coordinator, start_worker: StartWorker, mode: str
) -> None:
    # Given a run that checkpoints and one that never reaches a safe point
    worker = await start_worker(shutdown_grace=0.1, shutdown_cancel_wait=0.3, shutdown_mode=mode)
    polite = await coord.execute("polite", {"steps": 1000, "delay": 0.01})
    stubborn = await coord.execute("stubborn", {"kind": "forever"})
    await wait_status(coord, "polite", "running")
    await wait_status(coord, "stubborn", "running")
    # (running in Redis as soon as claimed; in flight once the worker has the claim's reply)
    await eventually(
        lambda: asyncio.sleep(0, len(worker.runs_in_flight)), lambda n: n == 2, what="in flight"
    )
    # When the worker stops
    worker.stop()
    await eventually(lambda: asyncio.sleep(0, worker.runs_in_flight), lambda r: not r, what="drain")
    # Then both are requeued as a new attempt, or end as error naming the shutdown
    queue = Queue(coord.store)
    for sid, res in (("polite", polite), ("stubborn", stubborn)):
        state = await coord.runner(sid)
        assert state is not None and state.run_id == res.run_id
        if mode == "requeue":
            assert state.status == "pending" and state.attempt == 1
            assert (sid, res.run_id) in (await queue.queued_runs() or set())
        else:
            assert state.status == "error"
            assert state.error is not None
            assert state.error.startswith(f"worker shutdown timeout: worker {worker.id!r}")


async def test_spawned_children_are_reported_on_the_parent_stream(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await start_worker(concurrency=4)
    # When a parent spawns two children and waits for them
    payload = {"kind": "spawn", "children": ["kid-1", "kid-2"], "child_payload": {"steps": 2}}
    parent = await coord.execute("parent", payload)
    state = await wait_status(coord, "parent", "completed", "error")
    assert state.status == "completed", state.error
    # Then the children ran linked to it
    for kid in ("kid-1", "kid-2"):
        child = await coord.runner(kid)
        assert child is not None and child.status == "completed"
        assert child.parent == f"parent {parent.run_id}"
    # And its stream tells their start and end; the replay keeps the newest per child
    events = await stream_events(coord, "parent")
    started = [e["child_session_id"] for e in events if e["type"] == "sub_agent_started"]
    done = {
        e["child_session_id"]: e["status"] for e in events if e["type"] == "sub_agent_completed"
    }
    assert started == ["kid-1", "kid-2"]
    assert done == {"kid-1": "completed", "kid-2": "completed"}
    assert [e["content"] for e in events if e["type"] == "token"] == ["completed completed"]
    critical = [(e.type, getattr(e, "child_session_id", "")) for e in state.last_critical_events]
    assert sorted(critical) == [("sub_agent_completed", "kid-1"), ("sub_agent_completed", "kid-2")]


async def test_spawning_into_a_busy_session_is_a_clear_error(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    busy = await coord.try_reserve("busy")
    await start_worker()
    await coord.execute("parent", {"kind": "spawn", "children": ["busy"]})
    state = await wait_status(coord, "parent", "error")
    assert state.error == (
        f"cannot spawn a child in session 'busy': it already has an active run "
        f"{busy.run_id!r}; spawn into a session with no active run"
    )


async def test_a_child_spawned_as_its_parent_is_cancelled_is_cancelled_too(
    coord: Coordinator,
) -> None:
    # Given a run whose cancel lands after its spawn reserved a child, before it was linked
    res = await coord.execute("parent", None)
    handle = await coord.claim("parent", res.run_id, "w1")
    ctx = RunContext(coord, Queue(coord.store), handle, worker_id="w1")
    real_execute = coord.execute

    async def execute_then_cancel(*args: Any, **kwargs: Any) -> Any:
        result = await real_execute(*args, **kwargs)
        # the cancel's script runs now; its nudge to our token has not arrived yet
        await coord.store.cancel("parent", "cancelled by user")
        return result

    coord.execute = execute_then_cancel  # type: ignore[method-assign]
    try:
        # When the spawn goes on
        with pytest.raises(RunCancelled):
            await ctx.spawn("kid", {"steps": 1})
    finally:
        coord.execute = real_execute  # type: ignore[method-assign]
        coord.release(handle)
    # Then the child is cancelled rather than left running without a parent
    kid = await coord.runner("kid")
    assert kid is not None and kid.status == "cancelled"
    assert await coord.client.smembers(coord.keys.children("parent")) == set()


async def test_cancelling_a_parent_cancels_its_children(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await start_worker(concurrency=4)
    payload = {"kind": "spawn", "children": ["kid"], "child_payload": {"steps": 1000}}
    await coord.execute("parent", payload)
    await wait_status(coord, "kid", "running")
    # (the kid is queued before it is linked to the parent: it may run before the link is)
    await eventually(
        lambda: stream_types(coord, "parent"), lambda t: "sub_agent_started" in t, what="linked"
    )
    # When the parent is cancelled
    assert await coord.cancel("parent")
    # Then the child is cancelled too, saying why, and both stop
    kid = await wait_status(coord, "kid", "cancelled")
    events = await stream_events(coord, "kid")
    assert events[-1]["type"] == "cancelled"
    assert events[-1]["message"] == "parent 'parent' was cancelled"
    assert kid.status == "cancelled"
    parent = await coord.runner("parent")
    assert parent is not None and parent.status == "cancelled"


async def test_a_scheduled_run_waits_pending_then_runs(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await start_worker()
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    res = await coord.execute("later", {"steps": 1}, at=at)
    state = await coord.runner("later")
    assert state is not None and state.status == "pending"
    assert await coord.client.zscore(coord.keys.schedule, f"later {res.run_id}") is not None
    await wait_status(coord, "later", "completed")
    started = datetime.fromisoformat(
        await coord.client.hget(coord.keys.runner("later"), "claimed_at")
    )
    assert started >= at


async def test_a_cancelled_scheduled_run_never_runs(coord: Coordinator) -> None:
    res = await coord.execute("later", {"steps": 1}, delay=0.05)
    assert await coord.cancel("later")
    assert await coord.client.zcard(coord.keys.schedule) == 0
    await asyncio.sleep(0.06)  # past its due time: nothing is left to dispatch
    assert await Queue(coord.store).move_due(10**15) == []
    state = await coord.runner("later")
    assert state is not None and state.status == "cancelled" and state.run_id == res.run_id


async def test_a_delayed_run_is_dispatched_once_with_three_workers(
    real_redis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # Given three workers, each with its own connection
        coords = [
            await stack.enter_async_context(Coordinator.from_url(redis_url, prefix=prefix))
            for _ in range(3)
        ]
        start = await stack.enter_async_context(running_workers(coords[0]))
        for c in coords:
            await start(coordinator=c, schedule_interval=0.01)
        coord = coords[0]
        # When a run is executed with a delay
        payload = {"steps": 1, "record_dir": str(tmp_path)}
        res = await coord.execute("later", payload, delay=0.3)
        assert isinstance(res, Reserved)
        state = await coord.runner("later")
        assert state is not None and state.status == "pending"
        # Then it runs exactly once: one queue entry ever, one claim, one execution
        await wait_status(coord, "later", "completed")
        info = await real_redis.xinfo_stream(coord.keys.queue)
        assert info["entries-added"] == 1
        assert (await stream_types(coord, "later")).count("execution_started") == 1
        assert [r["what"] for r in records(tmp_path)] == ["start", "end"]


async def test_junk_queue_entries_are_dropped(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await Queue(coord.store).ensure_group()
    await coord.client.xadd(coord.keys.queue, {"session": "not a session!", "run": "x"})
    await coord.client.xadd(coord.keys.queue, {"garbage": "1"})
    await start_worker()
    await coord.execute("ok", {"steps": 1})
    await wait_status(coord, "ok", "completed")
    await eventually(lambda: coord.client.xlen(coord.keys.queue), lambda n: n == 0, what="empty")


async def test_concurrency_is_respected(
    coord: Coordinator, start_worker: StartWorker, tmp_path: Path
) -> None:
    await start_worker(concurrency=2)
    for i in range(5):
        await coord.execute(f"s{i}", {"steps": 3, "delay": 0.02, "record_dir": str(tmp_path)})
    for i in range(5):
        await wait_status(coord, f"s{i}", "completed")
    in_flight = peak = 0
    for r in records(tmp_path):
        in_flight += 1 if r["what"] == "start" else -1
        peak = max(peak, in_flight)
    assert peak == 2


async def test_the_demo_agent_streams_like_an_llm_agent(
    coord: Coordinator, start_worker: StartWorker
) -> None:
    await start_worker()
    payload = {"kind": "demo", "rounds": 2, "token_delay": 0, "tool_delay": 0, "prompt": "tides"}
    await coord.execute("demo", payload)
    state = await wait_status(coord, "demo", "completed")
    types = await stream_types(coord, "demo")
    for expected in (
        "session_title_updated",
        "runner_progress",
        "reasoning_token",
        "token",
        "tool_start",
        "tool_lifecycle",
        "tool_complete",
        "token_budget_updated",
        "task_list_updated",
        "task_list_completed",
    ):
        assert expected in types
    assert types[0] == "execution_started" and types[-1] == "complete"
    assert state.round_count == 2 and state.last_tool_phase == "finished"
    complete = (await stream_events(coord, "demo"))[-1]
    assert complete["usage"]["total_tokens"] > 0
    with pytest.raises(ValueError, match=r"payload\['rounds'\] must be a number >= 0, got 'x'"):
        await workers.demo_agent.agent(_FakeCtx({"rounds": "x"}))  # type: ignore[arg-type]


class _FakeCtx:
    def __init__(self, payload: Any) -> None:
        self.payload = payload


async def test_block_time_must_stay_below_the_socket_timeout(redis_url: str, prefix: str) -> None:
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        with pytest.raises(ValueError, match=r"block_ms \(10000\) must be below the client's"):
            Worker(coord, basic.agent, block_ms=10_000)
        assert Worker(coord, basic.agent, block_ms=9_000).block_ms == 9_000


def test_load_agent_accepts_async_callables() -> None:
    class Agent:
        async def __call__(self, ctx: RunContext) -> None:
            return None

    instance = Agent()
    sys.modules[__name__].an_agent = instance  # type: ignore[attr-defined]
    try:
        assert workers.load_agent(f"{__name__}:an_agent") is instance
        assert workers.load_agent("workers.demo_agent:agent") is workers.demo_agent.agent
    finally:
        del sys.modules[__name__].an_agent  # type: ignore[attr-defined]
    with pytest.raises(workers.AppPathError, match="invalid app 'x:'"):
        workers.load_agent("x:")


async def test_bad_worker_settings_are_refused(coord: Coordinator) -> None:
    with pytest.raises(ValueError, match="concurrency must be an integer > 0, got 0"):
        Worker(coord, basic.agent, concurrency=0)
    with pytest.raises(
        ValueError, match="shutdown_mode must be one of 'requeue', 'error', got 'x'"
    ):
        Worker(coord, basic.agent, shutdown_mode="x")  # type: ignore[arg-type]
    message = r"lost_after \(5s\) must be longer than the heartbeat interval \(5s\)"
    with pytest.raises(ValueError, match=message):
        Worker(coord, basic.agent, heartbeat_interval=5, lost_after=5)
    with pytest.raises(ValueError, match="invalid worker id 'a b'"):
        Worker(coord, basic.agent, worker_id="a b")


def test_exported_names() -> None:
    assert workers.__all__ == sorted(workers.__all__)
    public = {
        name
        for name, value in vars(workers).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(workers.__all__) == public


async def test_two_entries_for_one_run_read_together_run_it_once(
    coord: Coordinator, start_worker: StartWorker, tmp_path: Path
) -> None:
    # Given one run with two queue entries (a retried dispatch, a reaper's re-dispatch),
    # both waiting before the worker starts, so that one read returns them together
    res = await coord.execute("dup", {"steps": 5, "delay": 0.02, "record_dir": str(tmp_path)})
    assert isinstance(res, Reserved)
    await coord.client.xadd(coord.keys.queue, {"session": "dup", "run": res.run_id})
    # When a worker with room for both reads them
    await start_worker(concurrency=4)
    state = await wait_status(coord, "dup", "completed")
    # Then the run was started once, as one attempt, and both entries were consumed
    starts = [r for r in records(tmp_path) if r["what"] == "start"]
    assert len(starts) == 1 and state.attempt == 1
    assert (await stream_types(coord, "dup")).count("execution_started") == 1
    await eventually(lambda: coord.client.xlen(coord.keys.queue), lambda n: n == 0)

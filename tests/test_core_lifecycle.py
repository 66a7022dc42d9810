"""The run lifecycle (DESIGN §2, §5, §7): reserve, claim, emit, finish, retention.

Every test that takes ``coord`` or ``redis`` runs against fakeredis and against a real server.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import multiprocessing
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

import runstate
from runstate import (
    AlreadyRunning,
    Coordinator,
    Reserved,
    RunnerState,
    RunStatus,
    RunSuperseded,
    StaleRunError,
)
from runstate.events import (
    Complete,
    RunnerProgress,
    SubAgentCompleted,
    SubAgentStarted,
    TaskListUpdated,
    Token,
    TokenBudgetUpdated,
    ToolComplete,
    ToolError,
    ToolLifecycle,
    ToolStart,
)
from tests.helpers import (
    claim,
    data_of,
    entries,
    eventually,
    next_event,
    reserve_in_process,
    settle,
    start_run,
    stream_types,
    take,
    within,
)


def _utc(value: str) -> datetime:
    """Parse an ISO-8601 string from a runner hash and check it is UTC."""
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), value
    return parsed


# ---- reserve ---------------------------------------------------------------------------------


async def test_reserve_starts_a_pending_generation(coord: Coordinator, redis: Redis) -> None:
    # Given an unused session
    # When a run is reserved with a payload
    result = await coord.try_reserve("s1", {"question": "why?"})

    # Then it is a fresh pending run with a uuid4-hex run_id, readable in HGETALL
    assert isinstance(result, Reserved)
    assert result.session_id == "s1"
    assert len(result.run_id) == 32
    int(result.run_id, 16)
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert fields["run_id"] == result.run_id
    assert fields["status"] == "pending"
    assert fields["round_count"] == "0"
    _utc(fields["started_at"])
    state = await coord.runner("s1")
    assert state is not None
    assert state.status is RunStatus.PENDING
    assert state.run_id == result.run_id
    assert [s.run_id for s in await coord.active_runs()] == [result.run_id]


async def test_reserve_of_an_active_session_changes_nothing(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a session with a pending run
    first = await coord.try_reserve("s1")
    before = await redis.hgetall(coord.keys.runner("s1"))

    # When it is reserved again, by execute or try_reserve
    again = await coord.execute("s1", {"other": True})
    again2 = await coord.try_reserve("s1")

    # Then both answers name the active run and nothing changed
    assert again == AlreadyRunning(session_id="s1", run_id=first.run_id)
    assert again2 == AlreadyRunning(session_id="s1", run_id=first.run_id)
    assert await redis.hgetall(coord.keys.runner("s1")) == before
    assert await redis.xlen(coord.keys.queue) == 0


@pytest.mark.parametrize("how", ["try_reserve", "execute"])
async def test_fifty_concurrent_reservers_have_one_winner(
    coord: Coordinator, redis: Redis, how: str
) -> None:
    # Given 50 concurrent reservers of one session
    reserve = getattr(coord, how)

    # When they all reserve at once
    results = await asyncio.gather(*(reserve("race") for _ in range(50)))

    # Then exactly one wins and every loser names the winner's run
    winners = [r for r in results if isinstance(r, Reserved)]
    losers = [r for r in results if isinstance(r, AlreadyRunning)]
    assert len(winners) == 1
    assert len(losers) == 49
    assert {r.run_id for r in losers} == {winners[0].run_id}
    state = await coord.runner("race")
    assert state is not None and state.run_id == winners[0].run_id
    # and only the winner was handed to the workers
    assert await redis.xlen(coord.keys.queue) == (1 if how == "execute" else 0)


async def test_fifty_reserving_processes_have_one_winner(
    redis_url: str, real_redis: Redis, prefix: str
) -> None:
    # Given 50 OS processes, each with its own Coordinator and connection, held at a barrier.
    # (forkserver: every child is forked from one clean, single-threaded server that imported
    # runstate once, so 50 interpreters start in well under a second.)
    n = 50
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["runstate", "tests.helpers"])
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=reserve_in_process,
            args=(
                redis_url,
                prefix,
                "race",
                "execute" if i % 2 else "try_reserve",
                barrier,
                results,
            ),
        )
        for i in range(n)
    ]
    try:
        for proc in procs:
            proc.start()

        # When they are released together and all reserve the same session
        answers = [await asyncio.to_thread(results.get, True, 30) for _ in range(n)]
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5)
        results.close()
        results.join_thread()

    # Then exactly one process won and every other one names the winner's run_id
    assert [a for a in answers if a[1] == "error"] == []
    assert all(proc.exitcode == 0 for proc in procs)
    assert len({pid for pid, _, _ in answers}) == n
    winners = [run_id for _, kind, run_id in answers if kind == "reserved"]
    losers = [run_id for _, kind, run_id in answers if kind == "already"]
    assert len(winners) == 1
    assert len(losers) == n - 1
    assert set(losers) == {winners[0]}
    coord = Coordinator(real_redis, prefix=prefix)
    try:
        state = await coord.runner("race")
        assert state is not None and state.run_id == winners[0]
        assert state.status is RunStatus.PENDING
        assert await real_redis.xlen(coord.keys.queue) <= 1
    finally:
        await coord.aclose()


async def test_execute_dispatches_now_or_on_schedule(coord: Coordinator, redis: Redis) -> None:
    # Given three sessions
    at = datetime.now(UTC) + timedelta(hours=1)

    # When one run is executed now, one after a delay and one at a given time
    now = await coord.execute("now", {"n": 1})
    later = await coord.execute("later", delay=30)
    fixed = await coord.execute("fixed", at=at)

    # Then only the first is on the queue; the others are scheduled at their due time
    queued = await redis.xrange(coord.keys.queue)
    assert [(f["session"], f["run"]) for _, f in queued] == [("now", now.run_id)]
    due_later = await redis.zscore(coord.keys.schedule, f"later {later.run_id}")
    due_fixed = await redis.zscore(coord.keys.schedule, f"fixed {fixed.run_id}")
    now_ms = datetime.now(UTC).timestamp() * 1000
    assert due_later is not None and now_ms + 25_000 < due_later <= now_ms + 30_000
    assert due_fixed == int(at.timestamp() * 1000)
    assert {s.run_id for s in await coord.active_runs()} == {
        now.run_id,
        later.run_id,
        fixed.run_id,
    }


# ---- claim -----------------------------------------------------------------------------------


async def test_claim_starts_the_run_with_execution_started(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a reserved run with a payload
    reserved = await coord.try_reserve("s1", {"q": [1, 2]})

    # When a worker claims it
    handle = await claim(coord, "s1", reserved.run_id, "worker-1")

    # Then it is running for that worker, attempt 1, and its first event is execution_started
    assert handle.run_id == reserved.run_id
    assert handle.attempt == 1
    assert handle.seq == 1
    assert handle.payload == {"q": [1, 2]}
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert fields["status"] == "running"
    assert fields["worker"] == "worker-1"
    assert fields["attempt"] == "1"
    [(_, entry)] = await entries(redis, coord, "s1")
    assert entry["type"] == "execution_started"
    assert entry["run"] == reserved.run_id
    assert entry["seq"] == "1"
    assert data_of(entry) == {
        "type": "execution_started",
        "run_id": reserved.run_id,
        "attempt": 1,
    }


async def test_claim_of_a_run_that_is_not_current_is_refused(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a session whose current run is pending
    reserved = await coord.try_reserve("s1")
    before = await redis.hgetall(coord.keys.runner("s1"))

    # When a worker claims another run_id of that session
    with pytest.raises(RunSuperseded) as refused:
        await coord.claim("s1", "f" * 32, "w1")

    # Then it is told which run owns the session, and nothing changed
    assert refused.value.current_run_id == reserved.run_id
    assert await redis.hgetall(coord.keys.runner("s1")) == before
    assert await redis.xlen(coord.keys.events("s1")) == 0


async def test_second_worker_cannot_claim_a_claimed_run(coord: Coordinator, redis: Redis) -> None:
    # Given a run claimed by worker w1
    handle = await start_run(coord, "s1", worker="w1")

    # When worker w2 claims the same run
    with pytest.raises(StaleRunError):
        await coord.claim("s1", handle.run_id, "w2")

    # Then w1 still owns it and the run started once
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert (fields["worker"], fields["attempt"], fields["status"]) == ("w1", "1", "running")
    assert await stream_types(redis, coord, "s1") == ["execution_started"]


async def test_claim_retried_by_the_same_worker_is_the_same_attempt(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run claimed by worker w1
    first = await start_run(coord, "s1", worker="w1")

    # When w1 claims it again (its first answer was lost)
    again = await claim(coord, "s1", first.run_id, "w1")

    # Then it gets the same attempt and position, and no second execution_started
    assert (again.attempt, again.seq) == (first.attempt, first.seq) == (1, 1)
    assert await stream_types(redis, coord, "s1") == ["execution_started"]
    assert (await redis.hgetall(coord.keys.runner("s1")))["attempt"] == "1"


# ---- stale generations -----------------------------------------------------------------------


async def test_superseded_generation_never_writes_into_the_new_one(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run that was claimed, cancelled, and replaced by a new claimed run with events
    old = await start_run(coord, "s1", worker="w-old")
    await old.emit(Token(content="old"))
    assert await coord.cancel("s1")
    new = await start_run(coord, "s1", worker="w-new")
    await new.emit_many([Token(content="a"), TaskListUpdated(task_list=["x"])])
    runner_before = await redis.hgetall(coord.keys.runner("s1"))
    stream_before = await entries(redis, coord, "s1")
    critical_before = await redis.lrange(coord.keys.critical("s1"), 0, -1)

    # When the old run's handle writes: emit, complete, fail
    for write in (
        lambda: old.emit(Token(content="late")),
        lambda: old.emit_many([Token(content="late"), Token(content="later")]),
        lambda: old.complete(),
        lambda: old.fail("late failure"),
    ):
        # Then every write is refused by the fence ...
        with pytest.raises(StaleRunError):
            await write()

    # ... and the new run's hash, stream and critical list are untouched
    assert await redis.hgetall(coord.keys.runner("s1")) == runner_before
    assert await entries(redis, coord, "s1") == stream_before
    assert await redis.lrange(coord.keys.critical("s1"), 0, -1) == critical_before
    assert runner_before["run_id"] == new.run_id
    assert runner_before["status"] == "running"
    assert runner_before["seq"] == "3"
    assert [f["run"] for _, f in stream_before[-3:]] == [new.run_id] * 3
    # and the new run goes on
    await new.emit(Token(content="b"))
    assert (await redis.hgetall(coord.keys.runner("s1")))["seq"] == "4"


async def test_finished_run_replaced_by_a_new_one_is_superseded(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run that completed, then a new run of the session that is running
    old = await start_run(coord, "s1")
    await old.complete()
    new = await start_run(coord, "s1", worker="w2")
    count = await redis.xlen(coord.keys.events("s1"))

    # When the old handle writes again
    for write in (
        lambda: old.emit(Token(content="late")),
        lambda: old.complete(),
        lambda: old.fail("late"),
    ):
        # Then it is told it was superseded, naming the run that owns the session
        with pytest.raises(RunSuperseded) as refused:
            await write()
        assert refused.value.current_run_id == new.run_id
        assert refused.value.status == "running"
        assert new.run_id in str(refused.value)

    # and nothing was written
    assert await redis.xlen(coord.keys.events("s1")) == count
    assert old.cancelled  # the refused writer's token tells its code to stop


async def test_emit_of_another_attempt_is_refused(coord: Coordinator, redis: Redis) -> None:
    # Given a running run (attempt 1)
    handle = await start_run(coord, "s1")

    # When a writer with another attempt number of the same run emits
    with pytest.raises(RunSuperseded):
        await coord.store.emit("s1", handle.run_id, 2, 2, coord.store.encode([Token(content="x")]))

    # Then nothing was written
    assert await redis.xlen(coord.keys.events("s1")) == 1


# ---- emit ------------------------------------------------------------------------------------


async def test_emit_is_idempotent_on_run_and_sequence_number(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run whose last event is execution_started (seq 1)
    handle = await start_run(coord, "s1")
    store, key = coord.store, coord.keys.events("s1")
    batch = store.encode([Token(content="a"), Token(content="b")])

    # When a batch starting at seq 2 is written twice
    first = await store.emit("s1", handle.run_id, handle.attempt, 2, batch)
    second = await store.emit("s1", handle.run_id, handle.attempt, 2, batch)

    # Then it was written once; the retry got the same ids back
    assert len(first) == 2
    assert second == first
    assert await redis.xlen(key) == 3
    assert (await redis.hgetall(coord.keys.runner("s1")))["seq"] == "3"

    # When a batch overlaps what is written (seqs 3, 4)
    tail = await store.emit(
        "s1",
        handle.run_id,
        handle.attempt,
        3,
        store.encode([Token(content="b"), Token(content="c")]),
    )

    # Then only its new tail is written, and both ids are returned
    assert len(tail) == 2
    written = await entries(redis, coord, "s1")
    assert [data_of(f).get("content") for _, f in written] == [None, "a", "b", "c"]
    assert [f["seq"] for _, f in written] == ["1", "2", "3", "4"]
    assert [eid for eid, _ in written[-2:]] == tail

    # When a batch starts beyond the next sequence number
    with pytest.raises(ValueError, match="seq 6, expected 5"):
        await store.emit("s1", handle.run_id, handle.attempt, 6, store.encode([Token(content="z")]))

    # Then nothing was written
    assert await redis.xlen(key) == 4


async def test_emit_returns_the_stream_ids_users_see(coord: Coordinator, redis: Redis) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits one event, then a batch
    one = await handle.emit(Token(content="a"))
    many = await handle.emit_many([Token(content="b"), {"type": "token", "content": "c"}])

    # Then the returned ids are the entries' stream ids, in order, and seq follows
    ids = [eid for eid, _ in await entries(redis, coord, "s1")]
    assert ids[1:] == [one, *many]
    assert handle.seq == 4


async def test_critical_list_keeps_the_last_32_and_replays_them_first(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run that emitted 40 distinct task lists and two budget updates
    handle = await start_run(coord, "s1")
    lists = [TaskListUpdated(task_list=[{"step": i, "done": i % 2 == 0}]) for i in range(40)]
    await handle.emit_many(lists[:20])
    await handle.emit(TokenBudgetUpdated(usage={"tokens": 1}))
    await handle.emit_many(lists[20:])
    await handle.emit(TokenBudgetUpdated(usage={"tokens": 2}))

    # Then the critical list holds the last 32, oldest first
    raw = await redis.lrange(coord.keys.critical("s1"), 0, -1)
    assert [json.loads(r)["task_list"][0]["step"] for r in raw] == list(range(8, 40))
    state = await coord.runner("s1")
    assert state is not None
    assert state.last_critical_events == lists[8:]
    assert state.last_budget_event == TokenBudgetUpdated(usage={"tokens": 2})

    # When a new subscriber arrives
    async with contextlib.aclosing(coord.subscribe("s1")) as events:
        replayed = await take(events, 33)

        # Then it gets the 32 critical events oldest first, then the last budget event ...
        assert all(item.id is None for item in replayed)
        assert all(item.run_id == handle.run_id for item in replayed)
        assert [item.event for item in replayed[:32]] == lists[8:]
        assert replayed[32].event == TokenBudgetUpdated(usage={"tokens": 2})

        # ... then live events, with their stream ids
        live_id = await handle.emit(Token(content="live"))
        live = await next_event(events)
        assert live.id == live_id
        assert live.event == Token(content="live")
    await settle(coord)


async def test_sub_agent_events_keep_the_newest_per_child(coord: Coordinator, redis: Redis) -> None:
    # Given a run that started two children
    handle = await start_run(coord, "parent")
    await handle.emit(SubAgentStarted(child_session_id="c1", child_run_id="r1"))
    await handle.emit(SubAgentStarted(child_session_id="c2", child_run_id="r2"))

    # When the first child completes
    await handle.emit(SubAgentCompleted(child_session_id="c1", child_run_id="r1", status="done"))

    # Then the critical list keeps only the newest event of each child, oldest first
    state = await coord.runner("parent")
    assert state is not None
    assert state.last_critical_events == [
        SubAgentStarted(child_session_id="c2", child_run_id="r2"),
        SubAgentCompleted(child_session_id="c1", child_run_id="r1", status="done"),
    ]
    # while the stream keeps all three
    assert (await stream_types(redis, coord, "parent"))[1:] == [
        "sub_agent_started",
        "sub_agent_started",
        "sub_agent_completed",
    ]


async def test_stream_is_capped_near_1000(coord: Coordinator, redis: Redis) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it emits 2500 events
    for start in range(0, 2500, 500):
        await handle.emit_many([Token(content=str(i)) for i in range(start, start + 500)])

    # Then the stream was trimmed to about 1000 entries, keeping the newest
    length = await redis.xlen(coord.keys.events("s1"))
    assert 1000 <= length <= 1100
    [(_, last)] = await redis.xrevrange(coord.keys.events("s1"), count=1)
    assert data_of(last)["content"] == "2499"
    assert last["seq"] == "2501"
    assert handle.seq == 2501


async def test_diagnostics_follow_tool_progress_and_budget_events(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")
    runner_key = coord.keys.runner("s1")

    async def diag() -> tuple[str | None, str | None]:
        fields = await redis.hgetall(runner_key)
        return fields.get("last_tool_name"), fields.get("last_tool_phase")

    # When tool events arrive, the last tool name and phase follow them
    await handle.emit(ToolStart(tool_call_id="c1", tool_name="search", arguments={"q": "x"}))
    assert await diag() == ("search", "begin")
    await handle.emit(ToolComplete(tool_call_id="c1", result={"hits": 3}))
    assert await diag() == ("search", "finished")
    await handle.emit(ToolError(tool_call_id="c2", error="timeout"))
    assert await diag() == ("search", "error")
    await handle.emit(ToolLifecycle(tool_call_id="c3", tool_name="fetch", phase="begin"))
    assert await diag() == ("fetch", "begin")

    # When progress and budget events arrive
    await handle.emit(RunnerProgress(round_count=3))
    await handle.emit(TokenBudgetUpdated(usage={"input": 10, "output": 2}))
    await handle.emit(Token(content="not a tool"))

    # Then the hash holds the diagnostics, times as ISO-8601 UTC strings
    fields = await redis.hgetall(runner_key)
    assert (fields["last_tool_name"], fields["last_tool_phase"]) == ("fetch", "begin")
    assert fields["round_count"] == "3"
    assert json.loads(fields["last_budget_event"]) == {
        "type": "token_budget_updated",
        "usage": {"input": 10, "output": 2},
    }
    started, last = _utc(fields["started_at"]), _utc(fields["last_event_at"])
    assert started <= last <= datetime.now(UTC) + timedelta(seconds=5)
    state = await coord.runner("s1")
    assert state is not None
    assert (state.last_tool_name, state.last_tool_phase, state.round_count) == ("fetch", "begin", 3)
    assert state.last_budget_event == TokenBudgetUpdated(usage={"input": 10, "output": 2})
    assert state.last_event_at is not None and state.last_event_at.utcoffset() == timedelta(0)

    # And every stream entry carries run, seq, type and data
    written = await entries(redis, coord, "s1")
    assert len(written) == 8
    for seq, (_, entry) in enumerate(written, start=1):
        assert set(entry) == {"run", "seq", "type", "data"}
        assert entry["run"] == handle.run_id
        assert entry["seq"] == str(seq)
        assert entry["type"] == data_of(entry)["type"]


# ---- finish ----------------------------------------------------------------------------------


async def test_complete_ends_with_a_complete_event(coord: Coordinator, redis: Redis) -> None:
    # Given a running run that emitted an event
    handle = await start_run(coord, "s1")
    await handle.emit(Token(content="hi"))

    # When it completes
    await handle.complete(usage={"total": 5})

    # Then its status is completed and the complete event is the last in the stream
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert fields["status"] == "completed"
    _utc(fields["completed_at"])
    written = await entries(redis, coord, "s1")
    assert [f["type"] for _, f in written] == ["execution_started", "token", "complete"]
    assert data_of(written[-1][1]) == {"type": "complete", "usage": {"total": 5}}
    state = await coord.runner("s1")
    assert state is not None
    assert state.status is RunStatus.COMPLETED
    assert state.error is None
    assert state.completed_at is not None
    assert await coord.active_runs() == []


async def test_fail_ends_with_an_error_event(coord: Coordinator, redis: Redis) -> None:
    # Given a running run
    handle = await start_run(coord, "s1")

    # When it fails
    await handle.fail("model exploded")

    # Then its status is error, the hash has the message, and the error event is last
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert fields["status"] == "error"
    assert fields["error"] == "model exploded"
    [*_, (_, last)] = await entries(redis, coord, "s1")
    assert last["type"] == "error"
    assert data_of(last) == {"type": "error", "message": "model exploded"}
    state = await coord.runner("s1")
    assert state is not None
    assert state.status is RunStatus.ERROR
    assert state.error == "model exploded"


@pytest.mark.parametrize("ending", ["complete", "fail"])
async def test_retried_finish_writes_one_terminal_event(
    coord: Coordinator, redis: Redis, ending: str
) -> None:
    # Given a run that finished
    handle = await start_run(coord, "s1")
    finish = handle.complete if ending == "complete" else lambda: handle.fail("boom")
    await finish()
    written = await entries(redis, coord, "s1")
    fields = await redis.hgetall(coord.keys.runner("s1"))

    # When the same finish is retried, by the handle and by the store
    await finish()
    event = Complete() if ending == "complete" else runstate.events.Error(message="boom")
    again = await coord.store.finish(
        "s1", handle.run_id, handle.attempt, event, None if ending == "complete" else "boom"
    )

    # Then it is answered without a second terminal event
    assert again is None
    assert await entries(redis, coord, "s1") == written
    assert await redis.hgetall(coord.keys.runner("s1")) == fields


async def test_terminal_status_is_set_when_the_terminal_event_is_visible(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a live subscriber of a running run (resuming after execution_started, so that it
    # cannot miss what follows)
    handle = await start_run(coord, "s1")
    [(started_id, _)] = await entries(redis, coord, "s1")
    seen: list[Any] = []

    async def watch() -> str | None:
        async with contextlib.aclosing(coord.subscribe("s1", started_id)) as events:
            async for item in events:
                seen.append(item)
                if item.event.is_terminal:
                    # the moment the terminal event is visible, read the status
                    status: str | None = await redis.hget(coord.keys.runner("s1"), "status")
                    return status
        return None

    task = asyncio.create_task(watch())
    try:
        await handle.emit(Token(content="x"))
        await eventually(lambda: seen, what="the subscriber is live")

        # When the run completes
        await handle.complete()

        # Then the subscriber saw the complete event when the hash already said completed
        assert await within(task) == "completed"
        assert [item.event.type for item in seen] == ["token", "complete"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- retention -------------------------------------------------------------------------------


async def _ttls(redis: Redis, coord: Coordinator, session_id: str) -> dict[str, int]:
    return {
        name: await redis.ttl(getattr(coord.keys, name)(session_id))
        for name in ("runner", "events", "critical")
    }


@pytest.mark.parametrize("ending", ["complete", "fail"])
async def test_finished_session_keys_expire_after_retention(
    redis: Redis, prefix: str, ending: str
) -> None:
    coord = Coordinator(redis, prefix=prefix, retention=100)
    try:
        # Given a running run with a critical event; its keys do not expire
        handle = await start_run(coord, "s1")
        await handle.emit(TaskListUpdated(task_list=["a"]))
        assert set((await _ttls(redis, coord, "s1")).values()) == {-1}

        # When it finishes
        await (handle.complete() if ending == "complete" else handle.fail("boom"))

        # Then its runner, events and critical keys expire after the retention
        ttls = await _ttls(redis, coord, "s1")
        assert all(0 < ttl <= 100 for ttl in ttls.values()), ttls
    finally:
        await coord.aclose()


async def test_default_retention_is_one_hour(coord: Coordinator, redis: Redis) -> None:
    # Given a run with a critical event
    handle = await start_run(coord, "s1")
    await handle.emit(TaskListUpdated(task_list=["a"]))

    # When it completes
    await handle.complete()

    # Then its keys expire in an hour
    ttls = await _ttls(redis, coord, "s1")
    assert all(3500 < ttl <= 3600 for ttl in ttls.values()), ttls


async def test_new_reserve_keeps_the_session_keys(redis: Redis, prefix: str) -> None:
    coord = Coordinator(redis, prefix=prefix, retention=100)
    try:
        # Given a finished session whose keys expire
        handle = await start_run(coord, "s1")
        await handle.emit(TaskListUpdated(task_list=["a"]))
        await handle.complete()
        assert (await redis.ttl(coord.keys.events("s1"))) > 0

        # When a new run is reserved on it
        assert isinstance(await coord.try_reserve("s1"), Reserved)

        # Then the runner and the events no longer expire; the old critical list is gone
        assert await redis.ttl(coord.keys.runner("s1")) == -1
        assert await redis.ttl(coord.keys.events("s1")) == -1
        assert await redis.exists(coord.keys.critical("s1")) == 0
        assert await redis.xlen(coord.keys.events("s1")) == 3  # the old run's events are kept
    finally:
        await coord.aclose()


# ---- closing ---------------------------------------------------------------------------------


def _aclose_seconds_after_a_subscription(make_client: Callable[[], Redis], prefix: str) -> float:
    """Follow a session in one run of an event loop, close the Coordinator in the next one.

    That is what an ``asyncio.Runner``-based host does (pytest-asyncio's fixture teardown, for
    one): the loop stops while the event reader is sending its next XREAD.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        client = make_client()
        coord = Coordinator(client, prefix=prefix, block_ms=2000)

        async def follow() -> None:
            handle = await start_run(coord, "s1")
            await handle.emit(TaskListUpdated(task_list=["a"]))
            async with contextlib.aclosing(coord.subscribe("s1")) as events:
                await take(events, 1)
                live_id = await handle.emit(Token(content="x"))
                assert (await next_event(events)).id == live_id

        async def close() -> float:
            started = time.monotonic()
            await coord.aclose()
            return time.monotonic() - started

        try:
            runner.run(follow())
            return runner.run(close())
        finally:
            runner.run(client.aclose())


def test_aclose_after_a_subscription_is_prompt_fake(prefix: str) -> None:
    # Given a process that followed a session, When its loop stops and it closes the Coordinator
    elapsed = _aclose_seconds_after_a_subscription(
        lambda: fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True),
        prefix,
    )
    # Then the close does not wait for the reader's blocked XREAD (block_ms = 2 s) to return
    assert elapsed < 1, f"Coordinator.aclose() took {elapsed:.2f}s"


def test_aclose_after_a_subscription_is_prompt_real(redis_url: str, prefix: str) -> None:
    # Given a process that followed a session, When its loop stops and it closes the Coordinator
    elapsed = _aclose_seconds_after_a_subscription(
        lambda: Redis.from_url(redis_url, decode_responses=True), prefix
    )
    # Then the close does not wait for the reader's blocked XREAD (block_ms = 2 s) to return
    assert elapsed < 1, f"Coordinator.aclose() took {elapsed:.2f}s"


# ---- public surface --------------------------------------------------------------------------


def _names_defined_in_init() -> set[str]:
    """Public names ``runstate/__init__.py`` imports or defines (parsed, not imported)."""
    tree = ast.parse(Path(runstate.__file__).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n != "annotations"}


def test_all_is_sorted_and_matches_the_public_names() -> None:
    # Given the package's __all__
    exported = runstate.__all__

    # Then it is sorted, has no duplicates, and names exactly what __init__ defines or re-exports
    assert exported == sorted(exported)
    assert len(set(exported)) == len(exported)
    assert set(exported) == _names_defined_in_init()
    for name in exported:
        assert getattr(runstate, name) is not None


def test_run_status_sets() -> None:
    # Then pending and running are active, the other three terminal, and they are strings
    active, terminal = RunStatus.ACTIVE, RunStatus.TERMINAL
    assert active == {RunStatus.PENDING, RunStatus.RUNNING}
    assert terminal == {RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.ERROR}
    assert not active & terminal
    assert active | terminal == set(RunStatus)
    assert [s.value for s in RunStatus] == ["pending", "running", "completed", "cancelled", "error"]
    assert RunStatus("running") == "running"
    assert RunStatus.PENDING.is_active and not RunStatus.PENDING.is_terminal
    assert RunStatus.ERROR.is_terminal and not RunStatus.ERROR.is_active


def test_runner_state_has_the_seed_fields() -> None:
    seed = {
        "status",
        "run_id",
        "started_at",
        "completed_at",
        "last_budget_event",
        "last_critical_events",
        "last_tool_name",
        "last_tool_phase",
        "last_event_at",
        "round_count",
    }
    assert seed | {"error", "worker", "attempt", "parent"} <= set(RunnerState.model_fields)
    assert RunnerState.model_fields["status"].annotation is RunStatus


async def test_a_run_started_right_after_the_last_one_ended_stays_indexed(
    coord: Coordinator,
) -> None:
    # Given a run that ended, and the next run reserved before its worker drops the old one
    # from the active index (a chat client sending right after [DONE])
    handle = await start_run(coord, "s1")
    await coord.store.finish("s1", handle.run_id, handle.attempt, Complete())
    nxt = await coord.execute("s1", {"turn": 2})
    # When the old run's owner unindexes the session, as it does after finishing
    await coord.store.unindex("s1")
    # Then the new run is still listed as active
    assert [r.run_id for r in await coord.active_runs()] == [nxt.run_id]
    assert "s1" in await coord.store.active_sessions()

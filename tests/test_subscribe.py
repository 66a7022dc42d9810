"""Subscribing (DESIGN §4): snapshot boundary, exact resume, gap notices, fan-out, slow readers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from runstate import Coordinator, RunHandle, RunstateError, StreamEvent
from runstate.events import Gap, TaskListUpdated, Token, TokenBudgetUpdated
from runstate.hub import MAX_CONCURRENT_READS
from runstate.models import Reserved
from tests.helpers import eventually


async def start_run(coord: Coordinator, sid: str = "s1") -> RunHandle:
    reserved = await coord.execute(sid, {"n": 1})
    assert isinstance(reserved, Reserved)
    return await coord.claim(sid, reserved.run_id, "w1")


async def collect(it: AsyncIterator[StreamEvent], limit: int | None = None) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    async for ev in it:
        out.append(ev)
        if limit is not None and len(out) >= limit:
            break
    return out


async def stream_entries(coord: Coordinator, sid: str) -> list[tuple[str, str]]:
    """(id, type) of every entry in the session stream, as redis-cli XRANGE shows them."""
    raw = await coord.client.xrange(coord.keys.events(sid))
    return [(eid, fields["type"]) for eid, fields in raw]


async def test_new_subscriber_gets_replay_then_live(coord: Coordinator) -> None:
    # Given a running run with critical events, a budget event and tokens
    run = await start_run(coord)
    await run.emit(TaskListUpdated(task_list={"items": ["a"]}))
    await run.emit(TokenBudgetUpdated(usage={"total": 10}))
    await run.emit(TaskListUpdated(task_list={"items": ["a", "b"]}))
    await run.emit(Token(content="old"))
    # When a new subscriber attaches, then more events arrive
    it = coord.subscribe("s1")
    first = [await anext(it) for _ in range(3)]
    await run.emit(Token(content="new"))
    await run.complete()
    rest = await collect(it)
    # Then: critical events oldest first, then the budget event (replayed: no id), then live only
    assert [(e.id, e.event.type) for e in first] == [
        (None, "task_list_updated"),
        (None, "task_list_updated"),
        (None, "token_budget_updated"),
    ]
    assert first[0].event.task_list == {"items": ["a"]}  # type: ignore[attr-defined]
    assert [e.event.type for e in rest] == ["token", "complete"]
    assert rest[0].event.content == "new"  # type: ignore[attr-defined]
    assert all(e.run_id == run.run_id for e in first + rest)


async def test_subscriber_attached_during_concurrent_emits_gets_no_gap_and_no_duplicate(
    coord: Coordinator,
) -> None:
    # Given a producer emitting 300 tokens as fast as it can
    run = await start_run(coord)
    started = asyncio.Event()

    async def produce() -> None:
        for i in range(300):
            await run.emit(Token(content=str(i)))
            if i == 50:
                started.set()
        await run.complete()

    producer = asyncio.create_task(produce())
    await started.wait()
    # When subscribers attach while it runs
    subs = [asyncio.create_task(collect(coord.subscribe("s1"))) for _ in range(5)]
    await producer
    results = await asyncio.wait_for(asyncio.gather(*subs), 10)
    # Then each got a contiguous tail of the stream ending with the terminal event: no gap, no dup
    entries = await stream_entries(coord, "s1")
    ids = [eid for eid, _ in entries]
    for got in results:
        live = [e.id for e in got if e.id is not None]
        assert live, "a subscriber attached before the end must see at least the terminal event"
        start = ids.index(live[0])
        assert live == ids[start:]
        assert not any(e.event.type == "gap" for e in got)


async def test_resume_from_every_id_is_exact(coord: Coordinator) -> None:
    # Given a finished run of 30 events
    run = await start_run(coord)
    for i in range(28):
        await run.emit(Token(content=str(i)))
    await run.complete()
    entries = await stream_entries(coord, "s1")
    ids = [eid for eid, _ in entries]
    # When resuming after any id, Then exactly the events after it arrive, in order, once
    # (after the terminal event itself nothing of this run is left: such a subscriber waits)
    for i, eid in enumerate(ids[:-1]):
        got = await asyncio.wait_for(collect(coord.subscribe("s1", last_event_id=eid)), 5)
        assert [e.id for e in got] == ids[i + 1 :]
    # And "0" means everything retained
    got = await asyncio.wait_for(collect(coord.subscribe("s1", last_event_id="0")), 5)
    assert [e.id for e in got] == ids


async def test_resume_while_running_then_live(coord: Coordinator) -> None:
    # Given a running run, and a client that saw the first events then dropped
    run = await start_run(coord)
    await run.emit(Token(content="a"))
    seen = await run.emit(Token(content="b"))
    await run.emit(Token(content="c"))
    # When it resumes from its last id and more events arrive
    it = coord.subscribe("s1", last_event_id=seen)
    first = await anext(it)
    await run.emit(Token(content="d"))
    await run.complete()
    rest = await collect(it)
    # Then it gets c, d and the terminal event: nothing twice, nothing lost
    got = [first, *rest]
    assert [e.event.content for e in got[:2]] == ["c", "d"]  # type: ignore[attr-defined]
    assert got[-1].event.type == "complete"
    assert not any(isinstance(e.event, Gap) for e in got)


async def test_gap_notice_after_trimming_says_how_many_were_missed(redis: Any, prefix: str) -> None:
    # Given a stream capped at 50 whose early events were trimmed away
    async with Coordinator(redis, prefix=prefix, maxlen=50) as coord:
        run = await start_run(coord)
        await run.emit(TaskListUpdated(task_list=["x"]))
        early = await run.emit(Token(content="early"))  # the 3rd event of the session
        for i in range(200):
            await run.emit(Token(content=str(i)))
        last = await run.emit(Token(content="last"))
        assert await redis.xlen(coord.keys.events("s1")) < 200
        # When a client resumes from an id that has been trimmed
        it = coord.subscribe("s1", last_event_id=early)
        gap = await asyncio.wait_for(anext(it), 5)
        replay = await asyncio.wait_for(anext(it), 5)
        await run.complete()
        tail = await collect(it)
    # Then it first hears exactly how many events it will not get, then the replay, then live
    assert isinstance(gap.event, Gap)
    n_last = int(last.split("-")[1])
    assert gap.event.missed == n_last - 3
    assert (replay.id, replay.event.type) == (None, "task_list_updated")
    assert [e.event.type for e in tail] == ["complete"]


async def test_no_gap_when_nothing_was_missed(redis: Any, prefix: str) -> None:
    # Given a capped stream and a resume id that is still retained
    async with Coordinator(redis, prefix=prefix, maxlen=50) as coord:
        run = await start_run(coord)
        ids = [await run.emit(Token(content=str(i))) for i in range(120)]
        await run.complete()
        retained = (await redis.xrange(coord.keys.events("s1"), count=1))[0][0]
        # When resuming right after the last event and right at the first retained one
        at_end = await collect(coord.subscribe("s1", last_event_id=ids[-1]))
        from_first = await collect(coord.subscribe("s1", last_event_id=retained))
    # Then no gap notice: the events after each id are all still there
    assert [e.event.type for e in at_end] == ["complete"]
    assert not any(isinstance(e.event, Gap) for e in from_first)
    assert from_first[-1].event.type == "complete"


async def test_batches_hold_the_same_events_as_subscribe_fewer_at_a_time(
    coord: Coordinator,
) -> None:
    # Given a run with a critical event, then live subscribers of both kinds
    run = await start_run(coord)
    await run.emit(TaskListUpdated(task_list=["x"]))
    one_by_one = coord.subscribe("s1")
    batched = coord.subscribe_batches("s1")
    assert (await anext(one_by_one)).event.type == "task_list_updated"
    assert [e.event.type for e in await anext(batched)] == ["task_list_updated"]

    async def all_batches() -> list[list[StreamEvent]]:
        return [batch async for batch in batched]

    events_task = asyncio.create_task(collect(one_by_one))
    batches_task = asyncio.create_task(all_batches())
    await eventually(lambda: coord._hub.subscribers == 2)
    # When 300 tokens are written in batches of 100, then the run completes
    for start in range(0, 300, 100):
        await run.emit_many([Token(content=str(i)) for i in range(start, start + 100)])
    await run.complete()
    events, batches = await asyncio.wait_for(asyncio.gather(events_task, batches_task), 10)
    # Then both get the same events in the same order, to the terminal event and no further
    assert [e.id for batch in batches for e in batch] == [e.id for e in events]
    assert [e.id for e in events] == [eid for eid, _ in await stream_entries(coord, "s1")][2:]
    assert events[-1].event.type == "complete"
    # And the batched subscriber got them in far fewer steps than one per event
    assert len(batches) <= 10


async def test_batches_report_a_gap_like_subscribe(redis: Any, prefix: str) -> None:
    # Given a stream capped at 50 whose early events were trimmed away
    async with Coordinator(redis, prefix=prefix, maxlen=50) as coord:
        run = await start_run(coord)
        await run.emit(TaskListUpdated(task_list=["x"]))
        early = await run.emit(Token(content="early"))
        for start in range(0, 200, 50):
            await run.emit_many([Token(content=str(i)) for i in range(start, start + 50)])
        await run.complete()
        # When a batched subscriber resumes from a trimmed id
        batches = [b async for b in coord.subscribe_batches("s1", last_event_id=early)]
        events = await collect(coord.subscribe("s1", last_event_id=early))
    # Then it hears of the gap first, with the same count, then the replay and the terminal
    flat = [e for batch in batches for e in batch]
    assert [(e.id, e.event.type) for e in flat] == [(e.id, e.event.type) for e in events]
    assert isinstance(flat[0].event, Gap) and flat[0].event.missed > 0
    assert flat[-1].event.type == "complete"


async def test_late_subscriber_to_finished_run_gets_replay_and_terminal(coord: Coordinator) -> None:
    # Given a finished run with a critical event
    run = await start_run(coord)
    await run.emit(TaskListUpdated(task_list=["done"]))
    await run.fail("boom")
    # When someone subscribes afterwards
    got = await asyncio.wait_for(collect(coord.subscribe("s1")), 5)
    # Then they get the replay and the terminal event, and the iterator ends
    assert [e.event.type for e in got] == ["task_list_updated", "error"]
    assert got[-1].id is not None
    assert got[-1].event.message == "boom"  # type: ignore[attr-defined]


async def test_follow_keeps_going_across_runs(coord: Coordinator) -> None:
    # Given a follower of a session
    run = await start_run(coord)
    it = coord.subscribe("s1", follow=True)
    await run.complete()
    assert (await asyncio.wait_for(anext(it), 5)).event.type == "complete"
    # When a second run starts and emits
    run2 = await start_run(coord)
    await run2.emit(Token(content="second"))
    # Then the follower sees the next run's events too
    got = [await asyncio.wait_for(anext(it), 5) for _ in range(2)]
    assert [e.event.type for e in got] == ["execution_started", "token"]
    assert {e.run_id for e in got} == {run2.run_id}
    await it.aclose()  # type: ignore[attr-defined]


async def test_many_subscribers_share_one_reader(coord: Coordinator) -> None:
    # Given 200 subscribers over 4 sessions in one process
    runs = [await start_run(coord, f"s{i}") for i in range(4)]
    its = [coord.subscribe(f"s{i % 4}") for i in range(200)]
    tasks = [asyncio.create_task(collect(it)) for it in its]
    await eventually(lambda: coord._hub.subscribers == 200, what="all 200 attached")
    # Then the process reads 4 streams, not 200
    assert coord._hub.watched == 4
    # When every run emits and ends
    for run in runs:
        await run.emit(Token(content="x"))
        await run.complete()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    # Then every subscriber got its session's events, and the reader lets go of finished streams
    for got in results:
        assert [e.event.type for e in got] == ["token", "complete"]
    assert coord._hub.watched == 0


async def test_cancelling_one_waiting_subscriber_leaves_the_others_waiting(
    coord: Coordinator,
) -> None:
    # Given three subscribers of one session, all waiting for the next event (on one shared
    # future: see runstate.batches)
    run = await start_run(coord)
    tasks = [asyncio.create_task(collect(coord.subscribe("s1"))) for _ in range(3)]
    await eventually(lambda: coord._hub.subscribers == 3)
    await asyncio.sleep(0.05)
    # When one of them is cancelled while it waits
    tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await eventually(lambda: coord._hub.subscribers == 2)
    # Then the other two are still waiting, and get what comes next
    assert not tasks[1].done() and not tasks[2].done()
    await run.emit(Token(content="after"))
    await run.complete()
    for got in await asyncio.wait_for(asyncio.gather(*tasks[1:]), 10):
        assert [e.event.type for e in got] == ["token", "complete"]


async def test_a_subscriber_cancelled_just_before_it_waits_ends(coord: Coordinator) -> None:
    # Given subscribers sharing one future, and one whose task is cancelled while it runs (so
    # the cancellation lands on the shared future as it starts waiting)
    run = await start_run(coord)
    peers = [asyncio.create_task(collect(coord.subscribe("s1"))) for _ in range(3)]

    async def cancelled_while_reading() -> None:
        async for _ in coord.subscribe("s1"):
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

    victim = asyncio.create_task(cancelled_while_reading())
    await eventually(lambda: coord._hub.subscribers == 4)
    await asyncio.sleep(0.05)
    # When an event arrives
    await run.emit(Token(content="a"))
    # Then that subscriber ends, cancelled (its cancellation is not taken for another's), and
    # the others go on
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(victim, 5)
    await run.complete()
    for got in await asyncio.wait_for(asyncio.gather(*peers), 10):
        assert [e.event.type for e in got] == ["token", "complete"]


async def test_closing_fails_each_subscriber_with_its_own_error(redis: Any, prefix: str) -> None:
    # Given many subscribers waiting in one process
    coord = Coordinator(redis, prefix=prefix)
    await start_run(coord)
    tasks = [asyncio.create_task(collect(coord.subscribe("s1"))) for _ in range(50)]
    await eventually(lambda: coord._hub.subscribers == 50)
    # When the coordinator closes under them
    await coord.aclose()
    errors = await asyncio.gather(*tasks, return_exceptions=True)
    # Then each fails with a clear error of its own: one instance raised in 50 tasks would
    # collect all 50 tracebacks (and keep their frames alive)
    assert all(isinstance(e, RunstateError) and "closed" in str(e) for e in errors)
    assert len({id(e) for e in errors}) == 50
    for error in errors:
        assert isinstance(error, BaseException)
        depth = 0
        tb = error.__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        assert depth < 10


async def test_connections_do_not_grow_with_subscribers(redis_url: str, prefix: str) -> None:
    # Given a coordinator on its own pool
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        runs = [await start_run(coord, f"s{i}") for i in range(3)]
        few = [asyncio.create_task(collect(coord.subscribe(f"s{i % 3}"))) for i in range(3)]
        await eventually(lambda: coord._hub.subscribers == 3)
        pool = coord.client.connection_pool

        def opened() -> int:
            return len(pool._available_connections) + len(pool._in_use_connections)  # type: ignore[attr-defined]

        with_few = opened()
        # When 300 more subscribers attach
        many = [asyncio.create_task(collect(coord.subscribe(f"s{i % 3}"))) for i in range(300)]
        await eventually(lambda: coord._hub.subscribers == 303)
        with_many = opened()
        for run in runs:
            await run.complete()
        await asyncio.wait_for(asyncio.gather(*few, *many), 10)
    # Then the connections stayed within a bound that does not depend on the subscriber count:
    # the reader, one for waking it, and the few reads subscribers may have in flight at once
    bound = 2 + MAX_CONCURRENT_READS + 2  # + the claims' cancel watcher and the test's calls
    assert with_few <= bound
    assert with_many <= bound


async def test_slow_subscriber_does_not_stall_others_and_catches_up(
    redis: Any, prefix: str
) -> None:
    # Given a tiny per-subscriber buffer, a fast reader and a reader that does not read
    async with Coordinator(redis, prefix=prefix, subscriber_buffer=4) as coord:
        run = await start_run(coord)
        fast_task = asyncio.create_task(collect(coord.subscribe("s1")))
        slow = coord.subscribe("s1")
        slow_first = asyncio.create_task(anext(slow))
        await eventually(lambda: coord._hub.subscribers == 2)
        # When 100 events are emitted
        for i in range(100):
            await run.emit(Token(content=str(i)))
        await run.complete()
        fast = await asyncio.wait_for(fast_task, 10)
        # Then the fast reader got them all, and the slow one, reading late, also gets every event
        # (its buffer overflowed, so it caught up from Redis: nothing lost while retained)
        slow_got = [
            await asyncio.wait_for(slow_first, 5),
            *await asyncio.wait_for(collect(slow), 5),
        ]
    assert [e.event.type for e in fast].count("token") == 100
    assert [e.id for e in slow_got] == [e.id for e in fast]


async def test_slow_subscriber_gets_gap_when_its_events_were_trimmed(
    redis: Any, prefix: str
) -> None:
    # Given a tiny buffer and a short stream
    async with Coordinator(redis, prefix=prefix, subscriber_buffer=2, maxlen=20) as coord:
        run = await start_run(coord)
        slow = coord.subscribe("s1")
        first = asyncio.create_task(anext(slow))
        await eventually(lambda: coord._hub.subscribers == 1)
        # When far more events than the stream keeps pass by while it does not read
        for i in range(300):
            await run.emit(Token(content=str(i)))
        await run.complete()
        got = [await asyncio.wait_for(first, 5), *await asyncio.wait_for(collect(slow), 5)]
    # Then it is told about the gap (never silently), and still ends with the terminal event
    gaps = [e.event for e in got if isinstance(e.event, Gap)]
    assert gaps and all(g.missed > 0 for g in gaps)
    assert got[-1].event.type == "complete"
    delivered = sum(1 for e in got if e.id is not None)
    assert delivered + sum(g.missed for g in gaps) == 301  # every token and the terminal event


async def test_a_new_stream_is_read_promptly_while_the_reader_blocks(coord: Coordinator) -> None:
    # Given the reader blocked on one session
    run_a = await start_run(coord, "a")
    a_task = asyncio.create_task(collect(coord.subscribe("a")))
    await eventually(lambda: coord._hub.subscribers == 1)
    await asyncio.sleep(0.05)  # let the reader block in XREAD on "a" alone
    # When a subscriber for another session attaches and that session emits
    run_b = await start_run(coord, "b")
    b_task = asyncio.create_task(collect(coord.subscribe("b")))
    await eventually(lambda: coord._hub.subscribers == 2)
    await run_b.complete()
    # Then it is delivered long before the reader's 5 s block would time out
    got = await asyncio.wait_for(b_task, 2)
    assert [e.event.type for e in got] == ["complete"]
    await run_a.complete()
    await asyncio.wait_for(a_task, 2)


async def test_bad_last_event_id_is_a_clear_error(coord: Coordinator) -> None:
    with pytest.raises(ValueError, match="'not-an-id'"):
        await anext(coord.subscribe("s1", last_event_id="not-an-id"))


async def test_junk_key_type_fails_only_its_subscribers(
    coord: Coordinator, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a healthy session being followed, and a session whose events key is not a stream
    run = await start_run(coord, "good")
    good = asyncio.create_task(collect(coord.subscribe("good")))
    await eventually(lambda: coord._hub.subscribers == 1)
    await redis.set(coord.keys.events("bad"), "junk")
    # When someone subscribes to the broken session
    with caplog.at_level(logging.WARNING), pytest.raises(RunstateError, match="must be a stream"):
        await asyncio.wait_for(collect(coord.subscribe("bad", last_event_id="0")), 5)
    # Then the other subscriber goes on
    await run.complete()
    assert [e.event.type for e in await asyncio.wait_for(good, 5)] == ["complete"]


async def test_streams_watched_and_dropped_under_churn_are_all_read(coord: Coordinator) -> None:
    # Given many subscribers at once, each to its own session, attaching and leaving all the
    # time (the reader's set of streams changes while its reads are in flight)
    async def one(sid: str) -> list[str]:
        reserved = await coord.execute(sid)
        assert isinstance(reserved, Reserved)
        task = asyncio.create_task(collect(coord.subscribe(sid)))
        # the run's events come through the reader
        await eventually(lambda: sid in coord._hub._watches, interval=0.001)
        run = await coord.claim(sid, reserved.run_id, "w1")
        await run.emit(Token(content="t"))
        await run.complete()
        return [e.event.type for e in await asyncio.wait_for(task, 10)]

    sem = asyncio.Semaphore(40)

    async def guarded(sid: str) -> list[str]:
        async with sem:
            return await one(sid)

    # When 500 runs go through
    got = await asyncio.gather(*(guarded(f"churn-{i}") for i in range(500)))
    # Then every subscriber saw its run's events, and the reader is still alive
    assert all(types == ["execution_started", "token", "complete"] for types in got), got[:3]
    assert coord._hub._task is not None and not coord._hub._task.done()


async def test_junk_in_the_readers_wake_up_key_does_not_stop_it(coord: Coordinator) -> None:
    # Given the reader's wake-up key overwritten by hand with a string
    junk = coord._hub._wake_key
    await coord.client.set(junk, "junk")
    # When a subscriber attaches and its run ends
    run = await start_run(coord, "w")
    task = asyncio.create_task(collect(coord.subscribe("w")))
    await eventually(lambda: coord._hub.subscribers == 1)
    await asyncio.sleep(0.05)  # let the reader try to read
    await run.complete()
    # Then it gets the run's end all the same (the reader moved to a new wake-up key)
    got = await asyncio.wait_for(task, 5)
    assert [e.event.type for e in got] == ["complete"]
    assert coord._hub._wake_key != junk or coord.store.cluster  # a cluster's reader polls


async def test_the_reader_reads_on_at_once_when_its_connection_is_cut(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a subscriber, and the process's reader blocked in its XREAD
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        run = await start_run(coord)
        got = asyncio.create_task(collect(coord.subscribe("s1")))
        await eventually(lambda: coord._hub.subscribers == 1, what="the subscriber attached")
        await run.emit(Token(content="before"))
        killer = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:

            async def reader_id() -> int | None:
                blocked = [c for c in await killer.client_list() if c.get("cmd") == "xread"]
                return int(blocked[0]["id"]) if blocked else None

            await eventually(reader_id, what="the reader blocked in XREAD")
            # When the server cuts that connection (CLIENT KILL, a proxy's timeout)
            assert await killer.execute_command("CLIENT", "KILL", "ID", await reader_id()) == 1
            # Then the subscriber still gets what follows, promptly
            await run.emit(Token(content="after"))
            await run.complete()
            events = await asyncio.wait_for(got, 2.0)
        finally:
            await killer.aclose()
    assert [(e.event.type, getattr(e.event, "content", None)) for e in events] == [
        ("token", "before"),
        ("token", "after"),
        ("complete", None),
    ]
    # and the reader said so once, reading again at once rather than after a pause
    lost = [r.getMessage() for r in caplog.records if "event reader lost Redis" in r.message]
    assert len(lost) == 1 and "retrying in 0.00s" in lost[0], lost

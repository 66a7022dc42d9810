"""Cancellation (DESIGN §2.6, §7): pending and running runs, markers, pub/sub, polling, children.

Every test that takes ``coord`` or ``redis`` runs against fakeredis and against a real server.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub

from runstate import (
    CancelToken,
    CancelWatcher,
    Coordinator,
    Reserved,
    RunCancelled,
    RunHandle,
    StaleRunError,
)
from runstate.errors import EventTooLarge
from runstate.events import TaskListUpdated, Token
from tests.helpers import claim, data_of, entries, eventually, start_run, stream_types, within


async def _next_message(pubsub: PubSub, limit: float = 5.0) -> dict[str, Any]:
    """The next published message (not a subscribe confirmation) on ``pubsub``."""

    async def wait() -> dict[str, Any]:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None:
                return message

    return await within(wait(), limit)


async def _keys_under(redis: Redis, prefix: str) -> list[str]:
    return [key async for key in redis.scan_iter(match=f"{prefix}:*")]


# ---- pending runs ----------------------------------------------------------------------------


async def test_cancel_of_a_pending_run_is_immediate(coord: Coordinator, redis: Redis) -> None:
    # Given a run handed to the workers but not started
    reserved = await coord.execute("s1", {"q": 1})
    assert isinstance(reserved, Reserved)

    # When it is cancelled
    assert await coord.cancel("s1") is True

    # Then it is cancelled at once, with a cancelled event in the stream ...
    state = await coord.runner("s1")
    assert state is not None and state.status == "cancelled"
    assert state.completed_at is not None
    [(_, entry)] = await entries(redis, coord, "s1")
    assert entry["type"] == "cancelled"
    assert entry["run"] == reserved.run_id
    assert data_of(entry)["type"] == "cancelled"
    assert await coord.active_runs() == []

    # ... and no worker can start it
    with pytest.raises(RunCancelled) as refused:
        await coord.claim("s1", reserved.run_id, "w1")
    assert refused.value.run_id == reserved.run_id
    assert await stream_types(redis, coord, "s1") == ["cancelled"]


async def test_cancel_of_a_scheduled_run_drops_it_from_the_schedule(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run scheduled for later
    reserved = await coord.execute("s1", delay=60)
    member = f"s1 {reserved.run_id}"
    assert await redis.zscore(coord.keys.schedule, member) is not None

    # When it is cancelled
    assert await coord.cancel("s1")

    # Then it is no longer scheduled, nor active
    assert await redis.zscore(coord.keys.schedule, member) is None
    assert await redis.zscore(coord.keys.active, "s1") is None


# ---- running runs ----------------------------------------------------------------------------


async def test_cancel_of_a_running_run(coord: Coordinator, redis: Redis) -> None:
    # Given a running run, and a listener on the cancel channel
    handle = await start_run(coord, "s1")
    await handle.emit(Token(content="working"))
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(coord.keys.cancel_channel)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"

        # When the run is cancelled
        assert await coord.cancel("s1", reason="user pressed stop") is True

        # Then its status is cancelled at once, with the cancelled event written by the cancel
        fields = await redis.hgetall(coord.keys.runner("s1"))
        assert fields["status"] == "cancelled"
        assert fields["run_id"] == handle.run_id
        [*_, (_, last)] = await entries(redis, coord, "s1")
        assert last["type"] == "cancelled"
        assert last["run"] == handle.run_id
        assert data_of(last) == {"type": "cancelled", "message": "user pressed stop"}

        # and a durable marker names the run, with a TTL
        assert await redis.get(coord.keys.cancel("s1")) == handle.run_id
        assert await redis.ttl(coord.keys.cancel("s1")) > 0

        # and a nudge was published
        message = await _next_message(pubsub)
        assert message["channel"] == coord.keys.cancel_channel
        assert message["data"] == f"s1 {handle.run_id}"
    finally:
        await pubsub.aclose()

    # and the old run's writes are refused
    with pytest.raises(RunCancelled):
        await handle.emit(Token(content="late"))

    # and a new run may be reserved right away
    new = await coord.try_reserve("s1")
    assert isinstance(new, Reserved)
    assert new.run_id != handle.run_id


async def test_cancelled_run_cannot_write(coord: Coordinator, redis: Redis) -> None:
    # Given a running run that was cancelled
    handle = await start_run(coord, "s1")
    await handle.emit(TaskListUpdated(task_list=["a"]))
    assert await coord.cancel("s1")
    runner_before = await redis.hgetall(coord.keys.runner("s1"))
    stream_before = await entries(redis, coord, "s1")

    # When its handle emits, completes or fails
    for write in (
        lambda: handle.emit(Token(content="late")),
        lambda: handle.emit_many([TaskListUpdated(task_list=["b"])]),
        lambda: handle.complete(),
        lambda: handle.fail("late"),
    ):
        # Then each write is refused as cancelled
        with pytest.raises(RunCancelled):
            await write()

    # and the session is untouched
    assert await redis.hgetall(coord.keys.runner("s1")) == runner_before
    assert await entries(redis, coord, "s1") == stream_before
    assert handle.cancelled


async def test_cancel_reaches_the_checkpoint_through_pubsub(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker process whose cancel watcher only listens (marker polling disabled)
    coord = Coordinator(redis, prefix=prefix, cancel_poll_interval=3600)
    try:
        watcher = coord.cancel_watcher

        async def no_poll() -> None:
            return None

        monkeypatch.setattr(watcher, "poll", no_poll)
        handle = await start_run(coord, "s1")
        channel = coord.keys.cancel_channel
        await eventually(
            lambda: _subscribers(redis, channel), what="the watcher is subscribed on the server"
        )
        await handle.checkpoint()  # not cancelled: a no-op

        # When another process cancels the run
        other = Coordinator(redis, prefix=prefix)
        try:
            assert await other.cancel("s1")
        finally:
            await other.aclose()

        # Then the run's token sees it, and its next checkpoint raises
        await eventually(lambda: handle.cancelled, what="the token sees the cancel")
        with pytest.raises(RunCancelled) as stopped:
            await handle.checkpoint()
        assert stopped.value.run_id == handle.run_id
        # and its emits are refused by the fence
        with pytest.raises(RunCancelled):
            await handle.emit(Token(content="late"))
    finally:
        await coord.aclose()


async def _subscribers(redis: Redis, channel: str) -> bool:
    if isinstance(redis, RedisCluster):  # PUBSUB NUMSUB counts one node's subscribers
        for node in redis.get_primaries():
            [(_, count)] = await redis.pubsub_numsub(channel, target_nodes=node)
            if int(count) >= 1:
                return True
        return False
    [(_, count)] = await redis.pubsub_numsub(channel)
    return int(count) >= 1


async def test_cancel_whose_nudge_was_lost_is_found_by_polling(redis: Redis, prefix: str) -> None:
    # Given a running run in a process that polls markers only when asked
    coord = Coordinator(redis, prefix=prefix, cancel_poll_interval=3600)
    try:
        handle = await start_run(coord, "s1")

        # When it is cancelled but the pub/sub nudge is lost (the cancel script alone runs)
        outcome = await coord.store.cancel("s1", "nudge lost")
        assert outcome.cancelled
        assert await redis.get(coord.keys.cancel("s1")) == handle.run_id

        # Then one poll of the markers delivers it to the run's token
        await coord.cancel_watcher.poll()
        assert handle.cancelled
        with pytest.raises(RunCancelled):
            await handle.checkpoint()
    finally:
        await coord.aclose()


async def test_poll_loop_delivers_a_lost_nudge(redis: Redis, prefix: str) -> None:
    # Given a running run in a process that polls markers often
    coord = Coordinator(redis, prefix=prefix, cancel_poll_interval=0.02)
    try:
        handle = await start_run(coord, "s1")

        # When it is cancelled without a nudge
        assert (await coord.store.cancel("s1", "nudge lost")).cancelled

        # Then the poll loop delivers it
        await eventually(lambda: handle.cancelled, what="the poll loop sees the marker")
        with pytest.raises(RunCancelled):
            await handle.checkpoint()
    finally:
        await coord.aclose()


async def test_poll_only_cancels_the_run_the_marker_names(coord: Coordinator, redis: Redis) -> None:
    # Given a watcher watching a running run
    handle = await start_run(coord, "s1")
    watcher = CancelWatcher(coord.store, poll_interval=3600)
    try:
        token = watcher.watch("s1", handle.run_id)
        await eventually(watcher.listening.is_set, what="the watcher listens")

        # When the session's marker names another run
        await redis.set(coord.keys.cancel("s1"), uuid.uuid4().hex)
        await watcher.poll()

        # Then the token is untouched
        assert not token.cancel_called

        # When the marker names the watched run
        await redis.set(coord.keys.cancel("s1"), handle.run_id)
        await watcher.poll()

        # Then the token is cancelled
        assert token.cancel_called

        # And an unwatched run is no longer delivered to
        other = CancelToken()
        watcher.watch("s2", "r2", other)
        watcher.unwatch("s2", "r2")
        await redis.set(coord.keys.cancel("s2"), "r2")
        await watcher.poll()
        assert not other.cancel_called
    finally:
        await watcher.aclose()


async def test_cancel_token_vocabulary() -> None:
    # Given a fresh token
    token = CancelToken()
    assert not token.cancel_called and token.reason is None

    # When it is cancelled twice
    waiter = asyncio.create_task(token.wait())
    token.cancel("first")
    token.cancel("second")

    # Then the first reason is kept and waiters wake up
    await within(waiter)
    assert token.cancel_called
    assert token.reason == "first"


# ---- nothing to cancel -----------------------------------------------------------------------


async def test_each_cancel_writes_its_own_reason(coord: Coordinator, redis: Redis) -> None:
    # The event of each short reason is made once and reused: the same reason twice, another,
    # and a long one (made each time)
    reasons = [("a", "user pressed stop"), ("b", "user pressed stop"), ("c", "budget")]
    for sid, reason in [*reasons, ("d", "over budget " * 30), ("e", "over budget " * 30)]:
        await start_run(coord, sid)
        assert await coord.cancel(sid, reason)
        [*_, (_, last)] = await entries(redis, coord, sid)
        assert data_of(last) == {"type": "cancelled", "message": reason}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (42, "input_value=42"),
        (None, "input_value=None"),
        (["stop"], "input_value=['stop']"),
        ("x" * 1_100_000, "over the limit"),
    ],
    ids=["int", "none", "list", "too-large"],
)
async def test_a_bad_cancel_reason_is_refused_and_changes_nothing(
    coord: Coordinator, bad: Any, says: str
) -> None:
    handle = await start_run(coord, "s1")
    with pytest.raises((ValidationError, EventTooLarge), match=re.escape(says)):
        await coord.cancel("s1", bad)
    assert (await coord.runner("s1")).status == "running"  # type: ignore[union-attr]
    assert not handle.cancelled


async def test_cancel_with_nothing_active_changes_nothing(
    coord: Coordinator, redis: Redis, prefix: str
) -> None:
    # Given a session that never had a run
    # When it is cancelled
    result = await coord.cancel("never")

    # Then the answer is False and no key was created
    assert result is False
    assert await _keys_under(redis, prefix) == []


async def test_cancel_of_a_finished_run_changes_nothing(coord: Coordinator, redis: Redis) -> None:
    # Given a run that completed
    handle = await start_run(coord, "s1")
    await handle.complete()
    runner_before = await redis.hgetall(coord.keys.runner("s1"))
    stream_before = await entries(redis, coord, "s1")

    # When it is cancelled
    result = await coord.cancel("s1")

    # Then the answer is False and nothing changed
    assert result is False
    assert await redis.hgetall(coord.keys.runner("s1")) == runner_before
    assert await entries(redis, coord, "s1") == stream_before
    assert await redis.exists(coord.keys.cancel("s1")) == 0


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
async def test_cancel_is_idempotent(coord: Coordinator, redis: Redis, started: bool) -> None:
    # Given an active run
    if started:
        await start_run(coord, "s1")
    else:
        await coord.execute("s1")

    # When it is cancelled twice
    first = await coord.cancel("s1")
    second = await coord.cancel("s1")

    # Then the first cancel did it, the second changed nothing
    assert (first, second) == (True, False)
    assert (await stream_types(redis, coord, "s1")).count("cancelled") == 1


# ---- children --------------------------------------------------------------------------------


async def test_cancel_of_a_parent_cancels_its_children(coord: Coordinator, redis: Redis) -> None:
    # Given a running parent run with a running child, a pending child, and a session in its
    # children set whose run was started by another run
    parent = await start_run(coord, "parent")
    link = f"parent {parent.run_id}"
    running_child = await coord.execute("child-a", parent=link)
    child_handle = await claim(coord, "child-a", running_child.run_id, "w2")
    pending_child = await coord.execute("child-b", parent=link)
    stranger = await coord.execute("stranger", parent=f"parent {uuid.uuid4().hex}")
    await redis.sadd(coord.keys.children("parent"), "child-a", "child-b", "stranger")
    assert (await coord.runner("child-a")).parent == link  # type: ignore[union-attr]

    # When the parent is cancelled
    assert await coord.cancel("parent")

    # Then its children are cancelled too
    for sid, run in (("child-a", running_child), ("child-b", pending_child)):
        state = await coord.runner(sid)
        assert state is not None
        assert (state.run_id, state.status) == (run.run_id, "cancelled")
    assert await redis.get(coord.keys.cancel("child-a")) == running_child.run_id
    await eventually(lambda: child_handle.cancelled, what="the child's token sees the cancel")

    # but not the run that another run started
    state = await coord.runner("stranger")
    assert state is not None
    assert (state.run_id, state.status) == (stranger.run_id, "pending")


# ---- retention -------------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["pending", "running"])
async def test_cancelled_session_keys_expire_after_retention(
    redis: Redis, prefix: str, started: bool
) -> None:
    coord = Coordinator(redis, prefix=prefix, retention=100)
    try:
        # Given an active run with a critical event
        if started:
            handle = await start_run(coord, "s1")
            await handle.emit(TaskListUpdated(task_list=["a"]))
        else:
            await coord.try_reserve("s1")

        # When it is cancelled
        assert await coord.cancel("s1")

        # Then the session's keys expire after the retention
        names = ("runner", "events", "critical") if started else ("runner", "events")
        ttls = {name: await redis.ttl(getattr(coord.keys, name)("s1")) for name in names}
        assert all(0 < ttl <= 100 for ttl in ttls.values()), ttls
        if started:
            assert await redis.ttl(coord.keys.cancel("s1")) > 0
    finally:
        await coord.aclose()


# ---- closing ---------------------------------------------------------------------------------


async def test_aclose_right_after_claim_returns(redis: Redis, prefix: str) -> None:
    hung: list[int] = []
    for pause in range(6):
        # Given a process that just claimed a run, its cancel watcher still subscribing
        # (closed after 0..5 round trips, to hit every step of the subscription)
        coord = Coordinator(redis, prefix=prefix)
        sid = f"s{pause}"
        reserved = await coord.try_reserve(sid)
        await coord.claim(sid, reserved.run_id, "w1")
        for _ in range(pause):
            await redis.ping()
        background = list(coord.cancel_watcher._tasks)

        # When the coordinator is closed
        closing = asyncio.create_task(coord.aclose())
        done, _ = await asyncio.wait({closing}, timeout=2)

        # Then it returns promptly with its background tasks stopped
        if closing not in done or not all(task.done() for task in background):
            hung.append(pause)
            for task in background:
                task.cancel()
            await asyncio.wait([closing, *background], timeout=2)
    assert hung == [], f"Coordinator.aclose() hung after claim (pauses {hung})"


async def test_old_run_stops_at_its_checkpoint_without_touching_the_new_one(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a run cancelled while running, and the session's next run running
    old = await start_run(coord, "s1", worker="w-old")
    assert await coord.cancel("s1")
    new = await start_run(coord, "s1", worker="w-new")

    # When the old run's worker, unaware, reaches its checkpoint and writes
    await eventually(lambda: old.cancelled, what="the old token sees the cancel")
    with pytest.raises(RunCancelled):
        await old.checkpoint()
    with pytest.raises(StaleRunError):
        await old.emit(Token(content="late"))

    # Then the new run is untouched and not cancelled
    assert not new.cancelled
    fields = await redis.hgetall(coord.keys.runner("s1"))
    assert (fields["run_id"], fields["status"], fields["seq"]) == (new.run_id, "running", "1")


# ---- waiting safe points: cancellable() and sleep() -----------------------------------------


async def test_a_cancel_interrupts_a_run_waiting_in_sleep(coord: Coordinator, redis: Redis) -> None:
    # Given a run waiting in a long sleep (say, a slow model call)
    handle = await start_run(coord, "s1")
    waiting = asyncio.create_task(handle.sleep(60))
    await asyncio.sleep(0.05)
    assert not waiting.done()

    # When another process cancels it
    other = Coordinator(redis, prefix=coord.prefix)
    try:
        assert await other.cancel("s1", "user pressed stop")
    finally:
        await other.aclose()

    # Then the wait raises at once, long before the minute is up
    with pytest.raises(RunCancelled) as stopped:
        await within(waiting, 5.0)
    assert stopped.value.run_id == handle.run_id


class SlowCall:
    """A stand-in for a slow model call that notes when it starts and when it is cancelled."""

    def __init__(self) -> None:
        self.started, self.interrupted = asyncio.Event(), asyncio.Event()

    async def __call__(self) -> str:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.interrupted.set()
            raise
        return "late"


async def test_cancellable_cancels_the_call_it_waits_for(coord: Coordinator) -> None:
    handle = await start_run(coord, "s1")
    call = SlowCall()
    waiting = asyncio.create_task(handle.cancellable(call()))
    await within(call.started.wait())
    handle.token.cancel("stop")  # what the cancel watcher does when the cancel arrives
    with pytest.raises(RunCancelled):
        await within(waiting)
    assert call.interrupted.is_set()  # the call itself was cancelled, not left running


async def test_cancellable_returns_the_result_or_the_error_of_the_call(
    coord: Coordinator,
) -> None:
    handle = await start_run(coord, "s1")

    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    async def broken() -> int:
        raise ValueError("model said no")

    assert await handle.cancellable(answer()) == 42
    assert await handle.cancellable(asyncio.sleep(0, result="done")) == "done"
    with pytest.raises(ValueError, match="model said no"):
        await handle.cancellable(broken())
    await handle.sleep(0.01)  # not cancelled: just waits


async def test_cancellable_of_a_cancelled_run_does_not_start_the_call(
    coord: Coordinator, recwarn: pytest.WarningsRecorder
) -> None:
    handle = await start_run(coord, "s1")
    handle.token.cancel("gone")
    ran = []

    async def call() -> None:
        ran.append(1)

    with pytest.raises(RunCancelled):
        await handle.cancellable(call())
    assert ran == []
    assert not [w for w in recwarn if "never awaited" in str(w.message)]
    # and a task the caller already started is cancelled, not left running
    slow = SlowCall()
    started = asyncio.ensure_future(slow())
    await within(slow.started.wait())
    with pytest.raises(RunCancelled):
        await handle.cancellable(started)
    with pytest.raises(asyncio.CancelledError):
        await within(started)
    assert slow.interrupted.is_set()


async def test_cancelling_the_waiting_task_cancels_the_call(coord: Coordinator) -> None:
    # A worker shutdown cancels the run's task outright: the call must not be left behind.
    handle = await start_run(coord, "s1")
    call = SlowCall()
    waiting = asyncio.create_task(handle.cancellable(call()))
    await within(call.started.wait())
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(waiting)
    assert call.interrupted.is_set()
    assert not handle.cancelled  # the run itself was not cancelled


async def test_a_cancel_wakes_a_waiting_call_within_a_few_turns_of_the_loop(
    coord: Coordinator,
) -> None:
    # The delivery of a cancel to a run waiting in sleep() is part of its latency: the wait
    # must not pass through helper tasks, each costing turns of the event loop.
    handle = await start_run(coord, "s1")
    waiting = asyncio.create_task(handle.sleep(60))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    turns = await turns_to_stop(handle, waiting)
    # sleep() has no call to stop: the turn that delivers the cancel raises it (through a
    # helper task awaiting the token with asyncio.wait it took eight; through cancellable(),
    # which must also stop its call, four).
    assert turns <= 1


async def test_cancellable_raises_once_its_call_has_stopped(coord: Coordinator) -> None:
    handle = await start_run(coord, "s1")
    call = SlowCall()
    waiting = asyncio.create_task(handle.cancellable(call()))
    await within(call.started.wait())
    turns = await turns_to_stop(handle, waiting)
    assert call.interrupted.is_set()
    assert turns <= 4


async def turns_to_stop(handle: RunHandle, waiting: asyncio.Task[Any]) -> int:
    """Cancel the run; how many turns of the event loop until ``waiting`` raised RunCancelled."""
    handle.token.cancel("stop")
    turns = 0
    while not waiting.done():
        await asyncio.sleep(0)
        turns += 1
    with pytest.raises(RunCancelled):
        waiting.result()
    return turns


async def test_sleep_waits_its_time_and_leaves_nothing_behind(coord: Coordinator) -> None:
    handle = await start_run(coord, "s1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await handle.sleep(0.05)
    assert loop.time() - started >= 0.05
    await handle.sleep(0)
    await handle.sleep(-1)  # like asyncio.sleep: no wait
    # A sleep cut short by the caller's own cancellation is not a cancel of the run
    waiting = asyncio.create_task(handle.sleep(60))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not handle.cancelled
    assert [w for w in handle.token._waiters if not w.done()] == []
    # A bad duration is refused naming it, leaving nothing behind
    for bad, error in (
        ("5", TypeError),
        (None, TypeError),
        (True, TypeError),
        (math.nan, ValueError),
    ):
        with pytest.raises(error, match=re.escape(repr(bad))):
            await handle.sleep(bad)
    assert [w for w in handle.token._waiters if not w.done()] == []
    # And a run cancelled before it sleeps raises at once
    handle.token.cancel("stop")
    with pytest.raises(RunCancelled, match="stop"):
        await within(handle.sleep(60), 1.0)

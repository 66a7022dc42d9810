"""The reaper's rules, one pass at a time (fake and real server)."""

from __future__ import annotations

import pytest

from runstate import Coordinator, Reserved, RunSuperseded
from runstate.queue import Queue, now_ms
from workers import ReapReport, reap_once
from workers.reaper import Reaper


@pytest.fixture
def queue(coord: Coordinator) -> Queue:
    return Queue(coord.store)


async def _running(coord: Coordinator, sid: str, worker: str) -> str:
    res = await coord.execute(sid, {"n": 1})
    assert isinstance(res, Reserved)
    await Queue(coord.store).ensure_group()
    # Take the entry the way a worker would, so only the run's state is left to recover.
    for entry in await Queue(coord.store).read(worker, 100, 10):
        await Queue(coord.store).ack(entry.id)
    handle = await coord.claim(sid, res.run_id, worker)
    coord.release(handle)
    return res.run_id


async def test_a_run_of_an_unknown_worker_is_requeued(coord: Coordinator, queue: Queue) -> None:
    # Given a running run whose worker never heartbeated (or was forgotten)
    run_id = await _running(coord, "s1", "ghost")
    # When the reaper passes
    report = await reap_once(coord)
    # Then the run is pending again, on the queue, and the next claim is attempt 2
    assert report.requeued == [f"s1 {run_id}"]
    state = await coord.runner("s1")
    assert state is not None and state.status == "pending" and state.worker is None
    assert await queue.queued_runs() == {("s1", run_id)}
    handle = await coord.claim("s1", run_id, "w2")
    assert handle.attempt == 2
    coord.release(handle)


async def test_a_run_of_a_live_worker_is_left_alone(coord: Coordinator, queue: Queue) -> None:
    await queue.heartbeat("alive", now_ms() + 60_000, {"pid": 1}, 60_000)
    await _running(coord, "s1", "alive")
    report = await reap_once(coord, undispatched_after=0, stale_entry_after=0)
    assert not report.changed
    state = await coord.runner("s1")
    assert state is not None and state.status == "running"


async def test_retry_budget_exhausted_ends_the_run_as_error_naming_the_worker(
    coord: Coordinator, queue: Queue
) -> None:
    # Given a worker whose heartbeat deadline has passed, with a run on its last attempt
    await queue.heartbeat("w-dead", now_ms() - 1, {"pid": 1}, 60_000)
    run_id = await _running(coord, "s1", "w-dead")
    # When the reaper passes with max_attempts=1
    report = await reap_once(coord, max_attempts=1)
    # Then the run ended as error, saying which worker was lost, with its terminal event
    assert report.failed == [f"s1 {run_id}"]
    state = await coord.runner("s1")
    assert state is not None and state.status == "error"
    assert state.error is not None and "worker 'w-dead' was lost" in state.error
    last = (await coord.client.xrevrange(coord.keys.events("s1"), count=1))[0][1]
    assert last["type"] == "error" and "w-dead" in last["data"]
    assert "s1" not in await coord.store.active_sessions()
    assert (await coord.store.ttls("s1"))["events"] > 0


async def test_cancel_of_a_run_whose_worker_died_converges_to_cancelled(
    coord: Coordinator,
) -> None:
    run_id = await _running(coord, "s1", "ghost")
    assert await coord.cancel("s1")
    report = await reap_once(coord)
    assert f"s1 {run_id}" not in report.requeued + report.failed
    state = await coord.runner("s1")
    assert state is not None and state.status == "cancelled"


async def test_the_lost_worker_cannot_write_after_its_run_was_requeued(
    coord: Coordinator,
) -> None:
    res = await coord.execute("s1", None)
    handle = await coord.claim("s1", res.run_id, "ghost")
    await reap_once(coord)
    with pytest.raises(RunSuperseded):
        await handle.emit({"type": "token", "content": "zombie"})
    with pytest.raises(RunSuperseded):
        await handle.complete()
    coord.release(handle)
    state = await coord.runner("s1")
    assert state is not None and state.status == "pending"


async def test_a_run_reserved_but_never_dispatched_is_dispatched(
    coord: Coordinator, queue: Queue
) -> None:
    # Given a crash between reserve and dispatch: pending and indexed (the reservation indexes
    # it in the same round trip), but not queued
    res = await coord.store.reserve("lost", {"x": 1}, mode="queue")
    assert isinstance(res, Reserved)
    assert "lost" in await coord.store.active_sessions()
    # When a young run is checked, nothing is done yet (its dispatch may be on its way)
    report = await reap_once(coord, undispatched_after=60)
    assert not report.reindexed and not report.redispatched
    # Then once it is old enough, it is dispatched
    report = await reap_once(coord, undispatched_after=0)
    assert report.redispatched == [f"lost {res.run_id}"]
    assert await queue.queued_runs() == {("lost", res.run_id)}
    assert "lost" in await coord.store.active_sessions()
    # And a run that is in the queue is not dispatched twice
    assert not (await reap_once(coord, undispatched_after=0)).redispatched
    assert await coord.client.xlen(coord.keys.queue) == 1


async def test_a_scheduled_run_missing_from_the_schedule_is_put_back(
    coord: Coordinator, queue: Queue
) -> None:
    due = now_ms() + 60_000
    res = await coord.store.reserve("later", None, due_ms=due, mode="queue")
    report = await reap_once(coord, undispatched_after=0)
    assert report.rescheduled == [f"later {res.run_id}"]
    assert await coord.client.zscore(coord.keys.schedule, f"later {res.run_id}") == due
    assert await queue.queued_runs() == set()


async def test_an_entry_read_by_a_dead_consumer_is_requeued(
    coord: Coordinator, queue: Queue
) -> None:
    # Given an entry delivered to a consumer that died before claiming it
    res = await coord.execute("s1", None)
    await queue.ensure_group()
    (entry,) = await queue.read("dead-consumer", 10, 10)
    # When the reaper passes
    report = await reap_once(coord, stale_entry_after=0, undispatched_after=60)
    # Then the run is on the queue again, the old entry is gone, and so is the dead consumer
    assert report.redelivered == 1
    assert "dead-consumer" in report.deleted_consumers
    remaining = await coord.client.xrange(coord.keys.queue)
    assert [(f["session"], f["run"]) for _, f in remaining] == [("s1", res.run_id)]
    assert remaining[0][0] != entry.id


async def test_the_active_index_is_repaired(coord: Coordinator, queue: Queue) -> None:
    # Given an index holding a session with no run and one whose run ended
    await coord.client.zadd(coord.keys.active, {"gone": 1})
    res = await coord.execute("done", None)
    handle = await coord.claim("done", res.run_id, "w")
    await handle.complete()
    coord.release(handle)
    await coord.client.zadd(coord.keys.active, {"done": 1})
    # And an active run missing from it
    await coord.execute("live", None)
    await coord.client.zrem(coord.keys.active, "live")
    # When the reaper scans
    report = await reap_once(coord)
    # Then the index holds exactly the active run
    assert sorted(report.unindexed) == ["done", "gone"]
    assert report.reindexed == ["live"]
    assert await coord.store.active_sessions() == ["live"]


async def test_local_runs_are_ended_not_requeued(coord: Coordinator, queue: Queue) -> None:
    # A run reserved for in-process execution whose process never claimed it
    never = await coord.try_reserve("never")
    # A local run whose process runs without heartbeats: not judged
    res = await coord.try_reserve("quiet")
    coord.release(await coord.claim("quiet", res.run_id, "api-1"))
    # A local run whose worker is known to be dead: ended as error, never requeued
    await queue.heartbeat("api-2", now_ms() - 1, {"pid": 1}, 60_000)
    dead = await coord.try_reserve("dead")
    coord.release(await coord.claim("dead", dead.run_id, "api-2"))

    report = await reap_once(coord, undispatched_after=0, max_attempts=5)

    assert sorted(report.failed) == [f"dead {dead.run_id}", f"never {never.run_id}"]
    assert not report.requeued and not report.redispatched
    assert {s: (await coord.runner(s)).status for s in ("never", "quiet", "dead")} == {  # type: ignore[union-attr]
        "never": "error",
        "quiet": "running",
        "dead": "error",
    }


async def test_workers_lost_long_ago_are_forgotten(coord: Coordinator, queue: Queue) -> None:
    await queue.heartbeat("ancient", now_ms() - 2 * 3600 * 1000, {"pid": 1}, 60_000)
    await queue.heartbeat("recent", now_ms() - 1000, {"pid": 1}, 60_000)
    report = await reap_once(coord)
    assert report.forgotten_workers == ["ancient"]
    assert set(await queue.worker_deadlines()) == {"recent"}


async def test_passes_are_spaced_by_the_lock(coord: Coordinator, queue: Queue) -> None:
    options = {
        "interval": 30.0,
        "scan_interval": 30.0,
        "max_attempts": 3,
        "undispatched_after": 30.0,
        "stale_entry_after": 30.0,
    }
    first = Reaper(coord, queue, worker_id="w1", **options)
    second = Reaper(coord, queue, worker_id="w2", **options)
    report = await first.tick()
    assert isinstance(report, ReapReport) and report.scanned
    assert await second.tick() is None
    assert await first.tick() is None


async def test_bad_thresholds_are_refused(coord: Coordinator) -> None:
    with pytest.raises(ValueError, match="max_attempts must be a number >= 1, got 0"):
        await reap_once(coord, max_attempts=0)
    with pytest.raises(ValueError, match="undispatched_after must be a number >= 0, got -1"):
        await reap_once(coord, undispatched_after=-1)

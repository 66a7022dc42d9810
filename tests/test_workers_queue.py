"""runstate.queue: the worker pool's Redis data (fake and real server)."""

from __future__ import annotations

import asyncio

import pytest

from runstate import Coordinator, Reserved, RunCancelled, RunSuperseded
from runstate.queue import Queue, now_ms
from runstate.queue_records import QueueEntry


@pytest.fixture
def queue(coord: Coordinator) -> Queue:
    return Queue(coord.store)


async def test_ensure_group_is_idempotent_and_reads_runs_dispatched_before_it(
    coord: Coordinator, queue: Queue
) -> None:
    # Given a run dispatched before any worker created the group
    res = await coord.execute("s1", {"x": 1})
    assert isinstance(res, Reserved)
    # When the group is created (twice) and a consumer reads
    await queue.ensure_group()
    await queue.ensure_group()
    entries = await queue.read("w1", 10, 10)
    # Then it gets the run, and the entry is pending for it until acknowledged
    assert [(e.session_id, e.run_id) for e in entries] == [("s1", res.run_id)]
    assert [e.id for e in await queue.read_pending("w1")] == [entries[0].id]
    await queue.ack(entries[0].id)
    assert await queue.read_pending("w1") == []
    assert await coord.client.xlen(coord.keys.queue) == 0


async def test_junk_entries_decode_as_empty(coord: Coordinator, queue: Queue) -> None:
    await queue.ensure_group()
    await coord.client.xadd(coord.keys.queue, {"session": "bad id!", "run": "r"})
    await coord.client.xadd(coord.keys.queue, {"nothing": "here"})
    entries = await queue.read("w1", 10, 10)
    assert [(e.session_id, e.run_id) for e in entries] == [(None, None), (None, None)]
    assert QueueEntry.decode("1-0", None) == QueueEntry("1-0", None, None)


async def test_lock_is_exclusive_and_only_its_holder_releases_or_extends_it(
    coord: Coordinator, queue: Queue
) -> None:
    token = await queue.acquire_lock("reaper", 5000)
    assert token is not None
    assert await queue.acquire_lock("reaper", 5000) is None
    assert not await queue.release_lock("reaper", "someone-else")
    assert not await queue.extend_lock("reaper", "someone-else", 10_000)
    assert await queue.extend_lock("reaper", token, 10_000)
    assert 5000 < await coord.client.pttl(coord.keys.lock("reaper")) <= 10_000
    assert await queue.release_lock("reaper", token)
    assert not await queue.release_lock("reaper", token)
    assert await queue.acquire_lock("reaper", 5000) is not None
    with pytest.raises(ValueError, match="lock TTL must be at least 1 ms, got 0"):
        await queue.acquire_lock("reaper", 0)


async def test_heartbeat_is_one_zset_entry_and_an_expiring_info_hash(
    coord: Coordinator, queue: Queue
) -> None:
    deadline = now_ms() + 30_000
    info = {"host": "h", "pid": 7, "concurrency": 2, "in_flight": 1, "runs": '["s r"]'}
    await queue.heartbeat("w-1", deadline, info, 15_000)
    await queue.heartbeat("w-1", deadline + 1, info, 15_000)
    assert await queue.worker_deadlines() == {"w-1": deadline + 1}
    assert (await queue.worker_info(["w-1"]))[0]["pid"] == "7"
    assert 0 < await coord.client.pttl(coord.keys.worker("w-1")) <= 15_000
    await queue.retire("w-1")
    assert await queue.worker_deadlines() == {}
    assert await queue.worker_info(["w-1"]) == [{}]


async def test_move_due_dispatches_each_run_once_however_many_movers_race(
    coord: Coordinator, queue: Queue
) -> None:
    # Given three runs scheduled in the past and one in the future
    runs = []
    for sid in ("a", "b", "c"):
        res = await coord.execute(sid, None, delay=0.001)
        runs.append((sid, res.run_id))
    later = await coord.execute("d", None, delay=60)
    await asyncio.sleep(0.01)  # let the 1 ms delays pass
    # When five movers race
    moved = await asyncio.gather(*(queue.move_due(now_ms()) for _ in range(5)))
    # Then each due run was dispatched by exactly one of them, and the later one waits
    assert sorted(r for batch in moved for r in batch) == sorted(runs)
    queued = await queue.queued_runs()
    assert queued == set(runs)
    assert await queue.scheduled([("d", later.run_id), runs[0]]) == [True, False]


async def test_move_due_drops_malformed_schedule_members(coord: Coordinator, queue: Queue) -> None:
    await coord.client.zadd(coord.keys.schedule, {"no-run-id": 1, "bad id! r": 1})
    assert await queue.move_due(now_ms()) == []
    assert await coord.client.zcard(coord.keys.schedule) == 0


async def test_recover_requeues_then_errors_and_is_fenced(coord: Coordinator, queue: Queue) -> None:
    # Given a run claimed by a worker
    res = await coord.execute("s1", None)
    handle = await coord.claim("s1", res.run_id, "w-dead")
    common = {"status": "running", "worker": "w-dead", "message": "lost"}
    # A recovery with the wrong attempt or worker changes nothing
    assert await queue.recover("s1", res.run_id, attempt=2, max_attempts=3, **common) == "stale"
    wrong = {**common, "worker": "w-other"}
    assert await queue.recover("s1", res.run_id, attempt=1, max_attempts=3, **wrong) == "stale"
    # When it is recovered while attempts remain, it is pending again and queued
    assert await queue.recover("s1", res.run_id, attempt=1, max_attempts=3, **common) == "requeued"
    state = await coord.runner("s1")
    assert state is not None and state.status == "pending" and state.attempt == 1
    assert (("s1", res.run_id)) in (await queue.queued_runs() or set())
    # Then the lost worker can no longer write
    with pytest.raises(RunSuperseded):
        await handle.emit({"type": "token", "content": "zombie"})
    coord.release(handle)
    # And the next claim is attempt 2; recovering it with no attempts left ends it as error
    second = await coord.claim("s1", res.run_id, "w-dead")
    assert second.attempt == 2
    assert await queue.recover("s1", res.run_id, attempt=2, max_attempts=2, **common) == "error"
    state = await coord.runner("s1")
    assert state is not None and state.status == "error" and state.error == "lost"
    assert (await coord.client.xrevrange(coord.keys.events("s1"), count=1))[0][1]["type"] == "error"
    assert "s1" not in await coord.store.active_sessions()
    assert (await coord.store.ttls("s1"))["runner"] > 0
    coord.release(second)


async def test_recover_never_resurrects_a_cancelled_run(coord: Coordinator, queue: Queue) -> None:
    res = await coord.execute("s1", None)
    handle = await coord.claim("s1", res.run_id, "w-dead")
    assert await coord.cancel("s1")
    outcome = await queue.recover(
        "s1",
        res.run_id,
        status="running",
        attempt=1,
        worker="w-dead",
        max_attempts=3,
        message="lost",
    )
    assert outcome == "stale"
    state = await coord.runner("s1")
    assert state is not None and state.status == "cancelled"
    coord.release(handle)
    with pytest.raises(ValueError, match="status must be 'running' or 'pending', got 'done'"):
        await queue.recover(
            "s1", res.run_id, status="done", attempt=1, worker="", max_attempts=0, message=""
        )


async def test_link_child_is_fenced_on_the_parent_running(coord: Coordinator, queue: Queue) -> None:
    res = await coord.execute("p", None)
    handle = await coord.claim("p", res.run_id, "w")
    await queue.link_child("p", res.run_id, 1, "c1")
    assert await coord.client.smembers(coord.keys.children("p")) == {"c1"}
    with pytest.raises(RunSuperseded):
        await queue.link_child("p", res.run_id, 2, "c2")
    assert await coord.cancel("p")
    with pytest.raises(RunCancelled):
        await queue.link_child("p", res.run_id, 1, "c3")
    coord.release(handle)


async def test_autoclaim_and_redeliver_move_a_stuck_entry(coord: Coordinator, queue: Queue) -> None:
    res = await coord.execute("s1", None)
    await queue.ensure_group()
    (entry,) = await queue.read("ghost", 10, 10)
    _cursor, taken = await queue.autoclaim("reaper", 0)
    assert [e.id for e in taken] == [entry.id]
    await queue.redeliver(taken[0])
    assert await queue.queued_runs() == {("s1", res.run_id)}
    (fresh,) = await queue.read("w1", 10, 10)
    assert fresh.id != entry.id and fresh.run_id == res.run_id
    assert {c.name: c.pending for c in await queue.consumers()} == {
        "ghost": 0,
        "reaper": 0,
        "w1": 1,
    }

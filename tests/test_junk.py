"""Junk written by hand into every key runstate uses (DESIGN §7): a clear error naming the
session or key, or a warning, never a crash or a hang of a worker, a subscriber, a reaper, an
API replica or the ``runstate`` command.

In-process cases run on fakeredis and on a real server (the ``redis`` fixture); the claims
about processes ("never a dead worker") run real worker and CLI subprocesses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from runstate import Coordinator, Reserved, RunHandle, RunstateError, StreamEvent
from runstate.cli import cmd_workers
from runstate.events import Token
from runstate.http import create_app
from runstate.queue import Queue, now_ms
from runstate.replies import Claimed
from tests.agents import basic
from tests.agents.helpers import wait_status
from tests.helpers import client_like, eventually
from tests.security_support import Process, Processes, processes, run_cli
from workers import Worker
from workers.reaper import reap_once
from workers.scheduler import Scheduler

GOOD = "good-1"
WORKER_KNOBS: dict[str, Any] = {
    "heartbeat_interval": 0.05,
    "lost_after": 3.0,
    "reaper_interval": 0.1,
    "scan_interval": 0.1,
    "schedule_interval": 0.05,
    "block_ms": 100,
    "shutdown_grace": 5.0,
    "shutdown_cancel_wait": 1.0,
}


def raw_client(redis: Redis) -> Redis:
    """A client of the same server that does not decode: for writing bytes."""
    return client_like(redis, decode_responses=False)


@pytest.fixture
async def jcoord(redis: Redis, prefix: str) -> AsyncIterator[Coordinator]:
    """A Coordinator whose client decodes like :meth:`Coordinator.from_url`'s (bytes that are
    not UTF-8 read as U+FFFD), on the same server as ``redis``."""
    client = client_like(redis, encoding_errors="replace")
    coord = Coordinator(client, prefix=prefix)
    try:
        yield coord
    finally:
        await coord.aclose()
        await client.aclose()


async def start_running(coord: Coordinator, sid: str, worker: str = "w-gone") -> Claimed:
    """A run of ``sid`` dispatched and claimed by ``worker`` (a worker that is not there)."""
    reserved = await coord.execute(sid, {"steps": 1})
    assert isinstance(reserved, Reserved)
    return await coord.store.claim(sid, reserved.run_id, worker)


# ---- the junk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Junk:
    """Junk in one session's keys, written into its running run."""

    name: str
    write: Callable[[Coordinator, Redis, str], Awaitable[None]]


async def _hset(coord: Coordinator, redis: Redis, sid: str, **fields: str) -> None:
    await redis.hset(coord.keys.runner(sid), mapping=fields)


async def _replace(redis: Redis, key: str, kind: str) -> None:
    await redis.delete(key)
    if kind == "string":
        await redis.set(key, "junk")
    elif kind == "list":
        await redis.rpush(key, "junk", "{}")
    elif kind == "hash":
        await redis.hset(key, "junk", "1")
    else:  # pragma: no cover
        raise AssertionError(kind)


async def _foreign_runner(coord: Coordinator, redis: Redis, sid: str, **fields: str) -> None:
    await redis.delete(coord.keys.runner(sid))
    await redis.hset(coord.keys.runner(sid), mapping=fields)


async def _junk_entries(coord: Coordinator, redis: Redis, sid: str) -> None:
    key = coord.keys.events(sid)
    for fields in (
        {"hello": "world"},
        {"run": "r", "seq": "x", "type": "token", "data": "{not json"},
        {"run": "r", "seq": "2", "type": "token", "data": "[1, 2]"},
        {"run": "r", "seq": "3", "type": "token", "data": '{"type": "token"}'},
    ):
        await redis.xadd(key, fields)


async def _binary_entry(coord: Coordinator, redis: Redis, sid: str) -> None:
    raw = raw_client(redis)
    try:
        key = coord.keys.events(sid).encode()
        await raw.xadd(key, {b"run": b"\xff\xfe", b"seq": b"1", b"type": b"\xc3", b"data": b"\xff"})
    finally:
        await raw.aclose()


async def _binary_runner(coord: Coordinator, redis: Redis, sid: str) -> None:
    raw = raw_client(redis)
    try:
        await raw.hset(coord.keys.runner(sid).encode(), b"last_tool_name", b"\xff\xfe")
    finally:
        await raw.aclose()


SESSION_JUNK = [
    Junk("runner-status-bogus", lambda c, r, s: _hset(c, r, s, status="bogus")),
    Junk(
        "runner-garbage-numbers-and-dates",
        lambda c, r, s: _hset(
            c, r, s, attempt="x", seq="-3", round_count="many", started_at="yesterday"
        ),
    ),
    Junk("runner-budget-not-json", lambda c, r, s: _hset(c, r, s, last_budget_event="{nope")),
    Junk("runner-foreign-fields", lambda c, r, s: _foreign_runner(c, r, s, hello="world")),
    Junk("runner-run-id-without-status", lambda c, r, s: _foreign_runner(c, r, s, run_id="abc")),
    Junk("runner-not-utf8", _binary_runner),
    Junk("runner-a-string", lambda c, r, s: _replace(r, c.keys.runner(s), "string")),
    Junk("events-a-string", lambda c, r, s: _replace(r, c.keys.events(s), "string")),
    Junk("events-a-list", lambda c, r, s: _replace(r, c.keys.events(s), "list")),
    Junk("events-a-hash", lambda c, r, s: _replace(r, c.keys.events(s), "hash")),
    Junk("events-junk-entries", _junk_entries),
    Junk("events-not-utf8", _binary_entry),
    Junk(
        "critical-not-json",
        lambda c, r, s: r.rpush(c.keys.critical(s), "{x", "[]", '{"type": "token"}'),
    ),
    Junk("critical-a-string", lambda c, r, s: _replace(r, c.keys.critical(s), "string")),
    Junk("cancel-marker-a-hash", lambda c, r, s: _replace(r, c.keys.cancel(s), "hash")),
    Junk("children-a-string", lambda c, r, s: _replace(r, c.keys.children(s), "string")),
    Junk(
        "children-bad-ids",
        lambda c, r, s: r.sadd(c.keys.children(s), "bad id", "{x}", "no-such-session"),
    ),
]


def _clear(exc: BaseException, *names: str) -> None:
    """``exc`` is one of runstate's clear errors and names one of ``names``."""
    assert isinstance(exc, RunstateError | ValueError), f"not a clear error: {exc!r}"
    assert not isinstance(exc, UnicodeError), f"not a clear error: {exc!r}"
    assert any(name in str(exc) for name in names), f"{exc} names none of {names}"


async def _outcome(call: Awaitable[Any], *names: str, limit: float = 5.0) -> Any:
    """Await ``call``: its result, or None after checking its error is a clear one."""
    try:
        async with asyncio.timeout(limit):
            return await call
    except TimeoutError:
        raise AssertionError(f"hung for {limit}s") from None
    except Exception as exc:
        _clear(exc, *names)
        return None


async def _read(events: AsyncIterator[StreamEvent], *names: str, idle: float = 0.1) -> list[Any]:
    """Items of a subscription until it ends, errs (clearly) or is quiet for ``idle`` seconds."""
    items: list[Any] = []
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        while True:
            try:
                async with asyncio.timeout(idle):
                    items.append(await anext(events))
            except (TimeoutError, StopAsyncIteration):
                return items
            except Exception as exc:
                _clear(exc, *names)
                return items


@pytest.mark.parametrize("junk", SESSION_JUNK, ids=lambda j: j.name)
async def test_session_junk_gets_a_clear_error_or_a_warning_everywhere(
    jcoord: Coordinator, redis: Redis, junk: Junk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    coord = jcoord
    # Given a healthy session followed live
    healthy = await coord.try_reserve(GOOD)
    assert isinstance(healthy, Reserved)
    good = await coord.claim(GOOD, healthy.run_id, "w-here")
    live: list[StreamEvent] = []
    follower = asyncio.create_task(_follow(coord, GOOD, live))
    try:
        await _meet_the_junk(coord, redis, junk, good, live)
        # And the healthy subscriber got to the end of its run
        await asyncio.wait_for(follower, 5)
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        coord.release(good)
    assert "Traceback" not in caplog.text


async def _meet_the_junk(
    coord: Coordinator, redis: Redis, junk: Junk, good: RunHandle, live: list[StreamEvent]
) -> None:
    sid = "junk-1"
    names = (repr(sid), sid)
    # Given a run whose worker was lost, and junk written into another running run's keys
    lost = await start_running(coord, "lost-1")
    await start_running(coord, sid)
    await junk.write(coord, redis, sid)

    # When each reader and writer meets it, Then each answers, or fails naming the session
    await _outcome(coord.runner(sid), *names)
    active = await _outcome(coord.active_runs(), *names)
    assert active is not None, "one junk session must not hide the others"
    assert "lost-1" in [r.session_id for r in active]
    await _read(coord.subscribe(sid), *names)
    await _read(coord.subscribe(sid, "0"), *names)
    # And the reaper still repairs the other sessions in the same pass
    report = await _outcome(reap_once(coord, undispatched_after=60), *names)
    assert report is not None, "one junk session must not stop the reaper"
    assert f"lost-1 {lost.run_id}" in report.requeued
    # And the HTTP API answers JSON, naming the session when it fails
    await _http_checks(coord, sid)
    await _outcome(coord.cancel(sid), *names)
    await _outcome(coord.execute(sid, {"again": True}), *names)
    await _outcome(coord.cancel(sid), *names)

    # And the process's event reader still serves the healthy session
    token = await good.emit(Token(content="still here"))
    await eventually(lambda: token in [i.id for i in live], what="the healthy subscriber")
    await good.complete()


async def _follow(coord: Coordinator, sid: str, out: list[StreamEvent]) -> None:
    async with contextlib.aclosing(coord.subscribe(sid)) as events:  # type: ignore[type-var]
        async for item in events:
            out.append(item)


async def _http_checks(coord: Coordinator, sid: str) -> None:
    transport = httpx.ASGITransport(app=create_app(coord), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        api = f"/api/v1/sessions/{sid}"
        for method, path in (
            ("GET", f"{api}/runner"),
            ("GET", "/api/v1/runs/active"),
            ("POST", f"{api}/stop"),
            ("POST", f"{api}/execute"),
        ):
            async with asyncio.timeout(5):
                response = await client.request(method, path)
            # Then every answer is JSON: the normal one, or an error that names the session
            body = response.json()
            if path.endswith("/active"):
                assert response.status_code == 200, body
            elif response.status_code not in (200, 202, 404):
                assert sid in body["error"], f"{method} {path}: {response.status_code} {body}"


async def test_bytes_that_are_not_utf8_fail_only_their_subscribers_on_a_strict_client(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a client that decodes strictly (not like from_url's), a healthy session followed
    # live, and a session whose stream gets an entry that is not UTF-8 while it is followed
    healthy = await coord.try_reserve(GOOD)
    assert isinstance(healthy, Reserved)
    good = await coord.claim(GOOD, healthy.run_id, "w-here")
    live: list[StreamEvent] = []
    follower = asyncio.create_task(_follow(coord, GOOD, live))
    bad = await coord.try_reserve("bad-1")
    assert isinstance(bad, Reserved)
    await coord.store.claim("bad-1", bad.run_id, "w-gone")
    broken: list[StreamEvent] = []
    victim = asyncio.create_task(_follow(coord, "bad-1", broken))
    try:
        await eventually(lambda: coord._hub.watched == 2, what="both followed")
        await _binary_entry(coord, redis, "bad-1")
        # Then the broken session's subscriber fails, naming it
        with pytest.raises(RunstateError, match=r"'bad-1'.*not UTF-8"):
            await asyncio.wait_for(victim, 5)
        # And the healthy one goes on
        token = await good.emit(Token(content="still here"))
        await eventually(lambda: token in [i.id for i in live], what="the healthy subscriber")
        # And reading the broken session again fails clearly, naming it
        await _read(coord.subscribe("bad-1", "0"), "'bad-1'")
        await good.complete()
        await asyncio.wait_for(follower, 5)
    finally:
        for task in (follower, victim):
            task.cancel()
        await asyncio.gather(follower, victim, return_exceptions=True)
        coord.release(good)


# ---- global keys ------------------------------------------------------------------------------


async def test_junk_members_of_the_indexes_are_skipped_with_a_warning(
    jcoord: Coordinator, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    coord = jcoord
    caplog.set_level(logging.WARNING)
    keys = coord.keys
    # Given a running run, and junk members in the active, schedule and workers sorted sets
    lost = await start_running(coord, "lost-1")
    junk = {"bad id": 1, "{x}": 2, "": 3, "no-such-session": 4, "é": 5}
    await redis.zadd(keys.active, junk)
    await redis.zadd(keys.schedule, {"": 1, "no-space": 2, "bad id run": 3, "ghost r1": 4})
    await redis.zadd(keys.workers, {"bad id": 1, "{w}": now_ms() + 60_000, "": 2})
    # And a worker whose info hash is a string
    await redis.zadd(keys.workers, {"w-string": now_ms() + 60_000})
    await redis.set(keys.worker("w-string"), "junk")

    # When runs are listed, Then the junk is skipped with a warning
    active = await _outcome(coord.active_runs(), "bad id")
    assert [r.session_id for r in active] == ["lost-1"]
    assert "bad id" in caplog.text
    # And the reaper's pass completes, recovering the lost run and dropping the junk member
    # that names no session
    report = await reap_once(coord, undispatched_after=60)
    assert f"lost-1 {lost.run_id}" in report.requeued
    # And the scheduler drops the malformed schedule entries, and dispatches the well-formed one
    moved = await Scheduler(Queue(coord.store), interval=1).tick()
    assert moved == 1
    assert await redis.zcard(keys.schedule) == 0
    # And `runstate workers` lists every member, with no info where it has none
    namespace = argparse.Namespace(json=True)
    assert await cmd_workers(coord, namespace) == 0
    # And the HTTP API lists the active runs
    transport = httpx.ASGITransport(app=create_app(coord))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/api/v1/runs/active")
    assert response.status_code == 200
    assert [r["session_id"] for r in response.json()] == ["lost-1"]


async def test_junk_queue_entries_are_dropped_and_the_worker_serves_on(
    coord: Coordinator, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    queue = coord.keys.queue
    # Given queue entries without fields runstate writes, naming bad session ids, naming
    # sessions that do not exist, and naming a session whose runner hash is a string
    await redis.set(coord.keys.runner("runner-string"), "junk")
    for fields in (
        {"hello": "world"},
        {"session": "bad id", "run": "r1"},
        {"session": "{x}", "run": "r1"},
        {"session": "no-such-session", "run": "r1"},
        {"session": "runner-string", "run": "r1"},
        {"run": "r1"},
        {"session": "s-no-run"},
    ):
        await redis.xadd(queue, fields)
    # When a worker with one slot serves the queue, and a good run is executed after the junk
    worker = Worker(coord, basic.agent, concurrency=1, **WORKER_KNOBS)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.ready.wait(), 10)
        await coord.execute("after-junk", {"steps": 2})
        # Then the good run completes, and every junk entry is gone from the queue
        await wait_status(coord, "after-junk", "completed", "error")
        state = await coord.runner("after-junk")
        assert state is not None and state.status == "completed"
        await eventually(lambda: _empty(redis, queue), what="junk entries dropped")
        assert "malformed queue entry" in caplog.text
        assert not task.done()
    finally:
        worker.stop("test over")
        await asyncio.wait_for(task, 15)


async def _empty(redis: Redis, queue: str) -> bool:
    return await redis.xlen(queue) == 0


async def test_a_queue_key_of_another_type_is_a_clear_error(
    coord: Coordinator, redis: Redis
) -> None:
    # Given the queue key holding a string
    await redis.set(coord.keys.queue, "junk")
    # When a run is executed, Then the error names the queue key
    await _outcome(coord.execute("s1", {"q": 1}), coord.keys.queue)
    if not coord.store.cluster:  # one script there: refused before anything was written
        assert await redis.exists(coord.keys.runner("s1"), coord.keys.active) == 0
    # And a worker cannot start, saying why
    worker = Worker(coord, basic.agent, **WORKER_KNOBS)
    with pytest.raises(RunstateError) as refused:
        await asyncio.wait_for(worker.run(), 5)
    assert coord.keys.queue in str(refused.value)
    # And a reaper pass fails naming the key, or completes
    await _outcome(reap_once(coord), coord.keys.queue)


async def test_an_active_index_of_another_type_is_a_clear_error(
    coord: Coordinator, redis: Redis
) -> None:
    # Given a running run, then the active index overwritten with a string
    reserved = await coord.try_reserve("s1")
    assert isinstance(reserved, Reserved)
    handle = await coord.claim("s1", reserved.run_id, "w1")
    await redis.delete(coord.keys.active)
    await redis.set(coord.keys.active, "junk")
    # When the run completes, and another run is executed
    # Then each error names the index
    await _outcome(handle.complete(), coord.keys.active)
    await _outcome(coord.execute("s2"), coord.keys.active)
    if not coord.store.cluster:  # one script each there: refused before anything was written
        state = await coord.runner("s1")
        assert state is not None and state.status == "running"
        assert await coord.runner("s2") is None
        # And a cancel still lands: the stop button works whatever the index holds
        assert await coord.cancel("s1") is True
        state = await coord.runner("s1")
        assert state is not None and state.status == "cancelled"


async def test_a_schedule_key_of_another_type_is_a_clear_error(
    coord: Coordinator, redis: Redis
) -> None:
    # Given the schedule key holding a list
    await redis.rpush(coord.keys.schedule, "junk")
    # When a run is executed for later, Then the error names the schedule key
    await _outcome(coord.execute("s1", delay=60), coord.keys.schedule)
    # And a run for now is not held up by it
    assert isinstance(await coord.execute("s2"), Reserved)
    # And its cancel lands, stepping over the junk
    assert await coord.cancel("s2") is True
    state = await coord.runner("s2")
    assert state is not None and state.status == "cancelled"
    assert await coord.client.lrange(coord.keys.schedule, 0, -1) == ["junk"]


async def test_junk_on_the_cancel_channel_is_ignored_and_cancels_still_land(
    coord: Coordinator, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # Given runs of this process, its cancel watcher listening, one of them with a cancel
    # marker that is a hash
    runs = {}
    for sid in ("s1", "s2", "s3"):
        reserved = await coord.try_reserve(sid)
        assert isinstance(reserved, Reserved)
        runs[sid] = await coord.claim(sid, reserved.run_id, "w1")
    await eventually(coord.cancel_watcher.listening.is_set, what="the watcher listens")
    await redis.hset(coord.keys.cancel("s3"), "junk", "1")
    # When junk is published on the cancel channel, then a real cancel of s2
    channel = coord.keys.cancel_channel
    s1 = runs["s1"].run_id
    for message in ("", "one-part", "too many parts here", f"s1 {s1} x", "s1 other", "{x} y"):
        await redis.publish(channel, message)
    raw = raw_client(redis)
    try:
        await raw.publish(channel.encode(), b"\xff\xfe s1")
    finally:
        await raw.aclose()
    assert await coord.cancel("s2")
    # Then s2's cancel lands, and nothing else was cancelled by the junk before it
    await eventually(lambda: runs["s2"].cancelled, limit=3, what="the cancel of s2")
    assert not runs["s1"].cancelled and not runs["s3"].cancelled
    assert "malformed cancel message" in caplog.text
    # And the junk marker is skipped by the marker poll, which goes on for the others
    await coord.cancel_watcher.poll()
    assert "ignoring the cancel marker of session 's3'" in caplog.text
    # And later cancels still land, s3's too (its marker is written over)
    assert await coord.cancel("s1") and await coord.cancel("s3")
    await eventually(lambda: runs["s1"].cancelled and runs["s3"].cancelled, limit=3)
    for run in runs.values():
        coord.release(run)


# ---- real processes ---------------------------------------------------------------------------


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    with processes(tmp_path) as started:
        yield started


async def test_a_worker_process_outlives_junk_in_every_key(
    real_redis: Redis,
    redis_url: str,
    prefix: str,
    procs: Processes,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with Coordinator.from_url(redis_url, prefix) as coord:
        keys = coord.keys
        # Given a worker process serving the prefix
        worker = procs.worker("wjunk", redis_url, prefix, "--concurrency", "40")
        await eventually(
            lambda: _has_worker(Queue(coord.store), "wjunk"), limit=15, what="the worker"
        )
        # And runs it is running, one per session that is about to get junk
        sessions = {junk.name: f"junk-{i}" for i, junk in enumerate(SESSION_JUNK)}
        for sid in sessions.values():
            await coord.execute(sid, {"steps": 40, "delay": 0.05})
        for sid in sessions.values():
            await wait_status(coord, sid, "running")
        # When junk lands in every kind of key: in those runs' keys,
        for junk in SESSION_JUNK:
            await junk.write(coord, real_redis, sessions[junk.name])
        # in the queue, the indexes, the worker's own info hash and the cancel channel
        for fields in (
            {"hello": "world"},
            {"session": "bad id", "run": "r1"},
            {"session": "no-such-session", "run": "r1"},
            {"session": sessions["runner-a-string"], "run": "r1"},
        ):
            await real_redis.xadd(keys.queue, fields)
        await real_redis.zadd(keys.active, {"bad id": 1, "{x}": 2})
        await real_redis.zadd(keys.schedule, {"bad id run": 1, "no-space": 2})
        await real_redis.zadd(keys.workers, {"bad id": 1})
        await real_redis.set(keys.worker("wjunk"), "junk")
        for message in ("junk junk junk", "bad id", ""):
            await real_redis.publish(keys.cancel_channel, message)

        # Then the worker stays alive and runs good runs after the junk
        for n in range(3):
            await coord.execute(f"good-{n}", {"steps": 2})
        for n in range(3):
            state = await wait_status(coord, f"good-{n}", "completed", "error", limit=20)
            assert state.status == "completed", worker.output()
        # And cancels still reach it
        await coord.execute("to-cancel", {"kind": "quiet", "steps": 2000, "delay": 0.01})
        await wait_status(coord, "to-cancel", "running")
        assert await coord.cancel("to-cancel")
        await worker.wait_for("session=to-cancel run=", limit=10)
        await eventually(
            lambda: _logged(worker, "outcome=cancelled"), limit=10, what="the cancel landed"
        )
        assert worker.proc.poll() is None, worker.output()

        # And the runstate command answers, never with a traceback: as a process,
        ls = procs.cli("cli-ls", redis_url, prefix, "ls")
        # and (quicker) in this process: `show` of each junk session says what it can, or
        # names the session in a one-line error
        url = ["--redis-url", redis_url, "--prefix", prefix]
        for sid in sessions.values():
            code, out, err = await run_cli(capsys, *url, "show", sid)
            assert code in (0, 1, 2), (sid, code, out, err)
            if code == 2:
                assert sid in err and len(err.strip().splitlines()) == 1, err
        code, out, err = await run_cli(capsys, *url, "workers")
        assert code == 0 and "wjunk" in out, (out, err)
        code, out, err = await run_cli(capsys, *url, "--json", "reap")
        assert code == 0 and json.loads(out)["scanned"], (out, err)
        assert ls.wait(30) == 0, ls.output()
        assert "Traceback" not in ls.output(), ls.output()

        # And the worker drains and exits 0 on SIGTERM; the tracebacks it logged are those of
        # runs whose writes the junk refused, nothing of its own
        assert worker.terminate() == 0, worker.output()
        for crash in ("entry task failed", "never retrieved", "worker failed", "listener failed"):
            assert crash not in worker.output(), worker.output()


async def _has_worker(queue: Queue, worker_id: str) -> bool:
    return worker_id in await queue.worker_deadlines()


async def _logged(process: Process, text: str) -> bool:
    return text in process.output()

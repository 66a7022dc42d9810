"""Two real `runstate serve` replicas on one real server: any replica serves any request.

Most tests play the worker from the test process (claiming each run with its own Coordinator
and writing the events), to control exactly what is written when; the last ones have a real
``python -m workers`` process run the runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from runstate import Coordinator, RunCancelled
from runstate.events import TaskListUpdated, Token

from .agents.helpers import WorkerProcess, registered, start_worker
from .agents.helpers import eventually as until
from .helpers import claim, eventually
from .http_support import (
    Frame,
    Replica,
    aiter_frames,
    start_serve,
    stop_serve,
    stream_ids,
    wait_ready,
    with_query,
)

API = "/api/v1"
KEEPALIVE = 0.3


@pytest.fixture(scope="module")
def module_prefix(redis_url: str) -> Iterator[str]:
    """One key prefix for the replicas and the tests of this module; removed afterwards."""
    value = "t" + uuid.uuid4().hex[:10]
    yield value
    with redis_sync.Redis.from_url(redis_url, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{value}:*", count=1000))
        if keys:
            client.unlink(*keys)


@pytest.fixture(scope="module")
def replicas(
    redis_url: str, module_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Replica, Replica]]:
    """Replicas A and B, each naming its Redis connections so that they can be counted."""
    log_dir = tmp_path_factory.mktemp("replicas")
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            client_name = f"rs-http-{name}-{uuid.uuid4().hex[:8]}"
            env = {
                "RUNSTATE_REDIS_URL": with_query(redis_url, client_name=client_name),
                "RUNSTATE_PREFIX": module_prefix,
            }
            args = ["--keepalive", str(KEEPALIVE), "--log-level", "warning"]
            replica = start_serve(log_dir, name, env, args)
            replica.client_name = client_name
            started.append(replica)
        for replica in started:
            wait_ready(replica)
        yield started[0], started[1]
    finally:
        codes = [stop_serve(r) for r in started]
    # Given SIGTERM, each replica drained and exited cleanly
    assert codes == [0] * len(started), [r.output() for r in started]


@pytest.fixture
async def worker(redis_url: str, module_prefix: str) -> AsyncIterator[Coordinator]:
    """The test's own Coordinator, standing in for a worker."""
    async with Coordinator.from_url(redis_url, module_prefix) as coord:
        yield coord


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=10.0, limits=limits) as client:
        yield client


async def next_event(frames: AsyncGenerator[Frame, None], limit: float = 5.0) -> Frame:
    """The next frame that is not a comment."""
    async with asyncio.timeout(limit):
        async for frame in frames:
            if frame.comment is None:
                return frame
    raise AssertionError("the stream ended")


async def execute(http: httpx.AsyncClient, replica: Replica, sid: str) -> str:
    response = await http.post(f"{replica.url}{API}/sessions/{sid}/execute", json={"sid": sid})
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def test_serve_answers_on_every_replica(
    replicas: tuple[Replica, Replica], http: httpx.AsyncClient
) -> None:
    for replica in replicas:
        response = await http.get(f"{replica.url}{API}/runs/active")
        assert response.status_code == 200 and isinstance(response.json(), list)
        page = await http.get(f"{replica.url}/")
        assert page.status_code == 200 and "runstate" in page.text


async def test_stream_on_b_drop_and_resume_on_a_loses_and_repeats_nothing(
    replicas: tuple[Replica, Replica],
    worker: Coordinator,
    real_redis: Redis,
    http: httpx.AsyncClient,
) -> None:
    a, b = replicas
    sid = "rep-stream"
    # Given a run started on A, and a client streaming it from B
    run_id = await execute(http, a, sid)
    seen: list[Frame] = []
    async with http.stream(
        "GET", f"{b.url}{API}/sessions/{sid}/events", params={"last_event_id": "0"}
    ) as response:
        assert response.status_code == 200
        frames = aiter_frames(response)
        # When the worker claims it and writes, each event reaches the client live
        run = await worker.claim(sid, run_id, "test-worker")
        seen.append(await next_event(frames))
        for i in range(3):
            await run.emit(Token(content=f"live-{i}"))
            seen.append(await next_event(frames))
        await frames.aclose()
    # And the connection drops mid-run, while the run goes on
    for i in range(3):
        await run.emit(Token(content=f"missed-{i}"))
    # When the client resumes on A with the last id it saw
    last = seen[-1].id
    assert last is not None
    async with http.stream(
        "GET", f"{a.url}{API}/sessions/{sid}/events", headers={"Last-Event-ID": last}
    ) as response:
        frames = aiter_frames(response)
        for _ in range(3):
            seen.append(await next_event(frames))
        await run.emit(Token(content="after-resume"))
        await run.complete({"tokens": 7})
        while not (frame := await next_event(frames)).done:
            seen.append(frame)
        await frames.aclose()
    worker.release(run)
    # Then the frames' ids are the run's stream entries, exactly, in order, none twice
    assert [f.id for f in seen] == await stream_ids(real_redis, worker.keys.events(sid))
    assert [f.event for f in seen] == ["execution_started", *["token"] * 7, "complete"]
    contents = [json.loads(f.data)["event"].get("content") for f in seen[1:-1]]
    assert contents == [
        *(f"live-{i}" for i in range(3)),
        *(f"missed-{i}" for i in range(3)),
        "after-resume",
    ]


async def test_stop_on_b_cancels_a_run_started_on_a(
    replicas: tuple[Replica, Replica], worker: Coordinator, http: httpx.AsyncClient
) -> None:
    a, b = replicas
    sid = "rep-stop"
    # Given a running run, started through A
    run_id = await execute(http, a, sid)
    run = await claim(worker, sid, run_id, "test-worker")
    # When B is asked to stop the session
    stopped = await http.post(f"{b.url}{API}/sessions/{sid}/stop")
    # Then the run is cancelled, as A sees it, and the worker stops at its next safe point
    assert stopped.status_code == 200 and stopped.json() == {"status": "cancelled"}
    runner = (await http.get(f"{a.url}{API}/sessions/{sid}/runner")).json()
    assert runner["run_id"] == run_id and runner["status"] == "cancelled"
    await eventually(lambda: run.cancelled, what="the worker saw the cancel")
    with pytest.raises(RunCancelled):
        await run.checkpoint()
    # And there is nothing left to stop
    again = await http.post(f"{a.url}{API}/sessions/{sid}/stop")
    assert again.status_code == 404
    assert again.json() == {"error": f"nothing active in session {sid!r}"}
    worker.release(run)


async def test_idempotency_key_across_replicas(
    replicas: tuple[Replica, Replica], worker: Coordinator, http: httpx.AsyncClient
) -> None:
    a, b = replicas
    key = f"order-{uuid.uuid4().hex}"
    url = f"{API}/sessions/rep-idem/execute"
    # Given a request executed on A
    first = await http.post(a.url + url, json={"n": 1}, headers={"Idempotency-Key": key})
    assert first.status_code == 202
    # When it is retried on B, B answers A's response without executing
    again = await http.post(b.url + url, json={"n": 1}, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json()) == (202, first.json())
    assert again.headers["idempotent-replayed"] == "true"
    # And the same key with another body is refused
    other = await http.post(b.url + url, json={"n": 2}, headers={"Idempotency-Key": key})
    assert other.status_code == 409 and "different request" in other.json()["error"]
    # When two replicas get a new key at the same moment, only one of them executes
    race = f"race-{uuid.uuid4().hex}"
    both = await asyncio.gather(
        *(
            http.post(
                r.url + f"{API}/sessions/rep-race/execute",
                json={"n": 3},
                headers={"Idempotency-Key": race},
            )
            for r in (a, b, a, b)
        )
    )
    assert [r.status_code for r in both] == [202] * 4
    assert len({r.json()["run_id"] for r in both}) == 1


async def test_a_hundred_streams_on_one_replica_hold_few_redis_connections(
    replicas: tuple[Replica, Replica],
    worker: Coordinator,
    real_redis: Redis,
    http: httpx.AsyncClient,
) -> None:
    a, b = replicas
    sessions = [f"rep-fan-{i}" for i in range(4)]
    runs = []
    # Given four running runs, each with a critical event for new subscribers
    for sid in sessions:
        run = await worker.claim(sid, await execute(http, a, sid), "test-worker")
        await run.emit(TaskListUpdated(task_list=[sid]))
        runs.append(run)
    async with contextlib.AsyncExitStack() as stack:
        # When 100 clients stream them from B
        streams = []
        for i in range(100):
            response = await stack.enter_async_context(
                http.stream("GET", f"{b.url}{API}/sessions/{sessions[i % 4]}/events")
            )
            assert response.status_code == 200
            frames = aiter_frames(response)
            stack.push_async_callback(frames.aclose)
            streams.append(frames)
        # (each one is subscribed once it has its replay)
        replays = await asyncio.gather(*(next_event(f, 10.0) for f in streams))
        assert {f.event for f in replays} == {"task_list_updated"}
        # And every one of them gets the next event live
        for run in runs:
            await run.emit(Token(content="to-all"))
        live = await asyncio.gather(*(next_event(f, 10.0) for f in streams))
        assert {(f.event, json.loads(f.data)["event"]["content"]) for f in live} == {
            ("token", "to-all")
        }
        # Then B holds fewer than 10 connections to Redis
        clients = await real_redis.client_list()
        held = [c for c in clients if c.get("name") == b.client_name]
        assert 0 < len(held) < 10, [c.get("cmd") for c in held]
    for run in runs:
        await run.complete()
        worker.release(run)


async def test_an_idle_stream_gets_keepalive_comments(
    replicas: tuple[Replica, Replica], http: httpx.AsyncClient
) -> None:
    a, _ = replicas
    # Given a stream of a session where nothing happens
    async with http.stream("GET", f"{a.url}{API}/sessions/rep-idle/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = aiter_frames(response)
        # Then it gets keepalive comments, and nothing else
        async with asyncio.timeout(KEEPALIVE * 10):
            comments = [await anext(frames) for _ in range(2)]
        assert [f.comment for f in comments] == ["keepalive", "keepalive"]
        await frames.aclose()


def test_serve_starts_an_embedded_server_without_a_url(
    redis_url: str, tmp_path: Path, module_prefix: str
) -> None:
    # Given no Redis URL in the environment (redis_url: a real server can run here)
    replica = start_serve(
        tmp_path, "embedded", {"RUNSTATE_REDIS_URL": None, "RUNSTATE_PREFIX": module_prefix}
    )
    try:
        # Then serve starts a private server, says where, and answers
        wait_ready(replica)
        assert "started an embedded Redis-compatible server at redis://127.0.0.1:" in (
            replica.output()
        )
        with httpx.Client(timeout=5.0) as client:
            started = client.post(f"{replica.url}{API}/sessions/emb/execute", json=[1, 2])
            assert started.status_code == 202
            runner = client.get(f"{replica.url}{API}/sessions/emb/runner").json()
            assert runner["run_id"] == started.json()["run_id"]
    finally:
        code = stop_serve(replica)
    # And SIGTERM stops it cleanly (the embedded server with it)
    assert code == 0, replica.output()


def test_serve_refuses_a_bad_prefix(tmp_path: Path, redis_url: str) -> None:
    # A bad prefix is bad input: exit 2, naming it
    env = {"RUNSTATE_REDIS_URL": redis_url, "RUNSTATE_PREFIX": "a b"}
    bad = start_serve(tmp_path, "bad", env)
    try:
        assert bad.proc.wait(timeout=30) == 2
    finally:
        stop_serve(bad)
    assert "invalid key prefix 'a b'" in bad.output()


# ---- with a real worker process running the runs ------------------------------------------


@pytest.fixture
async def real_worker(
    redis_url: str, module_prefix: str, worker: Coordinator, tmp_path: Path
) -> AsyncIterator[WorkerProcess]:
    """A ``python -m workers`` process running the demo agent for this module's prefix."""
    proc = start_worker(
        redis_url,
        module_prefix,
        f"http-w-{uuid.uuid4().hex[:6]}",
        tmp_path,
        app="workers.demo_agent:agent",
    )
    try:
        await registered(worker, proc)
        yield proc
    finally:
        proc.proc.terminate()
        proc.wait()


async def execute_payload(
    http: httpx.AsyncClient, replica: Replica, sid: str, payload: dict[str, object]
) -> str:
    response = await http.post(f"{replica.url}{API}/sessions/{sid}/execute", json=payload)
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def test_a_real_worker_runs_it_stream_on_b_drop_and_resume_on_a(
    replicas: tuple[Replica, Replica],
    real_worker: WorkerProcess,
    worker: Coordinator,
    real_redis: Redis,
    http: httpx.AsyncClient,
) -> None:
    a, b = replicas
    sid = "rep-worker-stream"
    # Given a run started on A and run by a worker process, streamed from B
    await execute_payload(http, a, sid, {"rounds": 2, "token_delay": 0.01, "tool_delay": 0.05})
    seen: list[Frame] = []
    async with http.stream(
        "GET", f"{b.url}{API}/sessions/{sid}/events", params={"last_event_id": "0"}
    ) as response:
        frames = aiter_frames(response)
        for _ in range(10):
            seen.append(await next_event(frames))
        await frames.aclose()  # When the connection drops mid-run
    # And the client resumes on A after the last id it saw, reading until [DONE]
    async with http.stream(
        "GET", f"{a.url}{API}/sessions/{sid}/events", headers={"Last-Event-ID": seen[-1].id or ""}
    ) as response:
        frames = aiter_frames(response)
        while not (frame := await next_event(frames, limit=20)).done:
            seen.append(frame)
        await frames.aclose()
    # Then the frames are the run's stream entries exactly, from execution_started to complete
    assert [f.id for f in seen] == await stream_ids(real_redis, worker.keys.events(sid))
    assert seen[0].event == "execution_started" and seen[-1].event == "complete"
    state = await worker.runner(sid)
    assert state is not None and state.status == "completed"
    assert state.worker == real_worker.id


async def test_stop_on_b_cancels_a_run_a_real_worker_runs(
    replicas: tuple[Replica, Replica],
    real_worker: WorkerProcess,
    worker: Coordinator,
    http: httpx.AsyncClient,
) -> None:
    a, b = replicas
    sid = "rep-worker-stop"
    # Given a long run started on A and running in a worker process
    run_id = await execute_payload(http, a, sid, {"rounds": 50, "token_delay": 0.05})
    await until(lambda: _status(worker, sid), lambda s: s == "running", what="it runs")
    # When B is asked to stop the session
    response = await http.post(f"{b.url}{API}/sessions/{sid}/stop")
    assert response.status_code == 200, response.text
    # Then the run is cancelled, its stream ends with the cancelled event, and the worker
    # stopped at its next checkpoint (its log says so) while staying up for other runs
    state = await worker.runner(sid)
    assert state is not None and state.status == "cancelled" and state.run_id == run_id
    await until(
        lambda: asyncio.sleep(0, real_worker.output()),
        lambda out: f"session={sid} run={run_id} attempt=1 outcome=cancelled" in out,
        what="the worker logged the cancelled run",
    )
    assert real_worker.proc.poll() is None


async def _status(coord: Coordinator, sid: str) -> str | None:
    state = await coord.runner(sid)
    return None if state is None else state.status.value

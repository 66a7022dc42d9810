"""The whole system on a 3-master Redis Cluster (DESIGN §7): worker processes killed with
SIGKILL, a cancel, subscribers, the reaper repairing the global indexes, and an HTTP replica.

The in-process integration suite runs on the cluster too (the ``cluster`` case of the ``redis``
fixture); these tests add the real processes. The ``cluster_url`` fixture fails the session at
teardown if any node ever refused a command for naming keys of more than one slot, or redirected
one (MOVED: a client that routed it before it knew the slot map).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from runstate import Coordinator, StreamEvent
from runstate.client import connect
from runstate.config import ENV_CLUSTER

from .agents.helpers import StartProcess, registered, wait_status, worker_processes
from .agents.helpers import eventually as until
from .http_support import aiter_frames, start_serve, stop_serve, stream_ids, wait_ready

API = "/api/v1"


@pytest.fixture
async def ccoord(cluster_url: str, prefix: str) -> AsyncIterator[Coordinator]:
    async with Coordinator.from_url(cluster_url, prefix, cluster=True) as coord:
        yield coord


@pytest.fixture
def start_process(cluster_url: str, prefix: str, tmp_path: Path) -> Iterator[StartProcess]:
    """Start ``python -m workers --cluster`` processes; any still alive at the end are killed."""
    with worker_processes(cluster_url, prefix, tmp_path, "--cluster") as start:
        yield start


def _nodes_of(coord: Coordinator, sessions: list[str]) -> set[str]:
    """The nodes (host:port) that own the slots of these sessions' keys."""
    client = coord.client
    assert isinstance(client, RedisCluster)
    owners = set()
    for sid in sessions:
        node = client.nodes_manager.get_node_from_slot(key_slot(coord.keys.events(sid).encode()))
        owners.add(node.name)
    return owners


async def _collect(coord: Coordinator, sid: str) -> list[StreamEvent]:
    return [e async for e in coord.subscribe(sid, last_event_id="0")]


async def test_workers_cancel_sigkill_and_subscribers_on_a_cluster(
    ccoord: Coordinator, start_process: StartProcess, tmp_path: Path
) -> None:
    # Given two worker processes on the cluster
    a = start_process("cA", "--concurrency", "20")
    await registered(ccoord, a, limit=20)
    b = start_process("cB", "--concurrency", "20")
    await registered(ccoord, b, limit=20)
    # And 12 runs whose sessions live on every node, each followed by a subscriber
    sessions = [f"cl-{i}" for i in range(12)]
    await ccoord.client.initialize()
    assert len(_nodes_of(ccoord, sessions)) == 3
    payload = {"steps": 30, "delay": 0.05, "retry_delay": 0.005, "record_dir": str(tmp_path)}
    runs = {sid: (await ccoord.execute(sid, payload)).run_id for sid in sessions}
    subscribers = {sid: asyncio.create_task(_collect(ccoord, sid)) for sid in sessions}
    for sid in sessions:
        await wait_status(ccoord, sid, "running", limit=20)
    # When one run is cancelled and worker A is killed with SIGKILL mid-run
    assert await ccoord.cancel(sessions[0])
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    # Then every other run completes, those A held as a second attempt on B
    for sid in sessions[1:]:
        state = await wait_status(ccoord, sid, "completed", "error", limit=30)
        assert (state.status, state.run_id) == ("completed", runs[sid])
        assert state.worker == "cB"
    cancelled = await ccoord.runner(sessions[0])
    assert cancelled is not None and cancelled.status == "cancelled"
    # And every subscriber got its session's stream in order, each event once, to the end
    for sid, task in subscribers.items():
        events = await asyncio.wait_for(task, 20)
        ids = [e.id for e in events]
        assert ids == await stream_ids(ccoord.client, ccoord.keys.events(sid))
        assert events[-1].event.type == ("cancelled" if sid == sessions[0] else "complete")
    # And no run is left in the active index
    await until(ccoord.active_runs, lambda active: not active, limit=10, what="no active run")


async def test_the_reaper_repairs_the_global_indexes_on_a_cluster(
    ccoord: Coordinator, start_process: StartProcess
) -> None:
    # Given runs in flight in a worker process on the cluster
    worker = start_process("cR", "--concurrency", "10")
    await registered(ccoord, worker, limit=20)
    sessions = [f"idx-{i}" for i in range(6)]
    for sid in sessions:
        await ccoord.execute(sid, {"steps": 100, "delay": 0.05})
    for sid in sessions:
        await wait_status(ccoord, sid, "running", limit=20)
    # When the global indexes (active runs, worker registry) are deleted by hand
    await ccoord.client.delete(ccoord.keys.active)
    await ccoord.client.delete(ccoord.keys.workers)

    # Then the worker's reaper puts every running session back in the active index
    async def active() -> set[str]:
        return {state.session_id for state in await ccoord.active_runs()}

    await until(active, lambda found: found == set(sessions), limit=20, what="active index")
    # And the worker's heartbeat registers it again
    await registered(ccoord, worker, limit=10)
    for sid in sessions:
        assert await ccoord.cancel(sid)


async def test_an_http_replica_streams_and_resumes_on_a_cluster(
    cluster_url: str, prefix: str, ccoord: Coordinator, start_process: StartProcess, tmp_path: Path
) -> None:
    # Given a `runstate serve` replica and a worker process, both on the cluster
    env = {"RUNSTATE_REDIS_URL": cluster_url, "RUNSTATE_PREFIX": prefix, ENV_CLUSTER: "1"}
    replica = start_serve(tmp_path, "api", env, ["--log-level", "warning"])
    try:
        wait_ready(replica)
        worker = start_process("cH", app="workers.demo_agent:agent")
        await registered(ccoord, worker, limit=20)
        sid = f"http-{uuid.uuid4().hex[:6]}"
        async with httpx.AsyncClient(timeout=20.0) as http:
            # When a run is started over HTTP and streamed
            url = f"{replica.url}{API}/sessions/{sid}"
            body = {"rounds": 2, "token_delay": 0.01, "tool_delay": 0.05}
            response = await http.post(f"{url}/execute", json=body)
            assert response.status_code == 202, response.text
            seen: list[str] = []
            async with http.stream("GET", f"{url}/events", params={"last_event_id": "0"}) as r:
                frames = aiter_frames(r)
                async for frame in frames:
                    if frame.id:
                        seen.append(frame.id)
                    if len(seen) == 8:
                        break
                await frames.aclose()  # the connection drops mid-run
            # And resumed after the last id seen, until [DONE]
            async with http.stream(
                "GET", f"{url}/events", headers={"Last-Event-ID": seen[-1]}
            ) as r:
                async for frame in aiter_frames(r):
                    if frame.done:
                        break
                    if frame.id:
                        seen.append(frame.id)
        # Then the frames are the stream's entries exactly, each once
        assert seen == await stream_ids(ccoord.client, ccoord.keys.events(sid))
        state = await ccoord.runner(sid)
        assert state is not None and state.status == "completed"
    finally:
        assert stop_serve(replica) == 0, replica.output()


def _redirected(cluster_url: str) -> int:
    """How many commands the nodes of the cluster have answered with MOVED, all together."""
    with redis_sync.Redis.from_url(cluster_url, decode_responses=True) as client:
        text = client.execute_command("CLUSTER", "NODES")
    total = 0
    for line in text.splitlines():  # "<id> <host>:<port>@<bus port> ..."
        host, port = line.split()[1].split("@")[0].rsplit(":", 1)
        with redis_sync.Redis(host=host, port=int(port), decode_responses=True) as node:
            total += node.info("errorstats").get("errorstat_MOVED", {}).get("count", 0)
    return total


async def test_the_first_commands_of_a_new_cluster_client_go_straight_to_their_nodes(
    cluster_url: str, prefix: str
) -> None:
    # Given a cluster client made as Coordinator.from_url makes it, that has sent nothing yet
    client = connect(cluster_url, cluster=True)
    try:
        before = _redirected(cluster_url)
        # When 30 tasks send their first commands together, on keys of every node
        keys = [f"{prefix}:first:{i}" for i in range(30)]
        await asyncio.gather(*(client.set(key, "v") for key in keys))
        # Then none went to a wrong node: no MOVED (on every fifth, redis-py would close every
        # connection of the client, under the commands the other tasks have in flight)
        assert _redirected(cluster_url) == before
        assert await client.get(keys[-1]) == "v"
    finally:
        await client.aclose()


def test_a_cluster_of_fewer_than_three_masters_is_refused_naming_the_count() -> None:
    from runstate.embedded_cluster import EmbeddedCluster

    with pytest.raises(ValueError, match="at least 3 masters, got 2"):
        EmbeddedCluster(masters=2)


async def test_a_plain_url_without_the_flag_makes_the_plain_client(
    redis_url: str, prefix: str
) -> None:
    # (whose event reader blocks in one XREAD instead of polling)
    async with Coordinator.from_url(redis_url, prefix, cluster=False) as coord:
        assert not coord.store.cluster

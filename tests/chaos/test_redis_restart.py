"""Redis killed with SIGKILL mid-run and restarted from its append-only file.

Workers, API replicas and subscribers all reconnect by themselves; the runs of a worker that died
during the outage are recovered by the reaper; every run ends; every subscriber (in-process, and
SSE clients resuming with ``Last-Event-ID``) gets each event of its session exactly once, in
order.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable

import httpx
import pytest

from runstate import Coordinator, RunStatus
from runstate.embedded import EmbeddedServer
from tests.agents.helpers import eventually, registered
from tests.chaos.conftest import Processes
from tests.chaos.support import (
    Seen,
    Stopwatch,
    attempts,
    check_delivery,
    check_stream,
    collect,
    stream_entries,
    token_numbers,
    wait_no_active,
    wait_terminal,
)
from tests.http_support import Replica, aiter_frames

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

APP = "tests.agents.chaos:agent"
PREFIX = "chaos1"
SESSIONS = [f"restart-{i}" for i in range(8)]
LATE = "restart-late"  # started through the API while Redis is down
TOKENS = 150
DELAY = 0.03  # about 5 s per run: the outage lands in the middle of every run
OUTAGE = 1.5  # seconds the server stays down
# lost_after: the live worker's beats resume within a backoff (<= 2 s) of the restart, so it
# never looks lost; the dead one's runs are recovered that long after its last beat.
WORKER_ARGS = ["--concurrency", "10", "--lost-after", "5", "--heartbeat-interval", "0.2"]


class SseClient:
    """Follows one session on a replica until ``[DONE]``, resuming after every break.

    The first request asks for everything retained (``last_event_id=0``); each reconnect sends
    the ``Last-Event-ID`` of the last frame received, as an EventSource does.
    """

    def __init__(self, http: httpx.AsyncClient, replica: Replica, session_id: str) -> None:
        self.http = http
        self.url = f"{replica.url}/api/v1/sessions/{session_id}/events"
        self.session_id = session_id
        self.items: list[Seen] = []
        self.last_id: str | None = None
        self.connections = 0
        self.failures: list[str] = []
        self.done = False

    async def follow(self) -> None:
        backoff = 0.05
        while not self.done:
            if await self._connect():
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _connect(self) -> bool:
        """One connection; True once ``[DONE]`` arrived."""
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        params = {} if self.last_id else {"last_event_id": "0"}
        self.connections += 1
        try:
            async with self.http.stream("GET", self.url, headers=headers, params=params) as resp:
                if resp.status_code != 200:
                    self.failures.append(f"HTTP {resp.status_code}: {(await resp.aread())!r}")
                    return False
                async for frame in aiter_frames(resp):
                    if frame.comment is not None:
                        continue
                    if frame.done:
                        self.done = True
                        return True
                    if frame.event == "stream_error":
                        self.failures.append(f"stream_error {frame.data}")
                        return False
                    body = json.loads(frame.data)
                    event = body["event"]
                    self.items.append(
                        (frame.id, body.get("seq"), event["type"], event.get("missed"))
                    )
                    if frame.id is not None:
                        self.last_id = frame.id
        except httpx.TransportError as exc:
            self.failures.append(repr(exc))
        return False


async def test_sigkill_and_restart_of_redis_mid_run(
    start_server: Callable[..., EmbeddedServer], processes: Processes
) -> None:
    clock = Stopwatch()
    server = start_server(appendonly=True, extra_args=["--appendfsync", "always"])
    url = server.url
    # Given two workers, two API replicas, and the test's own Coordinator, all on one server
    for name in ("w1", "w2"):
        processes.worker(url, PREFIX, name, *WORKER_ARGS, app=APP)
    a = processes.replica(url, PREFIX, "api-a", "--keepalive", "0.5", "--log-level", "warning")
    b = processes.replica(url, PREFIX, "api-b", "--keepalive", "0.5", "--log-level", "warning")
    processes.ready()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
    async with (
        Coordinator.from_url(url, PREFIX) as coord,
        httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=30.0), limits=limits) as http,
    ):
        for worker in processes.workers:
            await registered(coord, worker)
        # And, for every session, a subscriber in this process and an SSE client on replica B
        inproc: dict[str, list[Seen]] = {sid: [] for sid in SESSIONS}
        sub_tasks = [
            asyncio.create_task(collect(coord.subscribe(sid), inproc[sid])) for sid in SESSIONS
        ]

        async def attached() -> int:
            return coord._hub.subscribers  # white box: how many subscribers are attached

        await eventually(attached, lambda n: n == len(SESSIONS), what="subscribers to attach")
        sse = {sid: SseClient(http, b, sid) for sid in SESSIONS}
        sse_tasks = {sid: asyncio.create_task(c.follow()) for sid, c in sse.items()}
        try:
            # When runs are started through replica A
            payload = {"tokens": TOKENS, "delay": DELAY, "budget_every": 40}
            for sid in SESSIONS:
                started = await http.post(f"{a.url}/api/v1/sessions/{sid}/execute", json=payload)
                assert started.status_code == 202, started.text
            # And once every run is well under way, Redis is killed (SIGKILL) ...

            async def lengths() -> list[int]:
                return [int(await coord.client.xlen(coord.keys.events(s))) for s in SESSIONS]

            await eventually(
                lengths,
                lambda lens: min(lens) >= 30,
                limit=30,
                what="every run to have written 30 events",
            )
            before = {sid: len(await stream_entries(coord, sid)) for sid in SESSIONS}
            owners = {sid: (await coord.runner(sid)) for sid in SESSIONS}
            on_w2 = {sid for sid, state in owners.items() if state and state.worker == "w2"}
            server.kill(signal.SIGKILL)
            killed_at = clock()
            # ... worker w2 dies too (SIGKILL), so the reaper must recover its runs ...
            processes.workers[1].kill()
            # ... and every SSE client drops its connection: it resumes at once, while Redis
            # is down, with the Last-Event-ID it has
            for sid, task in sse_tasks.items():
                await cancel_quietly(task)
                sse_tasks[sid] = asyncio.create_task(sse[sid].follow())
            # ... and a run is started through replica A while Redis is down
            late = asyncio.create_task(
                http.post(f"{a.url}/api/v1/sessions/{LATE}/execute", json=payload)
            )
            await asyncio.sleep(OUTAGE)  # the outage itself, not a wait for some state
            server.restart()
            print(f"\nredis down for {clock() - killed_at:.2f}s at t={killed_at:.1f}s")
            # Then the request made during the outage is answered once Redis is back
            started = await asyncio.wait_for(late, 30)
            assert started.status_code == 202, started.text

            # And every run ends, and none stays active
            states = await wait_terminal(coord, [*SESSIONS, LATE], limit=60)
            await wait_no_active(coord, limit=15)
            finished_at = clock()
            # And every subscriber is done
            async with asyncio.timeout(30):
                await asyncio.gather(*sub_tasks, *sse_tasks.values())
            # And both replicas answer again, with nothing active
            for replica in (a, b):
                active = await http.get(f"{replica.url}/api/v1/runs/active")
                assert (active.status_code, active.json()) == (200, [])
        finally:
            for task in [*sub_tasks, *sse_tasks.values()]:
                await cancel_quietly(task)

        # Every run completed; those of the dead worker as a new attempt on the live one
        summary = {s.status for s in states}
        assert summary == {RunStatus.COMPLETED}, [(s.session_id, s.status, s.error) for s in states]
        assert on_w2, "w2 ran none of the runs"
        for state in states:
            if state.session_id in on_w2:
                assert state.worker == "w1" and state.attempt >= 2, state
        assert await coord.active_runs() == []
        # And the stream holds each run's events once, numbered without holes
        for sid, state in zip([*SESSIONS, LATE], states, strict=True):
            entries = await stream_entries(coord, sid)
            runs = check_stream(entries, sid)
            assert list(runs) == [state.run_id]
            last = attempts(entries)[-1]
            assert token_numbers(last) == list(range(TOKENS)), f"{sid}: tokens of the last attempt"
            assert last[-1]["type"] == "complete"
            if sid == LATE:
                continue
            assert len(entries) > before[sid], f"{sid}: nothing written after the restart"
            ids = [e["id"] for e in entries]
            # And every subscriber got exactly those events, in order
            check_delivery(inproc[sid], ids, from_start=True, who=f"in-process {sid}")
            check_delivery(sse[sid].items, ids, from_start=True, who=f"SSE {sid}")
        reconnects = sum(c.connections - 1 for c in sse.values())
        requeued = sum(s.attempt > 1 for s in states)
        print(
            f"{len(states)} runs ended {finished_at - killed_at:.1f}s after the kill; "
            f"{requeued} recovered as a new attempt; SSE reconnects: {reconnects} "
            f"({sum(len(c.failures) for c in sse.values())} failed); "
            f"total {clock():.1f}s"
        )
        assert all(c.connections >= 2 for c in sse.values()), "every SSE client resumed"
    # And the live worker said what happened (and that it retried)
    output = processes.workers[0].output()
    assert "redis error, retrying" in output, output[-3000:]


async def cancel_quietly(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it (its own failure, if any, is the test's to report)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

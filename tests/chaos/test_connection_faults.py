"""Connections killed every 100-200 ms, Redis paused (CLIENT PAUSE) and stalled (DEBUG SLEEP)
for longer than the clients' socket timeout, while runs write, get cancelled and are watched.

Every write that hit a killed connection or a timeout is retried. A stall makes it certain that
some retried writes had been applied already (the server runs what was sent during the stall,
though its senders timed out): emit's sequence numbers make those retries harmless, so no event
is written twice and none is lost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from runstate import Coordinator, RunStatus
from runstate.embedded import EmbeddedServer
from tests.agents.basic import read_records
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
from tests.http_support import with_query

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

APP = "tests.agents.chaos:agent"
PREFIX = "chaos2"
SESSIONS = [f"faults-{i}" for i in range(16)]
CANCELLED = SESSIONS[:2]  # cancelled while the faults go on
TOKENS = 300
DELAY = 0.02  # about 6 s per run, longer under faults: the runs span the whole fault window
SOCKET_TIMEOUT = 0.5  # the clients' socket timeout, so that a pause makes commands time out
PAUSE_MS = 1500  # longer than the socket timeout
STALL_S = 0.8  # a stalled server (DEBUG SLEEP), longer than the socket timeout too
WORKER_ARGS = [
    "--concurrency",
    "10",
    "--heartbeat-interval",
    "0.2",
    "--lost-after",
    "6",  # a pause plus retries must not make a live worker look lost
    "--block-ms",
    "200",
]


class Faults:
    """Kills client connections and pauses the server, on its own connection."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url, decode_responses=True)  # no socket timeout
        self.killed = {"normal": 0, "pubsub": 0}
        self.pauses = 0
        self.stalls = 0

    async def kill(self, kind: str) -> None:
        # SKIPME defaults to yes: this connection survives its own kills
        self.killed[kind] += int(await self.client.execute_command("CLIENT", "KILL", "TYPE", kind))

    async def run(
        self,
        seconds: float,
        pauses_at: tuple[float, ...],
        stalls_at: tuple[float, ...],
        rng: random.Random,
    ) -> None:
        clock = Stopwatch()
        pauses, stalls = list(pauses_at), list(stalls_at)
        while clock() < seconds:
            if pauses and clock() >= pauses[0]:
                pauses.pop(0)
                await self.client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")
                self.pauses += 1
                await asyncio.sleep(PAUSE_MS / 1000)  # the pause's own length
                continue
            if stalls and clock() >= stalls[0]:
                stalls.pop(0)
                # The server stops for longer than the socket timeout; then it runs what was
                # sent meanwhile, though the senders have timed out and sent it again.
                await self.client.execute_command("DEBUG", "SLEEP", STALL_S)
                self.stalls += 1
                continue
            await self.kill(rng.choice(("normal", "pubsub")))
            await asyncio.sleep(rng.uniform(0.1, 0.2))

    async def aclose(self) -> None:
        await self.client.aclose()


async def test_killed_connections_pauses_and_stalls_neither_lose_nor_double_events(
    start_server: Callable[..., EmbeddedServer], processes: Processes
) -> None:
    rng = random.Random(20260101)
    clock = Stopwatch()
    server = start_server(extra_args=["--enable-debug-command", "yes"])
    url = with_query(server.url, socket_timeout=str(SOCKET_TIMEOUT))
    # Given two workers whose Redis clients time out after 0.5 s, and the test's Coordinator
    for name in ("w1", "w2"):
        processes.worker(url, PREFIX, name, *WORKER_ARGS, app=APP)
    faults = Faults(server.url)
    async with Coordinator.from_url(url, PREFIX, block_ms=200) as coord:
        for worker in processes.workers:
            await registered(coord, worker)
        # And a subscriber for every session, attached before its run starts
        got: dict[str, list[Seen]] = {sid: [] for sid in SESSIONS}
        subs = [asyncio.create_task(collect(coord.subscribe(sid), got[sid])) for sid in SESSIONS]

        async def attached() -> int:
            return coord._hub.subscribers  # white box: how many subscribers are attached

        try:
            await eventually(attached, lambda n: n == len(SESSIONS), what="subscribers to attach")
            # When runs start
            payload = {"tokens": TOKENS, "delay": DELAY, "record_dir": str(processes.log_dir)}
            for sid in SESSIONS:
                await coord.execute(sid, payload)

            async def lengths() -> list[int]:
                return [int(await coord.client.xlen(coord.keys.events(s))) for s in SESSIONS]

            await eventually(lengths, lambda ls: min(ls) >= 5, limit=30, what="every run going")
            # And connections are killed every 100-200 ms for 7 s, with two pauses of 1.5 s
            # and two stalls of 0.8 s, while two of the runs are cancelled
            faulting = asyncio.create_task(faults.run(7.0, (1.5, 4.5), (3.5, 6.0), rng))
            await asyncio.sleep(0.8)  # well into the fault window
            for sid in CANCELLED:
                assert await coord.cancel(sid, "cancelled under chaos")
            await faulting
            faults_ended = clock()
            # Then every run ends, and none stays active
            states = await wait_terminal(coord, SESSIONS, limit=90)
            await wait_no_active(coord, limit=15)
            ended = clock()
            async with asyncio.timeout(30):
                await asyncio.gather(*subs)
        finally:
            for task in subs:
                task.cancel()
            await asyncio.gather(*subs, return_exceptions=True)
            await faults.aclose()

        status = {s.session_id: s.status for s in states}
        assert {sid for sid, st in status.items() if st == RunStatus.CANCELLED} == set(CANCELLED)
        assert {st for sid, st in status.items() if sid not in CANCELLED} == {
            RunStatus.COMPLETED
        }, [(s.session_id, s.status, s.error) for s in states]
        records = read_records(str(processes.log_dir))
        ends = {(r["session"], r["run"], r["attempt"]): r for r in records if r["what"] == "end"}
        requeued = 0
        for sid, state in zip(SESSIONS, states, strict=True):
            entries = await stream_entries(coord, sid)
            # Each run's events are numbered 1..N, each number once: nothing written twice
            runs = check_stream(entries, sid)
            assert list(runs) == [state.run_id]
            tries = attempts(entries)
            requeued += len(tries) - 1
            for i, attempt in enumerate(tries):
                numbers = token_numbers(attempt)
                # No token twice, none skipped: each attempt wrote 0, 1, 2, ... in order
                assert numbers == list(range(len(numbers))), f"{sid} attempt {i + 1}: {numbers}"
            last = tries[-1]
            if sid in CANCELLED:
                assert last[-1]["type"] == "cancelled", f"{sid}: {last[-1]}"
            else:
                assert last[-1]["type"] == "complete"
                assert token_numbers(last) == list(range(TOKENS)), f"{sid}: tokens missing"
                # And everything the agent was told was written is in the stream
                end = ends[(sid, state.run_id, state.attempt)]
                assert set(end["acked"]) <= set(token_numbers(last))
                assert end["deferred"] == [], f"{sid}: an emit gave up: {end['deferred']}"
            # And the subscriber got exactly the stream's events, in order
            check_delivery(got[sid], [e["id"] for e in entries], from_start=True, who=sid)
        logs = processes.logs(tail=10**7)
        timeouts = logs.count("TimeoutError: Timeout")
        print(
            f"\nkilled {faults.killed['normal']} normal and {faults.killed['pubsub']} pub/sub "
            f"connections, {faults.pauses} pauses of {PAUSE_MS} ms, {faults.stalls} stalls of "
            f"{STALL_S:g} s; {timeouts} socket timeouts "
            f"logged by the workers; {requeued} runs requeued; runs ended "
            f"{ended - faults_ended:.1f}s after the faults; total {clock():.1f}s"
        )
        # The pauses made commands time out, and the workers said so
        assert timeouts > 0, "no timeout in the workers' logs"
        assert faults.killed["normal"] > 0 and faults.killed["pubsub"] > 0
        assert (faults.pauses, faults.stalls) == (2, 2)

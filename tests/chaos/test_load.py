"""Load: 200 concurrent sessions of 200 events on 4 worker processes, watched by 500 subscribers
in 2 subscriber processes, plus a few sessions long enough to be trimmed at MAXLEN.

Every subscriber gets its session's events from its attach point to the terminal event, with no
gap and no duplicate; Redis memory stays bounded by MAXLEN (stream lengths) and retention
(finished sessions expire).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from runstate import Coordinator, RunStatus
from runstate.embedded import EmbeddedServer
from runstate.store import DEFAULT_MAXLEN, DEFAULT_RETENTION
from tests.agents.helpers import eventually, registered
from tests.chaos.conftest import Processes
from tests.chaos.support import (
    Stopwatch,
    check_delivery,
    check_stream,
    exists,
    ordinal,
    read_json,
    wait_no_active,
    write_text,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]

APP = "tests.agents.chaos:agent"
PREFIX = "chaos3"
SESSIONS = [f"load-{i:03d}" for i in range(200)]
LONG = [f"long-{i}" for i in range(4)]  # trimmed at MAXLEN while they run
# 200 events a run: execution_started, task_list_updated, 194 tokens, 3 budget updates, complete
TOKENS, BUDGET_EVERY = 194, 50
LONG_TOKENS = 1200
DELAY = 0.02
WORKERS = 4
SUBSCRIBERS = 500
SUBSCRIBER_PROCESSES = 2
LIVE_SPREAD = 10.0  # seconds over which live subscribers attach: mid-run, some after the end
WORKER_ARGS = [
    "--concurrency",
    "60",
    "--heartbeat-interval",
    "0.5",
    "--lost-after",
    "20",  # two busy cores: a live worker's beats may come late, it must not look lost
    "--reaper-interval",
    "1",
    "--block-ms",
    "200",
]
MAX_STREAM = DEFAULT_MAXLEN + 100  # MAXLEN ~ trims whole nodes of (by default) 100 entries
# A retained event (stream entry, its share of the hash and indexes) takes well under this.
BYTES_PER_EVENT = 1024


def subscriber_specs(rng: random.Random, spread: float) -> list[list[dict[str, Any]]]:
    """Every session gets a subscriber from "0"; the rest attach live at random times."""
    everyone = [*SESSIONS, *LONG]
    subs = [{"session": sid, "mode": "from0", "delay": 0.0} for sid in everyone]
    subs += [
        {"session": rng.choice(everyone), "mode": "live", "delay": rng.uniform(0, spread)}
        for _ in range(SUBSCRIBERS - len(subs))
    ]
    rng.shuffle(subs)
    return [subs[i::SUBSCRIBER_PROCESSES] for i in range(SUBSCRIBER_PROCESSES)]


async def memory(client: aioredis.Redis) -> dict[str, int]:
    info = await client.info("memory")
    return {k: int(info[k]) for k in ("used_memory", "used_memory_peak")}


async def test_200_sessions_200_events_4_workers_500_subscribers(
    start_server: Callable[..., EmbeddedServer], processes: Processes, tmp_path: Path
) -> None:
    rng = random.Random(7)
    clock = Stopwatch()
    server = start_server()
    url = server.url
    # Given four workers and two subscriber processes (one Coordinator each)
    for i in range(WORKERS):
        processes.worker(url, PREFIX, f"w{i}", *WORKER_ARGS, app=APP)
    outs: list[str] = []
    readies: list[str] = []
    go = str(tmp_path / "go")
    for i, subs in enumerate(subscriber_specs(rng, spread=LIVE_SPREAD)):
        outs.append(str(tmp_path / f"subs-{i}.json"))
        readies.append(str(tmp_path / f"ready-{i}"))
        spec = {
            "url": url,
            "prefix": PREFIX,
            "subscribers": subs,
            "ready": readies[-1],
            "go": go,
            "out": outs[-1],
            "limit": 240,
        }
        (tmp_path / f"spec-{i}.json").write_text(json.dumps(spec))
        processes.script(
            "tests.chaos.subscriber", str(tmp_path / f"spec-{i}.json"), name=f"subs-{i}"
        )
    async with Coordinator.from_url(url, PREFIX) as coord:
        client = coord.client
        for worker in processes.workers:
            await registered(coord, worker, limit=30)

        async def ready() -> bool:
            return all(exists(r) for r in readies)

        await eventually(ready, limit=60, what="the subscriber processes to attach")
        before = await memory(client)
        # When 204 runs start at once
        started = clock()
        payload = {"tokens": TOKENS, "delay": DELAY, "budget_every": BUDGET_EVERY}
        long_payload = {"tokens": LONG_TOKENS, "delay": 0, "budget_every": 100}
        for sid in SESSIONS:
            await coord.execute(sid, payload)
        for sid in LONG:
            await coord.execute(sid, long_payload)
        write_text(go, "go\n")
        # Then every run completes (memory sampled meanwhile)
        peak = before["used_memory"]
        everyone = [*SESSIONS, *LONG]

        async def all_done() -> bool:
            nonlocal peak
            peak = max(peak, (await memory(client))["used_memory"])
            states = await coord.store.runners(everyone)
            return len(states) == len(everyone) and all(
                s.status in RunStatus.TERMINAL for s in states
            )

        try:
            await eventually(all_done, limit=240, interval=0.5, what="every run to end")
        except AssertionError:
            raise AssertionError(f"not every run ended:\n{processes.logs()}") from None
        done = clock()
        await wait_no_active(coord, limit=30)
        after = await memory(client)
        states = await coord.store.runners(everyone)
        assert {s.status for s in states} == {RunStatus.COMPLETED}, [
            (s.session_id, s.status, s.error) for s in states if s.status != "completed"
        ]
        first = min(s.started_at for s in states if s.started_at)
        last = max(s.completed_at for s in states if s.completed_at)
        duration = (last - first).total_seconds()
        short = max(s.completed_at for s in states if s.completed_at and s.session_id in SESSIONS)
        short_duration = (short - first).total_seconds()

        # The streams: each run numbered 1..N once; at most ~MAXLEN entries; retention TTLs set
        ids: dict[str, list[str]] = {}
        seqs: dict[str, int] = {}
        retained = 0
        for sid in everyone:
            raw = await client.xrange(coord.keys.events(sid))
            entries = [
                {"id": eid, "run": f["run"], "seq": int(f["seq"]), "type": f["type"]}
                for eid, f in raw
            ]
            check_stream(entries, sid)
            ids[sid] = [e["id"] for e in entries]
            seqs[sid] = int(entries[-1]["seq"])  # the run's events, trimmed or not
            retained += len(entries)
            assert len(entries) <= MAX_STREAM, f"{sid}: XLEN {len(entries)} > {MAX_STREAM}"
            ttls = await coord.store.ttls(sid)
            for key in ("runner", "events", "critical"):
                assert 0 < ttls[key] <= DEFAULT_RETENTION, f"{sid}: TTL of {key} is {ttls[key]}"
        for sid in SESSIONS:
            assert len(ids[sid]) == 200
        for sid in LONG:
            assert ids[sid][0] != ids[sid][-1] and int(ids[sid][0].split("-")[1]) > 1, (
                f"{sid} was not trimmed"
            )

    # And every subscriber got its session's events after its attach point, in order, once
    for proc, _ in processes.scripts:
        assert proc.wait(timeout=120) == 0, processes.logs()
    reports = [s for out in outs for s in read_json(out)["subscribers"]]
    assert len(reports) == SUBSCRIBERS
    missed = delivered = mid_run = 0
    for n, sub in enumerate(reports):
        who = f"subscriber #{n} ({sub['mode']}) of {sub['session']}"
        assert sub["error"] is None, f"{who}: {sub['error']}"
        items = [tuple(item) for item in sub["items"]]
        gaps = check_delivery(
            items, ids[sub["session"]], from_start=sub["mode"] == "from0", who=who
        )
        assert gaps == 0 or sub["session"] in LONG, f"{who}: a gap, yet nothing was trimmed"
        missed += gaps
        delivered += len(items)
        live_ids = [item[0] for item in items if item[0] is not None]
        if sub["mode"] == "live" and len(live_ids) > 1 and ordinal(str(live_ids[0])) > 1:
            mid_run += 1  # attached while its run was going

    events = sum(seqs.values())
    long_events = seqs[LONG[0]]

    growth = after["used_memory"] - before["used_memory"]
    mib = 1024 * 1024
    print(
        f"\nload: {len(everyone)} runs ({len(SESSIONS)} x 200 events + {len(LONG)} x "
        f"{long_events} events), {WORKERS} workers, {SUBSCRIBERS} subscribers in "
        f"{SUBSCRIBER_PROCESSES} processes\n"
        f"  the {len(SESSIONS)} x 200 events: {short_duration:.1f}s from the first reservation "
        f"to the last completion, {len(SESSIONS) * 200 / short_duration:.0f} events/s\n"
        f"  all {len(everyone)} runs: {events} events in {duration:.1f}s, "
        f"{events / duration:.0f} events/s (all seen ended {done - started:.1f}s after the "
        f"first execute)\n"
        f"  subscribers: {delivered} items delivered, {missed} missed (gap notices), "
        f"{mid_run} attached mid-run\n"
        f"  redis memory: {before['used_memory'] / mib:.1f} MiB before, peak "
        f"{peak / mib:.1f} MiB, {after['used_memory'] / mib:.1f} MiB after "
        f"({retained} events retained, {growth / max(retained, 1):.0f} bytes each); "
        f"server peak {after['used_memory_peak'] / mib:.1f} MiB\n"
        f"  total {clock():.1f}s"
    )
    # Memory is bounded by what MAXLEN lets each session retain (which retention then expires)
    assert retained <= len(SESSIONS) * 200 + len(LONG) * MAX_STREAM
    assert growth <= retained * BYTES_PER_EVENT, f"memory grew by {growth} bytes"
    assert peak - before["used_memory"] <= 2 * retained * BYTES_PER_EVENT

"""Benchmark 3: fan-out of one run's events to 1, 100 and 1,000 subscribers in another process.

This process is the producer: a claimed run emitting ``Token`` events at 1,000 events/s whose
content is ``time.time_ns()`` at send time. The subscribers all live in one subprocess
(:mod:`suite.fanout_consumer`), which notes when each event arrives and works out receive time
minus send time after the last run (same machine, same clock). Each subscriber count is one
consumer process; the producer runs ``BENCH_REPS`` runs in a row on the session (as long as
``PHASES`` says), each run giving a p50 and a p99; the table shows the median of those.
Connections: ``CLIENT LIST`` entries named by the consumer's ``?client_name=`` (sampled before
and in the middle of every run; the most seen is reported). Baseline: sequential ``PING``
round trips on the producer's client before each run.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator, hub
from runstate.events import Token

from .common import (
    Procs,
    Row,
    Section,
    event_loop,
    fmt_ms,
    fmt_ratio,
    median,
    new_tag,
    percentile,
    ratio,
    redis_server,
    reps,
    run_async,
    scaled,
    with_query,
)
from .emit import claimed_run, end_run

RATE = 1000  # events per second
SUBSCRIBERS = (1, 100, 1000)
# (API, subscriber count, seconds per run, event loop). `subscribe` hands over one event at a
# time, which at 1,000 subscribers is 1M handovers/s: more than one Python process does, so the
# backlog (and the latency) grows for as long as a run lasts; its run there is short to keep the
# figure a lower bound and the time bounded. `subscribe_batches` hands over what arrived
# together. The event loop is the benchmark's (None: uvloop when installed, as runstate's own
# processes pick) or, for the last case, asyncio's own: what the subscribers cost without uvloop.
# The API "plain" is the floor the 100 and 1,000 subscriber cases are compared with: the same
# fan-out with nothing of runstate's (suite.fanout_plain), measured just before them.
PHASES: tuple[tuple[str, int, float, str | None], ...] = (
    ("subscribe", 1, 1.0, None),
    ("plain", 100, 1.0, None),
    ("subscribe", 100, 1.0, None),
    ("subscribe_batches", 100, 1.0, None),
    ("subscribe", 1000, 0.25, None),
    ("plain", 1000, 1.0, None),
    ("subscribe_batches", 1000, 1.0, None),
    ("plain", 1000, 1.0, "asyncio"),
    ("subscribe_batches", 1000, 1.0, "asyncio"),
)
CONSUMERS = {"plain": "suite.fanout_plain"}  # by API; the others: suite.fanout_consumer
PINGS = 1000
DRAIN_LIMIT = 60.0  # seconds the producer waits for the subscribers to catch up after a run


async def ping_baseline(client: Redis, n: int) -> dict[str, float]:
    lat = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await client.ping()
        lat.append((time.perf_counter_ns() - start) / 1e6)
    return {"p50": percentile(lat, 50), "p99": percentile(lat, 99)}


async def connections(client: Redis, name: str) -> int:
    return sum(1 for c in await client.client_list() if c.get("name") == name)


async def phase(
    coord: Coordinator,
    url: str,
    tag: str,
    procs: Procs,
    api: str,
    subs: int,
    runs: int,
    seconds: float,
    loop: str,
) -> dict[str, Any]:
    label = f"{api}-{subs}-{loop}"
    session = f"fan-{label}".replace("_", "-")
    name = f"{tag}-sub"
    drained = f"{tag}:drained:{label}"
    out = procs.dir / f"fanout-{label}.json"
    deadline = runs * (seconds + DRAIN_LIMIT) + 30
    proc = procs.start(
        f"fanout-{label}",
        [
            sys.executable,
            "-m",
            CONSUMERS.get(api, "suite.fanout_consumer"),
            "--url",
            with_query(url, client_name=name),
            "--prefix",
            tag,
            "--session",
            session,
            "--subs",
            str(subs),
            "--deadline",
            str(deadline),
            "--out",
            str(out),
            "--control-url",
            with_query(url, client_name=f"{tag}-control"),
            "--drained",
            drained,
            "--loop",
            loop,
            *(["--batches"] if api == "subscribe_batches" else []),
        ],
        stdout_pipe=True,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        procs.stop(proc)
        raise RuntimeError(f"fan-out consumer did not start:\n{procs.log(f'fanout-{label}')}")
    conns = [await connections(coord.client, name)]
    run_ids = []
    rates = []
    pings = []
    drain: list[float] = []
    for index in range(runs):
        # The baseline, under the same conditions: the subscribers are attached and idle.
        pings.append(await ping_baseline(coord.client, scaled(PINGS, 200)))
        run = await claimed_run(coord, session, worker="producer")
        run_ids.append(run.run_id)
        n = round(RATE * seconds)

        async def sample_later() -> int:
            await asyncio.sleep(seconds / 2)
            return await connections(coord.client, name)

        sampler = asyncio.create_task(sample_later())
        start = time.monotonic()
        for i in range(n):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await run.emit(Token(content=str(time.time_ns())))
        rates.append(n / (time.monotonic() - start))
        if index == runs - 1:
            await run.fail("end of the benchmark")  # tells the subscribers to stop
            coord.release(run)
        else:
            await end_run(coord, run)
        conns.append(await sampler)
        # Independent runs: the next one starts once every subscriber has caught up.
        drain_started = time.monotonic()
        while not await coord.client.blpop([drained], timeout=5):
            if proc.poll() is not None or time.monotonic() - drain_started > DRAIN_LIMIT:
                break
        drain.append(time.monotonic() - drain_started)
    code = await asyncio.to_thread(proc.wait, deadline + 30)
    procs.stop(proc)
    if code != 0 or not out.exists():
        raise RuntimeError(f"fan-out consumer failed ({code}):\n{procs.log(f'fanout-{label}')}")
    result = json.loads(out.read_text())
    per_run = [result["runs"].get(r) for r in run_ids]
    delivered = sum(r["n"] for r in per_run if r)
    return {
        "api": api,
        "subs": subs,
        "loop": loop,
        "run_seconds": seconds,
        "p50": median([r["p50"] for r in per_run if r]),
        "p99": median([r["p99"] for r in per_run if r]),
        "max": max((r["max"] for r in per_run if r), default=math.nan),
        "expected": subs * runs * round(RATE * seconds),
        "delivered": delivered,
        "gaps": result["gaps"],
        "timed_out": result["timed_out"],
        "consumer_cpu_s": result["cpu_s"],
        "batches": result["batches"],
        "connections": max(conns),
        "connection_samples": conns,
        "producer_rate": median(rates),
        "drain_s": drain,
        "ping_p50": median([p["p50"] for p in pings]),
        "ping_p99": median([p["p99"] for p in pings]),
        "per_run": per_run,
    }


async def measure(url: str, tag: str) -> dict[str, Any]:
    runs = reps()
    scale = scaled(1000, 100) / 1000
    async with Coordinator.from_url(url, prefix=tag) as coord:
        for _ in range(500):  # warm-up
            await coord.client.ping()
        phases = []
        with Procs() as procs:
            for api, subs, seconds, loop in PHASES:
                loop = loop or event_loop()
                if any((p["api"], p["subs"], p["loop"]) == (api, subs, loop) for p in phases):
                    continue  # the benchmark's own loop is asyncio: measured already
                phases.append(
                    await phase(coord, url, tag, procs, api, subs, runs, seconds * scale, loop)
                )
    return {"phases": phases}


def baseline(p: dict[str, Any], floor: dict[str, Any] | None, q: str) -> tuple[str, str]:
    """The baseline and ratio cells of phase ``p``'s percentile ``q`` ("p50", "p99"): against
    the floor measured for it, or else the PING round trips of its runs."""
    if floor is None:
        return f"PING {q} {fmt_ms(p[f'ping_{q}'])}", fmt_ratio(ratio(p[q], p[f"ping_{q}"]))
    return f"floor {q} {fmt_ms(floor[q])}", fmt_ratio(ratio(p[q], floor[q]))


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        data = run_async(measure(url, tag))
    section = Section(
        "3. Fan-out: one producer at 1,000 events/s, subscribers in one other process",
        f"{reps()} runs per case at {RATE} Token events/s, each "
        + " / ".join(f"{p['run_seconds']:g} s" for p in data["phases"])
        + " long for "
        + " / ".join(f"{p['subs']:,} ({p['api']}, {p['loop']})" for p in data["phases"])
        + " (past saturation the latency grows with the run's length: a shorter run keeps the "
        "figure a lower bound and the time bounded); median of the per-run p50 / p99 of receive "
        "time - send time (`subscribe_batches` takes one receive time per batch; the subscriber "
        "process notes receive times as events arrive and works out the latencies after the last "
        "run, and calls `gc.freeze()` once its subscribers are attached, as a long-running "
        "server does after start-up). "
        f"Baseline: for 1 subscriber, sequential `PING` round trips from the producer "
        f"({scaled(PINGS, 200)} before each run, the subscribers attached and idle); for 100 "
        "and 1,000, the floor: the same fan-out with nothing of runstate's, measured just before "
        "on the same event loop (`suite/fanout_plain.py`: one task reads the stream with plain "
        "redis-py `XREAD BLOCK`, parses each entry's JSON once and hands each read to every "
        "subscriber through one asyncio future they all await; no event models, ordinal checks, "
        "resume or overflow), the same notes; medians of the per-run p50 / p99.",
        data=data,
    )
    floors = {(p["subs"], p["loop"]): p for p in data["phases"] if p["api"] == "plain"}
    for p in data["phases"]:
        subs = p["subs"]
        limit, goal = {
            1: (4 * p["ping_p99"], "≤ 4x PING p99"),
            100: (5.0, "≤ 5 ms"),
            1000: (15.0, "≤ 15 ms"),
        }[subs]
        complete = p["delivered"] >= p["expected"] and not p["timed_out"]
        if p["api"] == "plain":
            section.notes.append(
                f"The floor, {subs:,} subscribers, {p['loop']}: p50 {fmt_ms(p['p50'])}, p99 "
                f"{fmt_ms(p['p99'])} (per run: "
                + ", ".join(fmt_ms(r["p99"]) for r in p["per_run"] if r)
                + f"); the goal ({goal}) {'met' if p['p99'] <= limit and complete else 'missed'}"
                " by the floor itself."
            )
            continue
        who = f"{subs:,} subscriber{'s' if subs > 1 else ''} (`{p['api']}`, {p['loop']})"
        floor = floors.get((subs, p["loop"]))
        met = bool(p["p99"] <= limit and complete)
        section.rows.append(
            Row(
                f"{who}: p99 delivery latency",
                fmt_ms(p["p99"]),
                *baseline(p, floor, "p99"),
                goal,
                met,
            )
        )
        section.rows.append(
            Row(f"{who}: p50 delivery latency", fmt_ms(p["p50"]), *baseline(p, floor, "p50"))
        )
    by_subs = {p["subs"]: p for p in data["phases"] if p["api"] == "subscribe"}  # one loop
    conns = {s: p["connections"] for s, p in by_subs.items()}
    reads = hub.MAX_CONCURRENT_READS
    bound = 1 + reads  # the hub's reader + its concurrent snapshot/catch-up reads
    section.rows.append(
        Row(
            "Redis connections of the subscriber process, most seen (1 / 100 / 1,000 subscribers)",
            " / ".join(str(conns[s]) for s in SUBSCRIBERS),
            "one per subscriber: " + " / ".join(f"{s:,}" for s in SUBSCRIBERS),
            "",
            f"independent of the count (≤ {bound}: 1 reader + {reads} reads)",
            max(conns.values()) <= bound,
        )
    )
    for p in data["phases"]:
        per_event_us = p["consumer_cpu_s"] / max(1, p["delivered"]) * 1e6
        per_batch_us = p["consumer_cpu_s"] / max(1, p["batches"]) * 1e6
        section.notes.append(
            f"{p['subs']:,} subscriber(s), `{p['api']}`, {p['loop']}: delivered "
            f"{p['delivered']:,} of {p['expected']:,} token events, gap notices covering "
            f"{p['gaps']:,} events, max latency {fmt_ms(p['max'])}, producer rate "
            f"{p['producer_rate']:,.0f}/s, subscriber process CPU {p['consumer_cpu_s']:.2f} s "
            f"({per_event_us:.1f} µs per delivered event; {p['batches']:,} handed over as "
            f"{'events' if p['api'] == 'subscribe' else 'batches'}, {per_batch_us:.1f} µs each), "
            "connections seen "
            f"{p['connection_samples']}, catching up after each run took "
            + "/".join(f"{x:.1f}" for x in p["drain_s"])
            + " s"
            + (
                f", {p['timed_out']} subscriber(s) still behind at the deadline"
                if p["timed_out"]
                else ""
            )
        )
    return [section]

"""Benchmark 4: cancel latency, ``coord.cancel()`` here → ``checkpoint()`` raising in a worker.

A ``python -m workers`` subprocess runs :mod:`suite.cancel_agent`, which loops on
``await ctx.checkpoint(); await asyncio.sleep(0.0005)`` and reports ``time.time_ns()`` the moment
the checkpoint raises. On asyncio's own loop that checks about every millisecond (its selector
waits whole milliseconds); uvloop's timers count whole milliseconds too and round 0.5 ms down
to none, so there the agent checks without pausing, a busy agent that keeps one CPU to itself.
This process executes a run, waits until it runs, waits a random 3-12 ms (so that the cancel
lands at any phase of the loop), notes ``time.time_ns()`` and calls ``coord.cancel()``. Two
workers: a normal one (pub/sub nudge), and one whose cancel watcher never subscribes and polls
the markers every 50 ms (:mod:`suite.cancel_agent_nopubsub`).

Baseline: a raw ``PUBLISH`` heard by a plain redis-py subscriber in another process
(:mod:`suite.cancel_raw`), timed the same way; for the polling worker, the poll interval.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator, Reserved

from .common import (
    Procs,
    Row,
    Section,
    child_env,
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
)

# Per repetition: enough that a p99 is one (the second slowest of 100), not the slowest of a few.
CANCELS = 100
WARMUP = 3
POLL_INTERVAL = 0.05
BLPOP_TIMEOUT = 8  # below the client's socket timeout


async def pop(client: Redis, key: str, what: str, procs: Procs, log: str, wait: float) -> str:
    deadline = time.monotonic() + wait
    while True:
        got = await client.blpop([key], timeout=min(BLPOP_TIMEOUT, wait))
        if got is not None:
            return str(got[1])
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {wait:g}s; log of {log}:\n{procs.log(log)}")


async def cancel_once(
    coord: Coordinator, session: str, key: str, procs: Procs, log: str, wait: float
) -> tuple[float, float, list[str]]:
    """One run executed and cancelled: (latency ms, cancel() call ms, unexpected starts)."""
    reserved = await coord.execute(session)
    assert isinstance(reserved, Reserved), reserved
    unexpected = []  # an agent started for some other run (e.g. twice for an earlier one)
    while (
        started := await pop(coord.client, f"{key}:started", "run start", procs, log, wait)
    ) != reserved.run_id:
        unexpected.append(started)
    await asyncio.sleep(random.uniform(0.003, 0.012))
    t0 = time.time_ns()
    assert await coord.cancel(session)
    call = (time.time_ns() - t0) / 1e6
    seen = await pop(coord.client, f"{key}:seen", "checkpoint raising", procs, log, wait)
    run_id, ns = seen.split()
    assert run_id == reserved.run_id, (run_id, reserved.run_id)
    return (int(ns) - t0) / 1e6, call, unexpected


class Worker:
    """A ``python -m workers`` process running ``app``, cancelled one run at a time."""

    def __init__(self, url: str, tag: str, procs: Procs, name: str, app: str) -> None:
        self.name, self.procs = name, procs
        self.key = f"{tag}:{name}"
        self.coord = Coordinator.from_url(url, prefix=f"{tag}-{name}")
        env = child_env(
            BENCH_REDIS_URL=url, BENCH_KEY=self.key, BENCH_POLL_INTERVAL=str(POLL_INTERVAL)
        )
        prefix = self.coord.prefix
        cmd = [sys.executable, "-m", "workers", app, "--redis-url", url, "--prefix", prefix]
        opts = ["--concurrency", "4", "--shutdown-grace", "1", "--shutdown-cancel-wait", "1"]
        self.proc = procs.start(name, [*cmd, *opts, "--log-level", "INFO"], env=env)
        self.calls: list[float] = []
        self.unexpected: list[str] = []
        self.executed = 0

    async def once(self, warm: bool) -> float:
        # The first one also waits for the worker to start.
        wait = 10.0 if self.executed else 60.0
        self.executed += 1
        latency, call, odd = await cancel_once(
            self.coord, "cancel", self.key, self.procs, self.name, wait
        )
        self.unexpected += odd
        if warm:
            self.calls.append(call)
        return latency

    async def close(self) -> dict[str, Any]:
        await self.coord.aclose()
        self.procs.stop(self.proc, timeout=5.0)
        return {
            "cancel_call_p50": percentile(self.calls, 50),
            "unexpected_starts": self.unexpected,
            "runs_started": self.procs.log(self.name, 100000).count("run started"),
            "runs_executed": self.executed,
        }


class Raw:
    """The baseline: ``PUBLISH`` heard by a plain redis-py subscriber in another process."""

    def __init__(self, url: str, tag: str, procs: Procs) -> None:
        self.procs, self.key, self.channel = procs, f"{tag}:raw", f"{tag}:raw-channel"
        cmd = [sys.executable, "-m", "suite.cancel_raw", url, self.channel, self.key]
        self.proc = procs.start("raw", cmd)
        self.client = Redis.from_url(url, decode_responses=True)
        self.sent = 0

    async def once(self, warm: bool) -> float:
        if not self.sent:
            await pop(self.client, f"{self.key}:ready", "raw listener", self.procs, "raw", 60.0)
        self.sent += 1
        await asyncio.sleep(random.uniform(0.003, 0.012))
        t0 = time.time_ns()
        await self.client.publish(self.channel, str(self.sent))
        seen = await pop(self.client, f"{self.key}:seen", "raw message", self.procs, "raw", 10.0)
        return (int(seen.split()[1]) - t0) / 1e6

    async def close(self) -> dict[str, Any]:
        await self.client.aclose()
        self.procs.stop(self.proc)
        return {}


async def take_turns(cases: dict[str, Worker | Raw], n: int) -> dict[str, dict[str, Any]]:
    """``WARMUP`` cancels of each case, then ``reps()`` repetitions of ``n``, the cases taking
    turns in a new random order for every cancel: each sees the same moments of the machine."""
    runs: dict[str, list[list[float]]] = {name: [] for name in cases}
    try:
        for i in range(WARMUP + reps() * n):
            warm = i >= WARMUP
            if warm and (i - WARMUP) % n == 0:
                for lists in runs.values():
                    lists.append([])
            for name in random.sample(list(cases), len(cases)):
                latency = await cases[name].once(warm)
                if warm:
                    runs[name][-1].append(latency)
    finally:
        closed = {name: await case.close() for name, case in cases.items()}
    return {name: summarize(runs[name]) | closed[name] for name in cases}


def summarize(runs: list[list[float]]) -> dict[str, Any]:
    return {
        "p50": median([percentile(r, 50) for r in runs]),
        "p99": median([percentile(r, 99) for r in runs]),
        "max": max(max(r) for r in runs),
        "runs": runs,
    }


async def measure(url: str, tag: str) -> dict[str, Any]:
    n = scaled(CANCELS, 5)
    with Procs() as procs:
        # The raw baseline and the two pub/sub workers take turns; the polling worker, whose
        # cancels take 50 times as long, goes alone.
        pubsub = await take_turns(
            {
                "raw": Raw(url, tag, procs),
                "pubsub": Worker(url, tag, procs, "pubsub", "suite.cancel_agent:agent"),
                "waiting": Worker(url, tag, procs, "waiting", "suite.cancel_agent_wait:agent"),
            },
            n,
        )
        polled = await take_turns(
            {"polling": Worker(url, tag, procs, "polling", "suite.cancel_agent_nopubsub:agent")},
            n,
        )
    return {"cancels_per_rep": n, **pubsub, **polled}


def pubsub_rows(what: str, worker: dict[str, Any], raw: dict[str, Any]) -> list[Row]:
    p99, p50 = worker["p99"], worker["p50"]
    return [
        Row(
            f"{what}: p99",
            fmt_ms(p99),
            f"raw PUBLISH p99 {fmt_ms(raw['p99'])}",
            fmt_ratio(ratio(p99, raw["p99"])),
            "≤ 2 ms",
            p99 <= 2.0,
        ),
        Row(
            f"{what}: p50",
            fmt_ms(p50),
            f"raw PUBLISH p50 {fmt_ms(raw['p50'])}",
            fmt_ratio(ratio(p50, raw["p50"])),
        ),
    ]


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        data = run_async(measure(url, tag))
    raw, pubsub, polled = data["raw"], data["pubsub"], data["polling"]
    waiting = data["waiting"]
    poll_ms = POLL_INTERVAL * 1000
    section = Section(
        "4. Cancel latency: `coord.cancel()` → `checkpoint()` raising in a worker process",
        f"{data['cancels_per_rep']} cancels per repetition, median over {reps()} repetitions "
        "of the per-repetition p50 / p99 (a p99 of up to 100 cancels lies between the two "
        "slowest). The agent loops on `checkpoint()` and `asyncio.sleep(0.0005)`: on uvloop, "
        "whose timers round that sleep down to none, a busy agent checking without pause (on "
        "asyncio's loop, about every millisecond); "
        "a second agent waits in `ctx.sleep(3600)`, which the cancel interrupts, so that "
        "row is the delivery alone. "
        "Baseline with pub/sub: raw `PUBLISH` → a plain redis-py subscriber in another "
        "process, timed the same way. The baseline and the two agents take turns, cancel by "
        "cancel, in a random order.",
        data=data,
    )
    section.rows += [
        *pubsub_rows("with pub/sub", pubsub, raw),
        *pubsub_rows("with pub/sub, the agent waiting in `ctx.sleep()`", waiting, raw),
        Row(
            f"pub/sub blocked, markers polled every {poll_ms:g} ms: p99",
            fmt_ms(polled["p99"]),
            f"poll interval {fmt_ms(poll_ms)}",
            fmt_ratio(ratio(polled["p99"], poll_ms)),
            f"≤ {poll_ms + 2:g} ms",
            polled["p99"] <= poll_ms + 2,
        ),
        Row(
            "pub/sub blocked: p50",
            fmt_ms(polled["p50"]),
            f"half the interval {fmt_ms(poll_ms / 2)}",
            fmt_ratio(ratio(polled["p50"], poll_ms / 2)),
        ),
    ]
    section.notes.append(
        "The `coord.cancel()` call itself (one script: it writes the cancel, publishes the "
        "nudge and drops the run from the active index and the schedule) "
        f"takes {fmt_ms(pubsub['cancel_call_p50'])} at p50; slowest cancel seen: "
        f"{fmt_ms(pubsub['max'])} with pub/sub, {fmt_ms(polled['max'])} polling, raw "
        f"{fmt_ms(raw['max'])}."
    )
    for name, worker in (("pub/sub", pubsub), ("waiting", waiting), ("polling", polled)):
        if worker["unexpected_starts"] or worker["runs_started"] != worker["runs_executed"]:
            section.notes.append(
                f"**Anomaly** ({name} worker): {worker['runs_executed']} runs executed, the "
                f'worker logged {worker["runs_started"]} "run started"; agent starts for a '
                f"run other than the one just executed: {len(worker['unexpected_starts'])} "
                "(a run started twice?)."
            )
    return [section]

"""Benchmark 5: the whole life of a no-op run, runstate next to arq, SAQ and RQ.

runstate: ``coord.execute(session)``, then ``coord.subscribe(session)`` until the run's terminal
event, with two ``python -m workers suite.noop_agent:agent --concurrency 10`` processes; every
run has its own session. The others (:mod:`suite.compare`, run in ``bench/.venv``): enqueue a
no-op job and wait until its result is seen, two worker processes each, on the same server.

Per repetition: throughput (``JOBS`` runs, ``WINDOW`` in flight) and latency (``LATENCY_JOBS``
runs one at a time, p50). The systems take turns in ``reps()`` passes, ``PER_PASS`` repetitions
each, in orders that alternate (runstate, arq, SAQ, RQ, then RQ, SAQ, arq, runstate, and so on),
so that the machine's drift over the minutes the benchmark takes favours none of them; the table
shows medians over all passes.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator, Reserved

from .common import (
    Procs,
    Row,
    Section,
    compare_python,
    fmt_ms,
    fmt_rate,
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

WORKERS = 2
CONCURRENCY = 10
# 1,000 runs per throughput repetition: at 200 one lasted 60-100 ms, the filling and draining of
# the window were a good part of it, and one system's repetitions spread twofold in one run
# (runstate 1,847-3,611 runs/s); at 1,000, 3,147-3,632 against SAQ's 1,934-2,252.
JOBS = 1000
LATENCY_JOBS = 40
WARMUP = 40
WINDOW = 40
# Repetitions per pass. With two passes of five, a slowdown of the machine that lasted one
# system's whole pass decided the ratio (runstate's five of one pass at 1,997-2,572 runs/s, of
# the other at 2,417-3,524, SAQ's 1,458-2,171 throughout); with five passes of two, a system's
# repetitions are spread over the whole benchmark.
PER_PASS = 2
SYSTEMS = ("arq", "saq", "rq")


async def one_run(coord: Coordinator, session: str) -> float:
    """Execute a run and follow it to its terminal event; returns how long execute() took."""
    start = time.perf_counter()
    reserved = await coord.execute(session)
    executed = time.perf_counter() - start
    assert isinstance(reserved, Reserved), reserved
    async for item in coord.subscribe(session):
        if item.event.is_terminal and item.run_id == reserved.run_id:
            if item.event.type != "complete":
                raise RuntimeError(f"run {reserved.run_id} ended with {item.event!r}")
            return executed
    raise RuntimeError(f"the events of {session} ended before its terminal event")


async def run_many(coord: Coordinator, sessions: list[str], window: int) -> float:
    sem = asyncio.Semaphore(window)

    async def guarded(session: str) -> None:
        async with sem:
            await one_run(coord, session)

    start = time.perf_counter()
    await asyncio.gather(*(guarded(s) for s in sessions))
    return time.perf_counter() - start


async def measure_runstate(url: str, tag: str, procs: Procs) -> dict[str, Any]:
    """One pass of runstate: workers started, warmed up, ``PER_PASS`` repetitions, stopped."""
    prefix = f"{tag}-rs"
    cmd = [sys.executable, "-m", "workers", "suite.noop_agent:agent", "--redis-url", url]
    cmd += ["--prefix", prefix, "--concurrency", str(CONCURRENCY), "--log-level", "WARNING"]
    workers = [procs.start(f"runstate-worker-{i}", cmd) for i in range(WORKERS)]
    jobs, lat_jobs = scaled(JOBS, 20), scaled(LATENCY_JOBS, 10)
    try:
        async with Coordinator.from_url(url, prefix=prefix) as coord:
            client: Redis = coord.client
            deadline = time.monotonic() + 60
            while await client.zcard(coord.keys.workers) < WORKERS:
                if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                    raise RuntimeError(
                        "runstate workers did not start:\n" + procs.log("runstate-worker-0")
                    )
                await asyncio.sleep(0.05)
            counter = 0

            def sessions(n: int) -> list[str]:
                nonlocal counter
                counter += n
                return [f"life-{i}" for i in range(counter - n, counter)]

            await run_many(coord, sessions(scaled(WARMUP, 10)), WINDOW)
            throughput, p50, p99, execute = [], [], [], []
            for _ in range(PER_PASS):
                throughput.append(jobs / await run_many(coord, sessions(jobs), WINDOW))
                lat = []
                for session in sessions(lat_jobs):
                    start = time.perf_counter()
                    execute.append(await one_run(coord, session) * 1000)
                    lat.append((time.perf_counter() - start) * 1000)
                p50.append(percentile(lat, 50))
                p99.append(percentile(lat, 99))
    finally:
        for worker in workers:
            procs.stop(worker)
    return {
        "system": "runstate",
        "throughput": throughput,
        "latency_p50": p50,
        "latency_p99": p99,
        "execute_ms": execute,
    }


def measure_other(system: str, python: str, url: str, tag: str, procs: Procs) -> dict[str, Any]:
    out = procs.dir / f"{system}.json"
    cmd = [python, "-m", "suite.compare", "bench", system, "--url", url, "--tag", tag]
    cmd += ["--out", str(out), "--logdir", str(procs.dir), "--workers", str(WORKERS)]
    cmd += ["--jobs", str(scaled(JOBS, 20)), "--latency-jobs", str(scaled(LATENCY_JOBS, 10))]
    cmd += ["--warmup", str(scaled(WARMUP, 10)), "--window", str(WINDOW), "--reps", str(PER_PASS)]
    proc = procs.start(f"{system}-bench", cmd)
    try:
        code = proc.wait(240)
    except subprocess.TimeoutExpired:
        code = None
    procs.stop(proc)  # SIGTERM: it stops its own workers on the way out
    if code != 0 or not out.exists():
        raise RuntimeError(f"{system} benchmark failed ({code}):\n{procs.log(f'{system}-bench')}")
    return json.loads(out.read_text())


def measure(url: str, tag: str) -> dict[str, Any]:
    passes: dict[str, list[dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    took: dict[str, float] = {}
    python, why = compare_python()
    order = ("runstate", *SYSTEMS)
    with Procs() as procs:
        for number in range(reps()):
            systems = order if number % 2 == 0 else order[::-1]
            pass_tag = f"{tag}-p{number}"  # fresh sessions and queues for each pass
            for system in systems:
                if system in errors:
                    continue
                start = time.monotonic()
                if system == "runstate":
                    part = run_async(measure_runstate(url, pass_tag, procs))
                elif python is None:
                    errors[system] = why
                    continue
                else:
                    try:
                        part = measure_other(system, python, url, pass_tag, procs)
                    except Exception as exc:  # report it, and go on with the others
                        errors[system] = str(exc).strip().splitlines()[0][:300]
                        continue
                took[system] = took.get(system, 0.0) + time.monotonic() - start
                passes.setdefault(system, []).append(part)
    results = {system: pooled(system, parts) for system, parts in passes.items()}
    return {"results": results, "errors": errors, "took": took}


def pooled(system: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetitions of all passes of one system, and their medians."""
    throughput = [x for part in parts for x in part["throughput"]]
    p50 = [x for part in parts for x in part["latency_p50"]]
    p99 = [x for part in parts for x in part["latency_p99"]]
    result = {
        "system": system,
        "throughput": throughput,
        "latency_p50": p50,
        "latency_p99": p99,
        "runs_per_s": median(throughput),
        "p50_ms": median(p50),
        "p99_ms": median(p99),
    }
    if system == "runstate":
        result["execute_p50_ms"] = percentile([x for p in parts for x in p["execute_ms"]], 50)
    return result


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        data = measure(url, tag)
    results, errors = data["results"], data["errors"]
    rs = results["runstate"]
    others = {s: r for s, r in results.items() if s != "runstate"}
    best = max(others.values(), key=lambda r: r["runs_per_s"], default=None)
    section = Section(
        "5. Run lifecycle: no-op runs, execute → worker → complete → terminal seen",
        f"{WORKERS} worker processes per system ({CONCURRENCY} jobs at once each; RQ's "
        f"SimpleWorker does one), all on the same server. Throughput: {scaled(JOBS, 20)} runs "
        f"with {WINDOW} in flight; latency: {scaled(LATENCY_JOBS, 10)} runs one at a time; "
        f"{reps()} passes of {PER_PASS}, the systems taking turns in orders that alternate "
        f"(runstate first, then last, ...), median of all {reps() * PER_PASS}. arq is tuned to "
        "poll every 2 ms (queue and result; its default is 500 ms); SAQ waits through pub/sub, "
        "RQ through a blocking XREAD.",
        data=data,
    )
    if best is not None:
        r = ratio(rs["runs_per_s"], best["runs_per_s"])
        section.rows.append(
            Row(
                f"runs/s vs the best other ({best['system']})",
                fmt_rate(rs["runs_per_s"]),
                f"{best['system']} {fmt_rate(best['runs_per_s'])}",
                fmt_ratio(r),
                "≥ 1.5x",
                r >= 1.5,
            )
        )
    else:
        section.rows.append(Row("runs/s", fmt_rate(rs["runs_per_s"]), "n/a", "", "≥ 1.5x", None))
    fastest = min(others.values(), key=lambda r: r["p50_ms"], default=None)
    section.rows.append(
        Row(
            "p50 latency, one run at a time"
            + (f" (vs the fastest other, {fastest['system']})" if fastest else ""),
            fmt_ms(rs["p50_ms"]),
            f"{fastest['system']} {fmt_ms(fastest['p50_ms'])}" if fastest else "n/a",
            fmt_ratio(ratio(rs["p50_ms"], fastest["p50_ms"])) if fastest else "",
            "≤ 3 ms",
            rs["p50_ms"] <= 3.0,
        )
    )
    for system in SYSTEMS:
        other = others.get(system)
        if other is None:
            section.rows.append(
                Row(f"vs {system}", "", f"not measured: {errors.get(system, '?')}", "", "", None)
            )
            continue
        section.rows.append(
            Row(
                f"vs {system}: runs/s",
                fmt_rate(rs["runs_per_s"]),
                fmt_rate(other["runs_per_s"]),
                fmt_ratio(ratio(rs["runs_per_s"], other["runs_per_s"])),
            )
        )
        section.rows.append(
            Row(
                f"vs {system}: p50 / p99 latency",
                f"{fmt_ms(rs['p50_ms'])} / {fmt_ms(rs['p99_ms'])}",
                f"{fmt_ms(other['p50_ms'])} / {fmt_ms(other['p99_ms'])}",
                fmt_ratio(ratio(rs["p50_ms"], other["p50_ms"])),
            )
        )
    spread = ", ".join(
        f"{name} {min(r['throughput']):,.0f}-{max(r['throughput']):,.0f}"
        for name, r in results.items()
        if not any(math.isnan(x) for x in r["throughput"])
    )
    section.notes.append(f"Throughput range over the repetitions (runs/s): {spread}.")
    section.notes.append(
        "Wall time per system (all passes), worker start and stop included: "
        + ", ".join(f"{name} {secs:.1f} s" for name, secs in data["took"].items())
        + "."
    )
    section.notes.append(
        f"Of runstate's one-at-a-time latency, `coord.execute()` itself takes "
        f"{fmt_ms(rs['execute_p50_ms'])} at p50; the rest is the worker's read, claim, run and "
        "finish, and the subscriber's snapshot and live read."
    )
    return [section]

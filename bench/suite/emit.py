"""Benchmarks 1 and 2: emitting events of one run, one per await and in batches.

runstate: ``RunHandle.emit`` (one fenced Lua script per event) and ``RunHandle.emit_many``
(one script per batch), from a run reserved with ``try_reserve`` and claimed with ``claim``.
Baseline: a raw redis-py loop of ``XADD key MAXLEN ~ 1000 * run R seq N type token data JSON``
on the very same client (``coord.client``), with the same ~100-byte event JSON.
"""

from __future__ import annotations

import time
from typing import Any

from runstate import Coordinator, Reserved, RunHandle
from runstate.events import Token

from .common import (
    Row,
    Section,
    fmt_rate,
    fmt_ratio,
    median,
    new_tag,
    ratio,
    redis_server,
    reps,
    run_async,
    scaled,
    server_version,
)

EVENT_BYTES = 100
BATCHES = (16, 64)
CHUNK = 64  # events per slice of the interleaving; a multiple of every batch size


def token_of_size(size: int) -> Token:
    """A Token whose JSON is ``size`` bytes long."""
    pad = size - len(Token(content="").to_json())
    return Token(content="x" * max(0, pad))


async def claimed_run(coord: Coordinator, session_id: str, worker: str = "bench") -> RunHandle:
    """A running run of ``session_id``, owned by the caller (reserve + claim)."""
    reserved = await coord.try_reserve(session_id)
    assert isinstance(reserved, Reserved), reserved
    return await coord.claim(session_id, reserved.run_id, worker=worker)


async def end_run(coord: Coordinator, run: RunHandle) -> None:
    await run.complete()
    coord.release(run)


async def emit_loop(run: RunHandle, event: Token, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await run.emit(event)
    return time.perf_counter() - start


async def emit_many_loop(run: RunHandle, event: Token, n: int, size: int) -> float:
    batch = [event] * size
    start = time.perf_counter()
    for _ in range(n // size):
        await run.emit_many(batch)
    return time.perf_counter() - start


async def raw_loop(
    coord: Coordinator, key: str, run_id: str, data: str, n: int, first_seq: int = 1
) -> float:
    client = coord.client
    start = time.perf_counter()
    for seq in range(first_seq, first_seq + n):
        fields = {"run": run_id, "seq": seq, "type": "token", "data": data}
        await client.xadd(key, fields, maxlen=1000, approximate=True)
    return time.perf_counter() - start


async def measure(url: str, tag: str) -> dict[str, Any]:
    n = scaled(3072, 64)
    event = token_of_size(EVENT_BYTES)
    data = event.to_json()
    rates: dict[str, list[float]] = {"raw": [], "emit": [], **{f"batch{b}": [] for b in BATCHES}}
    async with Coordinator.from_url(url, prefix=tag) as coord:
        # Warm up: scripts loaded (EVALSHA hits), connections open, code paths hot.
        warm = await claimed_run(coord, "warm")
        await emit_loop(warm, event, 200)
        await emit_many_loop(warm, event, 256, 64)
        await raw_loop(coord, f"{tag}:raw:warm", "r" * 32, data, 200)
        await end_run(coord, warm)
        for rep in range(reps()):
            # Interleaved in slices of CHUNK events, so that the machine's drift (its speed
            # changes over seconds here) hits every variant alike.
            runs = {
                name: await claimed_run(coord, f"{name}-{rep}") for name in rates if name != "raw"
            }
            elapsed = dict.fromkeys(rates, 0.0)
            raw_key = f"{tag}:raw:{rep}"
            for chunk in range(n // CHUNK):
                elapsed["raw"] += await raw_loop(
                    coord, raw_key, "r" * 32, data, CHUNK, chunk * CHUNK + 1
                )
                elapsed["emit"] += await emit_loop(runs["emit"], event, CHUNK)
                for size in BATCHES:
                    elapsed[f"batch{size}"] += await emit_many_loop(
                        runs[f"batch{size}"], event, CHUNK, size
                    )
            for name, seconds in elapsed.items():
                rates[name].append((n // CHUNK) * CHUNK / seconds)
            for run in runs.values():
                await end_run(coord, run)
    return {"events_per_rep": n, "event_bytes": len(data), "rates": rates}


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        version = server_version(url)
        data = run_async(measure(url, tag))
    rates = {k: median(v) for k, v in data["rates"].items()}
    raw = rates["raw"]
    single = Section(
        "1. Emit, one run, sequential awaits",
        f"{data['events_per_rep']} Token events of {data['event_bytes']} bytes per repetition, "
        f"median of {reps()}; baseline: raw redis-py `XADD MAXLEN ~ 1000` of the same fields "
        f"(run, seq, type, data) on the same asyncio client; server {version}. The variants "
        f"take turns every {CHUNK} events, so that the machine's drift hits them alike.",
        data=data,
    )
    single.rows.append(
        Row(
            "events/s, `emit` vs raw `XADD`",
            fmt_rate(rates["emit"]),
            fmt_rate(raw),
            fmt_ratio(ratio(rates["emit"], raw)),
            "≥ 0.75x",
            ratio(rates["emit"], raw) >= 0.75,
        )
    )
    single.rows.append(
        Row(
            "µs per event",
            f"{1e6 / rates['emit']:.0f} µs",
            f"{1e6 / raw:.0f} µs",
            fmt_ratio(ratio(raw, rates["emit"])),
        )
    )
    batched = Section(
        "2. Batched emit (token streaming)",
        "`emit_many` with batches of 16 and 64 events (same events) vs the raw single-`XADD` "
        f"loop of benchmark 1; median of {reps()}.",
    )
    for size in BATCHES:
        r = ratio(rates[f"batch{size}"], raw)
        batched.rows.append(
            Row(
                f"events/s, `emit_many` x {size} vs raw `XADD`",
                fmt_rate(rates[f"batch{size}"]),
                fmt_rate(raw),
                fmt_ratio(r),
                "≥ 4x",
                r >= 4,
            )
        )
    return [single, batched]

"""Benchmark 7: reservations, on distinct sessions and under contention on one session.

Distinct: ``coord.try_reserve(session)`` on ``N`` fresh session ids, one await after the other,
vs a raw loop of ``EVALSHA`` of a trivial script doing the similar ``HSET key run_id R status
pending started_at T`` on ``N`` fresh keys (same client; a fresh uuid4 and timestamp per call in
both). Contention: 50 ``try_reserve`` of one fresh session at once (``asyncio.gather``, so 50
connections of the pool race on the server): exactly one may win; the time is from the first
call to the last answer. Baseline: 50 raw ``EVALSHA`` calls on one key, the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from runstate import AlreadyRunning, Coordinator, Reserved

from .common import (
    Row,
    Section,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    median,
    new_tag,
    ratio,
    redis_server,
    reps,
    run_async,
    scaled,
)

DISTINCT = 2000
CHUNK = 50  # calls per slice of the interleaving
CONTENDERS = 50
RAW_SCRIPT = """
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'status', 'pending', 'started_at', ARGV[2])
return 1
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


async def raw_reserve(client: Redis, sha: str, key: str) -> Any:
    return await client.evalsha(sha, 1, key, uuid.uuid4().hex, now())


async def measure(url: str, tag: str) -> dict[str, Any]:
    n = scaled(DISTINCT, 50)
    rates: dict[str, list[float]] = {"runstate": [], "raw": []}
    contention: dict[str, list[float]] = {"runstate": [], "raw": []}
    winners: list[int] = []
    losers_agree: list[bool] = []
    async with Coordinator.from_url(url, prefix=tag) as coord:
        client: Redis = coord.client
        sha = await client.script_load(RAW_SCRIPT)
        for i in range(200):  # warm-up
            await coord.try_reserve(f"warm-{i}")
            await raw_reserve(client, sha, f"{tag}:raw:warm-{i}")
        await asyncio.gather(*(client.ping() for _ in range(CONTENDERS)))  # open 50 connections
        for rep in range(reps()):
            # Interleaved in slices of CHUNK calls, so that the machine's drift (its speed
            # changes over seconds here) hits both alike.
            elapsed = {"raw": 0.0, "runstate": 0.0}
            for first in range(0, n, CHUNK):
                ids = range(first, min(n, first + CHUNK))
                start = time.perf_counter()
                for i in ids:
                    await raw_reserve(client, sha, f"{tag}:raw:{{d{rep}-{i}}}:runner")
                middle = time.perf_counter()
                for i in ids:
                    await coord.try_reserve(f"d{rep}-{i}")
                elapsed["raw"] += middle - start
                elapsed["runstate"] += time.perf_counter() - middle
            for name, seconds in elapsed.items():
                rates[name].append(n / seconds)

            key = f"{tag}:raw:{{c{rep}}}:runner"
            start = time.perf_counter()
            await asyncio.gather(*(raw_reserve(client, sha, key) for _ in range(CONTENDERS)))
            contention["raw"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            results = await asyncio.gather(
                *(coord.try_reserve(f"c{rep}") for _ in range(CONTENDERS))
            )
            contention["runstate"].append((time.perf_counter() - start) * 1000)
            won = [r for r in results if isinstance(r, Reserved)]
            winners.append(len(won))
            losers_agree.append(
                len(won) == 1
                and all(
                    isinstance(r, AlreadyRunning) and r.run_id == won[0].run_id
                    for r in results
                    if r is not won[0]
                )
            )
    return {
        "sessions_per_rep": n,
        "rates": rates,
        "contention_ms": contention,
        "winners": winners,
        "losers_name_the_winner": losers_agree,
    }


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        data = run_async(measure(url, tag))
    rs, raw = median(data["rates"]["runstate"]), median(data["rates"]["raw"])
    c_rs, c_raw = median(data["contention_ms"]["runstate"]), median(data["contention_ms"]["raw"])
    section = Section(
        "7. Reservations",
        f"Distinct: {data['sessions_per_rep']} fresh sessions per repetition, sequential "
        f"awaits, `try_reserve` and the baseline taking turns every {CHUNK} calls; contention: "
        f"{CONTENDERS} concurrent reservers of one fresh session; median "
        f"of {reps()}. Baseline: `EVALSHA` of a trivial script doing one HSET.",
        data=data,
    )
    r = ratio(rs, raw)
    section.rows.append(
        Row(
            "distinct sessions: reservations/s (`try_reserve` vs raw `EVALSHA`)",
            fmt_rate(rs),
            fmt_rate(raw),
            fmt_ratio(r),
            "≥ 0.7x",
            r >= 0.7,
        )
    )
    one_winner = all(w == 1 for w in data["winners"]) and all(data["losers_name_the_winner"])
    section.rows.append(
        Row(
            f"{CONTENDERS}-way contention on one session: winners per repetition",
            ", ".join(str(w) for w in data["winners"]),
            "-",
            "",
            "exactly 1 (the others: AlreadyRunning naming it)",
            one_winner,
        )
    )
    section.rows.append(
        Row(
            f"{CONTENDERS}-way contention: time for all {CONTENDERS} answers",
            fmt_ms(c_rs),
            fmt_ms(c_raw),
            fmt_ratio(ratio(c_rs, c_raw)),
        )
    )
    return [section]

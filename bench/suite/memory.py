"""Benchmark 6: Redis memory per session, runstate's keys vs the same data in plain commands.

A *full* session: one run (reserve, claim, ``emit_many`` in batches of 50, ``complete``) whose
stream holds 1,000 entries of ~300-byte events (``execution_started``, 998 events of which every
31st is a critical ``task_list_updated`` and the rest ``token``, then ``complete``). An *idle*
session: a finished run that emitted nothing (its stream holds ``execution_started`` and
``complete``). Bytes are ``MEMORY USAGE key SAMPLES 0`` summed over the session's keys.

Baseline: the same data written with plain commands into keys of the same names' length:
``XADD key MAXLEN ~ 1000 * run R seq N type T data JSON`` for every entry runstate's stream holds,
``HSET`` of the runner hash's fields and values, ``RPUSH`` of the critical list's items, and the
same ``EXPIRE`` (the retention). A cross-check measures ``INFO memory`` ``used_memory`` before
and after writing many sessions of each kind.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator
from runstate.events import TaskListUpdated, Token

from .common import (
    Row,
    Section,
    fmt_bytes,
    fmt_ratio,
    median,
    new_tag,
    ratio,
    redis_server,
    reps,
    run_async,
    scaled,
)
from .emit import claimed_run

EVENT_BYTES = 300
ENTRIES = 1000
CRITICAL_EVERY = 31
BATCH = 50
IDLE_SESSIONS = 200
FULL_SESSIONS = 10


def events(n: int) -> list[Token | TaskListUpdated]:
    token = Token(content="")
    token = Token(content="t" * (EVENT_BYTES - len(token.to_json())))
    out: list[Token | TaskListUpdated] = []
    for i in range(n):
        if i % CRITICAL_EVERY == CRITICAL_EVERY // 2:
            empty = len(TaskListUpdated(task_list={"todo": [""], "n": i}).to_json())
            out.append(TaskListUpdated(task_list={"todo": ["s" * (EVENT_BYTES - empty)], "n": i}))
        else:
            out.append(token)
    return out


async def make_session(coord: Coordinator, session: str, n_events: int) -> None:
    run = await claimed_run(coord, session)
    batch = events(n_events)
    for i in range(0, len(batch), BATCH):
        await run.emit_many(batch[i : i + BATCH])
    await run.complete()
    coord.release(run)


async def usage(client: Redis, keys: list[str]) -> dict[str, int]:
    out = {}
    for key in keys:
        n = await client.memory_usage(key, samples=0)
        if n is not None:
            out[key.rsplit(":", 1)[-1]] = int(n)
    return out


async def copy_plain(client: Redis, coord: Coordinator, session: str, raw: str) -> list[str]:
    """Write the session's data with plain commands under prefix ``raw``; returns the keys."""
    keys = coord.keys
    runner, stream, critical = keys.runner(session), keys.events(session), keys.critical(session)
    fields = await client.hgetall(runner)
    entries = await client.xrange(stream)
    items = await client.lrange(critical, 0, -1)
    ttl = await client.ttl(runner)
    # Names as long as runstate's when ``raw`` is as long as its prefix (same key overhead).
    names = {k: raw + k[len(keys.prefix) :] for k in (runner, stream, critical)}
    async with client.pipeline(transaction=False) as pipe:
        for _, entry in entries:
            pipe.xadd(names[stream], entry, maxlen=1000, approximate=True)
        if fields:
            pipe.hset(names[runner], mapping=fields)
        if items:
            pipe.rpush(names[critical], *items)
        for name in names.values():
            if ttl > 0:
                pipe.expire(name, ttl)
        await pipe.execute()
    return [names[runner], names[stream], names[critical]]


async def used_memory(client: Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def measure(url: str, tag: str) -> dict[str, Any]:
    # Prefixes of one length, so that key names cost the same; all contain the tag (cleanup).
    prefix, plain_prefix, info_prefix = f"{tag}:rs", f"{tag}:pl", f"{tag}:pm"
    kinds = {"full": ENTRIES - 2, "idle": 0}
    per_key: dict[str, list[dict[str, Any]]] = {"full": [], "idle": []}
    async with Coordinator.from_url(url, prefix=prefix) as coord:
        client: Redis = coord.client
        await make_session(coord, "warm", 10)  # scripts loaded before anything is counted
        for kind, n_events in kinds.items():
            for rep in range(reps()):
                session = f"{kind}-{rep}"
                await make_session(coord, session, n_events)
                names = await copy_plain(client, coord, session, plain_prefix)
                rs = await usage(client, coord.keys.session_keys(session))
                plain = await usage(client, names)
                length = await client.xlen(coord.keys.events(session))
                per_key[kind].append({"runstate": rs, "plain": plain, "entries": length})
        # Cross-check: INFO used_memory around many sessions of each kind.
        info: dict[str, dict[str, float]] = {}
        for kind, count in (
            ("idle", scaled(IDLE_SESSIONS, 20)),
            ("full", scaled(FULL_SESSIONS, 2)),
        ):
            before = await used_memory(client)
            for i in range(count):
                await make_session(coord, f"info-{kind}-{i}", kinds[kind])
            middle = await used_memory(client)
            for i in range(count):
                await copy_plain(client, coord, f"info-{kind}-{i}", info_prefix)
            after = await used_memory(client)
            info[kind] = {
                "sessions": count,
                "runstate": (middle - before) / count,
                "plain": (after - middle) / count,
            }
    return {"per_key": per_key, "info": info}


def run() -> list[Section]:
    tag = new_tag()
    with redis_server(tag) as url:
        data = run_async(measure(url, tag))
    section = Section(
        "6. Memory per session",
        f"`MEMORY USAGE … SAMPLES 0` summed over a session's keys, median of {reps()} sessions; "
        f"full: {ENTRIES} stream entries of ~{EVENT_BYTES}-byte events, critical list full; "
        "idle: a finished run with no events of its own. Baseline: the same entries, hash "
        "fields and list items written with plain XADD / HSET / RPUSH (+ the same EXPIRE).",
        data=data,
    )
    for kind in ("full", "idle"):
        samples = data["per_key"][kind]
        rs = median([sum(s["runstate"].values()) for s in samples])
        plain = median([sum(s["plain"].values()) for s in samples])
        r = ratio(rs, plain)
        section.rows.append(
            Row(
                f"{kind} session, bytes (MEMORY USAGE)",
                fmt_bytes(rs),
                fmt_bytes(plain),
                fmt_ratio(r),
                "≤ 1.2x",
                r <= 1.2,
            )
        )
        info = data["info"][kind]
        section.rows.append(
            Row(
                f"{kind} session, bytes (INFO used_memory delta / {info['sessions']} sessions)",
                fmt_bytes(info["runstate"]),
                fmt_bytes(info["plain"]),
                fmt_ratio(ratio(info["runstate"], info["plain"])),
            )
        )
        first = samples[0]
        parts = ", ".join(
            f"{k} {first['runstate'].get(k, 0):,} vs {first['plain'].get(k, 0):,}"
            for k in ("runner", "events", "critical")
        )
        section.notes.append(
            f"{kind}: per key (runstate vs plain, bytes): {parts}; "
            f"stream length {first['entries']}."
        )
    return [section]

"""The agent of the cancel benchmark: loops on safe points until it is cancelled.

It says that it runs (``RPUSH <key>:started run_id``) and, when ``checkpoint()`` raises, notes
``time.time_ns()`` at once and reports it (``RPUSH <key>:seen "run_id ns"``), ``<key>`` being
``$BENCH_KEY`` on the server ``$BENCH_REDIS_URL``.
"""

from __future__ import annotations

import asyncio
import os
import time

from redis.asyncio import Redis

from runstate import RunCancelled
from workers.context import RunContext

_client: Redis | None = None


def _redis() -> Redis:
    global _client
    if _client is None:
        _client = Redis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)
    return _client


async def agent(ctx: RunContext) -> None:
    key = os.environ["BENCH_KEY"]
    await _redis().rpush(f"{key}:started", ctx.run_id)
    try:
        while True:
            await ctx.checkpoint()
            await asyncio.sleep(0.0005)
    except RunCancelled:
        seen = time.time_ns()
        await _redis().rpush(f"{key}:seen", f"{ctx.run_id} {seen}")
        raise

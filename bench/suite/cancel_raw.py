"""The baseline listener of the cancel benchmark (``python -m suite.cancel_raw URL CHANNEL KEY``).

A plain redis-py pub/sub subscriber in its own process: for every message it notes
``time.time_ns()`` and reports it (``RPUSH KEY:seen "message ns"``), so that ``PUBLISH`` →
"another process knows" can be timed exactly like ``coord.cancel()`` → ``checkpoint()`` raising.
"""

from __future__ import annotations

import sys
import time

from redis.asyncio import Redis

from .common import run_async


async def main(url: str, channel: str, key: str) -> None:
    client = Redis.from_url(url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    await client.rpush(f"{key}:ready", "1")
    async for message in pubsub.listen():
        if message["type"] == "message":
            seen = time.time_ns()
            await client.rpush(f"{key}:seen", f"{message['data']} {seen}")


if __name__ == "__main__":
    run_async(main(*sys.argv[1:4]))

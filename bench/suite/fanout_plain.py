"""The floor of benchmark 3: fan-out in one process with nothing of runstate's
(``python -m suite.fanout_plain``, the same arguments and hand-shake as
:mod:`suite.fanout_consumer`).

One task reads the session's stream with plain redis-py ``XREAD BLOCK`` on the same client type
and reply parser, parses each entry's JSON once, and hands each read to every subscriber through
one asyncio future that all of them await; each read's future carries the next one's, so a
subscriber that is behind still gets every read, in order. No event models, no ordinal checks,
no resume, no overflow, no pause between reads: about the least a process can do to hand reads to
that many awaiting tasks, hence the figure runstate's subscribers are compared with. Like
runstate's consumer, a subscriber notes one receive time per read (the seq of its last token),
the send times are noted once per event, and the latencies are worked out after the last run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
from array import array
from typing import Any

from redis.asyncio import Redis

from runstate.keys import Keys

from .fanout_consumer import serve, summary

# A read as the subscribers get it: (run id, seq of its first and of its last token, or 0 and 0,
# the type of its terminal event or "", the next read's future).
Read = tuple[str, int, int, str, "asyncio.Future[Read]"]
TERMINAL = frozenset({"complete", "cancelled", "error"})


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    client = Redis.from_url(args.url, decode_responses=True)
    control = Redis.from_url(args.control_url, decode_responses=True)
    key = Keys(args.prefix).events(args.session)
    loop = asyncio.get_running_loop()
    received: dict[str, list[array[int]]] = {}  # run id -> each subscriber's notes
    sent: dict[str, dict[int, int]] = {}  # run id -> seq -> send ns
    terminals: dict[str, int] = {}  # run id -> subscribers that saw its terminal event
    finished = 0
    # Read from the stream's end as the subscribers attach (the producer starts after "ready").
    last: Any = await client.xrevrange(key, count=1)
    cursor = last[0][0] if last else "0-0"
    head: asyncio.Future[Read] = loop.create_future()

    async def reader() -> None:
        nonlocal cursor, head
        while True:
            reply: Any = await client.xread({key: cursor}, count=1000, block=5000)
            if not reply:
                continue
            entries = reply[0][1]
            cursor = entries[-1][0]
            # One run per read in this benchmark (the next starts once every subscriber has
            # seen the previous one end); its terminal event, if any, comes last.
            run, first, token, terminal = entries[0][1]["run"], 0, 0, ""
            times = sent.setdefault(run, {})
            for _, fields in entries:
                data = json.loads(fields["data"])
                if data["type"] == "token":
                    token = int(fields["seq"])
                    first = first or token
                    times[token] = int(data["content"])
                elif data["type"] in TERMINAL:
                    terminal = data["type"]
            following: asyncio.Future[Read] = loop.create_future()
            head.set_result((run, first, token, terminal, following))
            head = following

    async def subscriber() -> None:
        nonlocal finished
        future = head
        run = ""
        notes = array("q")
        while True:
            read_run, first, token, terminal, future = await future
            now = time.time_ns()
            if token:
                if read_run != run:
                    run = read_run
                    notes = array("q", (0, first - 1))  # (0, seq): the next note starts after seq
                    received.setdefault(run, []).append(notes)
                notes.append(now)
                notes.append(token)
            if terminal:
                count = terminals[read_run] = terminals.get(read_run, 0) + 1
                if count == args.subs:
                    await control.rpush(args.drained, read_run)
                if terminal == "error":  # the end of the producer's last run
                    finished += 1
                    return

    tasks = [asyncio.create_task(subscriber()) for _ in range(args.subs)]
    read = asyncio.create_task(reader())
    await asyncio.sleep(0)  # the subscribers await the first read's future
    gc.freeze()  # as the runstate consumer does (see there)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    print("ready", flush=True)
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    for task in (*pending, read):
        task.cancel()
    await asyncio.gather(*tasks, read, return_exceptions=True)
    await control.aclose()
    await client.aclose()
    return summary(received, sent, cpu0, cpu1, pending, gaps=0, finished=finished)


if __name__ == "__main__":
    sys.exit(serve(consume))

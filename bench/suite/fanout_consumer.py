"""The subscriber process of the fan-out benchmark (``python -m suite.fanout_consumer``).

Starts ``--subs`` subscribers (``coord.subscribe(session, follow=True)``, or with ``--batches``
``coord.subscribe_batches``, taking one receive time per batch) on one session in this one
process, prints ``ready`` once all of them are attached, then records when each subscriber
receives each ``token`` event; its latency is that time minus the send time carried in the
event's content, worked out after the last run. Once every subscriber has seen a run's terminal
event (live, or replayed by a snapshot after a gap) it pushes the run id to ``--drained`` (a
list, through a separate connection that ``--control-url`` names differently), so the producer
starts the next run on an idle consumer.
A subscriber ends at the ``error`` terminal event that the producer ends its last run with; at
``--deadline`` seconds the process gives up on those still behind. It writes a JSON summary per
run id to ``--out``.

Once the subscribers are attached it calls ``gc.freeze()``, as a long-running server does after
start-up: the collector then leaves the objects that live as long as the process alone, and its
full collections, which otherwise walk every one of them, stop pausing all the subscribers for
tens of milliseconds.
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
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator

from .common import percentile, run_async


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    # While events flow, a subscriber notes for each batch only its receive time, where it
    # starts and how many tokens it holds; the send times (parsed out of the events' content)
    # are noted once per event for all subscribers, since they share the event objects. The
    # latencies are worked out after the last run: measuring must not cost the subscribers per
    # event (parsing the send time per event and subscriber costs ~0.4 µs, which at 1M
    # deliveries/s is 40% of a core).
    received: dict[str, array[int]] = {}  # run id -> (receive ns, first seq, count) triples
    sent: dict[str, dict[int, int]] = {}  # run id -> seq -> send ns
    last_sent: dict[str, int] = {}  # run id -> the highest seq in sent
    terminals: dict[str, int] = {}  # run id -> subscribers that saw its terminal event
    gaps = 0
    finished = 0
    control = Redis.from_url(args.control_url, decode_responses=True)

    async with Coordinator.from_url(args.url, prefix=args.prefix) as coord:

        async def other(item: Any) -> bool:
            """Note an event that is not a token; True at the subscriber's last event."""
            nonlocal gaps, finished
            event = item.event
            if event.is_terminal:
                count = terminals[item.run_id] = terminals.get(item.run_id, 0) + 1
                if count == args.subs:
                    await control.rpush(args.drained, item.run_id)
                if event.type == "error":  # the end of the producer's last run
                    finished += 1
                    return True
            elif event.type == "gap":
                gaps += event.missed
            return False

        def note(now: int, tokens: Sequence[Any]) -> None:
            """Note consecutive token events of one run received at ``now``."""
            first, last = tokens[0], tokens[-1]
            run = first.run_id
            if last.seq > last_sent.get(run, 0):  # the first subscriber to get these
                times = sent.setdefault(run, {})
                for item in tokens:
                    times[item.seq] = int(item.event.content)
                last_sent[run] = last.seq
            notes = received.get(run)
            if notes is None:  # (not setdefault: that would make an array per call)
                notes = received[run] = array("q")
            notes.extend((now, first.seq, len(tokens)))

        async def subscriber() -> None:
            if args.batches:  # one receive time per batch: when the application gets it
                async for batch in coord.subscribe_batches(args.session, follow=True):
                    now = time.time_ns()
                    # Events that are not tokens come first (a gap notice) or last (the
                    # terminal event): a run starts once every subscriber saw the last end.
                    if batch[0].event.type == "token" and batch[-1].event.type == "token":
                        note(now, batch)
                        continue
                    for item in batch:
                        if item.event.type == "token":
                            note(now, (item,))
                        elif await other(item):
                            return
                return
            # One event at a time (a million a second with 1,000 subscribers): the same notes,
            # written without a call per event.
            current, notes, known = None, array("q"), 0
            async for item in coord.subscribe(args.session, follow=True):
                if item.event.type != "token":
                    if await other(item):
                        return
                    continue
                now, seq = time.time_ns(), item.seq or 0  # a token always has its seq
                if item.run_id != current:
                    current = item.run_id
                    notes = received.setdefault(current, array("q"))
                    known = 0
                if seq > known:
                    known = last_sent.get(current, 0)
                    if seq > known:  # the first subscriber to get it
                        note(now, (item,))
                        continue
                notes.extend((now, seq, 1))

        tasks = [asyncio.create_task(subscriber()) for _ in range(args.subs)]
        hub = coord._hub  # private, read only: how many subscribers are attached
        deadline = time.monotonic() + 60
        while hub.subscribers < args.subs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {hub.subscribers} of {args.subs} subscribers attached")
            await asyncio.sleep(0.01)
        # What a long-running server does after start-up (see the module docstring).
        gc.freeze()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        print("ready", flush=True)
        _, pending = await asyncio.wait(tasks, timeout=args.deadline)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await control.aclose()

    runs = {}
    for run_id, notes in received.items():
        times = sent.get(run_id, {})
        ms: list[float] = []
        for i in range(0, len(notes), 3):
            now, first, count = notes[i], notes[i + 1], notes[i + 2]
            ms.extend((now - times[seq]) / 1e6 for seq in range(first, first + count))
        runs[run_id] = {
            "n": len(ms),
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "max": max(ms),
        }
    return {
        "runs": runs,
        "gaps": gaps,
        "finished": finished,
        "timed_out": len(pending),
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--subs", type=int, required=True)
    p.add_argument("--deadline", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--control-url", required=True)
    p.add_argument("--drained", required=True)
    p.add_argument("--batches", action="store_true", help="use coord.subscribe_batches")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], help="the event loop")
    args = p.parse_args()
    result = run_async(consume(args), args.loop)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

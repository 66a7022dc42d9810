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
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from redis.asyncio import Redis

from runstate import Coordinator

from .common import percentile, run_async


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    # While events flow, a subscriber notes for each batch only its receive time and the seq of
    # its last token, in an array of its own for the run: two appends (the events before it,
    # back to the previous note, arrived then). The send times (parsed out of the events'
    # content) are noted once per event for all subscribers, since they share the event objects.
    # The latencies are worked out after the last run: measuring must cost the subscribers as
    # little as possible (with the notes of the previous version, a shared array of
    # (time, first seq, count) triples filled by a helper, it cost 1.3-1.6 µs per batch in a
    # tight loop against 0.5-0.6 µs now, next to the 3-4 µs that runstate's own wake-up costs).
    received: dict[str, list[array[int]]] = {}  # run id -> each subscriber's notes
    sent: dict[str, dict[int, int]] = {}  # run id -> seq -> send ns
    # The run whose send times are being noted, and its highest seq noted so far. A run starts
    # once every subscriber has seen the previous one end, so all tokens in flight are of one
    # run: a subscriber's first batch of a run starts its notes (and maybe the run's), then one
    # check per batch (seq > noted) finds the batches nobody has noted yet.
    noted_run: str | None = None
    noted = 0
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

        def note_sent(tokens: Sequence[Any]) -> None:
            """Note the send times of tokens (the first subscriber to get them does)."""
            nonlocal noted_run, noted
            run = tokens[0].run_id
            if run != noted_run:  # runs follow one another: the previous one is over
                noted_run, noted = run, 0
            times = sent.setdefault(run, {})
            for item in tokens:
                if item.seq > noted:
                    times[item.seq] = int(item.event.content)
            noted = max(noted, tokens[-1].seq)

        def notes_for(run: str, before: int) -> array[int]:
            """A subscriber's notes for ``run``, starting after seq ``before``."""
            notes = array("q", (0, before))  # (0, seq): nothing received, the next note
            received.setdefault(run, []).append(notes)  # starts after seq
            return notes

        def skip(item: Any, run: str | None, notes: array[int]) -> str | None:
            """Note an event that is not a token (and not the last); returns the run the
            notes go on with: None after a gap notice, so the next token starts new notes
            (the events it stands for did not arrive)."""
            if item.seq is None:
                return None
            if item.run_id == run:
                notes.extend((0, item.seq))
            return run

        async def subscriber() -> None:
            # (receive ns, seq) pairs: the tokens after the previous pair's seq, through this
            # seq, arrived at that time; (0, seq) skips to after seq (no tokens received).
            run: str | None = None
            notes = array("q")
            if args.batches:  # one receive time per batch: when the application gets it
                async for batch in coord.subscribe_batches(args.session, follow=True):
                    now = time.time_ns()
                    last = batch[-1]
                    # Events that are not tokens come first (a gap notice) or last (the
                    # terminal event): a run starts once every subscriber saw the last end.
                    if batch[0].event.type == "token" and last.event.type == "token":
                        if last.run_id != run:
                            run = last.run_id
                            notes = notes_for(run, batch[0].seq - 1)
                            note_sent(batch)
                        elif last.seq > noted:
                            note_sent(batch)
                        notes.append(now)
                        notes.append(last.seq)
                        continue
                    for item in batch:
                        if item.event.type == "token":
                            if item.run_id != run:
                                run = item.run_id
                                notes = notes_for(run, item.seq - 1)
                                note_sent((item,))
                            elif item.seq > noted:
                                note_sent((item,))
                            notes.append(now)
                            notes.append(item.seq)
                        elif await other(item):
                            return
                        else:
                            run = skip(item, run, notes)
                return
            # One event at a time (a million a second with 1,000 subscribers): the same notes.
            async for item in coord.subscribe(args.session, follow=True):
                if item.event.type != "token":
                    if await other(item):
                        return
                    run = skip(item, run, notes)
                    continue
                now, seq = time.time_ns(), item.seq
                if item.run_id != run:
                    run = item.run_id
                    notes = notes_for(run, seq - 1)
                    note_sent((item,))
                elif seq > noted:
                    note_sent((item,))
                notes.append(now)
                notes.append(seq)

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
    return summary(received, sent, cpu0, cpu1, pending, gaps=gaps, finished=finished)


def summary(
    received: dict[str, list[array[int]]],
    sent: dict[str, dict[int, int]],
    cpu0: Any,
    cpu1: Any,
    pending: Collection[Any],
    *,
    gaps: int,
    finished: int,
) -> dict[str, Any]:
    """What the consumer writes to ``--out``: per run id the latencies worked out from the
    subscribers' notes (``received``: per run, each subscriber's (receive ns, seq) pairs) and
    the send times (``sent``: per run, seq -> send ns), and the CPU the process used between the
    ``getrusage`` readings ``cpu0`` and ``cpu1``."""
    runs = {}
    for run_id, by_subscriber in received.items():
        times = sent.get(run_id, {})
        ms: list[float] = []
        for notes in by_subscriber:
            after = 0
            for i in range(0, len(notes), 2):
                now, seq = notes[i], notes[i + 1]
                if now:
                    ms.extend((now - times[s]) / 1e6 for s in range(after + 1, seq + 1))
                after = seq
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
        # Handovers noted (a batch, or with `subscribe` an event; skips included): what the
        # subscriber process's CPU is spent on.
        "batches": sum(len(notes) // 2 for by in received.values() for notes in by),
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
    }


def arguments() -> argparse.Namespace:
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
    return p.parse_args()


def serve(consume: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]) -> int:
    """Run a fan-out consumer (this one or :mod:`suite.fanout_plain`) on its command line's
    event loop and write its summary to ``--out``."""
    args = arguments()
    result = run_async(consume(args), args.loop)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(serve(consume))

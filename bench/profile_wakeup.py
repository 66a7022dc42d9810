"""What one subscriber's wake-up costs, in one process: 1,000 subscribers of one session on a
hub whose ``XREAD`` is fed by hand, against the floor of benchmark 3 (a chain of futures).

    python bench/profile_wakeup.py [--subscribers N] [--rounds R] [--instructions]

Each round hands the hub ``reads`` reads of one token each, then waits until every subscriber
has been woken once; a subscriber takes the benchmark consumer's notes (a receive time, two
appends to its own array, the seq of its last token). Prints the process's CPU per wake-up
(median of 5 repetitions, on the benchmarks' event loop, see ``$BENCH_LOOP``), which moves with
the machine; with ``--instructions``, the instructions per wake-up instead, counted by
valgrind's cachegrind (it must be installed): the script runs itself under it twice, with 10
and 60 rounds, and divides the difference, so start-up does not count. Instructions are the
same from run to run, so a change of a few percent shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fakeredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.common import count_instructions, run_async

from runstate import Coordinator

DATA = json.dumps({"type": "token", "content": "x" * 20})


class Driver:
    """Rounds of reads, then a wait until every subscriber took them."""

    def __init__(self, subscribers: int) -> None:
        self.subscribers = subscribers
        self.woken = 0
        self.seq = 0

    def entries(self) -> list[tuple[str, dict[str, str]]]:
        self.seq += 1
        return [(f"1-{self.seq}", {"data": DATA, "run": "r1", "seq": str(self.seq)})]

    async def rounds(self, n: int, reads: int, feed: Callable[[Any], None]) -> float:
        """CPU seconds per wake-up over ``n`` rounds of ``reads`` reads each."""
        start = time.process_time()
        for _ in range(n):
            for _ in range(reads):
                feed(self.entries())
            target = self.woken + self.subscribers
            # Polled rather than signalled: a check in every subscriber would be measured too.
            while self.woken < target:  # noqa: ASYNC110
                await asyncio.sleep(0)
        return (time.process_time() - start) / n / self.subscribers


async def runstate_variant(driver: Driver, reads: int, rounds: int, reps: int) -> list[float]:
    replies: asyncio.Queue[Any] = asyncio.Queue()
    async with Coordinator(fakeredis.FakeAsyncRedis(decode_responses=True), prefix="p") as coord:
        hub = coord._hub  # private: its read is replaced by the replies fed below
        key = coord.keys.events("s1")

        async def read(streams: dict[str, str]) -> Any:
            return await replies.get()

        hub._xread = read  # type: ignore[method-assign]

        async def subscriber() -> None:
            notes, run_id = array("q"), None
            async for batch in coord.subscribe_batches("s1", "0-0", follow=True):
                now, last = time.time_ns(), batch[-1]
                if batch[0].event.type == "token" and last.event.type == "token":
                    if last.run_id != run_id:
                        run_id = last.run_id
                    notes.append(now)
                    notes.append(last.seq or 0)
                driver.woken += 1

        tasks = [asyncio.create_task(subscriber()) for _ in range(driver.subscribers)]
        while hub.subscribers < driver.subscribers:  # noqa: ASYNC110 (the hub has no signal)
            await asyncio.sleep(0.01)
        feed = lambda entries: replies.put_nowait([[key, entries]])  # noqa: E731
        results = [await driver.rounds(rounds, reads, feed) for _ in range(reps)]
        await cancel(tasks)
    return results


async def floor_variant(driver: Driver, reads: int, rounds: int, reps: int) -> list[float]:
    """As suite.fanout_plain: one future per read, carrying the next one, that all await."""
    loop = asyncio.get_running_loop()
    head: list[asyncio.Future[Any]] = [loop.create_future()]

    def feed(entries: list[tuple[str, dict[str, str]]]) -> None:
        token = 0
        for _, fields in entries:
            if json.loads(fields["data"])["type"] == "token":
                token = int(fields["seq"])
        following = loop.create_future()
        head[0].set_result(("r1", token, following))
        head[0] = following

    async def subscriber() -> None:
        future, notes, run_id = head[0], array("q"), ""
        while True:
            read_run, token, future = await future
            now = time.time_ns()
            if token:
                if read_run != run_id:
                    run_id = read_run
                notes.append(now)
                notes.append(token)
            driver.woken += 1

    tasks = [asyncio.create_task(subscriber()) for _ in range(driver.subscribers)]
    await asyncio.sleep(0)
    results = [await driver.rounds(rounds, reads, feed) for _ in range(reps)]
    await cancel(tasks)
    return results


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


VARIANT: dict[str, Callable[[Driver, int, int, int], Awaitable[list[float]]]] = {
    "runstate": runstate_variant,
    "floor": floor_variant,
}
# (variant, reads per wake-up): the floor hands each read over on its own, one per wake-up.
CASES = [("runstate", 1), ("runstate", 3), ("runstate", 8), ("floor", 1)]


def instructions(args: argparse.Namespace, variant: str, reads: int) -> int:
    """Instructions per wake-up, from two runs under cachegrind (10 and 60 rounds)."""
    counts = [
        count_instructions(
            [
                __file__,
                f"--subscribers={args.subscribers}",
                f"--rounds={rounds}",
                "--reps=1",
                f"--only={variant}:{reads}",
            ]
        )
        for rounds in (10, 60)
    ]
    return (counts[1] - counts[0]) // (50 * int(args.subscribers))


async def measure(args: argparse.Namespace) -> None:
    cases = CASES
    if args.only:
        variant, reads = args.only.split(":")
        cases = [(variant, int(reads))]
    for variant, reads in cases:
        per_wakeup = await VARIANT[variant](Driver(args.subscribers), reads, args.rounds, args.reps)
        print(
            f"{variant:>8}, {reads} read(s) per wake-up: "
            f"{statistics.median(per_wakeup) * 1e6:.2f} µs of CPU per wake-up",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="count with cachegrind")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # VARIANT:READS, for --instructions
    args = parser.parse_args()
    if not args.instructions:
        run_async(measure(args))
        return 0
    if shutil.which("valgrind") is None:
        print("--instructions needs valgrind (e.g. apt-get install valgrind)", file=sys.stderr)
        return 2
    for variant, reads in CASES:
        count = instructions(args, variant, reads)
        print(f"{variant:>8}, {reads} read(s) per wake-up: {count:,} instructions per wake-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())

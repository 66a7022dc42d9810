"""What a no-op run costs runstate's Python side, in one process: a worker (``workers.Worker``,
20 runs at once) and a client executing runs and following each to its terminal event
(benchmark 5's ``one_run``, 40 in flight), on a private server.

    python bench/profile_lifecycle.py [--runs N] [--instructions]

Prints runs/s and the process's CPU per run (median of 5 repetitions, on the benchmarks' event
loop, see ``$BENCH_LOOP``), which move with the machine; with ``--instructions``, the
instructions per run instead, counted by valgrind's cachegrind (it must be installed): the
script runs itself under it with 100 and 600 runs on one server started outside valgrind, and
divides the difference by 500, so start-up does not count. The counts still move a little
(about 0.5% here) with how fast the server answers, which shapes how commands share pipelines;
the worker and the client sharing one process also share pipelines, which two processes would
not (benchmark 5 measures that).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.common import count_instructions, run_async
from suite.lifecycle import WINDOW, run_many

from runstate import Coordinator
from runstate.embedded import EmbeddedServer
from workers.context import RunContext
from workers.worker import Worker

WARMUP = 100
COUNTS = (100, 600)  # runs in the two counted processes


async def noop(ctx: RunContext) -> None:
    return None


async def measure(url: str, runs: int, reps: int) -> list[tuple[float, float]]:
    """(runs/s, CPU seconds per run) of ``reps`` repetitions of ``runs`` runs each."""
    prefix = f"profile-{uuid.uuid4().hex[:8]}"
    sessions = (f"s{i}" for i in range(10**9))
    out = []
    async with (
        Coordinator.from_url(url, prefix=prefix) as worker_coord,
        Coordinator.from_url(url, prefix=prefix) as coord,
    ):
        worker = Worker(worker_coord, noop, concurrency=20)
        task = asyncio.get_running_loop().create_task(worker.run())
        await worker.ready.wait()
        await run_many(coord, [next(sessions) for _ in range(WARMUP)], WINDOW)
        for _ in range(reps):
            cpu, start = time.process_time(), time.perf_counter()
            await run_many(coord, [next(sessions) for _ in range(runs)], WINDOW)
            took = time.perf_counter() - start
            out.append((runs / took, (time.process_time() - cpu) / runs))
        worker.stop()
        await task
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="count with cachegrind")
    parser.add_argument("--url", help=argparse.SUPPRESS)  # the server, for --instructions
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        print("--instructions needs valgrind (e.g. apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.url:
        run_async(measure(args.url, args.runs, args.reps))
        return 0
    with EmbeddedServer() as server:
        if not args.instructions:
            results = run_async(measure(server.url, args.runs, args.reps))
            rate = statistics.median(r for r, _ in results)
            cpu = statistics.median(c for _, c in results)
            print(f"{rate:,.0f} runs/s, {cpu * 1e6:.0f} µs of CPU per run (worker and client)")
            return 0
        counts = [
            count_instructions([__file__, f"--url={server.url}", f"--runs={n}", "--reps=1"])
            for n in COUNTS
        ]
    per_run = (counts[1] - counts[0]) // (COUNTS[1] - COUNTS[0])
    print(f"{per_run:,} instructions per run (worker and client)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

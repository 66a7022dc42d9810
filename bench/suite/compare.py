"""arq, SAQ and RQ doing benchmark 5's no-op job; runs in ``bench/.venv`` (see common.py).

    python -m suite.compare bench SYSTEM --url URL --tag TAG --out FILE [--jobs N ...]
    python -m suite.compare worker SYSTEM --url URL --tag TAG     (started by ``bench``)

``bench`` starts two worker processes of SYSTEM (arq, saq or rq), waits until both are up,
warms up, then per repetition measures (a) throughput: ``--jobs`` jobs, ``--window`` of them in
flight, each "enqueue, then wait until the result is seen" with the library's own way of
waiting; (b) latency: ``--latency-jobs`` jobs one at a time. It writes JSON to ``--out`` and
stops its workers (SIGTERM, then SIGKILL) whatever happens.

How each waits for a result, and how its workers are tuned (the fastest sensible settings):

* arq: ``job.result(poll_delay=RESULT_POLL)``; workers poll the queue every ``WORKER_POLL``
  (arq's default is 0.5 s for both, which would make it look much slower than it can be).
* SAQ: a pub/sub ``queue.listen`` on the job key, registered before the enqueue (SAQ's own
  ``refresh(until_complete=)`` subscribes after its read, and can miss a fast job's update);
  workers block in ``BLMOVE``.
* RQ: ``job.latest_result(timeout=)``, a blocking ``XREAD`` on the result stream; the client
  side runs in ``--window`` threads (RQ is synchronous). Workers are ``rq worker`` with
  ``SimpleWorker`` (no fork per job).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from .common import median, percentile

CONCURRENCY = 10  # jobs at once per worker process (arq max_jobs, SAQ concurrency)
WORKER_POLL = 0.002
RESULT_POLL = 0.002
TIMEOUT = 30.0


# ---- the job ----------------------------------------------------------------------------------


async def noop(ctx: dict[str, Any]) -> None:
    return None


def noop_sync() -> None:
    return None


# ---- workers ----------------------------------------------------------------------------------


def queue_name(system: str, tag: str) -> str:
    return f"{tag}-{system}"


def run_worker(system: str, url: str, tag: str) -> None:
    ready_key = f"{tag}:{system}:ready"

    async def announce(ctx: Any) -> None:
        client = redis.asyncio.Redis.from_url(url)
        await client.rpush(ready_key, str(os.getpid()))
        await client.aclose()

    if system == "arq":
        from arq.connections import RedisSettings
        from arq.worker import Worker

        worker = Worker(
            functions=[noop],
            queue_name=queue_name(system, tag),
            redis_settings=RedisSettings.from_dsn(url),
            max_jobs=CONCURRENCY,
            poll_delay=WORKER_POLL,
            keep_result=300,
            on_startup=announce,
            handle_signals=True,
        )
        worker.run()
    elif system == "saq":
        from saq import Queue, Worker

        async def main() -> None:
            queue = Queue.from_url(url, name=queue_name(system, tag))
            worker = Worker(queue, functions=[noop], concurrency=CONCURRENCY, startup=announce)
            await worker.start()

        asyncio.run(main())
    else:
        raise SystemExit(f"no worker wrapper for {system!r}")


# ---- clients ----------------------------------------------------------------------------------


class Client:
    """One system's client side: ``one(i)`` enqueues job ``i`` and waits for its result."""

    async def start(self, url: str, tag: str) -> None: ...

    async def one(self, i: int) -> None: ...

    async def close(self) -> None: ...

    async def run_many(self, ids: range, window: int) -> float:
        sem = asyncio.Semaphore(window)

        async def guarded(i: int) -> None:
            async with sem:
                await self.one(i)

        start = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in ids))
        return time.perf_counter() - start

    async def run_sequential(self, ids: range) -> list[float]:
        lat = []
        for i in ids:
            start = time.perf_counter()
            await self.one(i)
            lat.append((time.perf_counter() - start) * 1000)
        return lat


class ArqClient(Client):
    async def start(self, url: str, tag: str) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.tag = tag
        self.pool = await create_pool(
            RedisSettings.from_dsn(url), default_queue_name=queue_name("arq", tag)
        )

    async def one(self, i: int) -> None:
        job = await self.pool.enqueue_job("noop", _job_id=f"{self.tag}-{i}")
        assert job is not None
        await job.result(timeout=TIMEOUT, poll_delay=RESULT_POLL)

    async def close(self) -> None:
        await self.pool.aclose()


class SaqClient(Client):
    async def start(self, url: str, tag: str) -> None:
        from saq import Queue

        self.tag = tag
        self.queue = Queue.from_url(url, name=queue_name("saq", tag))
        await self.queue.connect()
        # Keeps SAQ's pub/sub multiplexer subscribed between jobs (it unsubscribes when idle).
        self.keepalive = asyncio.create_task(
            self.queue.listen(["-keepalive-"], lambda *_: False, timeout=None)
        )
        await asyncio.sleep(0.2)

    async def one(self, i: int) -> None:
        from saq.job import TERMINAL_STATUSES

        key = f"{self.tag}-{i}"
        listener = asyncio.create_task(
            self.queue.listen([key], lambda _key, status: status in TERMINAL_STATUSES, TIMEOUT)
        )
        await asyncio.sleep(0)  # the listener registers itself before the job exists
        await self.queue.enqueue("noop", key=key)
        await listener

    async def close(self) -> None:
        self.keepalive.cancel()
        await asyncio.gather(self.keepalive, return_exceptions=True)
        await self.queue.disconnect()


class RqClient(Client):
    async def start(self, url: str, tag: str) -> None:
        from rq import Queue

        self.tag = tag
        self.conn = redis.Redis.from_url(url)
        self.queue = Queue(queue_name("rq", tag), connection=self.conn)
        self.local = threading.local()

    def one_sync(self, i: int) -> None:
        job = self.queue.enqueue(
            "suite.compare.noop_sync", job_id=f"{self.tag}-{i}", result_ttl=300
        )
        result = job.latest_result(timeout=int(TIMEOUT))
        if result is None:
            raise TimeoutError(f"rq job {i} had no result within {TIMEOUT:g}s")

    async def one(self, i: int) -> None:
        self.one_sync(i)

    async def run_many(self, ids: range, window: int) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(window) as pool:
            list(pool.map(self.one_sync, ids))
        return time.perf_counter() - start

    async def close(self) -> None:
        self.conn.close()


CLIENTS: dict[str, Callable[[], Client]] = {"arq": ArqClient, "saq": SaqClient, "rq": RqClient}


# ---- the benchmark ----------------------------------------------------------------------------


def worker_command(system: str, url: str, tag: str, index: int) -> list[str]:
    if system == "rq":
        rq = str(Path(sys.executable).parent / "rq")
        return [
            rq,
            "worker",
            "--url",
            url,
            "--worker-class",
            "rq.worker.SimpleWorker",
            "--name",
            f"{tag}-rq-{index}",
            "--logging_level",
            "WARNING",
            "--path",
            str(Path(__file__).resolve().parents[1]),
            queue_name(system, tag),
        ]
    return [sys.executable, "-m", "suite.compare", "worker", system, "--url", url, "--tag", tag]


def workers_up(system: str, conn: redis.Redis, tag: str) -> int:
    if system == "rq":
        return int(conn.scard(f"rq:workers:{queue_name(system, tag)}"))
    return int(conn.llen(f"{tag}:{system}:ready"))


def start_workers(args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(args.workers):
        with (Path(args.logdir) / f"{args.system}-worker-{i}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    worker_command(args.system, args.url, args.tag, i),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def worker_logs(args: argparse.Namespace) -> str:
    logs = [Path(args.logdir) / f"{args.system}-worker-{i}.log" for i in range(args.workers)]
    return "\n".join(log.read_text(errors="replace")[-2000:] for log in logs if log.exists())


async def bench(args: argparse.Namespace, procs: list[subprocess.Popen[bytes]]) -> dict[str, Any]:
    conn = redis.Redis.from_url(args.url)
    client = CLIENTS[args.system]()
    try:
        deadline = time.monotonic() + 60
        while workers_up(args.system, conn, args.tag) < args.workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{args.system} workers did not start:\n{worker_logs(args)}")
            await asyncio.sleep(0.05)
        await client.start(args.url, args.tag)
        next_id = 0

        def ids(n: int) -> range:
            nonlocal next_id
            next_id += n
            return range(next_id - n, next_id)

        await client.run_many(ids(args.warmup), args.window)
        throughput, latency_p50, latency_p99 = [], [], []
        for _ in range(args.reps):
            elapsed = await client.run_many(ids(args.jobs), args.window)
            throughput.append(args.jobs / elapsed)
            lat = await client.run_sequential(ids(args.latency_jobs))
            latency_p50.append(percentile(lat, 50))
            latency_p99.append(percentile(lat, 99))
        await client.close()
        return {
            "system": args.system,
            "throughput": throughput,
            "latency_p50": latency_p50,
            "latency_p99": latency_p99,
            "runs_per_s": median(throughput),
            "p50_ms": median(latency_p50),
            "p99_ms": median(latency_p99),
        }
    finally:
        conn.close()


def use_bench_loop() -> None:
    """Run on the benchmark's event loop, as runstate's side does (``BENCH_LOOP``, resolved by
    the parent): uvloop's policy makes every loop arq, SAQ and the clients start a uvloop one."""
    if os.environ.get("BENCH_LOOP") == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bench", "worker"])
    p.add_argument("system", choices=sorted(CLIENTS))
    p.add_argument("--url", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--out")
    p.add_argument("--logdir", default=".")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--latency-jobs", type=int, default=40)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--window", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    use_bench_loop()
    if args.mode == "worker":
        run_worker(args.system, args.url, args.tag)
        return 0
    # SIGTERM from the parent: unwind through bench()'s finally, which stops the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = start_workers(args)
    try:
        result = asyncio.run(bench(args, procs))
    finally:
        stop_workers(procs)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the worker tests: poll Redis state against a deadline (never bare sleeps), and
start ``python -m workers`` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from runstate import Coordinator, RunnerState
from runstate.config import ENV_PREFIX, ENV_URL
from runstate.queue import Queue

T = TypeVar("T")

# Knobs that keep in-process workers fast in tests.
FAST: dict[str, Any] = {
    "heartbeat_interval": 0.05,
    "lost_after": 3.0,
    "reaper_interval": 0.2,
    "scan_interval": 0.2,
    "schedule_interval": 0.05,
    "block_ms": 100,
    "shutdown_grace": 5.0,
    "shutdown_cancel_wait": 1.0,
}


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool] = bool,
    *,
    limit: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll ``probe()`` until ``check`` accepts its value; fail with the last value on timeout."""
    deadline = time.monotonic() + limit
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


async def wait_status(
    coord: Coordinator, session_id: str, *statuses: str, limit: float = 10.0
) -> RunnerState:
    """Wait until the session's run has one of ``statuses``; returns its state."""

    async def probe() -> RunnerState | None:
        return await coord.runner(session_id)

    state = await eventually(
        probe,
        lambda s: s is not None and s.status in statuses,
        limit=limit,
        what=f"session {session_id!r} to be {'/'.join(statuses)}",
    )
    assert state is not None
    return state


async def stream_types(coord: Coordinator, session_id: str) -> list[str]:
    """The ``type`` of every event in the session's stream, oldest first."""
    entries = await coord.client.xrange(coord.keys.events(session_id))
    return [fields["type"] for _, fields in entries]


async def stream_events(coord: Coordinator, session_id: str) -> list[dict[str, Any]]:
    """Every event in the session's stream as ``{run, seq, type, data}`` dicts."""
    entries = await coord.client.xrange(coord.keys.events(session_id))
    return [
        {
            "id": eid,
            "run": f["run"],
            "seq": int(f["seq"]),
            "type": f["type"],
            **json.loads(f["data"]),
        }
        for eid, f in entries
    ]


# ---- worker subprocesses ----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.agents.basic:agent"
# Knobs that keep worker processes fast in tests.
FAST_ARGS = [
    "--heartbeat-interval",
    "0.1",
    "--lost-after",
    "1.0",
    "--reaper-interval",
    "0.2",
    "--scan-interval",
    "0.5",
    "--schedule-interval",
    "0.05",
    "--block-ms",
    "200",
    "--log-level",
    "INFO",
]


class WorkerProcess:
    """One ``python -m workers`` subprocess, its output going to a log file."""

    def __init__(self, proc: subprocess.Popen[bytes], worker_id: str, log: Path) -> None:
        self.proc = proc
        self.id = worker_id
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, limit: float = 20.0) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.id} did not exit:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL it (if still alive) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def worker_env() -> dict[str, str]:
    """This process's environment without runstate's settings (the command line gives them)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_URL, ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_worker(
    redis_url: str,
    prefix: str,
    name: str,
    log_dir: Path,
    *extra: str,
    app: str = APP,
    fast: bool = True,
    env: dict[str, str] | None = None,
) -> WorkerProcess:
    """Start ``python -m workers APP`` with id ``name`` (``FAST_ARGS`` first, then ``extra``;
    ``env`` added to the environment)."""
    log = log_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "workers", app, "--redis-url", redis_url, "--prefix", prefix]
    cmd += [*(FAST_ARGS if fast else []), "--worker-id", name, *extra]
    with log.open("ab") as out:  # the child has its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**worker_env(), **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    return WorkerProcess(proc, name, log)


StartProcess = Callable[..., WorkerProcess]


@contextlib.contextmanager
def worker_processes(
    redis_url: str, prefix: str, log_dir: Path, *common: str
) -> Iterator[StartProcess]:
    """``start(name, *extra, app=APP)`` starts a worker process (``common`` options first, then
    ``extra``); every one still alive when the block ends is killed."""
    procs: list[WorkerProcess] = []

    def start(name: str, *extra: str, app: str = APP) -> WorkerProcess:
        worker = start_worker(redis_url, prefix, name, log_dir, *common, *extra, app=app)
        procs.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in procs:
            worker.kill()


async def registered(coord: Coordinator, worker: WorkerProcess, limit: float = 10.0) -> None:
    """Wait until the worker process has heartbeated (it reads the queue right after)."""
    queue = Queue(coord.store)
    try:
        await eventually(
            queue.worker_deadlines, lambda d: worker.id in d, limit=limit, what=worker.id
        )
    except AssertionError:
        raise AssertionError(f"worker {worker.id} did not start:\n{worker.output()}") from None

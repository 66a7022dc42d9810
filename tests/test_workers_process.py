"""``python -m workers`` as real subprocesses: cross-process cancel, SIGKILL, SIGTERM, bad apps."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from runstate import Coordinator
from runstate.queue import Queue, now_ms
from tests.agents import basic
from tests.agents.helpers import (
    APP,
    ROOT,
    StartProcess,
    eventually,
    registered,
    stream_events,
    wait_status,
    worker_env,
    worker_processes,
)


@pytest.fixture
def start_process(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[StartProcess]:
    """Start worker subprocesses; any still alive at teardown are killed."""
    with worker_processes(redis_url, prefix, tmp_path) as start:
        yield start


@pytest.fixture
async def rcoord(real_redis: aioredis.Redis, prefix: str) -> AsyncIterator[Coordinator]:
    """A Coordinator on the real server (the one the subprocesses use)."""
    c = Coordinator(real_redis, prefix=prefix)
    try:
        yield c
    finally:
        await c.aclose()


def records(folder: Path) -> list[dict[str, Any]]:
    return basic.read_records(str(folder))


def test_bad_app_paths_and_options_exit_2_naming_them() -> None:
    cases = {
        "no_colon": "invalid app 'no_colon': expected 'module:function'",
        "tests.agents.nope:agent": "cannot import module 'tests.agents.nope' of app "
        "'tests.agents.nope:agent'",
        "tests.agents.basic:missing": "app 'tests.agents.basic:missing': module "
        "'tests.agents.basic' has no attribute 'missing'",
        "tests.agents.basic:read_records": "app 'tests.agents.basic:read_records' is <function",
    }
    # An unreachable URL: the app is checked before anything connects.
    runs = {
        app: [sys.executable, "-m", "workers", app, "--redis-url", "redis://127.0.0.1:1/0"]
        for app in cases
    }
    runs["--concurrency 0"] = [sys.executable, "-m", "workers", APP, "--concurrency", "0"]
    cases["--concurrency 0"] = "argument --concurrency: must be >= 1, got '0'"
    runs["--loop trio"] = [sys.executable, "-m", "workers", APP, "--loop", "trio"]
    cases["--loop trio"] = "argument --loop: invalid choice: 'trio'"
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stderr=subprocess.PIPE)
        for name, cmd in runs.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, err
        assert cases[name] in err.decode()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_cancel_reaches_a_run_in_another_process(
    rcoord: Coordinator, start_process: StartProcess, tmp_path: Path, loop: str
) -> None:
    # Given a worker process running a long run, on either event loop
    worker = start_process("w1", "--loop", loop)
    await registered(rcoord, worker)
    assert f"event loop: {loop}" in worker.output()
    payload = {"steps": 2000, "delay": 0.01, "record_dir": str(tmp_path)}
    res = await rcoord.execute("s1", payload)
    await wait_status(rcoord, "s1", "running")
    # When this process cancels it
    assert await rcoord.cancel("s1", "stop from another process")
    # Then the run sees the cancel at its next checkpoint, and writes nothing after it
    await eventually(
        lambda: _async(records(tmp_path)),
        lambda rs: [r["what"] for r in rs] == ["start", "cancelled"],
        what="the agent to see the cancel",
    )
    events = await stream_events(rcoord, "s1")
    assert events[-1]["type"] == "cancelled" and events[-1]["run"] == res.run_id
    await eventually(
        lambda: _async(worker.output()),
        lambda out: f"run={res.run_id} attempt=1 outcome=cancelled" in out,
        what="the worker to log the outcome",
    )
    assert (await stream_events(rcoord, "s1"))[-1]["type"] == "cancelled"
    # And the worker serves the session's next run
    await rcoord.execute("s1", {"steps": 1})
    await wait_status(rcoord, "s1", "completed")


async def test_sigkill_with_runs_in_flight_every_run_ends_and_never_runs_twice_at_once(
    rcoord: Coordinator, start_process: StartProcess, tmp_path: Path
) -> None:
    # Given worker A running three runs
    a = start_process("wA", "--concurrency", "4")
    await registered(rcoord, a)
    # (a first attempt far longer than the test, so A is still running them when it is
    # killed however slow B is to start; the second attempts go quickly)
    payload = {"steps": 200, "delay": 0.2, "retry_delay": 0.005, "record_dir": str(tmp_path)}
    runs = {sid: (await rcoord.execute(sid, payload)).run_id for sid in ("k1", "k2", "k3")}
    for sid in runs:
        state = await wait_status(rcoord, sid, "running")
        assert state.worker == "wA"
    # And worker B, idle
    b = start_process("wB", "--concurrency", "4")
    await registered(rcoord, b)
    # When A is killed mid-run
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    killed_at = time.time()
    # Then every run completes, as a second attempt, on B
    for sid, run_id in runs.items():
        state = await wait_status(rcoord, sid, "completed", "error", limit=20)
        assert (state.status, state.run_id, state.attempt, state.worker) == (
            "completed",
            run_id,
            2,
            "wB",
        )
        types = [e["type"] for e in await stream_events(rcoord, sid)]
        assert types.count("execution_started") == 2 and types[-1] == "complete"
    # And no run was executed by two workers at once: A's attempts never ended, B's began after
    # A was dead
    rs = records(tmp_path)
    for sid in runs:
        mine = [r for r in rs if r["session"] == sid]
        assert [(r["what"], r["worker"], r["attempt"]) for r in mine] == [
            ("start", "wA", 1),
            ("start", "wB", 2),
            ("end", "wB", 2),
        ]
        assert mine[1]["t"] >= killed_at


async def test_retry_budget_exhausted_ends_the_run_as_error_naming_the_lost_worker(
    rcoord: Coordinator, start_process: StartProcess
) -> None:
    # Given a run on its only attempt
    a = start_process("wA", "--max-attempts", "1")
    await registered(rcoord, a)
    res = await rcoord.execute("s1", {"steps": 1000, "delay": 0.01})
    await wait_status(rcoord, "s1", "running")
    # When its worker is killed and another worker's reaper notices
    a.proc.send_signal(signal.SIGKILL)
    a.wait()
    b = start_process("wB", "--max-attempts", "1")
    await registered(rcoord, b)
    # Then the run ends as error, saying which worker was lost
    state = await wait_status(rcoord, "s1", "error", limit=20)
    assert state.run_id == res.run_id and state.attempt == 1
    assert state.error is not None and state.error.startswith("worker 'wA' was lost")
    events = await stream_events(rcoord, "s1")
    assert events[-1]["type"] == "error" and "'wA'" in events[-1]["message"]


async def test_sigterm_drains_and_exits_0(rcoord: Coordinator, start_process: StartProcess) -> None:
    # Given a worker with runs in flight
    w = start_process("w1", "--shutdown-grace", "20")
    await registered(rcoord, w)
    for sid in ("d1", "d2"):
        await rcoord.execute(sid, {"steps": 10, "delay": 0.05})
    for sid in ("d1", "d2"):
        await wait_status(rcoord, sid, "running")
    # When it gets SIGTERM
    w.proc.send_signal(signal.SIGTERM)
    # Then it finishes them, unregisters, and exits 0
    assert w.wait() == 0, w.output()
    for sid in ("d1", "d2"):
        state = await rcoord.runner(sid)
        assert state is not None and state.status == "completed"
    assert await Queue(rcoord.store).worker_deadlines() == {}
    assert "stopping (received SIGTERM)" in w.output()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_first_signal_of_either_kind_drains(
    rcoord: Coordinator, start_process: StartProcess, sig: signal.Signals, loop: str
) -> None:
    # Given a worker with a run in flight (on either event loop)
    w = start_process("w-sig", "--shutdown-grace", "20", "--loop", loop)
    await registered(rcoord, w)
    await rcoord.execute("sig-1", {"steps": 10, "delay": 0.05})
    await wait_status(rcoord, "sig-1", "running")
    # When it gets SIGINT (Ctrl-C) or SIGTERM
    w.proc.send_signal(sig)
    # Then it finishes the run and exits 0
    assert w.wait() == 0, w.output()
    state = await rcoord.runner("sig-1")
    assert state is not None and state.status == "completed"
    assert f"stopping (received {sig.name})" in w.output()


def test_without_a_url_the_worker_starts_an_embedded_server(tmp_path: Path) -> None:
    # Given no --redis-url and no RUNSTATE_REDIS_URL
    log = tmp_path / "w.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "tests.agents.basic:agent", "--log-level", "INFO"],
            cwd=ROOT,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Then it says it uses a private embedded server, and runs until stopped
        deadline = time.monotonic() + 20
        while "using an embedded server at redis://" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # (once it has started: a signal before its handlers are installed ends it at once)
        while " started: prefix=" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigterm_past_the_grace_period_requeues_and_a_second_signal_exits_at_once(
    rcoord: Coordinator, start_process: StartProcess
) -> None:
    # Given a worker whose run outlives a short grace period
    w = start_process("w1", "--shutdown-grace", "0.1")
    await registered(rcoord, w)
    res = await rcoord.execute("long", {"steps": 1000, "delay": 0.01})
    await wait_status(rcoord, "long", "running")
    # When it gets SIGTERM, the run is requeued for another worker and the process exits 0
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait() == 0, w.output()
    state = await rcoord.runner("long")
    assert state is not None and (state.status, state.attempt) == ("pending", 1)
    assert ("long", res.run_id) in (await Queue(rcoord.store).queued_runs() or set())

    # Given a worker stuck in a run that never reaches a safe point
    stuck = start_process("w2", "--shutdown-grace", "30")
    await registered(rcoord, stuck)
    await rcoord.execute("hang", {"kind": "forever"})
    await wait_status(rcoord, "hang", "running")
    # When it gets SIGTERM, then SIGINT while draining
    stuck.proc.send_signal(signal.SIGTERM)
    await eventually(lambda: _async(stuck.output()), lambda out: "stopping" in out, what="draining")
    stuck.proc.send_signal(signal.SIGINT)
    # Then it exits at once with 128 + SIGINT; its runs are left to the reaper
    assert stuck.wait(5) == 128 + signal.SIGINT
    assert "received SIGINT again: exiting at once" in stuck.output()
    deadline = (await Queue(rcoord.store).worker_deadlines())["w2"]
    assert deadline < now_ms() + 1000


async def _async(value: Any) -> Any:
    return value

"""The runstate CLI, run as a real subprocess against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from runstate import Coordinator
from runstate.events import TaskListUpdated, Token
from runstate.models import Reserved


def runstate(
    redis_url: str, prefix: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNSTATE_REDIS_URL": redis_url, "RUNSTATE_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "runstate.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_local_demo_runs_the_scripted_example(redis_url: str, prefix: str) -> None:
    # When the library-only demo runs against the real server
    done = runstate(redis_url, prefix, "demo", "--local")
    # Then it shows the live subscribers, the late replay and the cancel, and exits 0
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "[late]               replay  session_title_updated" in out
    assert "cancel('chat-2') -> True" in out
    assert "the agent: stopped at a checkpoint" in out
    assert "cancel again -> False" in out
    assert "chat-1: completed" in out


def test_demo_with_workers_cancel_and_a_killed_worker(redis_url: str, prefix: str) -> None:
    # When the main demo runs: 2 worker processes, 5 runs, a cancel, a SIGKILLed worker
    done = runstate(redis_url, prefix, "demo", timeout=120)
    # Then every run ended, the cancelled one as cancelled, the killed worker's runs recovered
    # as a second attempt, and the surviving worker drained and exited 0
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {
        line.split()[0]: line.split()
        for line in done.stdout.splitlines()
        if line.strip().startswith("research-") and " | " not in line
    }
    assert sorted(rows) == [f"research-{n}" for n in range(1, 6)]
    assert rows["research-2"][1] == "cancelled"
    assert rows["research-3"][1] == "completed" and rows["research-3"][2] == "2"
    assert {r[1] for n, r in rows.items() if n != "research-2"} == {"completed"}
    assert "drained and exited with code 0" in done.stdout
    assert "execution_started" in done.stdout  # the live stream of research-1


async def test_ls_show_tail_cancel(redis_url: str, prefix: str) -> None:
    # Given a running run with a critical event and a token
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        reserved = await coord.execute("ops-1", {"q": "x"})
        assert isinstance(reserved, Reserved)
        run = await coord.claim("ops-1", reserved.run_id, "w-ops")
        await run.emit(TaskListUpdated(task_list=["a"]))
        await run.emit(Token(content="hello"))

        # Then ls lists it, as a table and as JSON
        table = runstate(redis_url, prefix, "ls")
        assert table.returncode == 0 and "ops-1" in table.stdout and "w-ops" in table.stdout
        listed = json.loads(runstate(redis_url, prefix, "--json", "ls").stdout)
        assert [(r["session_id"], r["status"]) for r in listed] == [("ops-1", "running")]
        assert json.loads(runstate(redis_url, prefix, "ls", "--json").stdout) == listed

        # And show prints the runner, its critical events and its last events
        shown = runstate(redis_url, prefix, "show", "ops-1")
        assert shown.returncode == 0
        assert "task_list_updated" in shown.stdout and "hello" in shown.stdout
        doc = json.loads(runstate(redis_url, prefix, "--json", "show", "ops-1").stdout)
        assert doc["runner"]["run_id"] == reserved.run_id
        assert [e["event"]["type"] for e in doc["events"]] == [
            "execution_started",
            "task_list_updated",
            "token",
        ]

        # When an operator cancels it
        cancelled = runstate(redis_url, prefix, "cancel", "ops-1")
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
        # Then a second cancel finds nothing (exit 1), and tail from "0" prints the whole run
        again = runstate(redis_url, prefix, "--json", "cancel", "ops-1")
        assert again.returncode == 1
        assert json.loads(again.stdout) == {"session": "ops-1", "cancelled": False}
        tail = runstate(redis_url, prefix, "--json", "tail", "ops-1", "--from", "0")
        types = [json.loads(line)["event"]["type"] for line in tail.stdout.splitlines()]
        assert types == ["execution_started", "task_list_updated", "token", "cancelled"]
        token = json.loads(tail.stdout.splitlines()[2])["event"]
        assert token == {"type": "token", "content": "hello"}  # the event's own fields too
        assert (await coord.runner("ops-1")).status == "cancelled"  # type: ignore[union-attr]


def test_exit_codes_for_missing_and_bad_input(redis_url: str, prefix: str) -> None:
    missing = runstate(redis_url, prefix, "show", "nobody")
    assert missing.returncode == 1 and "'nobody'" in missing.stderr
    bad = runstate(redis_url, prefix, "show", "bad id")
    assert bad.returncode == 2 and "'bad id'" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "RUNSTATE_REDIS_URL"}
    no_url = subprocess.run(
        [sys.executable, "-m", "runstate.cli", "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert no_url.returncode == 2 and "RUNSTATE_REDIS_URL" in no_url.stderr
    down = runstate("redis://127.0.0.1:1/0", prefix, "ls", timeout=60)
    assert down.returncode == 3 and "Redis did not answer" in down.stderr


def test_workers_and_reap(redis_url: str, prefix: str) -> None:
    # Given a live worker process
    env = {**os.environ, "RUNSTATE_REDIS_URL": redis_url, "RUNSTATE_PREFIX": prefix}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers",
            "workers.demo_agent:agent",
            "--worker-id",
            "cli-w1",
            "--heartbeat-interval",
            "0.2",
            "--log-level",
            "WARNING",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not rows:
            rows = json.loads(runstate(redis_url, prefix, "--json", "workers").stdout)
            time.sleep(0.1)
        # Then `workers` lists it alive, with its pid, in JSON and as a table
        assert [(r["worker"], r["alive"], r["pid"]) for r in rows] == [
            ("cli-w1", True, str(worker.pid))
        ]
        table = runstate(redis_url, prefix, "workers")
        assert "cli-w1" in table.stdout and "alive" in table.stdout
        # And a reaper pass finds nothing to repair
        reaped = runstate(redis_url, prefix, "reap")
        assert reaped.returncode == 0 and "nothing to repair" in reaped.stdout
        report = json.loads(runstate(redis_url, prefix, "--json", "reap").stdout)
        assert report["requeued"] == [] and report["failed"] == []
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0
    # When it has drained and retired, it is gone from the list
    assert json.loads(runstate(redis_url, prefix, "--json", "workers").stdout) == []


async def test_reap_recovers_the_run_of_a_lost_worker(redis_url: str, prefix: str) -> None:
    # Given a run claimed by a worker that never heartbeats (lost from the start)
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        reserved = await coord.execute("orphan", {"q": 1})
        assert isinstance(reserved, Reserved)
        run = await coord.claim("orphan", reserved.run_id, "ghost-worker")
        coord.release(run)
        # When an operator runs one reaper pass
        done = await asyncio.to_thread(runstate, redis_url, prefix, "--json", "reap")
        # Then the run is put back on the queue as a new attempt
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["requeued"] == [f"orphan {reserved.run_id}"]
        state = await coord.runner("orphan")
        assert state is not None and state.status == "pending" and state.attempt == 1
        # And a second pass has nothing left to do
        again = await asyncio.to_thread(runstate, redis_url, prefix, "reap")
        assert "nothing to repair" in again.stdout


async def test_tail_follows_a_run_live_until_its_end(redis_url: str, prefix: str) -> None:
    # Given a running run and `runstate tail` following it
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        reserved = await coord.execute("live-1")
        assert isinstance(reserved, Reserved)
        run = await coord.claim("live-1", reserved.run_id, "w1")
        await run.emit(TaskListUpdated(task_list=["x"]))  # replayed: tells us it attached
        env = {**os.environ, "RUNSTATE_REDIS_URL": redis_url, "RUNSTATE_PREFIX": prefix}
        tail = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "runstate.cli",
            "tail",
            "live-1",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert tail.stdout is not None
            first = await asyncio.wait_for(tail.stdout.readline(), 30)
            assert b"replay" in first and b"task_list_updated" in first
            # When the run emits and ends
            await run.emit(Token(content="streamed live"))
            await run.complete()
            out, err = await asyncio.wait_for(tail.communicate(), 30)
        finally:
            if tail.returncode is None:
                tail.kill()
                await tail.wait()
    # Then it printed each event as it came, with its stream id, and stopped at the end
    assert tail.returncode == 0, err.decode()
    text = out.decode()
    assert "streamed live" in text and '"type":"complete"' in text
    assert text.index("streamed live") < text.index('"type":"complete"')

"""``runstate demo``: runstate at work on a real (embedded) server.

The main demo starts two worker processes, runs five agent-like runs at once, streams one of them
live, cancels another mid-run, kills a worker with SIGKILL and shows its run recovered by the
other, then prints a summary table.

``runstate demo --local`` shows the library on its own: one process reserves a session and
runs an agent-like task in-process, two subscribers watch it live, a late subscriber joins
mid-run and gets the replay (critical events, the last budget event), and a second run is
cancelled mid-run and stops at its next checkpoint.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

from .coordinator import Coordinator
from .errors import RunCancelled
from .events import (
    AgentEvent,
    RunnerProgress,
    SessionTitleUpdated,
    TaskListUpdated,
    Token,
    TokenBudgetUpdated,
    ToolComplete,
    ToolLifecycle,
    ToolStart,
)
from .models import Reserved
from .queue import Queue
from .run import RunHandle

WORDS = "Redis streams keep every event so that a late subscriber can catch up".split()  # noqa: SIM905


def describe(event: AgentEvent) -> str:
    """One short line for an event."""
    fields = event.model_dump(exclude={"type"})
    text = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    return f"{event.type}({text[:70]})"


async def agent_task(run: RunHandle, rounds: int, delay: float) -> str:
    """A stand-in for an LLM agent: rounds of tokens and a tool call, a checkpoint per step."""
    await run.emit(SessionTitleUpdated(title="Why streams?"))
    try:
        for r in range(1, rounds + 1):
            await run.emit(TaskListUpdated(task_list={"done": r - 1, "total": rounds}))
            await run.emit(RunnerProgress(round_count=r))
            await run.emit(ToolStart(tool_call_id=f"c{r}", tool_name="search", arguments={"q": r}))
            await run.emit(ToolLifecycle(tool_call_id=f"c{r}", tool_name="search", phase="begin"))
            await run.checkpoint()
            await asyncio.sleep(delay)
            await run.emit(ToolComplete(tool_call_id=f"c{r}", result={"hits": 3}))
            for word in WORDS:
                await run.emit(Token(content=word + " "))
                await run.checkpoint()
                await asyncio.sleep(delay / 10)
            await run.emit(TokenBudgetUpdated(usage={"tokens": r * len(WORDS)}))
        await run.complete({"tokens": rounds * len(WORDS)})
        return "completed"
    except RunCancelled as exc:
        return f"stopped at a checkpoint: {exc.reason}"


async def watch(coord: Coordinator, session: str, name: str, out: TextIO) -> int:
    count = 0
    async for item in coord.subscribe(session):  # a new subscriber: replay, then live
        count += 1
        if item.event.type == "token":
            continue  # too chatty to print; counted
        tag = "replay" if item.id is None else item.id
        print(f"  [{name}] {tag:>20}  {describe(item.event)}", file=out)
    return count


async def run_local_demo(
    url: str, prefix: str = "runstate", out: TextIO = sys.stdout, delay: float = 0.05
) -> None:
    async with Coordinator.from_url(url, prefix=prefix) as coord:
        print(f"Redis at {url}\n", file=out)

        print("1. reserve session 'chat-1' and run an agent in this process", file=out)
        reserved = await coord.try_reserve("chat-1", {"question": "why streams?"})
        assert isinstance(reserved, Reserved)
        again = await coord.try_reserve("chat-1")
        print(f"   reserved run {reserved.run_id}; a second reserve says {again!r}", file=out)
        run = await coord.claim("chat-1", reserved.run_id, worker="demo-local")

        print("2. two subscribers watch it live (tokens counted, not printed)", file=out)
        watchers = [asyncio.create_task(watch(coord, "chat-1", n, out)) for n in ("A", "B")]
        await asyncio.sleep(0.05)
        work = asyncio.create_task(agent_task(run, rounds=3, delay=delay))

        await asyncio.sleep(delay * 4)
        print("3. a late subscriber joins mid-run: replay first, then live", file=out)
        watchers.append(asyncio.create_task(watch(coord, "chat-1", "late", out)))
        print(f"   run ended: {await work}", file=out)
        counts = await asyncio.gather(*watchers)
        print(f"   events seen by A, B, late: {counts}", file=out)

        print("4. start 'chat-2' and cancel it mid-run", file=out)
        reserved2 = await coord.try_reserve("chat-2")
        assert isinstance(reserved2, Reserved)
        run2 = await coord.claim("chat-2", reserved2.run_id, worker="demo-local")
        work2 = asyncio.create_task(agent_task(run2, rounds=5, delay=delay))
        await asyncio.sleep(delay * 5)
        print(f"   cancel('chat-2') -> {await coord.cancel('chat-2')}", file=out)
        print(f"   the agent: {await work2}", file=out)
        print(f"   cancel again -> {await coord.cancel('chat-2')} (nothing active)", file=out)

        print("\n5. the runners, as `runstate show` and HGETALL see them", file=out)
        for sid in ("chat-1", "chat-2"):
            state = await coord.runner(sid)
            assert state is not None
            print(
                f"   {sid}: {state.status.value:<9} rounds={state.round_count} "
                f"events={state.seq} last_tool={state.last_tool_name}/{state.last_tool_phase} "
                f"critical={len(state.last_critical_events)}",
                file=out,
            )
        print(
            f"\n   every key is plain Redis: redis-cli -u {url} "
            f"HGETALL '{coord.keys.runner('chat-1')}'\n"
            "   (the embedded server stops with the demo; set RUNSTATE_REDIS_URL to keep them)",
            file=out,
        )


# ---- the main demo: worker processes -------------------------------------------------------

WORKER_ARGS = [
    "workers.demo_agent:agent",
    "--concurrency",
    "4",
    "--heartbeat-interval",
    "0.5",
    "--lost-after",
    "2",
    "--reaper-interval",
    "0.5",
    "--undispatched-after",
    "5",
    "--shutdown-grace",
    "10",
    "--log-level",
    "WARNING",
]
SESSIONS = [f"research-{n}" for n in range(1, 6)]


def start_worker(url: str, prefix: str, worker_id: str) -> subprocess.Popen[bytes]:
    """A real worker process, as ``python -m workers`` starts it."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers",
            *WORKER_ARGS,
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "--worker-id",
            worker_id,
        ],
        stdin=subprocess.DEVNULL,
    )


async def stream_live(coord: Coordinator, session: str, out: TextIO) -> None:
    """Print one session's events as they arrive: tokens inline, everything else on its line."""
    inline = False
    dim = out.isatty()  # reasoning tokens dimmed on a terminal
    async for item in coord.subscribe(session, last_event_id="0"):  # the run from its start
        event = item.event
        if event.type in ("token", "reasoning_token"):
            text = getattr(event, "content", "")
            if event.type == "reasoning_token" and dim:
                text = f"\x1b[2m{text}\x1b[0m"
            print(text, end="", file=out, flush=True)
            inline = True
            continue
        if inline:
            print(file=out)
            inline = False
        print(f"   {session} | {item.id or 'replay':>20}  {describe(event)}", file=out, flush=True)


async def wait_until(check: Callable[[], Awaitable[bool]], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.1)
    return False


async def run_worker_demo(url: str, prefix: str = "runstate", out: TextIO = sys.stdout) -> int:
    """2 worker processes, 5 runs at once, one streamed live, one cancelled, one worker killed."""
    print(f"Redis at {url}; starting 2 worker processes (python -m workers ...)", file=out)
    procs = {wid: start_worker(url, prefix, wid) for wid in ("demo-w1", "demo-w2")}
    try:
        async with Coordinator.from_url(url, prefix=prefix) as coord:
            queue = Queue(coord.store)

            async def both_alive() -> bool:
                return len(await queue.worker_deadlines()) == 2

            if not await wait_until(both_alive, 20):
                print("the workers did not start", file=out)
                return 1

            print(f"\n1. execute {len(SESSIONS)} runs at once; stream {SESSIONS[0]} live", file=out)
            started = {}
            for n, sid in enumerate(SESSIONS, 1):
                result = await coord.execute(sid, {"prompt": f"question {n}", "rounds": 3})
                started[sid] = result.run_id
            live = asyncio.create_task(stream_live(coord, SESSIONS[0], out))

            await asyncio.sleep(1.0)
            print(
                f"\n2. cancel {SESSIONS[1]} mid-run -> {await coord.cancel(SESSIONS[1])}", file=out
            )

            async def victim_running() -> bool:
                state = await coord.runner(SESSIONS[2])
                return state is not None and state.status == "running"

            await wait_until(victim_running, 20)
            victim = await coord.runner(SESSIONS[2])
            assert victim is not None and victim.worker in procs
            print(
                f"\n3. SIGKILL {victim.worker}, which is running {SESSIONS[2]} "
                f"(attempt {victim.attempt}); a reaper in the other worker recovers it",
                file=out,
            )
            procs[victim.worker].kill()
            procs[victim.worker].wait()

            async def all_ended() -> bool:
                states = await asyncio.gather(*(coord.runner(s) for s in SESSIONS))
                return all(s is not None and s.status.is_terminal for s in states)

            ended = await wait_until(all_ended, 60)
            await asyncio.wait_for(live, 10)

            print("\n4. summary", file=out)
            rows = []
            for sid in SESSIONS:
                state = await coord.runner(sid)
                assert state is not None
                took = (
                    f"{(state.completed_at - state.started_at).total_seconds():.1f}s"
                    if state.completed_at and state.started_at
                    else "-"
                )
                rows.append(
                    [
                        sid,
                        state.status.value,
                        str(state.attempt),
                        str(state.round_count),
                        str(state.seq),
                        took,
                        state.worker or "-",
                        (state.error or "")[:40],
                    ]
                )
            header = [
                "session",
                "status",
                "attempts",
                "rounds",
                "events",
                "duration",
                "worker",
                "error",
            ]
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for row in [header, *rows]:
                print(
                    "   " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)),
                    file=out,
                )
        survivor = next(wid for wid in procs if wid != victim.worker)
        procs[survivor].send_signal(signal.SIGTERM)
        code = procs[survivor].wait(timeout=30)
        print(f"\n5. SIGTERM {survivor}: drained and exited with code {code}", file=out)
        return 0 if ended and code == 0 else 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

"""``runstate demo --local``: the library on its own, scripted, on a real (embedded) server.

One process reserves a session and runs an agent-like task in-process, two subscribers watch it
live, a late subscriber joins mid-run and gets the replay (critical events, the last budget
event), and a second run is cancelled mid-run and stops at its next checkpoint.
"""

from __future__ import annotations

import asyncio
import sys
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
    async for item in coord.subscribe(session):
        count += 1
        if item.event.type == "token":
            continue  # too chatty to print; counted
        tag = "replay" if item.id is None else item.id
        print(f"  [{name}] {tag:>20}  {describe(item.event)}", file=out)
    return count


async def run_local_demo(url: str, out: TextIO = sys.stdout, delay: float = 0.05) -> None:
    async with Coordinator.from_url(url, prefix="runstate-demo") as coord:
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
            "HGETALL 'runstate-demo:{chat-1}:runner'\n"
            "   (the embedded server stops with the demo; set RUNSTATE_REDIS_URL to keep them)",
            file=out,
        )

"""A demo agent that behaves like an LLM agent: ``python -m workers workers.demo_agent:agent``.

Each round it reports progress, thinks (``reasoning_token``), streams an answer (``token``),
updates its token budget, calls a tool (``tool_start``, ``tool_lifecycle`` begin/finished,
``tool_complete``) and its task list, with a safe point between steps. The first round also
names the session. A run lasts a few seconds; the payload may override:

* ``rounds`` (int, default 3): how many rounds;
* ``token_delay`` (float seconds, default 0.03): the pause between streamed tokens;
* ``tool_delay`` (float seconds, default 0.3): how long a tool call takes;
* ``prompt`` (str): what the user asked (shows up in the title and the answer).
"""

from __future__ import annotations

import asyncio
from typing import Any

from runstate.events import (
    ReasoningToken,
    RunnerProgress,
    SessionTitleUpdated,
    TaskListCompleted,
    TaskListUpdated,
    Token,
    TokenBudgetUpdated,
    ToolComplete,
    ToolLifecycle,
    ToolStart,
)

from .context import RunContext

TOOLS = ("web_search", "read_file", "run_python")
THOUGHTS = "Let me think about which tool gets me closer to an answer."
ANSWER = "Here is what I found in round {n}: the results look consistent so far."


def _option(payload: Any, name: str, default: float, kind: type[float] | type[int]) -> float:
    value = payload.get(name, default) if isinstance(payload, dict) else default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"payload[{name!r}] must be a number >= 0, got {value!r}")
    return kind(value)


async def agent(ctx: RunContext) -> None:
    """Pretend to be an LLM agent working through a few rounds of thinking and tool calls.

    Raises:
        ValueError: a payload option of the wrong type, naming it.
    """
    payload = ctx.payload
    rounds = int(_option(payload, "rounds", 3, int))
    token_delay = _option(payload, "token_delay", 0.03, float)
    tool_delay = _option(payload, "tool_delay", 0.3, float)
    prompt = (
        payload.get("prompt", "the demo task") if isinstance(payload, dict) else "the demo task"
    )
    tasks = [{"title": f"round {n + 1}", "done": False} for n in range(rounds)]
    used = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    await ctx.emit(SessionTitleUpdated(title=f"Research: {prompt}"[:80]))
    await ctx.emit(TaskListUpdated(task_list={"tasks": tasks}))
    for n in range(1, rounds + 1):
        await ctx.checkpoint()
        await ctx.emit(RunnerProgress(round_count=n))
        for word in THOUGHTS.split(" "):
            await ctx.emit(ReasoningToken(content=word + " "))
            await asyncio.sleep(token_delay)
        await ctx.checkpoint()

        call_id = f"call_{ctx.run_id[:8]}_{n}"
        tool = TOOLS[(n - 1) % len(TOOLS)]
        await ctx.emit(ToolStart(tool_call_id=call_id, tool_name=tool, arguments={"query": prompt}))
        await ctx.emit(ToolLifecycle(tool_call_id=call_id, tool_name=tool, phase="begin"))
        await asyncio.sleep(tool_delay)
        await ctx.emit(ToolLifecycle(tool_call_id=call_id, tool_name=tool, phase="finished"))
        await ctx.emit(ToolComplete(tool_call_id=call_id, result={"hits": n * 3, "tool": tool}))
        await ctx.checkpoint()

        for word in ANSWER.format(n=n).split(" "):
            await ctx.emit(Token(content=word + " "))
            used["completion_tokens"] += 1
            await asyncio.sleep(token_delay)
        used["prompt_tokens"] += 120
        used["total_tokens"] = used["prompt_tokens"] + used["completion_tokens"]
        await ctx.emit(TokenBudgetUpdated(usage={**used, "budget": 10_000}))
        tasks[n - 1]["done"] = True
        await ctx.emit(TaskListUpdated(task_list={"tasks": tasks}))
    await ctx.emit(TaskListCompleted())
    ctx.usage = dict(used)

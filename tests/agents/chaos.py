"""The run function of the chaos tests: numbered tokens, so that a test can tell exactly which
events reached the stream, and how often.

Payload keys:

* ``tokens``: how many ``token`` events; the i-th has the content ``"<attempt>:<i>"``;
* ``delay``: seconds between two tokens;
* ``budget_every``: a ``token_budget_updated`` after every that many tokens (0: none);
* ``task_list``: write a ``task_list_updated`` (a critical event) first (default true);
* ``tolerate_outage``: go on after an emit that raised :class:`~runstate.RedisUnavailable`
  (the run's handle keeps the event and writes it ahead of its next write, never twice, so it
  is not emitted again); by default the error ends the run, as in an agent that does not
  expect it;
* ``record_dir``: record each run's end there (see :func:`tests.agents.basic.record`), with
  the numbers whose emit returned (``acked``) and those whose emit raised ``RedisUnavailable``
  (``deferred``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from runstate import RedisUnavailable
from runstate.events import TaskListUpdated, Token, TokenBudgetUpdated
from tests.agents.basic import record
from workers import RunContext


async def agent(ctx: RunContext) -> None:
    payload: dict[str, Any] = ctx.payload if isinstance(ctx.payload, dict) else {}
    tokens = int(payload.get("tokens", 100))
    delay = float(payload.get("delay", 0.01))
    budget_every = int(payload.get("budget_every", 0))
    tolerate = bool(payload.get("tolerate_outage", False))
    acked: list[int] = []
    deferred: list[int] = []
    record(ctx, "start")

    async def emit(event: Token | TaskListUpdated | TokenBudgetUpdated, i: int = -1) -> None:
        try:
            await ctx.emit(event)
        except RedisUnavailable:
            if i >= 0:
                deferred.append(i)
            if not tolerate:
                record(ctx, "unavailable", acked=acked, deferred=deferred)
                raise
            return
        if i >= 0:
            acked.append(i)

    if payload.get("task_list", True):
        await emit(TaskListUpdated(task_list={"tokens": tokens}))
    for i in range(tokens):
        await ctx.checkpoint()
        await emit(Token(content=f"{ctx.attempt}:{i}"), i)
        if budget_every and (i + 1) % budget_every == 0 and i + 1 < tokens:
            await emit(TokenBudgetUpdated(usage={"tokens": i + 1}))
        if delay:
            await asyncio.sleep(delay)
    ctx.usage = {"tokens": tokens}
    record(ctx, "end", acked=acked, deferred=deferred)

"""The run function of benchmark 5: does nothing (the run completes at once)."""

from __future__ import annotations

from workers.context import RunContext


async def agent(ctx: RunContext) -> None:
    return None

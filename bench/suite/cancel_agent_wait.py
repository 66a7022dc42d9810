"""The cancel benchmark's agent that waits on one long call, ``ctx.sleep(3600)``, instead of
looping on checkpoints: the cancel interrupts the wait itself, so what is measured is the
delivery alone (``coord.cancel()`` → pub/sub → the run's token → ``RunCancelled``), the
equivalent of the raw ``PUBLISH`` baseline. Reports like :mod:`suite.cancel_agent`.
"""

from __future__ import annotations

import os
import time

from runstate import RunCancelled
from workers.context import RunContext

from .cancel_agent import _redis


async def agent(ctx: RunContext) -> None:
    key = os.environ["BENCH_KEY"]
    await _redis().rpush(f"{key}:started", ctx.run_id)
    try:
        await ctx.sleep(3600)
    except RunCancelled:
        seen = time.time_ns()
        await _redis().rpush(f"{key}:seen", f"{ctx.run_id} {seen}")
        raise

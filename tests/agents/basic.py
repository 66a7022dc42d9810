"""One run function whose behaviour the payload picks, so one worker serves every test case.

Payload keys:

* ``kind``: ``"steps"`` (default), ``"quiet"``, ``"boom"``, ``"spawn"``, ``"forever"``,
  ``"bad_usage"``, ``"demo"``;
* ``steps`` / ``delay``: how many checkpointed steps, and the pause of each (``steps`` emits a
  token per step, ``quiet`` nothing); ``retry_delay``: the pause from the second attempt on
  (default ``delay``), so a test can keep a first attempt busy and let the retry be quick;
* ``message``: the exception message (``boom``);
* ``children``: child session ids, each run with ``child_payload`` (``spawn``);
* ``wait_children``: wait for the children before returning (``spawn``, default true);
* ``record_dir``: a directory where every start, end and cancel is recorded, one JSON line
  per event in ``<pid>.jsonl`` (so runs can be checked for overlap across processes).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from runstate import RunCancelled
from runstate.events import Token
from workers import RunContext, demo_agent


def record(ctx: RunContext, what: str, **extra: Any) -> None:
    """Append one line about this run to ``<record_dir>/<pid>.jsonl`` (if a dir was given)."""
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    folder = payload.get("record_dir")
    if not folder:
        return
    line = {
        "what": what,
        "session": ctx.session_id,
        "run": ctx.run_id,
        "attempt": ctx.attempt,
        "worker": ctx.worker_id,
        "pid": os.getpid(),
        "t": time.time(),
        **extra,
    }
    path = os.path.join(folder, f"{os.getpid()}.jsonl")
    # One write of a short line with O_APPEND: lines from concurrent runs never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_records(folder: str) -> list[dict[str, Any]]:
    """Every line recorded under ``folder``, oldest first."""
    out: list[dict[str, Any]] = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                out += [json.loads(line) for line in f if line.strip()]
    return sorted(out, key=lambda r: r["t"])


async def agent(ctx: RunContext) -> None:
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    kind = payload.get("kind", "steps")
    record(ctx, "start")
    try:
        if kind == "steps":
            delay = float(payload.get("delay", 0.01))
            if ctx.attempt > 1:
                delay = float(payload.get("retry_delay", delay))
            for i in range(int(payload.get("steps", 3))):
                await ctx.checkpoint()
                await ctx.emit(Token(content=f"step {i} "))
                await asyncio.sleep(delay)
        elif kind == "quiet":  # safe points, but no writes
            for _ in range(int(payload.get("steps", 3))):
                await ctx.checkpoint()
                await asyncio.sleep(float(payload.get("delay", 0.01)))
        elif kind == "boom":
            await ctx.emit({"type": "token", "content": "about to fail"})
            raise ValueError(payload.get("message", "boom"))
        elif kind == "spawn":
            children = [
                await ctx.spawn(child, payload.get("child_payload"))
                for child in payload.get("children", [])
            ]
            if payload.get("wait_children", True):
                statuses = [await child.wait() for child in children]
                await ctx.emit(Token(content=" ".join(statuses)))
        elif kind == "forever":
            await asyncio.Event().wait()  # never reaches a safe point
        elif kind == "bad_usage":
            ctx.usage = {"not json": object()}
        elif kind == "demo":
            await demo_agent.agent(ctx)
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except RunCancelled as exc:
        record(ctx, "cancelled", reason=exc.reason)
        raise
    record(ctx, "end")

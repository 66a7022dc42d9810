"""A subscriber process for the load test: ``python -m tests.chaos.subscriber SPEC.json``.

One Coordinator (so one event reader) serves every subscriber of the process. The spec is a
JSON object:

* ``url``, ``prefix``: where the runs are;
* ``subscribers``: ``[{"session": ..., "mode": "from0" | "live", "delay": seconds}, ...]``;
  ``from0`` subscribers resume from ``"0"`` (everything retained) at once, ``live`` ones are new
  subscribers (snapshot, then live) that attach ``delay`` seconds after the go signal;
* ``ready``: a file written once every ``from0`` subscriber is attached;
* ``go``: a file whose appearance starts the clock of the ``live`` subscribers;
* ``out``: the results file: ``{"subscribers": [{"session", "mode", "items", "error"}]}`` with
  ``items`` the ``[id, seq, type, missed]`` of everything each subscriber got;
* ``limit``: seconds after which unfinished subscribers are given up (reported as errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from runstate import Coordinator
from tests.chaos.support import Seen, collect, exists, write_text


async def wait_for_file(path: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {limit}s")
        await asyncio.sleep(0.02)


async def follow(coord: Coordinator, session_id: str, mode: str, out: list[Seen]) -> None:
    await collect(coord.subscribe(session_id, "0" if mode == "from0" else None), out)


async def main(spec: dict[str, Any]) -> int:
    subs: list[dict[str, Any]] = spec["subscribers"]
    results: list[list[Seen]] = [[] for _ in subs]
    errors: list[str | None] = [None] * len(subs)
    async with Coordinator.from_url(spec["url"], spec["prefix"]) as coord:
        await coord.client.ping()

        async def run(i: int) -> None:
            sub = subs[i]
            try:
                if sub["mode"] == "live":
                    await wait_for_file(spec["go"], spec["limit"])
                    await asyncio.sleep(float(sub["delay"]))
                await follow(coord, sub["session"], sub["mode"], results[i])
            except Exception as exc:
                errors[i] = repr(exc)

        tasks = [asyncio.create_task(run(i)) for i in range(len(subs))]
        from0 = sum(1 for s in subs if s["mode"] == "from0")
        deadline = time.monotonic() + 30
        while coord._hub.subscribers < from0:  # white box: attached to the event reader
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {coord._hub.subscribers}/{from0} attached in 30s")
            await asyncio.sleep(0.02)
        write_text(spec["ready"], "ready\n")
        _, late = await asyncio.wait(tasks, timeout=spec["limit"])
        for task in late:
            errors[tasks.index(task)] = f"not done within {spec['limit']}s"
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    report = {
        "subscribers": [
            {"session": s["session"], "mode": s["mode"], "items": items, "error": error}
            for s, items, error in zip(subs, results, errors, strict=True)
        ]
    }
    write_text(spec["out"], json.dumps(report))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    with open(sys.argv[1]) as f:
        sys.exit(asyncio.run(main(json.load(f))))

"""Dispatching scheduled runs (``execute(..., delay=)`` / ``at=``) when they fall due."""

from __future__ import annotations

import asyncio
import logging

from runstate.queue import Queue, now_ms

log = logging.getLogger(__name__)

LOCK = "scheduler"


class Scheduler:
    """Moves due runs from the ``schedule`` sorted set to the queue, every ``interval`` seconds.

    Every worker runs one. A tick first checks cheaply whether anything is due, then moves the
    due runs under the cluster-wide ``scheduler`` lock. The lock keeps movers from doing the
    same work; exactly-once does not depend on it: each entry is removed with ZREM and only the
    mover whose ZREM removed it dispatches it (see :meth:`runstate.queue.Queue.move_due`).

    Args:
        queue: the worker pool's data.
        interval: seconds between ticks (the lateness bound of a scheduled run).
        batch: the most runs moved per tick round trip.
    """

    def __init__(self, queue: Queue, *, interval: float, batch: int = 100) -> None:
        if not interval > 0:
            raise ValueError(f"schedule interval must be > 0 seconds, got {interval!r}")
        self.queue = queue
        self.interval = interval
        self.batch = batch

    async def tick(self) -> int:
        """Dispatch every run due now; returns how many this call dispatched."""
        if not await self.queue.next_due(now_ms()):
            return 0
        ttl_ms = max(1000, int(self.interval * 5000))
        token = await self.queue.acquire_lock(LOCK, ttl_ms)
        if token is None:
            return 0  # another worker is moving them right now
        moved = 0
        try:
            while True:
                batch = await self.queue.move_due(now_ms(), self.batch)
                for sid, run_id in batch:
                    log.info("scheduled run due: session=%s run=%s dispatched", sid, run_id)
                moved += len(batch)
                if len(batch) < self.batch:
                    return moved
        finally:
            await self.queue.release_lock(LOCK, token)

    async def run(self) -> None:
        """Tick every ``interval`` seconds until cancelled; a failed tick is logged, not fatal."""
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.warning("moving scheduled runs failed: %r", exc)
            await asyncio.sleep(self.interval)

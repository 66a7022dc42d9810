"""Worker liveness: one pipeline per worker per interval, however many runs it has in flight."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence

from runstate.codec import utcnow
from runstate.keys import run_ref
from runstate.queue import Queue, now_ms
from runstate.queue_records import RunOwner

log = logging.getLogger(__name__)


class Heartbeat:
    """Keeps ``worker_id`` in the ``workers`` index with a deadline ``lost_after`` ahead.

    Each beat is one pipeline: ``ZADD workers <id> <now + lost_after>`` and the worker's info
    hash (host, pid, concurrency, started_at, its runs in flight) with a TTL of a few beats.
    A reaper treats the worker as lost once its deadline has passed, so ``lost_after`` is the
    longest this worker may go without a successful beat (an event loop blocked by a
    synchronous agent counts too).

    Args:
        queue: where the beat is written.
        worker_id: the worker.
        interval: seconds between beats.
        lost_after: seconds after a beat at which the worker counts as lost.
        concurrency: reported in the info hash.
        runs: returns the ``(session_id, run_id)`` pairs in flight at the time of a beat.
        on_owners: called after each beat with who owns each of those runs now (read in the
            same round trip), so the worker can stop runs that were taken over.
    """

    def __init__(
        self,
        queue: Queue,
        worker_id: str,
        *,
        interval: float,
        lost_after: float,
        concurrency: int,
        runs: Callable[[], Sequence[tuple[str, str]]],
        on_owners: Callable[[list[RunOwner]], None] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval!r}")
        if not lost_after > interval:
            raise ValueError(
                f"lost_after ({lost_after!r}s) must be longer than the heartbeat interval "
                f"({interval!r}s), or a live worker would look lost between two beats"
            )
        self.queue = queue
        self.worker_id = worker_id
        self.interval = interval
        self.lost_after = lost_after
        self._runs = runs
        self._on_owners = on_owners
        self._static: dict[str, str | int] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": concurrency,
            "started_at": utcnow(),
        }
        self.beats = 0

    async def beat(self) -> None:
        """Write one heartbeat now."""
        runs = list(self._runs())
        info: dict[str, str | int] = {
            **self._static,
            "in_flight": len(runs),
            "runs": json.dumps([run_ref(sid, run_id) for sid, run_id in runs]),
            "beat_at": utcnow(),
        }
        ttl_ms = int(max(self.lost_after, 3 * self.interval) * 1000)
        deadline = now_ms() + int(self.lost_after * 1000)
        owners = await self.queue.heartbeat(self.worker_id, deadline, info, ttl_ms, runs)
        self.beats += 1
        if self._on_owners is not None:
            self._on_owners(owners)

    async def run(self) -> None:
        """Beat every ``interval`` seconds until cancelled; a failed beat is logged, not fatal."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except Exception as exc:
                log.warning("heartbeat of worker %s failed: %r", self.worker_id, exc)

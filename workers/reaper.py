"""Recovering what crashed processes leave behind (DESIGN §2.7), once or every few seconds.

One pass (:func:`reap_once`) applies these rules; every step is fenced or idempotent, so two
passes running at once (two workers, or a worker and ``runstate reap``) do no harm:

1. **Stuck queue entries**: an entry delivered to a consumer and not acknowledged for
   ``stale_entry_after`` seconds (its worker died between reading and claiming) is taken over
   with XAUTOCLAIM, put back on the queue as a new entry, and the old one acknowledged and
   deleted. If the run was claimed after all, the new entry's claim is simply refused.
2. **Lost workers**: a ``running`` run whose worker is lost (its heartbeat deadline in the
   ``workers`` index has passed, or it is not in the index at all) goes back to ``pending``
   and onto the queue while its attempt is below ``max_attempts``, else ends as ``error``
   with a message naming the lost worker. The change is fenced on run_id, attempt, worker and
   status ``running`` (``recover.lua``): a cancelled run stays cancelled, and the lost worker,
   should it wake up, can no longer write (its attempt is stale). Runs a process runs itself
   (``dispatch=local``) are never requeued, only ended, and only once their worker is known
   to be dead (a deadline that passed): a process that runs runs without heartbeating is not
   supervised.
3. **Never dispatched**: a ``pending`` queue run older than ``undispatched_after`` seconds
   (counted from its reservation, its requeue, or its due time), due, and neither in the
   queue nor in the schedule (a crash between reserve and dispatch) is dispatched. One not
   due yet and missing from the schedule is put back in it. A ``pending`` local run older
   than that was never claimed by its process: it ends as ``error``.
4. **The active index**: a session in ``active`` whose run ended or whose hash is gone is
   removed; an active run missing from the index is added back (on scanning passes).
5. **Housekeeping**: consumers of lost workers with nothing pending are deleted from the
   group, and workers lost for over an hour are dropped from the ``workers`` index.

A pass reads the ``active`` index; a *scanning* pass also SCANs every runner hash of the
prefix, which is what finds runs that never reached the index (rule 3 after a crash, and
rule 4's second half). Workers scan at most every ``scan_interval`` seconds cluster-wide.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

from runstate import Coordinator
from runstate.keys import run_ref
from runstate.queue import Queue, now_ms
from runstate.queue_records import RunProbe

log = logging.getLogger(__name__)

LOCK = "reaper"
SCAN_LOCK = "reaper-scan"
FORGET_WORKERS_AFTER = 3600.0
PROBE_BATCH = 500
MAX_AUTOCLAIM_PAGES = 100


@dataclass
class ReapReport:
    """What one reaper pass did. Runs are named ``"<session> <run_id>"``."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    redelivered: int = 0
    unindexed: list[str] = field(default_factory=list)
    reindexed: list[str] = field(default_factory=list)
    deleted_consumers: list[str] = field(default_factory=list)
    forgotten_workers: list[str] = field(default_factory=list)
    scanned: bool = False

    @property
    def changed(self) -> bool:
        """True if the pass changed anything."""
        return bool(
            self.requeued
            or self.failed
            or self.redispatched
            or self.rescheduled
            or self.redelivered
            or self.unindexed
            or self.reindexed
            or self.deleted_consumers
            or self.forgotten_workers
        )


def _check(name: str, value: float, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {value!r}")


async def reap_once(
    coord: Coordinator,
    *,
    max_attempts: int = 3,
    undispatched_after: float = 30.0,
    stale_entry_after: float = 30.0,
    scan: bool = True,
    consumer: str = "reaper",
    queue: Queue | None = None,
) -> ReapReport:
    """Run one reaper pass over ``coord``'s prefix (see the module docstring for the rules).

    Safe to call while workers run, including their own reapers.

    Args:
        max_attempts: attempts a run gets in all before a lost worker ends it as ``error``.
        undispatched_after: seconds a pending run may go undispatched before it is dispatched.
        stale_entry_after: seconds a delivered queue entry may stay unacknowledged.
        scan: also SCAN every runner hash (finds runs missing from the ``active`` index).
        consumer: the consumer name that takes over stuck queue entries.
        queue: the Queue to use (default: a new one on ``coord.store``).

    Raises:
        ValueError: a bad threshold.
        RedisUnavailable: Redis did not answer.
    """
    _check("max_attempts", max_attempts, 1)
    _check("undispatched_after", undispatched_after)
    _check("stale_entry_after", stale_entry_after)
    queue = queue or Queue(coord.store)
    report = ReapReport(scanned=scan)
    await queue.ensure_group()
    deadlines = await queue.worker_deadlines()
    now = now_ms()

    # 1. entries a dead consumer read and never claimed
    cursor = "0-0"
    for _ in range(MAX_AUTOCLAIM_PAGES):
        cursor, entries = await queue.autoclaim(
            consumer, int(stale_entry_after * 1000), 100, cursor
        )
        for entry in entries:
            log.warning(
                "reaper: queue entry %s (session=%s run=%s) was never acknowledged; requeued",
                entry.id,
                entry.session_id,
                entry.run_id,
            )
            await queue.redeliver(entry)
            report.redelivered += 1
        if cursor in ("0-0", "0"):
            break

    # 2-4. sessions: the index, plus every runner hash on a scanning pass
    indexed = await coord.store.active_sessions()
    in_index = set(indexed)
    sessions = list(dict.fromkeys(indexed))
    if scan:
        seen = set(sessions)
        async for sid in queue.scan_sessions():
            if sid not in seen:
                seen.add(sid)
                sessions.append(sid)
    waiting: list[RunProbe] = []
    for i in range(0, len(sessions), PROBE_BATCH):
        for probe in await queue.probe(sessions[i : i + PROBE_BATCH]):
            await _reap_session(
                coord,
                queue,
                probe,
                probe.session_id in in_index,
                deadlines,
                report,
                max_attempts=max_attempts,
                undispatched_ms=int(undispatched_after * 1000),
                waiting=waiting,
            )
    if waiting:
        await _dispatch_waiting(queue, waiting, report)

    # 5. housekeeping
    for info in await queue.consumers():
        alive = deadlines.get(info.name, -1) >= now or info.name == consumer
        if not alive and info.pending == 0 and info.idle_ms >= stale_entry_after * 1000:
            await queue.delete_consumer(info.name)
            report.deleted_consumers.append(info.name)
    report.forgotten_workers = await queue.forget_workers(now - int(FORGET_WORKERS_AFTER * 1000))
    if report.changed:
        log.info("reaper pass: %s", report)
    return report


async def _reap_session(
    coord: Coordinator,
    queue: Queue,
    probe: RunProbe,
    indexed: bool,
    deadlines: dict[str, int],
    report: ReapReport,
    *,
    max_attempts: int,
    undispatched_ms: int,
    waiting: list[RunProbe],
) -> None:
    sid, run_id = probe.session_id, probe.run_id
    if run_id is None or probe.status not in ("pending", "running"):
        if indexed:
            await _unindex(coord, queue, sid, report)
        return
    name = run_ref(sid, run_id)
    if not indexed and await queue.index_if_absent(sid):
        report.reindexed.append(sid)
    now = now_ms()

    if probe.status == "running":
        deadline = deadlines.get(probe.worker)
        if deadline is not None and deadline >= now:
            return  # its worker is alive
        # Look again: the worker may have started, or beaten, since the pass read the index.
        deadline = await queue.worker_deadline(probe.worker) if probe.worker else None
        if deadline is not None and deadline >= now_ms():
            return
        if probe.dispatch == "local" and deadline is None:
            return  # a process running its own runs without heartbeats: not ours to judge
        budget = max_attempts if probe.dispatch == "queue" else 0
        outcome = await queue.recover(
            sid,
            run_id,
            status="running",
            attempt=probe.attempt,
            worker=probe.worker,
            max_attempts=budget,
            message=(
                f"worker {probe.worker!r} was lost (no heartbeat) while running attempt "
                f"{probe.attempt}; no attempts left (max_attempts={budget})"
            ),
        )
        if outcome == "requeued":
            log.warning("reaper: worker %r lost; run %s requeued", probe.worker, name)
            report.requeued.append(name)
        elif outcome == "error":
            log.warning("reaper: worker %r lost; run %s ended as error", probe.worker, name)
            report.failed.append(name)
        return

    # pending
    since = max(probe.reserved_ms or 0, probe.requeued_ms or 0, probe.due_ms or 0)
    if probe.dispatch == "local":
        if now - since > undispatched_ms:
            outcome = await queue.recover(
                sid,
                run_id,
                status="pending",
                attempt=probe.attempt,
                worker="",
                max_attempts=0,
                message="the run was reserved to run in-process but never claimed "
                "(its process is gone)",
            )
            if outcome == "error":
                report.failed.append(name)
        return
    if probe.due_ms is not None and probe.due_ms > now_ms() + 1000:
        # Scheduled for later: make sure it is in the schedule (a crash may have skipped it).
        # The margin keeps us off entries a mover may be taking right now.
        if await queue.schedule_if_absent(sid, run_id, probe.due_ms):
            report.rescheduled.append(name)
        return
    if now - since > undispatched_ms:
        waiting.append(probe)


async def _dispatch_waiting(queue: Queue, waiting: list[RunProbe], report: ReapReport) -> None:
    """Dispatch the old pending runs that are neither queued nor scheduled."""
    queued = await queue.queued_runs()
    if queued is None:
        log.warning("reaper: the queue is too long to check for undispatched runs; skipped")
        return
    runs = [(p.session_id, p.run_id or "") for p in waiting]
    scheduled = await queue.scheduled(runs)
    for (sid, run_id), in_schedule in zip(runs, scheduled, strict=True):
        if in_schedule or (sid, run_id) in queued:
            continue
        log.warning("reaper: run %s %s was never dispatched; dispatching it", sid, run_id)
        await queue.enqueue(sid, run_id)
        report.redispatched.append(run_ref(sid, run_id))


async def _unindex(coord: Coordinator, queue: Queue, sid: str, report: ReapReport) -> None:
    await coord.store.unindex(sid)
    # A new run may have been reserved and indexed between our read and the ZREM: look again.
    (probe,) = await queue.probe([sid])
    if probe.status in ("pending", "running"):
        await queue.index_if_absent(sid)
    else:
        report.unindexed.append(sid)


class Reaper:
    """A worker's periodic reaper: a pass every ``interval`` seconds by whichever worker holds
    the ``reaper`` lock.

    The lock is taken with a TTL of ``interval`` and not released, so passes are spaced
    cluster-wide however many workers there are; a worker that dies holding it delays the
    next pass by at most one interval. Scanning passes are spaced by the ``reaper-scan`` lock.

    Args:
        coord: the coordinator.
        queue: the worker pool's data.
        worker_id: the consumer that takes over stuck entries.
        interval: seconds between passes.
        scan_interval: seconds between scanning passes.
        max_attempts, undispatched_after, stale_entry_after: see :func:`reap_once`.
    """

    def __init__(
        self,
        coord: Coordinator,
        queue: Queue,
        *,
        worker_id: str,
        interval: float,
        scan_interval: float,
        max_attempts: int,
        undispatched_after: float,
        stale_entry_after: float,
    ) -> None:
        _check("reaper interval", interval, 0.001)
        _check("scan_interval", scan_interval, 0.001)
        _check("max_attempts", max_attempts, 1)
        _check("undispatched_after", undispatched_after)
        _check("stale_entry_after", stale_entry_after)
        self.coord = coord
        self.queue = queue
        self.worker_id = worker_id
        self.interval = interval
        self.scan_interval = scan_interval
        self.max_attempts = max_attempts
        self.undispatched_after = undispatched_after
        self.stale_entry_after = stale_entry_after
        self.passes = 0

    async def tick(self) -> ReapReport | None:
        """One pass if this worker gets the lock; None if another worker had it."""
        if await self.queue.acquire_lock(LOCK, int(self.interval * 1000)) is None:
            return None
        scan = await self.queue.acquire_lock(SCAN_LOCK, int(self.scan_interval * 1000)) is not None
        report = await reap_once(
            self.coord,
            max_attempts=self.max_attempts,
            undispatched_after=self.undispatched_after,
            stale_entry_after=self.stale_entry_after,
            scan=scan,
            consumer=self.worker_id,
            queue=self.queue,
        )
        self.passes += 1
        return report

    async def run(self) -> None:
        """Tick about every ``interval`` seconds until cancelled; failures are logged."""
        while True:
            # Jitter, so that workers started together do not all ask for the lock at once.
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            try:
                await self.tick()
            except Exception as exc:
                log.warning("reaper pass failed: %r", exc)

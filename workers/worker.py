"""The worker: consumes the dispatch queue and runs up to ``concurrency`` runs at once.

A worker registers itself (a heartbeat) before it reads anything, then loops: read as many
queue entries as it has free slots (XREADGROUP, blocking), claim each run (fenced
pending -> running), acknowledge and delete the entry, and run the agent function with a
:class:`~workers.context.RunContext`. Beside the loop it runs its heartbeat, a share of the
reaper (:mod:`workers.reaper`) and of the scheduler (:mod:`workers.scheduler`).

How a run ends:

* the agent function returns -> ``completed``;
* it raises -> ``error`` with the exception's message (logged with its traceback);
* it was cancelled -> the cancel already wrote ``cancelled``; the worker only stops waiting
  once the agent raises :class:`~runstate.RunCancelled` at a safe point;
* a write was refused by the fence (a newer run or attempt owns the session) -> the run just
  stops, nothing is written.

Stopping (:meth:`Worker.stop`, SIGTERM/SIGINT in ``python -m workers``): no more entries are
read, runs in flight get ``shutdown_grace`` seconds to finish; then their tokens are cancelled
with the reason ``worker shutdown timeout`` and they get ``shutdown_cancel_wait`` more seconds
to reach a safe point, after which their tasks are cancelled outright. Each interrupted run is
requeued (``shutdown_mode="requeue"``, while attempts remain) or ended as ``error`` with a
message that says the worker shut down. Entries read but not claimed are put back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from runstate import (
    Coordinator,
    RedisUnavailable,
    RunCancelled,
    RunHandle,
    RunstateError,
    RunSuperseded,
    StaleRunError,
)
from runstate.client import client_option
from runstate.events import JSONObject
from runstate.keys import validate_worker_id
from runstate.queue import Queue
from runstate.queue_records import QueueEntry, RunOwner
from runstate.retry import TRANSIENT_ERRORS, cancel_and_wait, describe

from .context import Agent, RunContext
from .heartbeat import Heartbeat
from .reaper import Reaper
from .scheduler import Scheduler

log = logging.getLogger(__name__)

ShutdownMode = Literal["requeue", "error"]
SHUTDOWN_MODES: tuple[str, ...] = get_args(ShutdownMode)
SHUTDOWN_REASON = "worker shutdown timeout"
IDLE_POLL = 0.05  # pause after an empty read that came back at once (a server ignoring BLOCK)
MAX_BACKOFF = 5.0
MAX_ERROR_MESSAGE = 4000
RETRYABLE: tuple[type[BaseException], ...] = (RedisUnavailable, *TRANSIENT_ERRORS)


def default_worker_id() -> str:
    """``<host>-<pid>-<random>``, with the host name reduced to characters ids may hold."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(eq=False)
class _Running:
    handle: RunHandle
    ctx: RunContext
    task: asyncio.Task[Any]
    interrupted: bool = False  # the worker's shutdown cancelled it
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def usage(self) -> JSONObject | None:
        usage = self.ctx.usage
        return usage if isinstance(usage, dict) else None


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {what} > 0, got {value!r}")


class Worker:
    """Runs ``agent`` for the runs dispatched under ``coord``'s prefix.

    Args:
        coord: the coordinator (its client, prefix and settings are used).
        agent: ``async def agent(ctx: RunContext) -> None``.
        worker_id: this worker's unique id (default ``<host>-<pid>-<random>``).
        concurrency: the most runs in flight at once.
        heartbeat_interval: seconds between heartbeats.
        lost_after: seconds without a heartbeat after which this worker counts as lost and
            its runs are recovered by a reaper.
        reaper_interval: seconds between reaper passes (cluster-wide, whichever worker holds
            the lock).
        scan_interval: seconds between reaper passes that SCAN every runner hash.
        schedule_interval: seconds between checks for due scheduled runs.
        max_attempts: attempts a run gets before a lost worker (or a shutdown) ends it as
            ``error``.
        undispatched_after: seconds a pending run may go undispatched before a reaper
            dispatches it.
        stale_entry_after: seconds a read queue entry may stay unacknowledged before a reaper
            puts it back (default: ``lost_after``).
        shutdown_grace: seconds runs in flight get to finish after :meth:`stop`.
        shutdown_mode: what happens to runs still in flight after the grace period:
            ``"requeue"`` (while attempts remain) or ``"error"``.
        shutdown_cancel_wait: seconds a cancelled run gets to reach a safe point before its
            task is cancelled outright.
        block_ms: how long one queue read blocks; keep it below the client's socket timeout.

    Raises:
        ValueError: a bad setting, naming it.
    """

    def __init__(
        self,
        coord: Coordinator,
        agent: Agent,
        *,
        worker_id: str | None = None,
        concurrency: int = 10,
        heartbeat_interval: float = 5.0,
        lost_after: float = 30.0,
        reaper_interval: float = 10.0,
        scan_interval: float = 60.0,
        schedule_interval: float = 1.0,
        max_attempts: int = 3,
        undispatched_after: float = 30.0,
        stale_entry_after: float | None = None,
        shutdown_grace: float = 30.0,
        shutdown_mode: ShutdownMode = "requeue",
        shutdown_cancel_wait: float = 5.0,
        block_ms: int = 1000,
    ) -> None:
        if not callable(agent):
            raise TypeError(f"agent must be an async function taking a RunContext, got {agent!r}")
        _positive("concurrency", concurrency, integer=True)
        _positive("max_attempts", max_attempts, integer=True)
        _positive("block_ms", block_ms, integer=True)
        for name, value in (
            ("shutdown_grace", shutdown_grace),
            ("shutdown_cancel_wait", shutdown_cancel_wait),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        socket_timeout = _socket_timeout(coord)
        if socket_timeout is not None and block_ms / 1000 >= socket_timeout:
            raise ValueError(
                f"block_ms ({block_ms!r}) must be below the client's socket timeout "
                f"({socket_timeout:g}s), or every idle read would time out"
            )
        if shutdown_mode not in SHUTDOWN_MODES:
            raise ValueError(
                f"shutdown_mode must be one of {', '.join(map(repr, SHUTDOWN_MODES))}, "
                f"got {shutdown_mode!r}"
            )
        self.coord = coord
        self.agent = agent
        self.id = validate_worker_id(worker_id or default_worker_id())
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.shutdown_grace = shutdown_grace
        self.shutdown_mode: ShutdownMode = shutdown_mode
        self.shutdown_cancel_wait = shutdown_cancel_wait
        self.block_ms = block_ms
        self.queue = Queue(coord.store)
        self.heartbeat = Heartbeat(
            self.queue,
            self.id,
            interval=heartbeat_interval,
            lost_after=lost_after,
            concurrency=concurrency,
            runs=lambda: list(self._running),
            on_owners=self._check_owners,
        )
        self.reaper = Reaper(
            coord,
            self.queue,
            worker_id=self.id,
            interval=reaper_interval,
            scan_interval=scan_interval,
            max_attempts=max_attempts,
            undispatched_after=undispatched_after,
            stale_entry_after=lost_after if stale_entry_after is None else stale_entry_after,
        )
        self.scheduler = Scheduler(self.queue, interval=schedule_interval)
        self.ready = asyncio.Event()  # set once registered and reading
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._interrupting = False  # the grace period is over
        self._started = False
        self._tasks: dict[asyncio.Task[None], str] = {}  # entry tasks -> their entry id
        self._running: dict[tuple[str, str], _Running] = {}
        self._claiming: dict[tuple[str, str], asyncio.Event] = {}

    # ---- public -------------------------------------------------------------------------------

    @property
    def runs_in_flight(self) -> list[tuple[str, str]]:
        """``(session_id, run_id)`` of the runs this worker is running."""
        return list(self._running)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self, reason: str = "stop requested") -> None:
        """Stop reading and drain (see the module docstring); :meth:`run` then returns."""
        if not self._stopping.is_set():
            log.info(
                "worker %s stopping (%s): %d run(s) in flight, grace %.1fs",
                self.id,
                reason,
                len(self._running),
                self.shutdown_grace,
            )
            self._stopping.set()

    async def run(self) -> None:
        """Serve until :meth:`stop`, then drain and unregister.

        If the task running this is cancelled instead, in-flight runs are cancelled at once
        and nothing more is written: a reaper recovers them once the heartbeat lapses.

        Raises:
            RuntimeError: called twice.
            RedisUnavailable: Redis did not answer at startup.
        """
        if self._started:
            raise RuntimeError(f"worker {self.id} already ran; create a new Worker")
        self._started = True
        await self.queue.ensure_group()
        # Registered before the first read: a reaper never sees our runs without a heartbeat.
        await self.heartbeat.beat()
        loop = asyncio.get_running_loop()
        background = [
            loop.create_task(self.heartbeat.run(), name=f"heartbeat-{self.id}"),
            loop.create_task(self.reaper.run(), name=f"reaper-{self.id}"),
            loop.create_task(self.scheduler.run(), name=f"scheduler-{self.id}"),
        ]
        log.info(
            "worker %s started: prefix=%s concurrency=%d",
            self.id,
            self.coord.prefix,
            self.concurrency,
        )
        clean = False
        try:
            self.ready.set()
            await self._serve()
            await self._drain()
            clean = True
        finally:
            await _cancel_all([*self._tasks, *background])
            if clean:
                await self._unregister()
        log.info("worker %s stopped", self.id)

    def _check_owners(self, owners: list[RunOwner]) -> None:
        """Stop, at their next safe point, runs that are no longer ours (seen by a heartbeat).

        Fenced writes already refuse them; this also stops a run that only checkpoints, e.g.
        one a reaper requeued because our heartbeat lapsed while we were alive.
        """
        for owner in owners:
            running = self._running.get((owner.session_id, owner.run_id))
            if (
                running is None
                or running.handle.ended
                or owner.owned_by(self.id, running.handle.attempt)
                or owner.ended_by(self.id, running.handle.attempt)  # its end, written meanwhile
            ):
                continue
            if owner.status == "cancelled" and owner.current_run_id == owner.run_id:
                running.handle.token.cancel("cancelled")
                continue
            log.warning(
                "run %s of session %s was taken over (now %s, attempt %d, worker %r); stopping it",
                owner.run_id,
                owner.session_id,
                owner.status or "gone",
                owner.attempt,
                owner.worker,
            )
            running.handle.token.cancel(
                f"superseded: the session holds run {owner.current_run_id!r} ({owner.status})"
            )

    # ---- the read loop ------------------------------------------------------------------------

    async def _serve(self) -> None:
        backoff = 0.05
        recheck = False  # a read failed: its entries may be pending for us unseen
        while not self._stopping.is_set():
            free = self.concurrency - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await _wait_any(self._slot_freed, self._stopping)
                continue
            started = time.monotonic()
            try:
                if recheck:
                    entries = await self.queue.read_pending(self.id, free)
                    entries = [e for e in entries if e.id not in self._tasks.values()]
                    recheck = False
                else:
                    entries = await self.queue.read(self.id, free, self.block_ms)
            except Exception as exc:
                log.warning("worker %s: reading the queue failed (%s)", self.id, describe(exc))
                recheck = True
                await _wait_any(self._stopping, limit=backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = 0.05
            if not entries and time.monotonic() - started < self.block_ms / 2000:
                await _wait_any(self._stopping, limit=IDLE_POLL)
            for entry in entries:
                task = asyncio.get_running_loop().create_task(
                    self._process(entry), name=f"entry-{entry.id}"
                )
                self._tasks[task] = entry.id
                task.add_done_callback(self._entry_done)
            if entries:
                # Two loop turns let the new tasks send their claims before the next blocking
                # read goes out: sent first, the read delayed every claim by a send (~0.4 ms).
                for _ in range(2):
                    await asyncio.sleep(0)

    def _entry_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("worker %s: entry task failed", self.id, exc_info=task.exception())

    async def _process(self, entry: QueueEntry) -> None:
        sid, run_id = entry.session_id, entry.run_id
        if sid is None or run_id is None:
            log.warning("worker %s: dropping malformed queue entry %s", self.id, entry.id)
            await self._ack(entry)
            return
        key = (sid, run_id)
        while True:
            if (here := self._running.get(key)) is not None:
                # A second entry for a run we are running: a duplicate, or the run was requeued
                # while this (now stale) attempt still runs here. Claim once it has ended: the
                # claim is refused for a duplicate and takes the new attempt otherwise.
                await here.finished.wait()
            elif (claiming := self._claiming.get(key)) is not None:
                # Two entries for one run read together: a claim by this worker of a run it
                # already claimed is answered as a retry, so the second must not claim until
                # the first is settled (and then it finds the run running here, above).
                await claiming.wait()
            else:
                break
        if self._stopping.is_set():
            await self._hand_back_entry(entry)
            return
        claiming = self._claiming[key] = asyncio.Event()
        try:
            handle = await self._claim(entry, sid, run_id)
        finally:
            del self._claiming[key]
            claiming.set()  # the waiters run after _execute has registered the run
        if handle is not None:
            await self._execute(handle)

    async def _claim(self, entry: QueueEntry, sid: str, run_id: str) -> RunHandle | None:
        backoff = 0.1
        while True:
            try:
                # The entry is acknowledged in the claim's round trip, whatever its answer.
                handle = await self.coord.claim(sid, run_id, self.id, ack=entry.id)
            except StaleRunError as exc:
                log.info("worker %s: not claiming session=%s run=%s: %s", self.id, sid, run_id, exc)
                return None
            except Exception as exc:
                if isinstance(exc, RunstateError | ValueError) and not isinstance(exc, RETRYABLE):
                    # Junk in the session's keys: retrying cannot help, and must not hold a slot.
                    log.error(
                        "worker %s: cannot claim session=%s run=%s: %s", self.id, sid, run_id, exc
                    )
                    await self._ack(entry)
                    return None
                # Not acknowledged: if the claim did land, retrying it is answered the same
                # (claims by one worker are idempotent); if we stop, the entry is put back.
                log.warning("worker %s: claim of run %s failed (%r)", self.id, run_id, exc)
                if self._stopping.is_set():
                    return None
                await _wait_any(self._stopping, limit=backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            return handle

    async def _ack(self, entry: QueueEntry) -> None:
        try:
            await self.queue.ack(entry.id)
        except Exception as exc:  # the entry stays pending; a later claim of it is refused
            log.warning("worker %s: ack of queue entry %s failed (%r)", self.id, entry.id, exc)

    async def _hand_back_entry(self, entry: QueueEntry) -> None:
        try:
            await self.queue.redeliver(entry)
        except Exception as exc:  # it stays pending for us; a reaper will put it back
            log.warning("worker %s: could not put entry %s back (%r)", self.id, entry.id, exc)

    # ---- one run ------------------------------------------------------------------------------

    async def _execute(self, handle: RunHandle) -> None:
        key = (handle.session_id, handle.run_id)
        ctx = RunContext(self.coord, self.queue, handle, worker_id=self.id)
        task = asyncio.get_running_loop().create_task(
            self._call_agent(ctx), name=f"run-{handle.session_id}-{handle.run_id}"
        )
        running = self._running[key] = _Running(handle, ctx, task)
        if self._interrupting:  # claimed just as the grace period ran out
            running.interrupted = True
            handle.token.cancel(SHUTDOWN_REASON)
        log.info(
            "run started: session=%s run=%s attempt=%d worker=%s",
            handle.session_id,
            handle.run_id,
            handle.attempt,
            self.id,
        )
        started = time.monotonic()
        try:
            await asyncio.wait({task})
            outcome = await self._settle(running)
        finally:
            if not task.done():
                task.cancel()
            self.coord.release(handle)
            del self._running[key]
            running.finished.set()
            await asyncio.gather(task, return_exceptions=True)
            await handle.close()  # a batched write of a cancelled run may still be in flight
            await ctx._close()
        log.info(
            "run ended: session=%s run=%s attempt=%d outcome=%s after %.2fs",
            handle.session_id,
            handle.run_id,
            handle.attempt,
            outcome,
            time.monotonic() - started,
        )

    async def _call_agent(self, ctx: RunContext) -> None:
        result = self.agent(ctx)
        if not inspect.isawaitable(result):
            raise TypeError(
                f"the agent {self.agent!r} returned {type(result).__name__}, not an awaitable: "
                "it must be an async function"
            )
        await result

    async def _settle(self, running: _Running) -> str:
        """Write the run's end (or hand it back) from its task's outcome; returns the outcome."""
        handle, task = running.handle, running.task
        exc = None if task.cancelled() else task.exception()
        sid, run_id = handle.session_id, handle.run_id
        if running.interrupted and (task.cancelled() or isinstance(exc, StaleRunError)):
            return await self._hand_back_run(handle)
        if task.cancelled():
            exc = RuntimeError("the run function was cancelled (asyncio.CancelledError)")
        if exc is None:
            return await self._write_end(handle, None, running.usage())
        if isinstance(exc, StaleRunError) and handle.token.cancel_called:
            # Cancelled or superseded: the cancel (or the newer generation) owns the status.
            if isinstance(exc, RunSuperseded) or "superseded" in (handle.token.reason or ""):
                return "superseded"
            return "cancelled"
        log.error(
            "run failed: session=%s run=%s attempt=%d: %s",
            sid,
            run_id,
            handle.attempt,
            exc,
            exc_info=exc,
        )
        message = str(exc) or type(exc).__name__
        return await self._write_end(handle, message[:MAX_ERROR_MESSAGE])

    async def _write_end(
        self, handle: RunHandle, error: str | None, usage: JSONObject | None = None
    ) -> str:
        """complete() or fail(); the run must not stay ``running`` behind a live worker.

        Redis errors are retried (until the shutdown gives up on the run). A ``complete``
        event that cannot be written (e.g. ``ctx.usage`` is not JSON or too large) ends the
        run as ``error`` saying so.
        """
        backoff = 0.1
        while True:
            try:
                if error is None:
                    await handle.complete(usage)
                    return "completed"
                await handle.fail(error)
                return "error"
            except RunCancelled:
                return "cancelled"
            except StaleRunError:
                return "superseded"
            except RETRYABLE as exc:
                if self._interrupting:
                    log.error("run %s: could not write its end (%r); giving up", handle.run_id, exc)
                    return "abandoned"
                log.warning("run %s: writing its end failed (%r); retrying", handle.run_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception as exc:
                if error is not None and error == type(exc).__name__:
                    log.exception("run %s: cannot write its end; giving up", handle.run_id)
                    return "abandoned"
                log.error("run %s: its end was refused: %r", handle.run_id, exc)
                error = (
                    f"the run returned, but its complete event was refused: {exc}"
                    if error is None
                    else type(exc).__name__
                )[:MAX_ERROR_MESSAGE]

    async def _hand_back_run(self, handle: RunHandle) -> str:
        """Requeue or fail a run interrupted by this worker's shutdown (fenced on its attempt)."""
        budget = self.max_attempts if self.shutdown_mode == "requeue" else 0
        try:
            outcome = await self.queue.recover(
                handle.session_id,
                handle.run_id,
                status="running",
                attempt=handle.attempt,
                worker=self.id,
                max_attempts=budget,
                message=(
                    f"{SHUTDOWN_REASON}: worker {self.id!r} shut down before the run finished "
                    f"(grace {self.shutdown_grace:g}s, shutdown_mode={self.shutdown_mode!r})"
                ),
            )
        except Exception as exc:  # our heartbeat stops; a reaper recovers it
            log.error("run %s: could not hand it back (%r)", handle.run_id, exc)
            return "abandoned"
        return {"requeued": "requeued (shutdown)", "error": "error (shutdown)"}.get(
            outcome, "cancelled"
        )

    # ---- stopping -----------------------------------------------------------------------------

    async def _drain(self) -> None:
        tasks = set(self._tasks)
        if not tasks:
            return
        log.info(
            "worker %s: waiting up to %.1fs for %d run(s)", self.id, self.shutdown_grace, len(tasks)
        )
        _, left = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        if not left:
            return
        self._interrupting = True
        log.warning(
            "worker %s: %d run(s) still in flight after the grace period; cancelling them",
            self.id,
            len(self._running),
        )
        for running in self._running.values():
            running.interrupted = True
            running.handle.token.cancel(SHUTDOWN_REASON)
        _, left = await asyncio.wait(left, timeout=self.shutdown_cancel_wait)
        if left:
            for running in self._running.values():
                running.task.cancel()  # it did not reach a safe point in time
            await asyncio.wait(left)

    async def _unregister(self) -> None:
        try:
            for entry in await self.queue.read_pending(self.id):
                await self._hand_back_entry(entry)
            await self.queue.retire(self.id)
            await self.queue.delete_consumer(self.id)
        except Exception as exc:  # a reaper cleans up after us
            log.warning("worker %s: unregistering failed (%r)", self.id, exc)


def _socket_timeout(coord: Coordinator) -> float | None:
    value = client_option(coord.client, "socket_timeout")
    return float(value) if isinstance(value, int | float) else None


async def _wait_any(*events: asyncio.Event, limit: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``limit`` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for them to end (see :func:`runstate.retry.cancel_and_wait`)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        await cancel_and_wait(task)

"""A claimed run as its owner sees it: the fenced writer of its events and its cancel token."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from .cancellation import CancelToken, wake
from .codec import EncodedEvent
from .errors import RedisUnavailable, RunCancelled, StaleRunError
from .events import AgentEvent, Complete, Error, JSONObject, coerce_event
from .replies import Claimed
from .retry import TRANSIENT_ERRORS, cancel_and_wait
from .store import Store

# A write that failed with one of these may or may not have been applied.
# (Cancelled too: a write cancelled in flight may or may not have reached Redis.)
UNKNOWN_OUTCOME: tuple[type[BaseException], ...] = (
    RedisUnavailable,
    asyncio.CancelledError,
    *TRANSIENT_ERRORS,
)

T = TypeVar("T")


class RunHandle:
    """Writes one run's events, fenced by run_id and attempt, numbered for idempotent retries.

    Obtained from :meth:`runstate.Coordinator.claim`. A write refused by the fence raises
    :class:`RunCancelled` (the run was cancelled) or :class:`RunSuperseded` (a newer run or
    attempt owns the session); neither touches the newer run.

    If a write fails because Redis stayed unreachable, its events are kept and written ahead of
    the next write (never twice: the script skips sequence numbers it has already stored), so
    do not emit them again.

    For token streaming, :meth:`stream` queues events and writes them in batches: one round
    trip per ``batch_size`` events, or ``batch_delay`` seconds after the first one queued.
    """

    def __init__(
        self,
        store: Store,
        claimed: Claimed,
        token: CancelToken,
        *,
        batch_size: int = 64,
        batch_delay: float = 0.005,
    ) -> None:
        if batch_size < 1 or batch_delay < 0:
            raise ValueError(
                f"batch_size must be >= 1 and batch_delay >= 0, got {batch_size!r}, {batch_delay!r}"
            )
        self._store = store
        self.session_id = claimed.session_id
        self.run_id = claimed.run_id
        self.attempt = claimed.attempt
        self.payload: Any = claimed.payload
        self.parent = claimed.parent
        self.token = token
        self._seq = claimed.seq  # the last sequence number known written
        self._unsent: list[EncodedEvent] = []  # events of a write whose outcome is unknown
        self._queued: list[EncodedEvent] = []  # stream()ed events not yet written
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._flush_error: BaseException | None = None
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.ended = False

    @property
    def seq(self) -> int:
        """The sequence number of the last event written."""
        return self._seq

    @property
    def cancelled(self) -> bool:
        return self.token.cancel_called

    async def checkpoint(self) -> None:
        """The safe point: raise :class:`RunCancelled` if this run was cancelled."""
        await asyncio.sleep(0)
        self._raise_flush_error()
        if self.token.cancel_called:
            raise self._cancelled()

    def _cancelled(self) -> RunCancelled:
        return RunCancelled(self.session_id, self.run_id, self.token.reason or "cancelled")

    async def cancellable(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (e.g. a model call) as a safe point that does not wait for it.

        Returns its result; if the run is cancelled first, the awaitable's task is cancelled
        and :class:`RunCancelled` is raised the moment the cancel arrives, not after the call.

        Raises:
            RunCancelled: the run was cancelled (before or while waiting).
        """
        try:
            await self.checkpoint()
        except BaseException:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never started: no "never awaited" warning
            elif isinstance(awaitable, asyncio.Future):
                awaitable.cancel()  # a task the caller started: it must not run on
            raise
        work = asyncio.ensure_future(awaitable)
        if not work.done():
            # One future for both ends of the wait, completed by the token (at the cancel) or by
            # the call's end: the cancel wakes this task in one turn of the event loop.
            waiter = self.token.waiter()
            work.add_done_callback(lambda _: wake(waiter))
            try:
                await waiter
            finally:
                finished = work.done()
                waiter.cancel()
                # Cancelled, or our own task is being cancelled: the call must not run on (a
                # cancel swallowed inside redis-py's connect is sent again).
                await cancel_and_wait(work)
            if not finished:
                raise self._cancelled()
        return work.result()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or raise :class:`RunCancelled` as soon as the run is cancelled."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TypeError(f"seconds must be a number, got {type(seconds).__name__}: {seconds!r}")
        if math.isnan(seconds):
            raise ValueError(f"seconds must be a number, got {seconds!r}")
        await self.checkpoint()
        # One future, completed by a timer or by the cancel: no call to stop, so the cancel
        # raises in the turn that delivers it (cancellable() also waits for its call to end).
        waiter = self.token.waiter()
        timer = asyncio.get_running_loop().call_later(seconds, wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            waiter.cancel()
        if self.token.cancel_called:
            raise self._cancelled()

    async def emit(self, event: AgentEvent | JSONObject) -> str:
        """Write one event (a model, or a dict with a ``type``); returns its stream id."""
        ids = await self.emit_many([event])
        return ids[-1]

    async def emit_many(self, events: Sequence[AgentEvent | JSONObject]) -> list[str]:
        """Write several events in one round trip, in order; returns their stream ids.

        Raises:
            UnknownEventType, EventTooLarge, ValueError: a bad event; nothing of the batch is
                written and the run goes on.
            RunCancelled, RunSuperseded: the fence refused the write.
            RedisUnavailable: Redis stayed unreachable; the events are kept and written ahead
                of the next write.
        """
        batch = self._store.encode([coerce_event(e) for e in events])
        self._raise_flush_error()
        async with self._lock:
            ids = await self._write(batch)
            return ids[len(ids) - len(batch) :]

    async def stream(self, event: AgentEvent | JSONObject) -> None:
        """Queue an event for a batched write: the way to send tokens.

        Queued events are written in order, in one round trip, as soon as ``batch_size`` are
        queued or ``batch_delay`` seconds after the first; :meth:`emit`, :meth:`flush`,
        :meth:`complete` and :meth:`fail` write them first. The event is validated now; a write
        that fails later is raised by the next call to this handle (a refused write also
        cancels the token, so the next checkpoint stops the run).
        """
        encoded = self._store.encode([coerce_event(event)])
        self._raise_flush_error()
        self._queued.extend(encoded)
        if len(self._queued) >= self.batch_size:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_later())

    async def flush(self) -> list[str]:
        """Write the queued events now; returns their stream ids."""
        async with self._lock:
            return await self._write([])

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self.batch_delay)
            self._timer = None
            await self.flush()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # raised to the agent by its next call
            self._flush_error = exc

    def _raise_flush_error(self) -> None:
        if self._flush_error is not None:
            exc, self._flush_error = self._flush_error, None
            raise exc

    async def close(self) -> None:
        """Stop the batch timer and wait for a batched write in flight (the run is over)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        async with self._lock:  # a flush that had already started finishes first
            pass

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _write(self, batch: list[EncodedEvent]) -> list[str]:
        pending = self._unsent + self._queued + batch
        self._queued = []
        if not pending:
            return []
        try:
            ids = await self._store.emit(
                self.session_id, self.run_id, self.attempt, self._seq + 1, pending
            )
        except StaleRunError as exc:
            self._unsent = []
            self._refused(exc)
            raise
        except UNKNOWN_OUTCOME:
            self._unsent = pending  # the outcome is unknown: retried, never doubled, by seq
            raise
        self._unsent = []
        self._seq += len(pending)
        return ids

    async def complete(self, usage: JSONObject | None = None) -> None:
        """End the run as ``completed`` with a ``complete`` event."""
        await self._finish(Complete(usage=usage), None)

    async def fail(self, message: str) -> None:
        """End the run as ``error`` with an ``error`` event carrying ``message``."""
        await self._finish(Error(message=message), message)

    async def _finish(self, event: AgentEvent, error: str | None) -> None:
        self._stop_timer()
        async with self._lock:
            if self._unsent or self._queued:
                await self._write([])  # queued and failed writes first: the terminal event last
            try:
                await self._store.finish(self.session_id, self.run_id, self.attempt, event, error)
            except StaleRunError as exc:
                self._refused(exc)
                raise
            self.ended = True

    def _refused(self, exc: StaleRunError) -> None:
        self.ended = True
        self._stop_timer()
        self._queued = []
        self.token.cancel("cancelled" if isinstance(exc, RunCancelled) else f"superseded: {exc}")

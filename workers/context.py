"""What a run function sees: :class:`RunContext`, and a :class:`ChildRun` per spawned run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol, TypeVar

from runstate import Coordinator, RunCancelled, RunHandle, RunstateError, StaleRunError
from runstate.cancellation import CancelToken
from runstate.events import AgentEvent, JSONObject, SubAgentCompleted, SubAgentStarted
from runstate.keys import run_ref, validate_session_id
from runstate.models import AlreadyRunning, RunStatus
from runstate.queue import Queue
from runstate.retry import cancel_and_wait

log = logging.getLogger(__name__)

T = TypeVar("T")
TERMINAL_STATUS = {"complete": "completed", "cancelled": "cancelled", "error": "error"}


class Agent(Protocol):
    """A run function: ``async def agent(ctx: RunContext) -> None``."""

    def __call__(self, ctx: RunContext, /) -> Awaitable[Any]: ...


class SpawnError(RunstateError):
    """A child run could not be started (e.g. its session already has an active run).

    Attributes:
        child_session_id: the session the child was to run in.
        active_run_id: the run already active there, if that was the reason.
    """

    def __init__(self, message: str, child_session_id: str, active_run_id: str = "") -> None:
        super().__init__(message)
        self.child_session_id = child_session_id
        self.active_run_id = active_run_id


class ChildRun:
    """A run spawned by :meth:`RunContext.spawn`, watched by the parent's worker.

    Attributes:
        session_id: the child's session.
        run_id: the child's run.
        status: the child's terminal status (``completed``, ``cancelled``, ``error``, or
            ``unknown`` if its run vanished), None while it is active.
    """

    def __init__(self, session_id: str, run_id: str, parent: RunContext) -> None:
        self.session_id = session_id
        self.run_id = run_id
        self.status: str | None = None
        self._done = asyncio.Event()
        self._parent = parent

    async def wait(self) -> str:
        """Wait until the child ended (and ``sub_agent_completed`` was written); its status.

        Raises:
            RunCancelled: the parent run was cancelled while waiting (a safe point).
        """
        waiters = {
            asyncio.ensure_future(self._done.wait()),
            asyncio.ensure_future(self._parent.token.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if self.status is None:
            parent = self._parent
            raise RunCancelled(parent.session_id, parent.run_id, parent.token.reason or "cancelled")
        return self.status

    def _finish(self, status: str) -> None:
        self.status = status
        self._done.set()

    def __repr__(self) -> str:
        return f"<ChildRun {self.session_id!r} {self.run_id!r} status={self.status!r}>"


class RunContext:
    """The run function's view of its run: identity, payload, events, safe points, spawning.

    Created by the worker for each claimed run; every write goes through the run's fenced
    :class:`~runstate.RunHandle`, so a run that was cancelled or superseded cannot write.

    Attributes:
        session_id: the run's session.
        run_id: the run (one generation of the session).
        attempt: 1 for the first attempt, more after a lost worker's run was requeued.
        payload: the JSON value given to ``execute``.
        worker_id: the worker running it.
        parent: ``"<session> <run_id>"`` of the run that spawned this one, or None.
        usage: set it to a JSON object (e.g. token counts) to report it in the run's
            ``complete`` event.
    """

    def __init__(
        self, coord: Coordinator, queue: Queue, handle: RunHandle, *, worker_id: str
    ) -> None:
        self._coord = coord
        self._queue = queue
        self._handle = handle
        self.session_id = handle.session_id
        self.run_id = handle.run_id
        self.attempt = handle.attempt
        self.payload: Any = handle.payload
        self.parent = handle.parent
        self.worker_id = worker_id
        self.usage: JSONObject | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self.children: list[ChildRun] = []

    @property
    def token(self) -> CancelToken:
        """The run's cancel token (``cancel_called``, ``reason``, ``await wait()``)."""
        return self._handle.token

    @property
    def cancelled(self) -> bool:
        """True once the run was asked to stop (by a cancel, a shutdown, or a refused write)."""
        return self._handle.cancelled

    async def checkpoint(self) -> None:
        """The safe point: raise :class:`~runstate.RunCancelled` if the run must stop.

        Raises:
            RunCancelled: the run was cancelled; let it propagate.
        """
        await self._handle.checkpoint()

    async def cancellable(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (e.g. a model call) as a safe point that does not wait for it:
        a cancel cancels it and raises :class:`~runstate.RunCancelled` at once.
        See :meth:`runstate.RunHandle.cancellable`."""
        return await self._handle.cancellable(awaitable)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or raise :class:`~runstate.RunCancelled` as soon as cancelled."""
        await self._handle.sleep(seconds)

    async def emit(self, event: AgentEvent | JSONObject) -> str:
        """Write one event to the session's stream; returns its stream id.

        Args:
            event: a model from :mod:`runstate.events` (or an application's registered
                subclass), or a dict with a ``type``, validated the same way.

        Raises:
            RunCancelled / RunSuperseded: the run no longer owns the session; let it propagate.
            UnknownEventType, ValueError, TypeError: an invalid event (nothing written).
        """
        return await self._handle.emit(event)

    async def stream(self, event: AgentEvent | JSONObject) -> None:
        """Queue an event (a token) for a batched write; see :meth:`runstate.RunHandle.stream`."""
        await self._handle.stream(event)

    async def emit_many(self, events: Sequence[AgentEvent | JSONObject]) -> list[str]:
        """Write several events in one round trip, in order; returns their stream ids."""
        return await self._handle.emit_many(events)

    async def spawn(self, child_session_id: str, payload: Any = None) -> ChildRun:
        """Start a child run in another session, linked to this run.

        The child is dispatched to the worker pool; this run's stream gets ``sub_agent_started``
        now and ``sub_agent_completed{status}`` when the child ends (if this run is still
        running then). Cancelling this run cancels the child.

        Raises:
            SpawnError: the child session already has an active run.
            RunCancelled / RunSuperseded: this run no longer owns its session (the child, if it
                was already reserved, is cancelled).
            ValueError / TypeError: a bad session id or a payload that is not JSON.
        """
        validate_session_id(child_session_id)
        await self.checkpoint()
        me = run_ref(self.session_id, self.run_id)
        result = await self._coord.execute(child_session_id, payload, parent=me)
        if isinstance(result, AlreadyRunning):
            raise SpawnError(
                f"cannot spawn a child in session {child_session_id!r}: it already has an "
                f"active run {result.run_id!r}; spawn into a session with no active run",
                child_session_id,
                result.run_id,
            )
        child = ChildRun(child_session_id, result.run_id, self)
        try:
            # Fenced on this run still running: if a cancel got here between execute() and the
            # link, it did not see the child, so the child is cancelled below instead.
            await self._queue.link_child(
                self.session_id, self.run_id, self.attempt, child.session_id
            )
        except StaleRunError:
            await self._cancel_orphan(child)
            raise
        await self.emit(
            SubAgentStarted(child_session_id=child.session_id, child_run_id=child.run_id)
        )
        self.children.append(child)
        task = asyncio.get_running_loop().create_task(
            self._watch(child), name=f"runstate-child-{child.session_id}"
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return child

    async def _cancel_orphan(self, child: ChildRun) -> None:
        store = self._coord.store
        reason = f"parent {self.session_id!r} stopped before the child was linked"
        outcome = await store.cancel(child.session_id, reason, run_id=child.run_id)
        if outcome.cancelled and outcome.run_id:
            await store.after_cancel(child.session_id, outcome.run_id)

    async def _watch(self, child: ChildRun) -> None:
        status = "unknown"
        try:
            status = await self._child_outcome(child)
            with contextlib.suppress(StaleRunError):  # the parent ended first: nothing to tell
                await self.emit(
                    SubAgentCompleted(
                        child_session_id=child.session_id, child_run_id=child.run_id, status=status
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watching child %r of %r failed", child.session_id, self.session_id)
        finally:
            child._finish(status)

    async def _child_outcome(self, child: ChildRun) -> str:
        async for item in self._coord.subscribe(child.session_id):
            if item.event.is_terminal and item.run_id == child.run_id:
                return TERMINAL_STATUS.get(item.event.type, item.event.type)
            if item.event.is_terminal:
                break  # another run's end: the child's was not in the window, ask the hash
        state = await self._coord.runner(child.session_id)
        if (
            state is not None
            and state.run_id == child.run_id
            and state.status in RunStatus.TERMINAL
        ):
            return str(state.status)
        return "unknown"

    async def _close(self) -> None:
        """Stop watching children (the run ended; its stream takes no more writes)."""
        for task in list(self._watchers):
            await cancel_and_wait(task)
        for child in self.children:
            if child.status is None:
                child._finish("unknown")

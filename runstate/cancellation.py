"""Cancellation of running runs across processes.

A cancel (``Coordinator.cancel``) writes the terminal status and a durable marker
(``{sid}:cancel`` = run_id) in one script, then publishes ``"<sid> <run_id>"`` on the cancel
channel. A :class:`CancelWatcher` serves every run of a process over one pub/sub connection and,
because pub/sub messages are lost while a connection is down, also polls the markers of its runs
every ``poll_interval`` seconds (and at once after reconnecting). Runs see the cancel at their
next safe point through their :class:`CancelToken`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .keys import parse_run_ref
from .retry import TRANSIENT_ERRORS, cancel_and_wait, describe
from .store import Store

log = logging.getLogger(__name__)


def wake(future: asyncio.Future[None]) -> None:
    """Complete a waiter future, unless something else (or a cancellation) already did."""
    if not future.done():
        future.set_result(None)


class CancelToken:
    """The cancellation state of one run (the vocabulary of anyio's ``CancelScope``)."""

    __slots__ = ("_called", "_waiters", "reason")

    def __init__(self) -> None:
        self._called = False
        self._waiters: list[asyncio.Future[None]] = []  # see waiter()
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop at its next safe point; the first reason given is kept."""
        if not self._called:
            self._called = True
            self.reason = reason
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                wake(waiter)

    @property
    def cancel_called(self) -> bool:
        return self._called

    async def wait(self) -> None:
        """Return once the token is cancelled."""
        await self.waiter()

    def waiter(self) -> asyncio.Future[None]:
        """A future the token completes when it is cancelled (already done if it is), for a
        waiter that also waits for something else: whoever completes it first wakes its task,
        in one turn of the event loop (a task awaiting :meth:`wait` alongside takes three).
        Cancel it, or let it be done, when no longer waiting: the token drops such futures."""
        future = asyncio.get_running_loop().create_future()
        if self._called:
            future.set_result(None)
        else:
            self._waiters = [w for w in self._waiters if not w.done()]
            self._waiters.append(future)
        return future


class CancelWatcher:
    """Delivers cancels of the runs this process is running to their tokens.

    Args:
        store: where markers are read and the channel lives.
        poll_interval: seconds between marker polls (the bound on a cancel's latency when
            pub/sub messages are lost).
    """

    def __init__(self, store: Store, *, poll_interval: float = 1.0) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval!r}")
        self._store = store
        self.poll_interval = poll_interval
        self._runs: dict[str, tuple[str, CancelToken]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self.listening = asyncio.Event()  # set while the pub/sub subscription is up

    def watch(self, session_id: str, run_id: str, token: CancelToken | None = None) -> CancelToken:
        """Start delivering cancels of ``run_id`` to a token (a new one unless given)."""
        token = token or CancelToken()
        self._runs[session_id] = (run_id, token)
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen(), name="runstate-cancel-listen"),
                loop.create_task(self._poll_loop(), name="runstate-cancel-poll"),
            ]
        return token

    def unwatch(self, session_id: str, run_id: str) -> None:
        current = self._runs.get(session_id)
        if current is not None and current[0] == run_id:
            del self._runs[session_id]

    def _deliver(self, session_id: str, run_id: str, reason: str = "cancelled") -> bool:
        current = self._runs.get(session_id)
        if current is None or current[0] != run_id or current[1].cancel_called:
            return False
        current[1].cancel(reason)
        return True

    async def poll(self) -> None:
        """Check the cancel markers of every watched run once."""
        runs = list(self._runs.items())
        if not runs:
            return
        markers = await self._store.cancel_markers([sid for sid, _ in runs])
        for (sid, (run_id, _)), marker in zip(runs, markers, strict=True):
            if marker == run_id:
                self._deliver(sid, run_id)

    async def _poll_loop(self) -> None:
        # On a fixed cadence: a slow poll does not push the next one back, so a cancel whose
        # nudge was lost waits at most one interval (plus the read) whatever the polls cost.
        # Polls slower than the interval (Redis struggling) still leave half of it between them.
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due = max(due + self.poll_interval, loop.time() + self.poll_interval / 2)
            await asyncio.sleep(due - loop.time())
            try:
                await self.poll()
            except Exception as exc:  # never let a poll kill the watcher
                log.warning("cancel poll failed: %r", exc)

    async def _listen(self) -> None:
        wait = 0.05
        channel = self._store.keys.cancel_channel
        while True:
            pubsub = None
            try:
                if self._store.cluster:  # its pub/sub needs the slot map the first command loads
                    await self._store.client.initialize()
                pubsub = self._pubsub = self._store.client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(channel)
                self.listening.set()
                wait = 0.05
                await self.poll()  # whatever was published while we were not listening
                async for message in pubsub.listen():
                    if self._on_message(message):
                        # The run woken goes first; reading on would keep it waiting.
                        await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except TRANSIENT_ERRORS as exc:
                log.warning(
                    "cancel listener lost Redis (%s); retrying in %.2fs", describe(exc), wait
                )
            except Exception as exc:
                log.error("cancel listener failed: %r; retrying in %.2fs", exc, wait)
            finally:
                self.listening.clear()
                # Shielded: closing must finish even if we are being cancelled, or the
                # connection is left open until garbage collection.
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(wait)
            wait = min(wait * 2, 2.0)

    def _on_message(self, message: dict[str, Any]) -> bool:
        """Deliver a cancel message; True if it cancelled a run of ours."""
        if message.get("type") != "message":
            return False
        data = message.get("data")
        ref = parse_run_ref(data)
        if ref is None:
            log.warning("ignoring malformed cancel message %r", data)
            return False
        return self._deliver(*ref)

    async def aclose(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []

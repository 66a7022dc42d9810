"""The Coordinator: runstate's public entry point (DESIGN §6)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis

from .cancellation import CancelWatcher
from .client import client_option, connect
from .config import load_settings
from .errors import RedisUnavailable, RunstateError
from .events import DEFAULT_MAX_EVENT_BYTES, StreamEvent
from .hub import Hub
from .keys import Keys, run_ref, validate_session_id
from .models import ReserveResult, RunnerState, RunStatus
from .retry import RetryPolicy
from .run import RunHandle
from .store import DEFAULT_CRITICAL_CAP, DEFAULT_MAXLEN, DEFAULT_RETENTION, Store
from .subscription import subscribe, subscribe_batches

log = logging.getLogger(__name__)


class Coordinator:
    """Runs, events and cancellation of many sessions, shared through Redis.

    Args:
        client: a redis-py asyncio client made with ``decode_responses=True`` (and, like
            :meth:`from_url`'s, ``encoding_errors="replace"``, so that bytes written by hand
            that are not UTF-8 read as junk to skip rather than failing the reply they are in).
            A :class:`~redis.asyncio.RedisCluster` must be initialised first (``await
            client.initialize()``): before, redis-py sends commands to random nodes.
        prefix: the prefix of every key (default ``runstate``).
        retention: seconds a finished session's keys are kept (default 1 hour; 0 keeps them).
        maxlen: approximate cap of each session's event stream (default 1000).
        critical_cap: critical events kept per run for replay (default 32).
        max_event_bytes: the largest event or payload accepted (default 1 MiB).
        retry: how transient Redis errors are retried.
        block_ms: how long the event reader blocks in one XREAD.
        subscriber_buffer: events one subscriber may have pending before it catches up from
            Redis by itself (it never slows the others down).
        cancel_poll_interval: seconds between cancel-marker polls, the fallback for lost
            pub/sub messages.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "runstate",
        retention: int = DEFAULT_RETENTION,
        maxlen: int = DEFAULT_MAXLEN,
        critical_cap: int = DEFAULT_CRITICAL_CAP,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        retry: RetryPolicy | None = None,
        block_ms: int = 5000,
        subscriber_buffer: int = 1024,
        cancel_poll_interval: float = 1.0,
        owns_client: bool = False,
    ) -> None:
        if not client_option(client, "decode_responses", True):
            raise ValueError("runstate needs a Redis client created with decode_responses=True")
        self.client = client
        self.keys = Keys(prefix)
        self.store = Store(
            client,
            self.keys,
            maxlen=maxlen,
            critical_cap=critical_cap,
            retention=retention,
            max_event_bytes=max_event_bytes,
            retry=retry,
        )
        self._hub = Hub(self.store, block_ms=block_ms, buffer=subscriber_buffer)
        self._cancel_poll_interval = cancel_poll_interval
        self._watcher: CancelWatcher | None = None
        self._owns_client = owns_client

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        prefix: str | None = None,
        *,
        max_connections: int = 64,
        cluster: bool | None = None,
        **kwargs: Any,
    ) -> Coordinator:
        """A Coordinator on its own connection pool.

        Args:
            url: ``redis://``, ``rediss://`` or ``unix://`` URL; defaults to
                ``$RUNSTATE_REDIS_URL``.
            prefix: key prefix; defaults to ``$RUNSTATE_PREFIX``, then ``runstate``.
            max_connections: the size of the connection pool (callers wait for a free one);
                on a cluster, per node.
            cluster: the URL names a node of a Redis Cluster; defaults to
                ``$RUNSTATE_REDIS_CLUSTER``, then False.
            kwargs: passed on to :class:`Coordinator`.

        Raises:
            ValueError: no URL given and none in the environment.
        """
        settings = load_settings(url, prefix, cluster)
        if not settings.redis_url:
            raise ValueError(
                "no Redis URL: pass one (e.g. 'redis://localhost:6379/0') or set RUNSTATE_REDIS_URL"
            )
        client = connect(
            settings.redis_url, cluster=settings.cluster, max_connections=max_connections
        )
        return cls(client, prefix=settings.prefix, owns_client=True, **kwargs)

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    @property
    def cancel_watcher(self) -> CancelWatcher:
        """This process's cancel watcher (one pub/sub connection for all of its runs)."""
        if self._watcher is None:
            self._watcher = CancelWatcher(self.store, poll_interval=self._cancel_poll_interval)
        return self._watcher

    # ---- starting runs ----------------------------------------------------------------------

    async def try_reserve(
        self, session_id: str, payload: Any = None, *, parent: str | None = None
    ) -> ReserveResult:
        """Reserve the session for a new run that the caller will run itself (see :meth:`claim`).

        Returns:
            Reserved(run_id) for a fresh pending run, or AlreadyRunning(run_id) naming the
            session's active run (nothing changed).
        """
        validate_session_id(session_id)
        return await self.store.reserve(session_id, payload, parent=parent or "", mode="local")

    async def execute(
        self,
        session_id: str,
        payload: Any = None,
        delay: float | None = None,
        *,
        at: datetime | None = None,
        parent: str | None = None,
    ) -> ReserveResult:
        """Reserve a run and hand it to the worker pool, now or later.

        Args:
            payload: the run's input, any JSON value (read by the agent as ``ctx.payload``).
            delay: seconds to wait before dispatching.
            at: when to dispatch (a timezone-aware datetime).

        Raises:
            ValueError: a bad session id, a negative or non-finite delay, a naive datetime,
                or both ``delay`` and ``at``.
            TypeError: a payload that is not JSON-serialisable.
        """
        validate_session_id(session_id)
        due_ms = _due_ms(delay, at)
        return await self.store.reserve(
            session_id, payload, parent=parent or "", due_ms=due_ms, mode="queue", dispatch=True
        )

    # ---- the owner's primitives -------------------------------------------------------------

    async def claim(
        self, session_id: str, run_id: str, worker: str, *, ack: str | None = None
    ) -> RunHandle:
        """Take a pending run (pending -> running) and return the writer of its events.

        The first event of the run, ``execution_started``, is written by the claim; ``ack``
        names the queue entry to acknowledge in the same round trip (workers). The run's
        cancel token is served by this process's cancel watcher until the run ends.

        Raises:
            RunCancelled: the run was cancelled before it started.
            RunSuperseded: the session holds another run, or the run is not pending.
        """
        claimed = await self.store.claim(session_id, run_id, worker, ack=ack)
        token = self.cancel_watcher.watch(session_id, run_id)
        return RunHandle(self.store, claimed, token)

    def release(self, handle: RunHandle) -> None:
        """Stop watching a run's cancels (after it ended, or was handed back)."""
        if self._watcher is not None:
            self._watcher.unwatch(handle.session_id, handle.run_id)

    # ---- anyone -----------------------------------------------------------------------------

    async def cancel(self, session_id: str, reason: str = "cancelled by user") -> bool:
        """Cancel the session's active run, and the runs it spawned.

        A pending run is cancelled at once; a running one is marked cancelled at once (a new run
        may be reserved right away) and its worker stops at its next safe point.

        Returns:
            True if a run was cancelled; False if nothing was active (nothing changed).
        """
        validate_session_id(session_id)
        return await self._cancel(session_id, reason, parent="")

    async def _cancel(self, session_id: str, reason: str, parent: str) -> bool:
        outcome = await self.store.cancel(session_id, reason, parent=parent)
        if not outcome.cancelled or outcome.run_id is None:
            return False
        await self.store.after_cancel(session_id, outcome.run_id)
        for child in outcome.children:
            try:
                await self._cancel(
                    child,
                    f"parent {session_id!r} was cancelled",
                    parent=run_ref(session_id, outcome.run_id),
                )
            except RedisUnavailable:
                raise
            except (RunstateError, ValueError) as exc:  # junk in the children set or its keys
                log.warning("cancel of %r: cannot cancel its child %r: %s", session_id, child, exc)
        return True

    async def runner(self, session_id: str) -> RunnerState | None:
        """The session's current (or last) run, or None if the session has none."""
        validate_session_id(session_id)
        return await self.store.runner(session_id)

    async def active_runs(self) -> list[RunnerState]:
        """Every pending or running run, by reservation time."""
        states = await self.store.runners(await self.store.active_sessions())
        return [s for s in states if s.status in RunStatus.ACTIVE]

    def subscribe(
        self, session_id: str, last_event_id: str | None = None, *, follow: bool = False
    ) -> AsyncIterator[StreamEvent]:
        """The session's events as :class:`StreamEvent` (see DESIGN §4).

        Args:
            last_event_id: resume after this stream id (``"0"``: everything retained); None
                replays the critical events and the last budget event, then goes live.
            follow: keep going after the run's terminal event (default: stop there).

        Raises:
            ValueError: a bad session id or ``last_event_id`` (when iteration starts).
        """
        validate_session_id(session_id)
        return subscribe(self._hub, session_id, last_event_id, follow=follow)

    def subscribe_batches(
        self, session_id: str, last_event_id: str | None = None, *, follow: bool = False
    ) -> AsyncIterator[list[StreamEvent]]:
        """What :meth:`subscribe` yields, as lists of the events ready at once.

        For consumers that write events out (SSE, websockets): one write per list, and far
        less work per event when many subscribers share a process. What arrived while the
        consumer was busy usually comes as one list.
        """
        validate_session_id(session_id)
        return subscribe_batches(self._hub, session_id, last_event_id, follow=follow)

    # ---- lifetime ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        await self._hub.aclose()
        if self._watcher is not None:
            await self._watcher.aclose()
        await self.store.aclose()
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _due_ms(delay: float | None, at: datetime | None) -> int | None:
    if delay is not None and at is not None:
        raise ValueError(f"give delay or at, not both (delay={delay!r}, at={at!r})")
    if delay is not None:
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay!r}")
        return int((datetime.now(UTC).timestamp() + delay) * 1000) if delay > 0 else None
    if at is not None:
        if not isinstance(at, datetime) or at.tzinfo is None:
            raise ValueError(f"at must be a timezone-aware datetime, got {at!r}")
        return int(at.timestamp() * 1000)
    return None

"""The worker pool's Redis data: the dispatch queue, heartbeats, locks, the schedule, recovery.

The companion of :mod:`runstate.store` (which holds the per-session operations): everything
here is either a global key (``queue``, ``schedule``, ``active``, ``workers``, ``worker:<id>``,
``lock:<name>``) touched by one plain command or pipeline, or a fenced per-session script
(``recover.lua``, ``link_child.lua``). No operation spans a global key and a session's keys in
one script, so every command stays within one slot on Redis Cluster; where two global keys
must change together (a due schedule entry becoming a queue entry), ``ZREM``'s answer decides
who writes the second one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, cast

from redis import exceptions as rexc
from redis.commands.core import AsyncScript

from .codec import utcnow
from .errors import RunCancelled, RunstateError, RunSuperseded, StaleRunError
from .events import Error, dump_event
from .keys import QUEUE_GROUP, parse_run_ref, run_ref, validate_session_id
from .queue_records import ConsumerInfo, QueueEntry, RunOwner, RunProbe, int_or_none, iso_ms
from .replies import junk_tolerant
from .store import Store, load_lua

log = logging.getLogger(__name__)

SESSION_SCRIPTS = ("recover", "link_child")
GLOBAL_SCRIPTS = ("lock_release", "lock_extend")
# What the reaper reads of a runner hash.
RUNNER_FIELDS = (
    "run_id",
    "status",
    "worker",
    "attempt",
    "dispatch",
    "due_at",
    "started_at",
    "requeued_at",
)


def now_ms() -> int:
    """This machine's clock in Unix milliseconds (the unit of every score in this module)."""
    return int(datetime.now(UTC).timestamp() * 1000)


def _load_global(name: str) -> str:
    # Global scripts get their own KEYS; the per-session helpers of _lib.lua would only confuse.
    return (resources.files("runstate") / "lua" / f"{name}.lua").read_text()


def _entries(result: Any) -> list[tuple[str, dict[str, str] | None]]:
    """The entries of an XREADGROUP answer (RESP2 list or RESP3 dict) of one stream."""
    items = result.items() if isinstance(result, dict) else result or []
    out: list[tuple[str, dict[str, str] | None]] = []
    for _key, entries in items:
        for entry in entries or []:
            out.append((entry[0], entry[1]))
    return out


class Queue:
    """Typed access to the worker pool's global data for one Store (its client, keys, retry).

    Args:
        store: the store whose client, key names, stream limits and retry policy are used.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.retry = store.retry
        self._session_scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(load_lua(name)) for name in SESSION_SCRIPTS
        }
        self._global_scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(_load_global(name)) for name in GLOBAL_SCRIPTS
        }

    async def _pipeline(
        self, what: str, build: Callable[[Any], object], *, transaction: bool = False
    ) -> list[Any]:
        """Run the commands ``build`` queues on a pipeline, as one retried round trip."""

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=transaction) as pipe:
                build(pipe)
                return await pipe.execute()

        return await self.retry.call(what, go)

    # ---- the dispatch stream ------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; a no-op if it exists.

        The group starts at ``0``, so runs dispatched before any worker ever started are
        delivered too.
        """

        async def go() -> None:
            try:
                await self.client.xgroup_create(self.keys.queue, QUEUE_GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise _queue_error(self.keys.queue, exc) from exc

        await self.retry.call("create consumer group", go)

    async def read(self, consumer: str, count: int, block_ms: int) -> list[QueueEntry]:
        """Up to ``count`` new entries for ``consumer``, blocking up to ``block_ms``.

        Not retried: an answer lost in transit leaves its entries pending for this consumer,
        where :meth:`read_pending` finds them. A missing group (the stream was deleted) is
        recreated.

        Raises:
            redis.exceptions.ConnectionError / TimeoutError: Redis did not answer.
        """
        try:
            result = await self.client.xreadgroup(
                QUEUE_GROUP, consumer, {self.keys.queue: ">"}, count=count, block=block_ms
            )
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise _queue_error(self.keys.queue, exc) from exc
            log.warning("consumer group %r is missing; creating it again", QUEUE_GROUP)
            await self.ensure_group()
            return []
        return [QueueEntry.decode(eid, fields) for eid, fields in _entries(result)]

    async def read_pending(self, consumer: str, count: int = 100) -> list[QueueEntry]:
        """Entries delivered to ``consumer`` and not acknowledged yet (its pending list)."""

        async def go() -> Any:
            return await self.client.xreadgroup(
                QUEUE_GROUP, consumer, {self.keys.queue: "0"}, count=count
            )

        try:
            result = await self.retry.call("read pending entries", go)
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            return []
        return [QueueEntry.decode(eid, fields) for eid, fields in _entries(result)]

    async def ack(self, entry_id: str) -> None:
        """Acknowledge and delete one entry (the queue only holds runs nobody has taken yet)."""
        queue = self.keys.queue
        await self._pipeline(
            "ack queue entry",
            lambda p: p.xack(queue, QUEUE_GROUP, entry_id).xdel(queue, entry_id),
            transaction=True,
        )

    async def redeliver(self, entry: QueueEntry) -> None:
        """Put a pending entry's run back on the queue as a new entry, then drop the old one.

        Dropping happens second: a crash in between leaves two entries for the run, and the
        second claim is simply refused.
        """
        sid, run_id = entry.session_id, entry.run_id
        if sid is not None and run_id is not None:
            await self.retry.call(
                "requeue entry",
                lambda: self.client.xadd(self.keys.queue, {"session": sid, "run": run_id}),
            )
        await self.ack(entry.id)

    async def autoclaim(
        self, consumer: str, min_idle_ms: int, count: int = 100, start: str = "0-0"
    ) -> tuple[str, list[QueueEntry]]:
        """Take over entries pending longer than ``min_idle_ms`` (their consumer likely died).

        Returns:
            The cursor to continue from (``"0-0"`` when done) and the entries now owned by
            ``consumer``. Entries deleted while pending are dropped by Redis itself.
        """

        async def go() -> Any:
            return await self.client.xautoclaim(
                self.keys.queue, QUEUE_GROUP, consumer, min_idle_ms, start_id=start, count=count
            )

        result = await self.retry.call("autoclaim queue entries", go)
        cursor, raw = result[0], result[1]
        return str(cursor), [QueueEntry.decode(eid, fields) for eid, fields in raw or []]

    async def consumers(self) -> list[ConsumerInfo]:
        """The consumers of the queue's group, with their pending counts and idle times."""

        async def go() -> Any:
            return await self.client.xinfo_consumers(self.keys.queue, QUEUE_GROUP)

        try:
            raw = await self.retry.call("list consumers", go)
        except rexc.ResponseError:  # no stream or no group yet
            return []
        return [
            ConsumerInfo(str(c["name"]), int(c.get("pending", 0)), int(c.get("idle", 0)))
            for c in raw
        ]

    async def delete_consumer(self, name: str) -> None:
        await self.retry.call(
            "delete consumer",
            lambda: self.client.xgroup_delconsumer(self.keys.queue, QUEUE_GROUP, name),
        )

    # ---- workers ------------------------------------------------------------------------------

    async def heartbeat(
        self,
        worker_id: str,
        deadline_ms: int,
        info: Mapping[str, str | int],
        ttl_ms: int,
        runs: Sequence[tuple[str, str]] = (),
    ) -> list[RunOwner]:
        """Say ``worker_id`` is alive until ``deadline_ms``: one pipeline, whatever it runs.

        The same round trip reads who owns each of ``runs`` (``(session_id, run_id)``) now,
        so the worker learns when one was taken over (requeued by a reaper that thought it
        lost, cancelled, superseded) without a write per run.
        """
        key = self.keys.worker(worker_id)

        def build(pipe: Any) -> None:
            pipe.zadd(self.keys.workers, {worker_id: deadline_ms})
            pipe.hset(key, mapping=info).pexpire(key, ttl_ms)
            for sid, _ in runs:
                pipe.hmget(self.keys.runner(sid), ["run_id", "status", "attempt", "worker"])

        raw = await self._pipeline("heartbeat", build)
        return [
            RunOwner(sid, run_id, h[0] or "", h[1] or "", int_or_none(h[2]) or 0, h[3] or "")
            for (sid, run_id), h in zip(runs, raw[3:], strict=True)
        ]

    async def retire(self, worker_id: str) -> None:
        """Remove a worker that stopped cleanly (its runs have all ended or been handed back)."""
        key = self.keys.worker(worker_id)
        await self._pipeline(
            "retire worker", lambda p: p.zrem(self.keys.workers, worker_id).delete(key)
        )

    async def worker_deadlines(self) -> dict[str, int]:
        """Every known worker id and its heartbeat deadline (Unix ms)."""
        raw = cast(
            list[tuple[str, float]],
            await self.retry.call(
                "read workers",
                lambda: self.client.zrange(self.keys.workers, 0, -1, withscores=True),
            ),
        )
        return {str(member): int(score) for member, score in raw}

    async def worker_deadline(self, worker_id: str) -> int | None:
        """One worker's heartbeat deadline (Unix ms), None if it is not in the index."""
        score = await self.retry.call(
            "read worker", lambda: self.client.zscore(self.keys.workers, worker_id)
        )
        return None if score is None else int(score)

    async def worker_info(self, worker_ids: Sequence[str]) -> list[dict[str, str]]:
        """The info hash of each worker (empty once it expired, or if it is junk)."""
        keys: list[str | None] = []
        for wid in worker_ids:
            try:
                keys.append(self.keys.worker(wid))
            except ValueError as exc:  # a member of the workers index that is no worker id
                log.warning("no info for %r: %s", wid, exc)
                keys.append(None)

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    if key is not None:
                        pipe.hgetall(key)
                return junk_tolerant(await pipe.execute(raise_on_error=False))

        found = iter(await self.retry.call("read worker info", go) if any(keys) else [])
        infos: list[dict[str, str]] = []
        for key in keys:
            info = next(found) if key is not None else {}
            if isinstance(info, Exception):
                log.warning("no info for %s: %s", key, info)
                info = {}
            infos.append(info)
        return infos

    async def forget_workers(self, dead_before_ms: int) -> list[str]:
        """Drop workers whose deadline passed before ``dead_before_ms`` from the index."""
        gone = cast(
            list[str],
            await self.retry.call(
                "read dead workers",
                lambda: self.client.zrangebyscore(self.keys.workers, "-inf", dead_before_ms),
            ),
        )
        if gone:
            await self.retry.call(
                "forget workers", lambda: self.client.zrem(self.keys.workers, *gone)
            )
        return gone

    # ---- locks --------------------------------------------------------------------------------

    async def acquire_lock(self, name: str, ttl_ms: int) -> str | None:
        """Take the cluster-wide lock ``name`` for ``ttl_ms``; returns the holder's token or None.

        Raises:
            ValueError: a TTL below 1 ms.
        """
        if ttl_ms < 1:
            raise ValueError(f"lock TTL must be at least 1 ms, got {ttl_ms!r}")
        token = uuid.uuid4().hex
        ok = await self.retry.call(
            f"acquire lock {name!r}",
            lambda: self.client.set(self.keys.lock(name), token, nx=True, px=ttl_ms),
        )
        if ok:
            return token
        # A retried SET whose first answer was lost may have set our own token.
        current = await self.retry.call(
            f"read lock {name!r}", lambda: self.client.get(self.keys.lock(name))
        )
        return token if current == token else None

    async def extend_lock(self, name: str, token: str, ttl_ms: int) -> bool:
        """Give the lock another ``ttl_ms`` if ``token`` still holds it."""
        script = self._global_scripts["lock_extend"]
        res = await self.retry.call(
            f"extend lock {name!r}",
            lambda: script(keys=[self.keys.lock(name)], args=[token, ttl_ms]),
        )
        return bool(res)

    async def release_lock(self, name: str, token: str) -> bool:
        """Release the lock if ``token`` still holds it; False if it expired or changed hands."""
        script = self._global_scripts["lock_release"]
        res = await self.retry.call(
            f"release lock {name!r}", lambda: script(keys=[self.keys.lock(name)], args=[token])
        )
        return bool(res)

    # ---- the schedule -------------------------------------------------------------------------

    async def next_due(self, now: int) -> bool:
        """True if some scheduled run is due at ``now`` (ms): the cheap check before locking."""
        due = await self.retry.call(
            "read schedule",
            lambda: self.client.zrangebyscore(self.keys.schedule, "-inf", now, start=0, num=1),
        )
        return bool(due)

    async def move_due(self, now: int, limit: int = 100) -> list[tuple[str, str]]:
        """Dispatch up to ``limit`` scheduled runs due at ``now`` (ms); returns them.

        Each due member is removed with ZREM first and only the caller whose ZREM removed it
        adds the queue entry, so a run is dispatched once however many movers race. A crash
        between the two leaves the run pending and undispatched, which the reaper repairs.
        """
        members = cast(
            list[str],
            await self.retry.call(
                "read schedule",
                lambda: self.client.zrangebyscore(
                    self.keys.schedule, "-inf", now, start=0, num=limit
                ),
            ),
        )
        if not members:
            return []

        schedule = self.keys.schedule
        removed = await self._pipeline(
            "take due runs", lambda p: [p.zrem(schedule, m) for m in members]
        )
        moved: list[tuple[str, str]] = []
        for member, won in zip(members, removed, strict=True):
            if not won:
                continue
            ref = parse_run_ref(member)
            try:
                sid, run_id = ref if ref else ("", "")
                validate_session_id(sid)
            except (TypeError, ValueError):
                log.warning("dropping malformed schedule entry %r", member)
                continue
            moved.append((sid, run_id))

        if moved:
            queue = self.keys.queue
            await self._pipeline(
                "dispatch due runs",
                lambda p: [p.xadd(queue, {"session": sid, "run": rid}) for sid, rid in moved],
            )
        return moved

    async def schedule_if_absent(self, session_id: str, run_id: str, due_ms: int) -> bool:
        """Put a scheduled run back in the schedule unless it is there; True if it was added."""
        member = run_ref(session_id, run_id)
        added = await self.retry.call(
            "reschedule",
            lambda: self.client.zadd(self.keys.schedule, {member: due_ms}, nx=True),
        )
        return bool(added)

    async def enqueue(self, session_id: str, run_id: str) -> None:
        """Dispatch a pending run now (and index it as active)."""
        await self.store.dispatch(session_id, run_id)

    # ---- the reaper's reads -------------------------------------------------------------------

    async def probe(self, session_ids: Sequence[str]) -> list[RunProbe]:
        """The reaper's fields of each session's runner hash, in one round trip."""
        keys = [self.keys.runner(sid) for sid in session_ids]
        if not keys:
            return []

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, list(RUNNER_FIELDS))
                return junk_tolerant(await pipe.execute(raise_on_error=False))

        raw = await self.retry.call("probe runs", go)
        out: list[RunProbe] = []
        for sid, values in zip(session_ids, raw, strict=True):
            if isinstance(values, Exception):  # junk: nothing to recover, and not active
                log.warning("reaper: cannot read the runner of session %r: %s", sid, values)
                values = [None] * len(RUNNER_FIELDS)
            f = dict(zip(RUNNER_FIELDS, values, strict=True))
            out.append(
                RunProbe(
                    session_id=sid,
                    run_id=f["run_id"] or None,
                    status=f["status"] or None,
                    worker=f["worker"] or "",
                    attempt=int_or_none(f["attempt"]) or 0,
                    dispatch=f["dispatch"] or "queue",
                    due_ms=int_or_none(f["due_at"]),
                    reserved_ms=iso_ms(f["started_at"]),
                    requeued_ms=iso_ms(f["requeued_at"]),
                )
            )
        return out

    async def queued_runs(self, limit: int = 100_000) -> set[tuple[str, str]] | None:
        """Every ``(session_id, run_id)`` with an entry in the queue, or None past ``limit``.

        The queue only holds runs not claimed yet (entries are deleted when claimed), so this
        is the size of the backlog.
        """
        found: set[tuple[str, str]] = set()
        after, page, read = "-", 1000, 0
        while True:
            entries = await self._xrange(after, page)
            for eid, fields in entries:
                entry = QueueEntry.decode(eid, fields)
                if entry.session_id is not None and entry.run_id is not None:
                    found.add((entry.session_id, entry.run_id))
            read += len(entries)
            if len(entries) < page:
                return found
            if read >= limit:
                return None
            after = f"({entries[-1][0]}"

    async def _xrange(self, start: str, count: int) -> list[tuple[str, dict[str, str]]]:
        async def go() -> Any:
            return await self.client.xrange(self.keys.queue, min=start, max="+", count=count)

        return cast(list[tuple[str, dict[str, str]]], await self.retry.call("read queue", go))

    async def scheduled(self, runs: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each ``(session_id, run_id)`` is in the schedule."""
        members = [run_ref(sid, run_id) for sid, run_id in runs]
        if not members:
            return []
        schedule = self.keys.schedule
        scores = await self._pipeline(
            "read schedule", lambda p: [p.zscore(schedule, m) for m in members]
        )
        return [score is not None for score in scores]

    async def scan_sessions(self, count: int = 500) -> AsyncIterator[str]:
        """Every session id with a runner hash under this prefix (SCAN, never KEYS)."""
        async for key in self.client.scan_iter(match=self.keys.runner_pattern(), count=count):
            sid = self.keys.session_of(str(key))
            if sid:
                yield sid

    async def index_if_absent(self, session_id: str) -> bool:
        """Add an active session missing from the ``active`` index; True if it was missing."""
        added = await self.retry.call(
            "reindex",
            lambda: self.client.zadd(self.keys.active, {session_id: now_ms()}, nx=True),
        )
        return bool(added)

    # ---- fenced per-session scripts -----------------------------------------------------------

    async def recover(
        self,
        session_id: str,
        run_id: str,
        *,
        status: str,
        attempt: int,
        worker: str,
        max_attempts: int,
        message: str,
    ) -> str:
        """Hand a run whose owner is gone back to the queue, or end it as ``error``.

        Only if the session still holds ``run_id`` with this ``status``, ``attempt`` and (for a
        running run) ``worker``; see ``recover.lua``. A requeued run is dispatched here too.

        Args:
            status: ``"running"`` (a lost or stopping worker) or ``"pending"`` (never claimed).
            max_attempts: a running run is requeued while its attempt is below this.
            message: the run's error message if it is not requeued.

        Returns:
            ``"requeued"``, ``"error"`` or ``"stale"`` (the run moved on; nothing changed).
        """
        if status not in ("running", "pending"):
            raise ValueError(f"status must be 'running' or 'pending', got {status!r}")
        store = self.store
        event = dump_event(Error(message=message), store.max_event_bytes)
        args = [
            run_id,
            status,
            attempt,
            worker,
            max_attempts,
            message,
            event,
            utcnow(),
            store.maxlen,
            store.retention,
        ]
        res = await self._session_script("recover", session_id, args)
        outcome = str(res[0])
        if outcome == "requeued":
            await self.enqueue(session_id, run_id)
        elif outcome == "error":
            await store.unindex(session_id)
        return outcome

    async def link_child(self, session_id: str, run_id: str, attempt: int, child: str) -> None:
        """Record ``child`` as spawned by the running run (for cascade cancel).

        Raises:
            RunCancelled: the parent run was cancelled.
            RunSuperseded: the parent run no longer owns its session.
        """
        res = await self._session_script("link_child", session_id, [run_id, attempt, child])
        if res[0] != "ok":
            raise _stale(session_id, run_id, str(res[1]), str(res[2]))

    async def _session_script(self, name: str, session_id: str, args: list[Any]) -> list[Any]:
        script = self._session_scripts[name]
        keys = self.keys.session_keys(session_id)
        result = await self.retry.call(
            f"{name} {session_id!r}", lambda: script(keys=keys, args=args)
        )
        return cast(list[Any], result)


def _queue_error(queue: str, exc: rexc.ResponseError) -> Exception:
    """A clear error when the queue key holds junk (another type than a stream)."""
    if "WRONGTYPE" in str(exc):
        return RunstateError(
            f"{queue} holds another type than the stream runstate writes there "
            f"(junk written by hand?): {exc}"
        )
    return exc


def _stale(session_id: str, run_id: str, status: str, current: str) -> StaleRunError:
    if status == "cancelled" and current == run_id:
        return RunCancelled(session_id, run_id)
    return RunSuperseded(session_id, run_id, status, current)

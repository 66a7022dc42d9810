"""The one module that talks to Redis: Lua scripts and commands behind typed methods.

Every per-session operation is one Lua script (``runstate/lua/<name>.lua``, with the shared
``_lib.lua`` prepended) over the session's hash-tagged keys. On a single server the script also
updates the global indexes (queue, schedule, active) it touches, in the same round trip; on a
Redis Cluster, where those keys live in other slots, idempotent commands pipelined with the
script do it, and the reaper repairs what a lost connection left half done. What the scripts
answer, and the errors made of their failures, are in :mod:`runstate.replies`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any, cast

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .autopipeline import AutoPipeline
from .client import is_cluster
from .codec import (
    EncodedEvent,
    decode_entry,
    encode_events,
    encode_payload,
    new_nonce,
    pairs,
    utcnow,
)
from .errors import RunCancelled, RunstateError, RunSuperseded, StaleRunError
from .events import (
    DEFAULT_MAX_EVENT_BYTES,
    AgentEvent,
    StreamEvent,
    dump_cancelled,
    dump_event,
    parse_event,
)
from .keys import QUEUE_GROUP, Keys, run_ref, validate_session_id
from .models import AlreadyRunning, Reserved, ReserveResult, RunnerState
from .replies import CancelOutcome, Claimed, Snapshot, junk_tolerant, not_text, wrong_type
from .retry import RetryPolicy

log = logging.getLogger(__name__)

SCRIPTS = ("reserve", "claim", "emit", "finish", "cancel", "snapshot")
DEFAULT_MAXLEN = 1000
DEFAULT_CRITICAL_CAP = 32
DEFAULT_RETENTION = 3600


def load_lua(name: str) -> str:
    """The source of script ``name`` with the shared helpers prepended."""
    folder = resources.files("runstate") / "lua"
    return (folder / "_lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


class Store:
    """Typed access to runstate's Redis data for one prefix.

    Args:
        client: a redis-py asyncio client created with ``decode_responses=True``.
        keys: the key names.
        maxlen: approximate cap of each session stream.
        critical_cap: how many critical events a run keeps for replay.
        retention: seconds a finished session's keys are kept (0 keeps them).
        max_event_bytes: the largest serialised event (or payload) accepted.
        cancel_marker_ttl: seconds a cancel marker is kept for a worker to find.
        retry: the retry policy for transient errors.
    """

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        critical_cap: int = DEFAULT_CRITICAL_CAP,
        retention: int = DEFAULT_RETENTION,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        cancel_marker_ttl: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        for name, value in (("maxlen", maxlen), ("critical_cap", critical_cap)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if retention < 0:
            raise ValueError(f"retention must be >= 0 seconds, got {retention!r}")
        self.client = client
        self.keys = keys
        self.maxlen = maxlen
        self.critical_cap = critical_cap
        self.retention = retention
        self.max_event_bytes = max_event_bytes
        self.cancel_marker_ttl = cancel_marker_ttl or max(retention, 3600)
        self.retry = retry or RetryPolicy()
        # A Redis Cluster client: one command may only name keys of one slot (DESIGN §5).
        self.cluster = is_cluster(client)
        # Scripts issued together go as one pipeline (see autopipeline); a cluster's client
        # sends each to its node itself.
        self._auto = None if self.cluster else AutoPipeline(client)
        self._key_cache: dict[str, list[str]] = {}
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_lua(name)) for name in SCRIPTS
        }

    async def aclose(self) -> None:
        """Hand the connections kept for scripts back to the client's pool."""
        if self._auto is not None:
            await self._auto.aclose()

    def _session_keys(self, session_id: str) -> list[str]:
        keys = self._key_cache.get(session_id)
        if keys is None:
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            keys = self._key_cache[session_id] = self.keys.session_keys(session_id)
        return keys

    async def _script(
        self,
        name: str,
        session_id: str,
        args: Sequence[Any],
        keys: int = 5,
        extra_keys: Sequence[str] = (),
    ) -> list[Any]:
        script = self._scripts[name]
        session_keys = self._session_keys(session_id)[:keys] + list(extra_keys)
        try:
            result = await self.retry.call(
                f"{name} {session_id!r}", lambda: self._run_script(script, session_keys, args)
            )
        except rexc.ResponseError as exc:
            raise wrong_type(exc, session_id, name) from exc
        return cast(list[Any], result)

    async def _run_script(self, script: AsyncScript, keys: list[str], args: Sequence[Any]) -> Any:
        """One try of ``script``: through the auto-pipeline, or on a cluster through redis-py's
        Script, which sends it to the node of its keys' slot."""
        if self._auto is None:
            return await script(keys=keys, args=list(args))
        return await self._auto.run_script(script, keys, args)

    async def _script_and(
        self,
        name: str,
        session_id: str,
        args: Sequence[Any],
        more: Callable[[Any], None],
        more_keys: Sequence[str],
    ) -> list[Any]:
        """Run a session script and the commands ``more`` adds (on ``more_keys``), in one round
        trip.

        The script goes as a plain EVALSHA (redis-py's Script in a pipeline would ask
        SCRIPT EXISTS first, every time); on NOSCRIPT it is loaded and the whole pipeline is
        sent again, which is safe because every caller's commands are idempotent.
        """
        script = self._scripts[name]
        keys = self._session_keys(session_id)

        async def go() -> list[Any]:
            for _ in range(2):
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
                    more(pipe)
                    results = await pipe.execute(raise_on_error=False)
                if isinstance(results[0], rexc.NoScriptError):
                    await self.client.script_load(script.script)
                    continue
                if isinstance(results[0], Exception):
                    raise results[0]
                for result in results[1:]:
                    if isinstance(result, rexc.ResponseError) and "WRONGTYPE" in str(result):
                        raise RunstateError(
                            f"{name} of session {session_id!r} failed: {' or '.join(more_keys)} "
                            f"holds another type than runstate writes there (junk written by "
                            f"hand?): {result}"
                        ) from result
                    if isinstance(result, Exception):
                        raise result
                return results
            raise rexc.NoScriptError(f"script {name!r} could not be loaded")

        try:
            return await self.retry.call(f"{name} {session_id!r}", go)
        except rexc.ResponseError as exc:
            raise wrong_type(exc, session_id, name) from exc

    # ---- lifecycle ------------------------------------------------------------------------

    async def reserve(
        self,
        session_id: str,
        payload: Any = None,
        *,
        parent: str = "",
        due_ms: int | None = None,
        mode: str = "queue",
        dispatch: bool = False,
    ) -> ReserveResult:
        """Reserve the session for a new run, index it as active and, with ``dispatch``, hand a
        won 'queue' run to the workers (now, or at ``due_ms``).

        On a single server all of it is one script: one round trip. On a cluster the global
        keys live in other slots: the reserve script and ``ZADD NX`` of the active index go in
        one round trip (when the reservation loses, the session is active already, so the NX
        add changes nothing), then :meth:`dispatch` in a second; a run left pending by a crash
        in between is in the index, where the reaper finds it.
        """
        data = self.encode_payload(payload)
        run_id = uuid.uuid4().hex
        due = "" if due_ms is None else due_ms
        args: list[Any] = [run_id, utcnow(), data, parent, due, mode]
        if self.cluster:

            def index(pipe: Any) -> None:
                pipe.zadd(self.keys.active, {session_id: _now_ms()}, nx=True)

            results = await self._script_and("reserve", session_id, args, index, [self.keys.active])
            res = results[0]
            if res[0] == "reserved" and dispatch and mode == "queue":
                await self.dispatch(session_id, run_id, due_ms)
        else:
            keys = self.keys
            args += [session_id, _now_ms(), "1" if dispatch else ""]
            res = await self._script(
                "reserve", session_id, args, extra_keys=(keys.active, keys.queue, keys.schedule)
            )
        if res[0] != "reserved":
            return AlreadyRunning(session_id=session_id, run_id=res[1])
        return Reserved(session_id=session_id, run_id=res[1])

    def encode_payload(self, payload: Any) -> str:
        """A run's payload as stored ('' for None); TypeError / EventTooLarge if it cannot be."""
        return encode_payload(payload, self.max_event_bytes)

    async def dispatch(self, session_id: str, run_id: str, due_ms: int | None = None) -> None:
        """Hand a reserved run to the workers, now or when due, and index it as active.

        Idempotent enough to repeat: a second queue entry only costs a refused claim.
        """

        async def go() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.active, {session_id: _now_ms()}, nx=True)
                if due_ms is None:
                    pipe.xadd(self.keys.queue, {"session": session_id, "run": run_id})
                else:
                    pipe.zadd(self.keys.schedule, {run_ref(session_id, run_id): due_ms})
                await pipe.execute()

        try:
            await self.retry.call(f"dispatch {session_id!r}", go)
        except rexc.ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                raise
            raise RunstateError(
                f"dispatch of session {session_id!r} failed: {self.keys.queue}, "
                f"{self.keys.active} or {self.keys.schedule} holds another type than runstate "
                f"writes there (junk written by hand?): {exc}"
            ) from exc

    async def claim(
        self, session_id: str, run_id: str, worker: str, *, ack: str | None = None
    ) -> Claimed:
        """pending -> running for ``worker``; writes execution_started.

        Args:
            ack: the id of the queue entry that dispatched the run, acknowledged and deleted in
                the same round trip (whatever the claim's answer: the entry is consumed).

        Raises:
            RunCancelled: the run was cancelled before it started.
            RunSuperseded: the session holds another run, or this one is not pending.
        """
        args: list[Any] = [run_id, worker, utcnow(), self.maxlen]
        if ack is None:
            res = await self._script("claim", session_id, args)
        elif not self.cluster:  # one script
            args += [QUEUE_GROUP, ack]
            res = await self._script("claim", session_id, args, extra_keys=(self.keys.queue,))
        else:
            queue, entry = self.keys.queue, ack

            def consume(pipe: Any) -> None:
                pipe.xack(queue, QUEUE_GROUP, entry).xdel(queue, entry)

            res = (await self._script_and("claim", session_id, args, consume, [queue]))[0]
        if res[0] != "ok":
            raise self._stale(session_id, run_id, res[1], res[2])
        payload = json.loads(res[3]) if res[3] else None
        return Claimed(
            session_id=session_id,
            run_id=run_id,
            attempt=int(res[1]),
            seq=int(res[2]),
            payload=payload,
            parent=res[4] or None,
            event_id=res[5] or None,
        )

    def encode(self, events: Sequence[AgentEvent]) -> list[EncodedEvent]:
        """Serialise events for :meth:`emit`; raises EventTooLarge before anything is sent."""
        return encode_events(events, self.max_event_bytes)

    async def emit(
        self,
        session_id: str,
        run_id: str,
        attempt: int,
        first_seq: int,
        events: Sequence[EncodedEvent],
    ) -> list[str]:
        """Append events numbered ``first_seq, first_seq + 1, ...``; returns their stream ids.

        Events an earlier try already wrote are not written again; their ids are returned too.

        Raises:
            StaleRunError: the run no longer owns the session (RunCancelled if it was cancelled).
            ValueError: ``first_seq`` leaves a hole after the last written event.
        """
        args: list[Any] = [
            run_id,
            attempt,
            first_seq,
            utcnow(),
            self.maxlen,
            self.critical_cap,
            len(events),
        ]
        for event in events:
            args += event
        res = await self._script("emit", session_id, args, keys=3)
        if res[0] == "ok":
            return list(res[1:])
        if res[0] == "seq":
            raise ValueError(f"emit of run {run_id!r} starts at seq {first_seq}, expected {res[1]}")
        raise self._stale(session_id, run_id, res[1], res[2])

    async def finish(
        self,
        session_id: str,
        run_id: str,
        attempt: int,
        event: AgentEvent,
        error: str | None = None,
    ) -> str | None:
        """End the run with its terminal event (Complete or Error) and drop the session from
        the active index, in one round trip; returns the event's id.

        On a single server the script drops it (unless the session holds an active run). On a
        cluster the index update is :meth:`unindex`'s (remove, read the status, put back if a
        new run began), sent in the script's pipeline. Either is right whatever the script
        answered.

        Raises:
            StaleRunError: the run no longer owns the session.
        """
        status = "completed" if event.type == "complete" else "error"
        args = [
            run_id,
            attempt,
            status,
            event.type,
            dump_event(event, self.max_event_bytes),
            error or "",
            utcnow(),
            self.maxlen,
            self.retention,
        ]
        active = self.keys.active
        if not self.cluster:
            args.append(session_id)
            res = await self._script("finish", session_id, args, extra_keys=(active,))
        else:
            runner = self.keys.runner(session_id)

            def unindex(pipe: Any) -> None:
                pipe.zrem(active, session_id)
                pipe.hget(runner, "status")

            res, _, now = await self._script_and("finish", session_id, args, unindex, [active])
            if now in ("pending", "running"):  # a new run began: it stays in the index
                await self._index(session_id)
        if res[0] == "ok":
            return str(res[1])
        if res[0] == "done":
            return None
        raise self._stale(session_id, run_id, res[1], res[2])

    async def cancel(
        self,
        session_id: str,
        message: str,
        *,
        run_id: str = "",
        parent: str = "",
        nonce: str | None = None,
    ) -> CancelOutcome:
        data = dump_cancelled(message, self.max_event_bytes)
        res = await self._script(
            "cancel",
            session_id,
            [
                utcnow(),
                self.maxlen,
                self.retention,
                data,
                nonce or new_nonce(),
                run_id,
                parent,
                self.cancel_marker_ttl,
                self.keys.cancel_channel,
                session_id,
            ],
            extra_keys=() if self.cluster else (self.keys.active, self.keys.schedule),
        )
        if res[0] != "cancelled":
            return CancelOutcome(False, res[2] or None, res[1], [])
        return CancelOutcome(True, res[1], res[2], list(res[3:]))

    async def after_cancel(self, session_id: str, run_id: str) -> None:
        """The global side of a cancel on a cluster: out of the active index and the schedule.
        (On a single server the cancel script did it, in the same round trip.)"""
        if not self.cluster:
            return
        schedule, member = self.keys.schedule, run_ref(session_id, run_id)
        await self.unindex(session_id, lambda pipe: pipe.zrem(schedule, member))

    async def unindex(self, session_id: str, more: Callable[[Any], None] | None = None) -> None:
        """Drop a session whose run ended from the active index, unless a new run began.

        The status is read in the same round trip as the removal: a run reserved in between
        (a client starting the next run right after the last one's terminal event) is put
        back at once, so the index never loses an active run.
        """
        runner = self.keys.runner(session_id)

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                if more is not None:
                    more(pipe)
                pipe.zrem(self.keys.active, session_id)
                pipe.hget(runner, "status")
                return junk_tolerant(await pipe.execute(raise_on_error=False))

        results = await self.retry.call(f"unindex {session_id!r}", go)
        if results[-1] in ("pending", "running"):
            await self._index(session_id)

    async def _index(self, session_id: str) -> None:
        active = self.keys.active
        await self.retry.call(
            f"index {session_id!r}",
            lambda: self.client.zadd(active, {session_id: _now_ms()}, nx=True),
        )

    def _stale(self, session_id: str, run_id: str, status: str, current: str) -> StaleRunError:
        if status == "cancelled" and current == run_id:
            return RunCancelled(session_id, run_id)
        return RunSuperseded(session_id, run_id, status, current)

    # ---- reading --------------------------------------------------------------------------

    async def snapshot(
        self, session_id: str, wake: str | None = None, wake_when: str = "active", ttl_ms: int = 0
    ) -> Snapshot:
        """The session's snapshot (see snapshot.lua), waking the stream ``wake`` of an event
        reader too (single server only; ``wake_when``: 'active' or 'always'; ``ttl_ms``: its
        TTL)."""
        if wake is None or self.cluster:
            res = await self._script("snapshot", session_id, [])
        else:
            res = await self._script(
                "snapshot", session_id, [wake_when, ttl_ms], extra_keys=(wake,)
            )
        run_id, status, last_id, budget_raw, critical_raw, last_entry, wake_id = res
        critical = [e for raw in critical_raw if (e := _parse_or_warn(raw, session_id))]
        terminal = None
        if last_entry:
            entry = decode_entry(last_entry[0], pairs(last_entry[1]), session_id)
            if entry and entry.run_id == run_id and entry.event.is_terminal:
                terminal = entry
        return Snapshot(
            run_id=run_id or None,
            status=status or None,
            last_id=last_id,
            budget=_parse_or_warn(budget_raw, session_id) if budget_raw else None,
            critical=critical,
            terminal=terminal,
            wake_id=wake_id or None,
        )

    async def runner(self, session_id: str) -> RunnerState | None:
        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.runner(session_id))
                pipe.lrange(self.keys.critical(session_id), 0, -1)
                return await pipe.execute()

        try:
            fields, critical = await self.retry.call(f"runner {session_id!r}", go)
        except rexc.ResponseError as exc:
            raise wrong_type(exc, session_id, "runner") from exc
        except UnicodeDecodeError as exc:
            raise not_text(exc, session_id, "runner") from exc
        return RunnerState.from_redis(session_id, fields, critical)

    async def runners(self, session_ids: Sequence[str]) -> list[RunnerState]:
        """The runs of ``session_ids`` that have one. A session whose keys hold junk is skipped
        with a warning: it never hides the others."""

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hgetall(self.keys.runner(sid))
                    pipe.lrange(self.keys.critical(sid), 0, -1)
                return junk_tolerant(await pipe.execute(raise_on_error=False))

        if not session_ids:
            return []
        raw = await self.retry.call("runners", go)
        states: list[RunnerState] = []
        for i, sid in enumerate(session_ids):
            fields, critical = raw[2 * i], raw[2 * i + 1]
            try:
                for value in (fields, critical):
                    if isinstance(value, rexc.ResponseError):
                        raise wrong_type(value, sid, "runner")
                state = RunnerState.from_redis(sid, fields, critical)
            except RunstateError as exc:
                log.warning("skipping session %r: %s", sid, exc)
                continue
            if state is not None:
                states.append(state)
        return states

    async def active_sessions(self) -> list[str]:
        """The sessions of the ``active`` index (members that are no session id are skipped
        with a warning)."""
        members = cast(
            list[str],
            await self.retry.call("active", lambda: self.client.zrange(self.keys.active, 0, -1)),
        )
        sessions: list[str] = []
        for member in members:
            try:
                sessions.append(validate_session_id(member))
            except (TypeError, ValueError) as exc:
                log.warning("skipping a member of %s that is no session: %s", self.keys.active, exc)
        return sessions

    async def read_range(
        self, session_id: str, after: str, count: int, before: str = "+"
    ) -> list[tuple[str, StreamEvent | None]]:
        """Up to ``count`` entries with ids in ``(after, before]``, junk entries as None."""
        key = self.keys.events(session_id)
        try:
            raw = cast(
                list[tuple[str, dict[str, str]]],
                await self.retry.call(
                    f"xrange {session_id!r}",
                    lambda: self.client.xrange(key, min=f"({after}", max=before, count=count),
                ),
            )
        except rexc.ResponseError as exc:
            raise wrong_type(exc, session_id, "read events") from exc
        except UnicodeDecodeError as exc:
            raise not_text(exc, session_id, "read events") from exc
        return [(eid, decode_entry(eid, fields, session_id)) for eid, fields in raw]

    async def cancel_markers(self, session_ids: Sequence[str]) -> list[str | None]:
        """The cancel marker of each session (None if none, or junk: skipped with a warning)."""

        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.get(self.keys.cancel(sid))
                return junk_tolerant(await pipe.execute(raise_on_error=False))

        if not session_ids:
            return []
        markers = await self.retry.call("cancel markers", go)
        for i, (sid, marker) in enumerate(zip(session_ids, markers, strict=True)):
            if isinstance(marker, Exception):
                log.warning("ignoring the cancel marker of session %r: %s", sid, marker)
                markers[i] = None
        return markers

    async def ttls(self, session_id: str) -> dict[str, int]:
        """Seconds to live of each per-session key (-1 none, -2 missing): for tests and ops."""
        names = ["runner", "events", "critical", "cancel", "children"]
        keys = self.keys.session_keys(session_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            values = await pipe.execute()
        return dict(zip(names, values, strict=True))


def _parse_or_warn(raw: str, session_id: str) -> AgentEvent | None:
    try:
        return parse_event(raw)
    except ValueError as exc:
        log.warning("skipping unreadable replay event of session %r: %s", session_id, exc)
        return None


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)

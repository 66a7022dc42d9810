"""The one module that talks to Redis: Lua scripts and commands behind typed methods.

Every per-session operation is one Lua script (``runstate/lua/<name>.lua``, with the shared
``_lib.lua`` prepended) over the session's hash-tagged keys; global indexes (queue, schedule,
active) are written by separate idempotent commands that the reaper can repair.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, NamedTuple, cast

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .errors import EventTooLarge, RunCancelled, RunstateError, RunSuperseded, StaleRunError
from .events import DEFAULT_MAX_EVENT_BYTES, AgentEvent, StreamEvent, dump_event, parse_event
from .keys import Keys
from .models import AlreadyRunning, Reserved, ReserveResult, RunnerState
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


def utcnow() -> str:
    """Now as the ISO-8601 UTC string stored in runner hashes."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_stream_id(value: str) -> tuple[int, int]:
    """``"<ms>-<n>"`` (or ``"<ms>"``) as a tuple that orders like Redis orders stream ids.

    Raises:
        ValueError: not a stream id.
    """
    ms, sep, n = value.partition("-")
    try:
        out = (int(ms), int(n) if sep else 0)
    except ValueError:
        raise ValueError(f"invalid stream id {value!r}: expected '<ms>-<n>', e.g. '0-0'") from None
    if out[0] < 0 or out[1] < 0:
        raise ValueError(f"invalid stream id {value!r}: expected '<ms>-<n>', e.g. '0-0'")
    return out


def decode_entry(entry_id: str, fields: dict[str, str], where: str = "") -> StreamEvent | None:
    """A stream entry as a StreamEvent; None (with a warning) for an entry we did not write."""
    try:
        event = parse_event(fields["data"])
        return StreamEvent(id=entry_id, run_id=fields["run"], seq=int(fields["seq"]), event=event)
    except (KeyError, ValueError) as exc:
        log.warning("skipping malformed stream entry %s %s: %s", where, entry_id, exc)
        return None


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=False))


class EncodedEvent(NamedTuple):
    """An event as emit.lua receives it (see the ARGV block of emit.lua)."""

    type: str
    data: str
    flags: str
    tool_name: str
    tool_phase: str
    round_count: str
    dedupe_field: str
    dedupe_value: str


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run a worker now owns."""

    session_id: str
    run_id: str
    attempt: int
    seq: int
    payload: Any
    parent: str | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Where a new subscriber starts: what to replay, and the stream id live events follow."""

    run_id: str | None
    status: str | None
    last_id: str
    budget: AgentEvent | None
    critical: list[AgentEvent]
    terminal: StreamEvent | None


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    cancelled: bool
    run_id: str | None
    previous_status: str
    children: list[str]


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
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_lua(name)) for name in SCRIPTS
        }

    async def _script(self, name: str, session_id: str, args: Sequence[Any]) -> list[Any]:
        script = self._scripts[name]
        keys = self.keys.session_keys(session_id)
        try:
            result = await self.retry.call(
                f"{name} {session_id!r}", lambda: script(keys=keys, args=list(args))
            )
        except rexc.ResponseError as exc:
            raise _wrong_type(exc, session_id, name) from exc
        return cast(list[Any], result)

    # ---- lifecycle ------------------------------------------------------------------------

    async def reserve(
        self,
        session_id: str,
        payload: Any = None,
        *,
        parent: str = "",
        due_ms: int | None = None,
        mode: str = "queue",
    ) -> ReserveResult:
        data = self.encode_payload(payload)
        run_id = uuid.uuid4().hex
        due = "" if due_ms is None else due_ms
        res = await self._script("reserve", session_id, [run_id, utcnow(), data, parent, due, mode])
        if res[0] == "reserved":
            return Reserved(session_id=session_id, run_id=res[1])
        return AlreadyRunning(session_id=session_id, run_id=res[1])

    def encode_payload(self, payload: Any) -> str:
        if payload is None:
            return ""
        try:
            data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"payload must be JSON-serialisable, got {payload!r:.200}: {exc}"
            ) from exc
        if len(data.encode()) > self.max_event_bytes:
            raise EventTooLarge(
                f"payload is {len(data.encode())} bytes, over the limit of {self.max_event_bytes}"
            )
        return data

    async def dispatch(self, session_id: str, run_id: str, due_ms: int | None = None) -> None:
        """Index the reserved run as active and hand it to workers, now or when due."""
        member = f"{session_id} {run_id}"

        async def go() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.active, {session_id: _now_ms()})
                if due_ms is None:
                    pipe.xadd(self.keys.queue, {"session": session_id, "run": run_id})
                else:
                    pipe.zadd(self.keys.schedule, {member: due_ms})
                await pipe.execute()

        await self.retry.call(f"dispatch {session_id!r}", go)

    async def index_active(self, session_id: str) -> None:
        await self.retry.call(
            "index active", lambda: self.client.zadd(self.keys.active, {session_id: _now_ms()})
        )

    async def claim(self, session_id: str, run_id: str, worker: str) -> Claimed:
        """pending -> running for ``worker``; writes execution_started.

        Raises:
            RunCancelled: the run was cancelled before it started.
            RunSuperseded: the session holds another run, or this one is not pending.
        """
        res = await self._script("claim", session_id, [run_id, worker, utcnow(), self.maxlen])
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
        out = []
        for event in events:
            tool = event.tool_update()
            rounds = event.round_count_update()
            dedupe = event.dedupe() if event.is_critical else None
            out.append(
                EncodedEvent(
                    event.type,
                    dump_event(event, self.max_event_bytes),
                    ("c" if event.is_critical else "") + ("b" if event.is_budget else ""),
                    (tool[0] or "") if tool else "",
                    tool[1] if tool else "",
                    "" if rounds is None else str(rounds),
                    dedupe[0] if dedupe else "",
                    dedupe[1] if dedupe else "",
                )
            )
        return out

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
        res = await self._script("emit", session_id, args)
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
        """End the run with its terminal event (Complete or Error); returns the event's id.

        Raises:
            StaleRunError: the run no longer owns the session.
        """
        status = "completed" if event.type == "complete" else "error"
        res = await self._script(
            "finish",
            session_id,
            [
                run_id,
                attempt,
                status,
                event.type,
                dump_event(event, self.max_event_bytes),
                error or "",
                utcnow(),
                self.maxlen,
                self.retention,
            ],
        )
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
        from .events import Cancelled

        data = dump_event(Cancelled(message=message), self.max_event_bytes)
        res = await self._script(
            "cancel",
            session_id,
            [
                utcnow(),
                self.maxlen,
                self.retention,
                data,
                nonce or uuid.uuid4().hex,
                run_id,
                parent,
                self.cancel_marker_ttl,
            ],
        )
        if res[0] != "cancelled":
            return CancelOutcome(False, res[2] or None, res[1], [])
        return CancelOutcome(True, res[1], res[2], list(res[3:]))

    async def after_cancel(self, session_id: str, run_id: str, was: str) -> None:
        """The global side of a cancel: nudge the worker, drop the run from the indexes."""

        async def go() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                if was == "running":
                    pipe.publish(self.keys.cancel_channel, f"{session_id} {run_id}")
                pipe.zrem(self.keys.active, session_id)
                pipe.zrem(self.keys.schedule, f"{session_id} {run_id}")
                await pipe.execute()

        await self.retry.call(f"cancel {session_id!r}", go)

    async def unindex(self, session_id: str) -> None:
        await self.retry.call("unindex", lambda: self.client.zrem(self.keys.active, session_id))

    def _stale(self, session_id: str, run_id: str, status: str, current: str) -> StaleRunError:
        if status == "cancelled" and current == run_id:
            return RunCancelled(session_id, run_id)
        return RunSuperseded(session_id, run_id, status, current)

    # ---- reading --------------------------------------------------------------------------

    async def snapshot(self, session_id: str) -> Snapshot:
        res = await self._script("snapshot", session_id, [])
        run_id, status, last_id, budget_raw, critical_raw, last_entry = res
        critical = [e for raw in critical_raw if (e := _parse_or_warn(raw, session_id))]
        terminal = None
        if last_entry:
            entry = decode_entry(last_entry[0], _pairs(last_entry[1]), session_id)
            if entry and entry.run_id == run_id and entry.event.is_terminal:
                terminal = entry
        return Snapshot(
            run_id=run_id or None,
            status=status or None,
            last_id=last_id,
            budget=_parse_or_warn(budget_raw, session_id) if budget_raw else None,
            critical=critical,
            terminal=terminal,
        )

    async def runner(self, session_id: str) -> RunnerState | None:
        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self.keys.runner(session_id))
                pipe.lrange(self.keys.critical(session_id), 0, -1)
                return await pipe.execute()

        fields, critical = await self.retry.call(f"runner {session_id!r}", go)
        return RunnerState.from_redis(session_id, fields, critical)

    async def runners(self, session_ids: Sequence[str]) -> list[RunnerState]:
        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.hgetall(self.keys.runner(sid))
                    pipe.lrange(self.keys.critical(sid), 0, -1)
                return await pipe.execute()

        if not session_ids:
            return []
        raw = await self.retry.call("runners", go)
        states = (
            RunnerState.from_redis(sid, raw[2 * i], raw[2 * i + 1])
            for i, sid in enumerate(session_ids)
        )
        return [s for s in states if s is not None]

    async def active_sessions(self) -> list[str]:
        return cast(
            list[str],
            await self.retry.call("active", lambda: self.client.zrange(self.keys.active, 0, -1)),
        )

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
            raise _wrong_type(exc, session_id, "read events") from exc
        return [(eid, decode_entry(eid, fields, session_id)) for eid, fields in raw]

    async def cancel_markers(self, session_ids: Sequence[str]) -> list[str | None]:
        async def go() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for sid in session_ids:
                    pipe.get(self.keys.cancel(sid))
                return await pipe.execute()

        if not session_ids:
            return []
        return await self.retry.call("cancel markers", go)

    async def ttls(self, session_id: str) -> dict[str, int]:
        """Seconds to live of each per-session key (-1 none, -2 missing): for tests and ops."""
        names = ["runner", "events", "critical", "cancel", "children"]
        keys = self.keys.session_keys(session_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            values = await pipe.execute()
        return dict(zip(names, values, strict=True))


def _wrong_type(exc: rexc.ResponseError, session_id: str, what: str) -> Exception:
    """A clear error for a session key that holds the wrong type (junk written by hand)."""
    if "WRONGTYPE" in str(exc):
        return RunstateError(
            f"{what} of session {session_id!r} failed: one of its keys is not of the type "
            f"runstate writes (its events key must be a stream, runner a hash, critical a list): "
            f"{exc}"
        )
    return exc


def _parse_or_warn(raw: str, session_id: str) -> AgentEvent | None:
    try:
        return parse_event(raw)
    except ValueError as exc:
        log.warning("skipping unreadable replay event of session %r: %s", session_id, exc)
        return None


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)

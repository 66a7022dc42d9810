"""Models of what runstate stores in Redis: run status, runner state, reservation results."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from .errors import RunstateError
from .events import AgentEvent, parse_event

log = logging.getLogger(__name__)


class RunStatus(StrEnum):
    """A run's status, stored as this string in the runner hash."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"

    ACTIVE: ClassVar[frozenset[RunStatus]]
    TERMINAL: ClassVar[frozenset[RunStatus]]

    @property
    def is_active(self) -> bool:
        return self in RunStatus.ACTIVE

    @property
    def is_terminal(self) -> bool:
        return self in RunStatus.TERMINAL


RunStatus.ACTIVE = frozenset({RunStatus.PENDING, RunStatus.RUNNING})
RunStatus.TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.ERROR})


class Reserved(BaseModel):
    """A new run was reserved (and, for execute, dispatched)."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    run_id: str


class AlreadyRunning(BaseModel):
    """The session already has an active run; nothing was changed."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    run_id: str


ReserveResult = Reserved | AlreadyRunning


def _event_or_none(raw: str | None, where: str) -> AgentEvent | None:
    if not raw:
        return None
    try:
        return parse_event(raw)
    except ValueError as exc:
        log.warning("skipping unreadable %s: %s", where, exc)
        return None


class RunnerState(BaseModel):
    """A session's current run, read from its runner hash and critical list (the seed's fields)."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    run_id: str
    status: RunStatus
    started_at: datetime | None = None
    completed_at: datetime | None = None
    last_budget_event: SerializeAsAny[AgentEvent] | None = None
    last_critical_events: list[SerializeAsAny[AgentEvent]] = Field(default_factory=list)
    last_tool_name: str | None = None
    last_tool_phase: str | None = None
    last_event_at: datetime | None = None
    round_count: int = 0
    error: str | None = None
    worker: str | None = None
    attempt: int = 0
    parent: str | None = None
    seq: int = 0
    event_count: int = 0
    last_event_id: str | None = None

    @classmethod
    def from_redis(
        cls, session_id: str, fields: dict[str, str], critical: list[str]
    ) -> RunnerState | None:
        """Build from ``HGETALL`` of the runner hash and ``LRANGE`` of the critical list.

        Unreadable events are skipped with a warning.

        Raises:
            RunstateError: a field holds a value runstate never writes (junk written by hand),
                naming the session and the field.
        """
        if not fields.get("run_id") or not fields.get("status"):
            return None
        events = [e for raw in critical if (e := _event_or_none(raw, "critical event"))]
        data: dict[str, Any] = {
            k: v for k, v in fields.items() if k in cls.model_fields and v != ""
        }
        data["session_id"] = session_id
        data["last_budget_event"] = _event_or_none(fields.get("last_budget_event"), "budget event")
        data["last_critical_events"] = events
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            bad = "; ".join(
                f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}"
                for e in exc.errors()
            )
            raise RunstateError(
                f"the runner hash of session {session_id!r} holds what runstate never writes: {bad}"
            ) from exc

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict of the state (events as their JSON objects)."""
        out: dict[str, Any] = json.loads(self.model_dump_json())
        return out

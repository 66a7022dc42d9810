"""What the worker pool's reads return: queue entries, consumers, and the runs the reaper probes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from .keys import validate_session_id

__all__ = ["ConsumerInfo", "QueueEntry", "RunOwner", "RunProbe", "int_or_none", "iso_ms"]


def iso_ms(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(datetime.fromisoformat(value).timestamp() * 1000)
    except ValueError:
        return None


def int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One entry of the dispatch stream, as delivered to a consumer.

    ``session_id`` and ``run_id`` are None for an entry runstate did not write (junk, or an
    entry deleted while it was pending), which the consumer should just acknowledge.
    """

    id: str
    session_id: str | None
    run_id: str | None

    @classmethod
    def decode(cls, entry_id: str, fields: Mapping[str, str] | None) -> QueueEntry:
        fields = fields or {}
        session_id, run_id = fields.get("session"), fields.get("run")
        try:
            if session_id is not None:
                validate_session_id(session_id)
        except (TypeError, ValueError):
            session_id = None
        if not session_id or not run_id:
            return cls(entry_id, None, None)
        return cls(entry_id, session_id, run_id)


@dataclass(frozen=True, slots=True)
class RunProbe:
    """What the reaper reads of one session's runner hash (None fields: missing or unreadable)."""

    session_id: str
    run_id: str | None
    status: str | None
    worker: str
    attempt: int
    dispatch: str
    due_ms: int | None
    reserved_ms: int | None
    requeued_ms: int | None


@dataclass(frozen=True, slots=True)
class RunOwner:
    """Who owns a session now, as read for a run a worker believes it is running."""

    session_id: str
    run_id: str  # the run the worker asked about
    current_run_id: str
    status: str
    attempt: int
    worker: str

    def owned_by(self, worker_id: str, attempt: int) -> bool:
        """True if the run is still running, as this attempt, on ``worker_id``."""
        return self.status == "running" and self._same(worker_id, attempt)

    def ended_by(self, worker_id: str, attempt: int) -> bool:
        """True if this attempt on ``worker_id`` ended the run itself (completed or error)."""
        return self.status in ("completed", "error") and self._same(worker_id, attempt)

    def _same(self, worker_id: str, attempt: int) -> bool:
        return (self.current_run_id, self.attempt, self.worker) == (self.run_id, attempt, worker_id)


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of the queue's group (a worker id, or a reaper's name)."""

    name: str
    pending: int
    idle_ms: int

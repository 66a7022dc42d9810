"""What the store's scripts and pipelines answer: the records made of their replies, and the
clear errors made of their failures (junk written by hand, bytes that are not text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import exceptions as rexc

from .errors import RunstateError
from .events import AgentEvent, StreamEvent

__all__ = ["CancelOutcome", "Claimed", "Snapshot", "junk_tolerant", "not_text", "wrong_type"]


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
    wake_id: str | None = None  # the entry written to the reader's wake-up stream, if any


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    cancelled: bool
    run_id: str | None
    previous_status: str
    children: list[str]


def wrong_type(exc: rexc.ResponseError, session_id: str, what: str) -> Exception:
    """A clear error for a session key that holds the wrong type (junk written by hand)."""
    if "junk written by hand" in str(exc):  # a script's own check, naming the key
        return RunstateError(f"{what} of session {session_id!r} failed: {exc}")
    if "WRONGTYPE" in str(exc):
        return RunstateError(
            f"{what} of session {session_id!r} failed: one of its keys is not of the type "
            f"runstate writes (its events key must be a stream, runner a hash, critical a list): "
            f"{exc}"
        )
    return exc


def not_text(exc: UnicodeDecodeError, session_id: str, what: str) -> RunstateError:
    """A clear error for bytes that are not UTF-8 in a session's keys, read by a client that
    decodes strictly (:meth:`Coordinator.from_url` replaces them instead)."""
    return RunstateError(
        f"{what} of session {session_id!r} failed: its keys hold bytes that are not UTF-8 text "
        f"(junk written by hand?): {exc}"
    )


def junk_tolerant(results: list[Any]) -> list[Any]:
    """The results of a pipeline run with ``raise_on_error=False``: WRONGTYPE errors (a key
    holding junk) are left in place for the caller to skip; any other error is raised."""
    for result in results:
        if isinstance(result, Exception) and "WRONGTYPE" not in str(result):
            raise result
    return results

"""Every Redis key runstate uses, spelled in one place.

With the default prefix ``runstate`` (``<sid>`` is a session id):

``runstate:{<sid>}:runner`` (hash)
    the session's current run (the fields of RunnerState); TTL: retention, once the run ended.
``runstate:{<sid>}:events`` (stream)
    the session's events, MAXLEN ~ 1000, fields run, seq, type, data; TTL: retention.
``runstate:{<sid>}:critical`` (list)
    JSON critical events of the current run, at most 32; TTL: retention.
``runstate:{<sid>}:cancel`` (string)
    the run_id whose cancel was asked; TTL: the cancel marker TTL.
``runstate:{<sid>}:children`` (set)
    child session ids spawned by the current run; TTL: retention.
``runstate:queue`` (stream, consumer group ``workers``)
    dispatched runs, fields session, run; no TTL, entries deleted when claimed.
``runstate:schedule`` (sorted set)
    ``"<sid> <run_id>"`` of runs dispatched later, scored by due time (ms).
``runstate:active`` (sorted set)
    sessions with an active run, scored by reservation time (ms).
``runstate:workers`` (sorted set)
    worker ids scored by heartbeat deadline (ms).
``runstate:worker:<id>`` (hash)
    a worker's host, pid, concurrency and start time; TTL: a few heartbeats.
``runstate:lock:<name>`` (string)
    the holder of a cluster-wide lock (the reaper, the scheduler); TTL: the lock's.
``runstate:hub:<id>`` (stream)
    one process's event-reader wake-up: at most one entry, written when the reader must start
    reading another session's stream; TTL: 60 s, renewed by each wake-up.
``runstate:idem:<key>`` (string)
    an HTTP response replayed for an Idempotency-Key; TTL: 10 minutes.
``runstate:cancel`` (pub/sub channel)
    ``"<sid> <run_id>"`` cancel nudges.

Per-session keys share the hash tag ``{<sid>}`` so that every per-session script touches one
slot (Redis Cluster). Global keys are only ever touched by separate, idempotent commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "runstate"

SESSION_ID_MAX_LEN = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]+")
_PREFIX = re.compile(r"[A-Za-z0-9._:-]+")
_WORKER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,200}")

QUEUE_GROUP = "workers"


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it can safely name a session, else raise.

    Raises:
        TypeError: not a string.
        ValueError: empty, longer than 128 characters, or holding anything but letters, digits
            and ``. _ : @ -`` (so no id can break out of its hash tag or its key).
    """
    if not isinstance(session_id, str):
        raise TypeError(
            f"session id must be a str, got {type(session_id).__name__}: {session_id!r}"
        )
    if not session_id:
        raise ValueError(f"invalid session id {session_id!r}: it must not be empty")
    if len(session_id) > SESSION_ID_MAX_LEN:
        raise ValueError(
            f"invalid session id {session_id!r}: {len(session_id)} characters, "
            f"at most {SESSION_ID_MAX_LEN} allowed"
        )
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use only letters, digits and . _ : @ -"
        )
    return session_id


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a usable key prefix, else raise ``ValueError`` naming it."""
    if not isinstance(prefix, str) or not prefix or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"invalid key prefix {prefix!r}: use a non-empty string of letters, digits and . _ : -"
        )
    return prefix


def validate_worker_id(worker_id: object) -> str:
    """Return ``worker_id`` if it is a usable worker id, else raise ``ValueError`` naming it."""
    if not isinstance(worker_id, str) or not _WORKER_ID.fullmatch(worker_id):
        raise ValueError(
            f"invalid worker id {worker_id!r}: use 1-200 letters, digits and . _ : @ -"
        )
    return worker_id


def run_ref(session_id: str, run_id: str) -> str:
    """``"<session> <run_id>"``: how a run is named in the schedule, in cancel messages, in a
    child's ``parent`` field and in reports (session ids hold no spaces, so it splits back)."""
    return f"{session_id} {run_id}"


def parse_run_ref(value: object) -> tuple[str, str] | None:
    """The ``(session_id, run_id)`` of a :func:`run_ref`, or None if ``value`` is not one."""
    if not isinstance(value, str):
        return None
    session_id, sep, run_id = value.partition(" ")
    if not sep or not session_id or not run_id or " " in run_id:
        return None
    return session_id, run_id


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names for one prefix. The only object in runstate that spells a key."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    def _tag(self, session_id: str) -> str:
        """``<prefix>:{<session>}:``, what every per-session key starts with."""
        return f"{self.prefix}:{{{validate_session_id(session_id)}}}:"

    def _session(self, session_id: str, suffix: str) -> str:
        return self._tag(session_id) + suffix

    def runner(self, session_id: str) -> str:
        return self._session(session_id, "runner")

    def events(self, session_id: str) -> str:
        return self._session(session_id, "events")

    def critical(self, session_id: str) -> str:
        return self._session(session_id, "critical")

    def cancel(self, session_id: str) -> str:
        return self._session(session_id, "cancel")

    def children(self, session_id: str) -> str:
        return self._session(session_id, "children")

    def session_keys(self, session_id: str) -> list[str]:
        """The per-session keys in the order every per-session script receives them."""
        tag = self._tag(session_id)  # the id checked once, not once per key
        return [tag + suffix for suffix in ("runner", "events", "critical", "cancel", "children")]

    def session_of(self, key: str) -> str | None:
        """The session id inside a per-session key of this prefix, or None."""
        head = f"{self.prefix}:{{"
        if not key.startswith(head):
            return None
        end = key.find("}", len(head))
        return key[len(head) : end] if end > len(head) else None

    def runner_pattern(self) -> str:
        """A SCAN pattern that matches every session's runner hash."""
        return f"{self.prefix}:{{*}}:runner"

    @property
    def queue(self) -> str:
        return f"{self.prefix}:queue"

    @property
    def schedule(self) -> str:
        return f"{self.prefix}:schedule"

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{validate_worker_id(worker_id)}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    def hub(self, hub_id: str) -> str:
        return f"{self.prefix}:hub:{hub_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

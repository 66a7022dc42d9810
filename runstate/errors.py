"""The exceptions runstate raises.

::

    RunstateError
    ├── StaleRunError          a fenced write was refused: this run no longer owns the session
    │   ├── RunCancelled       ... because the run was cancelled (also raised by checkpoint())
    │   └── RunSuperseded      ... because a newer run or attempt took over, or the run ended
    ├── EventError (ValueError)
    │   ├── UnknownEventType   an event whose type no model is registered for
    │   └── EventTooLarge      an event (or payload) over the size limit
    └── RedisUnavailable       Redis did not answer through every retry
        └── RedisAccessDenied  Redis refused the credentials, or its ACL refused a command or key

Bad arguments (a malformed session id, a negative delay) raise plain ``ValueError`` /
``TypeError`` whose message names the offending value.
"""

from __future__ import annotations


class RunstateError(Exception):
    """Base class of every runstate exception."""


class StaleRunError(RunstateError):
    """A fenced write (claim, emit, finish) was refused because the run no longer owns its session.

    Attributes:
        session_id: the session written to.
        run_id: the run that tried to write.
        status: the session's status when the write was refused ("" if the session is gone).
        current_run_id: the run that owns the session now ("" if none).
    """

    def __init__(
        self, session_id: str, run_id: str, status: str = "", current_run_id: str = ""
    ) -> None:
        self.session_id = session_id
        self.run_id = run_id
        self.status = status
        self.current_run_id = current_run_id
        super().__init__(self._message())

    def _message(self) -> str:
        now = f"run {self.current_run_id!r} ({self.status})" if self.current_run_id else "nothing"
        return (
            f"run {self.run_id!r} of session {self.session_id!r} is stale: the session holds {now}"
        )


class RunCancelled(StaleRunError):
    """The run was cancelled; raised at the run's next safe point or by a refused write."""

    def __init__(self, session_id: str, run_id: str, reason: str = "cancelled") -> None:
        self.reason = reason
        super().__init__(session_id, run_id, "cancelled", run_id)

    def _message(self) -> str:
        return f"run {self.run_id!r} of session {self.session_id!r} was cancelled: {self.reason}"


class RunSuperseded(StaleRunError):
    """A newer run or attempt owns the session, or this run already ended."""


class EventError(RunstateError, ValueError):
    """An event that cannot be written."""


class UnknownEventType(EventError):
    """No event model is registered for this type."""


class EventTooLarge(EventError):
    """The serialised event is over the configured size limit."""


class RedisUnavailable(RunstateError):
    """Redis stayed unreachable through every retry; the operation was not (fully) applied."""


class RedisAccessDenied(RedisUnavailable):
    """Redis refused the credentials (wrong user or password) or an ACL refused a command or key.

    Raised at once, never retried: trying again cannot help. The message names the operation
    and carries Redis's own (which names the refused command).
    """

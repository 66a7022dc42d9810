"""Retrying transient Redis errors with backoff (tenacity); a lasting outage becomes an error.

Only errors that mean "the command may not have reached Redis, or its answer was lost" are
retried. Every write runstate makes is safe to repeat: reservations carry their run_id, emits
their sequence numbers, finishes and cancels their run, so a retry never writes twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as rexc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import RedisAccessDenied, RedisUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError
    rexc.TimeoutError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
)
# Subclasses of ConnectionError (or ResponseError) that trying again cannot help: a wrong
# password, an ACL that refuses a command or key. Raised at once as RedisAccessDenied.
FINAL_ERRORS: tuple[type[BaseException], ...] = (
    rexc.AuthenticationError,
    rexc.AuthorizationError,
    rexc.NoPermissionError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before giving up with :class:`RedisUnavailable`.

    Args:
        attempts: the most tries of one operation. The default is high enough that the
            deadline is what ends the tries of an operation failing fast (a refused
            connection while Redis restarts), so a restart or failover shorter than the
            deadline does not fail the operation.
        deadline: the most seconds spent on one operation, all tries together.
        initial: the first backoff in seconds (doubled each time, with jitter).
        max_wait: the longest single backoff in seconds.
    """

    attempts: int = 30
    deadline: float = 20.0
    initial: float = 0.05
    max_wait: float = 2.0

    def retrying(self, attempts: int | None = None, what: str = "") -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS)
            & retry_if_not_exception_type(FINAL_ERRORS),
            stop=stop_after_attempt(attempts or self.attempts) | stop_after_delay(self.deadline),
            wait=wait_random_exponential(multiplier=self.initial, max=self.max_wait),
            before_sleep=functools.partial(_log_retry, what),
        )

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it succeeds, a non-transient error is raised, or the policy gives up.

        Raises:
            RedisUnavailable: every try failed with a transient error.
            RedisAccessDenied: Redis refused the credentials or the ACL refused the command
                (at once, without retrying).
        """
        # The first try goes straight through: building tenacity's machinery for every command
        # would cost more than the command itself on a healthy connection.
        try:
            return await fn()
        except FINAL_ERRORS as exc:
            raise access_denied(what, exc) from exc
        except TRANSIENT_ERRORS as exc:
            if self.attempts <= 1:
                raise RedisUnavailable(f"{what}: Redis did not answer: {describe(exc)}") from exc
            log.warning("%s: redis error, retrying (try 1): %s", what, describe(exc))
            first = exc
        await asyncio.sleep(self.initial)
        try:
            async for attempt in self.retrying(self.attempts - 1, what):
                with attempt:
                    return await fn()
        except FINAL_ERRORS as exc:
            raise access_denied(what, exc) from exc
        except RetryError as exc:
            last = exc.last_attempt.exception() or first
            tries = exc.last_attempt.attempt_number + 1
            raise RedisUnavailable(
                f"{what}: Redis did not answer after {tries} tries "
                f"(gave up after at most {self.deadline:g}s): {describe(last)}"
            ) from last
        raise AssertionError("unreachable")  # pragma: no cover


def access_denied(what: str, exc: BaseException) -> RedisAccessDenied:
    """The clear error for a refused login or an ACL refusal of ``what``."""
    if isinstance(exc, rexc.NoPermissionError):
        return RedisAccessDenied(
            f"{what}: Redis refused it (NOPERM {exc}); the Redis user's ACL must allow "
            "runstate's keys (~<prefix>:*), its channel (&<prefix>:*) and its commands "
            "(see the README's Security section)"
        )
    return RedisAccessDenied(
        f"{what}: Redis authentication failed ({exc}); check the user name and password "
        "in the Redis URL"
    )


def _log_retry(what: str, state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "%s: redis error, retrying (try %d): %s", what, state.attempt_number + 1, describe(exc)
    )


def describe(exc: BaseException | None) -> str:
    """``"TimeoutError: Timeout reading from host:port"``: the error's class and message.

    redis-py's own ``repr`` (``network:TimeoutError``) leaves the message out.
    """
    if exc is None:
        return "no error"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


NO_RETRY = RetryPolicy(attempts=1, deadline=0.0)


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it is done.

    Cancel again until it takes: on Python 3.11 a cancel that lands while redis-py connects
    (inside ``asyncio.wait_for``) can be swallowed, leaving the task blocked in its next read.
    """
    while not task.done():
        task.cancel()
        # Wait a while before cancelling again: a second cancel would interrupt the task's own
        # cleanup (closing a connection in a finally block) and leak what it was closing.
        await asyncio.wait({task}, timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %r ended with %r", task, task.exception())

"""Retrying transient Redis errors with backoff (tenacity); a lasting outage becomes an error.

Only errors that mean "the command may not have reached Redis, or its answer was lost" are
retried. Every write runstate makes is safe to repeat: reservations carry their run_id, emits
their sequence numbers, finishes and cancels their run, so a retry never writes twice.
"""

from __future__ import annotations

import asyncio
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
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from .errors import RedisUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,  # includes BusyLoadingError
    rexc.TimeoutError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before giving up with :class:`RedisUnavailable`.

    Args:
        attempts: the most tries of one operation.
        deadline: the most seconds spent on one operation, all tries together.
        initial: the first backoff in seconds (doubled each time, with jitter).
        max_wait: the longest single backoff in seconds.
    """

    attempts: int = 8
    deadline: float = 20.0
    initial: float = 0.05
    max_wait: float = 2.0

    def retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT_ERRORS),
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.deadline),
            wait=wait_random_exponential(multiplier=self.initial, max=self.max_wait),
            before_sleep=_log_retry,
        )

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` until it succeeds, a non-transient error is raised, or the policy gives up.

        Raises:
            RedisUnavailable: every try failed with a transient error.
        """
        try:
            async for attempt in self.retrying():
                with attempt:
                    return await fn()
        except RetryError as exc:
            last = exc.last_attempt.exception()
            tries = exc.last_attempt.attempt_number
            raise RedisUnavailable(
                f"{what}: Redis did not answer after {tries} tries "
                f"(gave up after at most {self.deadline:g}s): {last!r}"
            ) from last
        raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("redis error, retrying (try %d): %r", state.attempt_number, exc)


NO_RETRY = RetryPolicy(attempts=1, deadline=0.0)


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is done.

    Cancel again until it takes: on Python 3.11 a cancel that lands while redis-py connects
    (inside ``asyncio.wait_for``) can be swallowed, leaving the task blocked in its next read.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())

"""What the subscription hub hands out: shared batches of events, and each subscriber's bounded
queue of them (:mod:`runstate.subscription` reads and fans out)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from .codec import parse_stream_id
from .events import StreamEvent

__all__ = ["Batch", "Overflow", "Subscriber", "Watch"]


class Overflow(Exception):
    """The subscriber fell behind its buffer; it must catch up from Redis."""


class Batch:
    """Consecutive events of one stream, as read together: decoded once and shared by every
    subscriber of the stream, with what each of them checks computed once too."""

    __slots__ = ("contiguous", "events", "first", "last", "terminal")

    def __init__(self, events: Sequence[StreamEvent]) -> None:
        self.events = events
        assert events[0].id is not None and events[-1].id is not None
        self.first = parse_stream_id(events[0].id)
        self.last = parse_stream_id(events[-1].id)
        # Ordinals without a hole: the usual case, where no event needs looking at one by one.
        self.contiguous = self.last[1] - self.first[1] == len(events) - 1
        self.terminal = next((i for i, e in enumerate(events) if e.event.is_terminal), -1)

    def after(self, position: tuple[int, int]) -> Batch | None:
        """The events after ``position`` (None if none)."""
        if self.first > position:
            return self
        rest = [e for e in self.events if e.id is not None and parse_stream_id(e.id) > position]
        return Batch(rest) if rest else None


class Subscriber:
    """One subscriber's bounded queue of batches: it overflows (and must catch up from Redis)
    rather than grow past ``limit`` events."""

    __slots__ = ("error", "items", "limit", "overflowed", "size", "start", "waiter")

    def __init__(self, limit: int, start: str) -> None:
        self.items: deque[Batch] = deque()
        self.size = 0  # events in items
        self.limit = limit
        self.overflowed = False
        self.start = start  # the hub's cursor when this subscriber attached
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None

    def push(self, batch: Batch) -> None:
        if self.overflowed:
            return
        if self.size + len(batch.events) > self.limit:
            self.overflowed = True
            self.items.clear()
            self.size = 0
        else:
            self.items.append(batch)
            self.size += len(batch.events)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self) -> Batch:
        while not self.items:
            if self.error is not None:
                raise self.error
            if self.overflowed:
                raise Overflow
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        batch = self.items.popleft()
        self.size -= len(batch.events)
        return batch


class Watch:
    """One watched stream: the read cursor and the subscribers its events go to."""

    __slots__ = ("cursor", "subs")

    def __init__(self, cursor: str) -> None:
        self.cursor = cursor
        self.subs: set[Subscriber] = set()

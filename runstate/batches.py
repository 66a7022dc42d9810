"""What the subscription hub hands out: shared batches of events, kept in one log per watched
stream that every local subscriber of it reads at its own pace (:mod:`runstate.hub` reads
Redis and appends to the logs, :mod:`runstate.subscription` reads them).

Handing a read to a thousand subscribers is one append and ten wake-ups of futures shared by a
hundred subscribers each, not a thousand queue pushes and futures; the wake-ups of later reads
queue behind those still to go, so every subscriber is woken once per pass. Batches that follow
one another also go into a segment, one list of their events, so that a subscriber woken after
several reads takes them all in one slice rather than one batch at a time. Appends drop the
batches that lie more than ``limit`` events before the end, and, every so many appends, those
that every subscriber has read; a subscriber that falls further behind than the limit
overflows, and catches up from Redis instead. A subscriber cancelled while it waits cancels its
group's future, which wakes the rest of the group for nothing: they wait again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from .codec import parse_stream_id
from .events import StreamEvent

__all__ = ["Batch", "Overflow", "Segment", "Subscriber", "Watch"]

# Subscribers woken per turn of the event loop (see Watch.wake).
WAKE_GROUP = 100
# Batches the log may hold before an append looks at every subscriber's place to drop those all
# of them have read (see Watch._trim); then twice what is left, so that the look, which costs a
# step per subscriber, is paid once per many appends even while a slow reader holds the log.
SWEEP_FROM = 16


class Overflow(Exception):
    """The subscriber fell more than the limit behind the end of the log; it must catch up
    from Redis."""


class Batch:
    """Consecutive events of one stream, as read together: decoded once and shared by every
    subscriber of the stream, with what each of them checks computed once too."""

    __slots__ = (
        "at",
        "contiguous",
        "end",
        "events",
        "first",
        "follows",
        "last",
        "segment",
        "terminal",
    )

    def __init__(self, events: Sequence[StreamEvent]) -> None:
        self.events = events
        assert events[0].id is not None and events[-1].id is not None
        self.first = parse_stream_id(events[0].id)
        self.last = parse_stream_id(events[-1].id)
        # Ordinals without a hole: the usual case, where no event needs looking at one by one.
        self.contiguous = self.last[1] - self.first[1] == len(events) - 1
        self.terminal = next((i for i, e in enumerate(events) if e.event.is_terminal), -1)
        self.end = 0  # in a Watch's log: how many events the log had received through this one
        # In a Watch's log: whether its events come right after the previous batch's, no hole
        # and no overlap; then a subscriber that took that one whole takes this one whole.
        self.follows = False
        # In a Watch's log, when it follows and holds no terminal event: the segment it is part
        # of, from its first event on at ``segment.events[at]``.
        self.segment: Segment | None = None
        self.at = 0

    def after(self, position: tuple[int, int]) -> Batch | None:
        """The events after ``position`` (None if none)."""
        if self.first > position:
            return self
        rest = [e for e in self.events if e.id is not None and parse_stream_id(e.id) > position]
        return Batch(rest) if rest else None


class Segment:
    """Batches of a watch's log that follow one another with no terminal event, as one list of
    their events: a subscriber that took the batch before one of them whole takes everything
    from that one to the segment's end in one slice, however many reads brought it.

    Once a segment holds the watch's ``limit`` of events, the next batch starts a new one, so
    that the log's trimming lets go of a long run's events.
    """

    __slots__ = ("end", "events", "last")

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.last: Batch | None = None  # its last batch
        self.end = 0  # the log position after its last batch


class Watch:
    """One watched stream: the read cursor, its subscribers, and the log of batches they read.

    Args:
        cursor: the stream id the hub's reader reads after.
        limit: how many events one subscriber may have left unread before it overflows.
        key: the stream's key, as the reader names it in every read.
    """

    __slots__ = (
        "base",
        "cursor",
        "group",
        "grouped",
        "key",
        "limit",
        "log",
        "queue",
        "segment",
        "subs",
        "sweep_at",
        "tail",
        "total",
        "waiting",
    )

    def __init__(self, cursor: str, limit: int, key: str = "") -> None:
        self.cursor = cursor
        self.limit = limit
        self.key = key
        self.subs: set[Subscriber] = set()
        self.log: deque[Batch] = deque()
        self.base = 0  # the position (counted in batches since the watch began) of log[0]
        self.total = 0  # events appended since the watch began
        self.sweep_at = SWEEP_FROM  # the log's length at which _trim looks at every place
        self.tail: Batch | None = None  # the last batch appended (trimmed or not)
        self.segment: Segment | None = None  # the one the tail is part of, if any
        # The waiting subscribers, in groups of up to WAKE_GROUP sharing one future each.
        self.waiting: list[asyncio.Future[None]] = []
        self.group: asyncio.Future[None] | None = None  # the group new waiters join
        self.grouped = 0  # how many joined it
        # The groups being woken, a group per turn: wake-ups queue behind those still to go.
        self.queue: deque[asyncio.Future[None]] = deque()

    @property
    def end(self) -> int:
        """The position the next batch appended will have."""
        return self.base + len(self.log)

    def append(self, batch: Batch) -> None:
        """Add a batch for every subscriber and wake those waiting."""
        self.total += len(batch.events)
        batch.end = self.total
        tail = self.tail
        batch.follows = (
            tail is not None
            and batch.contiguous
            and batch.first[1] == tail.last[1] + 1
            and batch.first > tail.last
        )
        self.tail = batch
        self.log.append(batch)
        if batch.follows and batch.terminal < 0:
            segment = self.segment
            if segment is None or len(segment.events) >= self.limit:
                segment = self.segment = Segment()
            batch.segment, batch.at = segment, len(segment.events)
            segment.events.extend(batch.events)
            segment.last, segment.end = batch, self.end
        else:
            self.segment = None
        self._trim()
        self.wake()

    def _trim(self) -> None:
        """Drop the batches no subscriber will read: those beyond ``limit`` events (whoever has
        not read them has overflowed), and, once the log holds ``sweep_at`` batches, those read
        by every subscriber. A thousand subscribers' places are looked at once per many appends,
        not at every one; the batches read by all that the log keeps meanwhile are shared by
        every subscriber, a few list entries."""
        log = self.log
        floor = self.total - self.limit
        while log and log[0].end - len(log[0].events) < floor:
            log.popleft()
            self.base += 1
        if len(log) < self.sweep_at:
            return
        oldest = min((s.position for s in self.subs), default=self.end)
        while log and self.base < oldest:
            log.popleft()
            self.base += 1
        self.sweep_at = max(SWEEP_FROM, 2 * len(log))

    def waiter(self) -> asyncio.Future[None]:
        """The future a subscriber waits on: done at the next append (or failure), shared with
        other waiting subscribers of the watch. A subscriber cancelled while awaiting it cancels
        it for all of them, who then just wait again."""
        group = self.group
        if group is None or group.done() or self.grouped >= WAKE_GROUP:
            if group is not None and group.cancelled():
                # A subscriber's cancellation cancelled it (see above): forget it,
                # so that disconnects on a quiet stream do not pile up cancelled groups.
                self.waiting = [g for g in self.waiting if not g.done()]
            group = self.group = asyncio.get_running_loop().create_future()
            self.waiting.append(group)
            self.grouped = 0
        self.grouped += 1
        return group

    def wake(self) -> None:
        """Wake every waiting subscriber, a group per turn of the event loop.

        Between two groups the loop handles I/O: the hub's next read comes in and is appended
        while the wake-up goes on, so the subscribers still to be woken get it in the same
        wake-up. The groups waiting by then (those woken first, waiting again) queue behind
        those still to be woken: first come, first served, so the last of a thousand
        subscribers is not put off again by the first ones' next wake-up.
        """
        groups, self.waiting, self.group = self.waiting, [], None
        going = bool(self.queue)  # then these are woken after it
        self.queue.extend(groups)
        if groups and not going:
            self._wake_next()

    def _wake_next(self) -> None:
        """Wake the next group in the queue, and the one after it next turn.

        The next turn is scheduled on the group's own loop before anything else, so that the
        queue is never left holding groups with no turn to come (every later wake-up would
        then only add to it): a group not done yet is in the queue only while a turn is due.
        """
        queue = self.queue
        while queue:
            group = queue.popleft()
            if not group.done():
                if queue:
                    group.get_loop().call_soon(self._wake_next)
                group.set_result(None)  # its subscribers run next turn, then this again
                return


class Subscriber:
    """One subscriber's place in its watch's log: it overflows (and must catch up from Redis)
    rather than hold the log past ``limit`` unread events."""

    __slots__ = ("error", "position", "start", "watch")

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.position = watch.end  # the next batch to read
        self.start = watch.cursor  # the hub's cursor when this subscriber attached
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.watch.wake()

    def next(self) -> Batch | None:
        """The next batch, or None when there is none yet (then await ``watch.waiter()``).

        Raises:
            Overflow: this subscriber fell further behind than the watch's limit.
        """
        watch = self.watch
        index = self.position - watch.base
        if index >= len(watch.log):
            if self.error is not None:
                raise self.error
            return None
        # Every batch the log still holds lies within the limit (each append drops those that
        # do not, see Watch._trim): the subscriber fell too far behind when its next one is gone.
        if index < 0:
            if self.error is not None:  # say why it ends, rather than catch up from Redis
                raise self.error
            raise Overflow
        self.position += 1
        return watch.log[index]

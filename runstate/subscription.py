"""Subscribing to a session's events (DESIGN §4): snapshot replay, live events, exact resume.

The events come from this process's :class:`~runstate.hub.Hub`, which reads every watched stream
over one connection; a subscriber that is behind reads pages of the stream itself.

Each subscriber checks the ordinal in every event id (``<ms>-<n>``, n counting the session's
events), so it knows exactly how many events it did not get: if events were trimmed away before
it read them, it is told with a ``gap`` event carrying that number, then gets the snapshot replay
and the live tail. A subscriber that falls too far behind the hub's log is not a reason to stall the
reader or grow memory: it catches up from Redis on its own, which only costs a gap if the events
it missed have been trimmed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from .batches import Batch, Overflow
from .codec import parse_stream_id
from .events import Gap, StreamEvent
from .hub import CATCH_UP_PAGE, Hub
from .keys import validate_session_id
from .replies import Snapshot

log = logging.getLogger(__name__)


def normalize_stream_id(value: str) -> str:
    """A ``last_event_id`` as a full stream id (``"0"`` -> ``"0-0"``).

    Raises:
        ValueError: naming the value, when it is not a stream id.
    """
    if not isinstance(value, str):
        raise TypeError(f"last_event_id must be a str, got {value!r}")
    ms, n = parse_stream_id(value.strip())
    return f"{ms}-{n}"


def _replay(snapshot: Snapshot) -> list[StreamEvent]:
    """What a snapshot hands a subscriber first: critical events, the last budget event, and
    the terminal event of an ended run."""
    run_id = snapshot.run_id or ""
    items = [StreamEvent(id=None, run_id=run_id, event=e) for e in snapshot.critical]
    if snapshot.budget is not None:
        items.append(StreamEvent(id=None, run_id=run_id, event=snapshot.budget))
    if snapshot.terminal is not None:
        items.append(snapshot.terminal)
    return items


class _Gap(Exception):
    """Events were trimmed away before the subscriber read them."""


class _Place:
    """How far one subscriber has got: the last entry read, and the ordinal (the ``n`` of
    ``<ms>-<n>``, counting the session's events) that the next event must have."""

    __slots__ = ("at", "cursor", "done", "expect", "follow", "gap", "session_id")

    def __init__(self, session_id: str, cursor: str, follow: bool) -> None:
        self.session_id = session_id
        self.follow = follow
        self.done = False  # the run's terminal event was handed out (and we do not follow)
        self.gap = False  # take() met a hole: hand out what it returned, then raise _Gap
        self.move(cursor)
        # None after "0-0": whatever is retained comes first, with no ordinal to check.
        self.expect: int | None = self.at[1] + 1 if cursor != "0-0" else None

    def move(self, cursor: str) -> None:
        self.cursor = cursor
        self.at = parse_stream_id(cursor)

    def reach(self, batch: Batch) -> None:
        """Note that every event through ``batch`` was handed out, ``batch`` following on from
        the last event read."""
        self.expect = batch.last[1] + 1
        self.at = batch.last
        self.cursor = batch.events[-1].id or self.cursor

    def take(self, batch: Batch) -> list[StreamEvent]:
        """The events of ``batch`` to hand out: those after the last one read, up to a hole in
        the ordinals (then raises :class:`_Gap` once they are handed out, see ``gap``) or to the
        terminal event (then ``done``, unless following)."""
        if batch.last <= self.at:
            return []
        if batch.first <= self.at:  # the reader's batch overlaps what came from Redis directly
            rest = batch.after(self.at)
            assert rest is not None
            batch = rest
        events = batch.events
        if self.expect is not None and batch.contiguous and batch.first[1] == self.expect:
            self.expect = batch.last[1] + 1
            if batch.terminal >= 0 and not self.follow:
                self.done = True
                return list(events[: batch.terminal + 1])
            self.cursor, self.at = events[-1].id or self.cursor, batch.last
            return list(events)
        # Look at each event: the first one after a hole means trimmed events.
        out: list[StreamEvent] = []
        for event in events:
            assert event.id is not None
            n = parse_stream_id(event.id)[1]
            if self.expect is not None and n > self.expect:
                self.gap = True
                break
            if self.expect is not None and n < self.expect:
                log.warning(
                    "session %r stream restarted (event %s after ordinal %d)",
                    self.session_id,
                    event.id,
                    self.expect - 1,
                )
            self.expect = n + 1
            out.append(event)
            if event.event.is_terminal and not self.follow:
                self.done = True
                break
        if out:
            self.move(out[-1].id or self.cursor)
        return out

    def finished(self) -> bool:
        """After handing out what :meth:`take` returned: True once the subscription is over;
        raises :class:`_Gap` at a hole."""
        if self.done:
            return True
        if self.gap:
            raise _Gap
        return False


async def _pages(hub: Hub, session_id: str, place: _Place, before: str) -> AsyncIterator[Batch]:
    """The stream's entries after ``place`` up to ``before`` (``"+"``: the end), read from
    Redis a page at a time, as batches; ``place`` moves past each page, entries that did not
    decode included."""
    while before == "+" or parse_stream_id(before) > place.at:
        page = await hub.read_range(session_id, place.cursor, before)
        events = [event for _, event in page if event is not None]
        if events:
            yield Batch(events)
        if page:
            place.move(page[-1][0])
        if len(page) < CATCH_UP_PAGE:
            return


def _cancelled_by_another(waiter: asyncio.Future[None]) -> bool:
    """Whether a waiter shared by several subscribers (see :class:`Watch`) was cancelled by
    another one's cancellation rather than this task's.

    This task's own cancellation shows in ``Task.cancelling()``, even one requested while it
    ran, just before it began waiting (its count cannot tell that one from an old one, so any
    count means ours). A task that caught a cancellation earlier without calling ``uncancel()``
    (as asyncio asks) therefore still counts as cancelled, and gets a ``CancelledError`` when
    another subscriber's cancellation wakes it.
    """
    task = asyncio.current_task()
    return waiter.cancelled() and task is not None and not task.cancelling()


async def subscribe(
    hub: Hub,
    session_id: str,
    last_event_id: str | None = None,
    *,
    follow: bool = False,
) -> AsyncIterator[StreamEvent]:
    """Yield a session's events: snapshot replay then live, or an exact resume after an id.

    Args:
        last_event_id: resume after this stream id (``"0"`` for everything retained); None to
            start from the snapshot (critical events oldest first, the last budget event, live).
        follow: keep following the session after the run's terminal event.
    """
    batches = subscribe_batches(hub, session_id, last_event_id, follow=follow)
    try:
        async for batch in batches:
            for event in batch:
                yield event
    finally:
        await batches.aclose()


async def subscribe_batches(
    hub: Hub,
    session_id: str,
    last_event_id: str | None = None,
    *,
    follow: bool = False,
) -> AsyncGenerator[list[StreamEvent], None]:
    """What :func:`subscribe` yields, as lists of the events ready at once.

    The same events in the same order; a consumer that writes them out (an SSE response, a
    websocket) does one write per list instead of one per event, and keeps up with far more
    events per second. A consumer that comes back for more after the reader has read several
    times usually gets all of it as one list (not across a hole in the stream or the run's
    terminal event; a long backlog may come as a few lists).

    Every event after the place reached, in order, each once: a subscriber that is behind (a
    resume, or one that fell too far behind) first pages through the stream itself, at its
    own pace, and only then joins the hub's reader near the end, since a reader batch larger
    than its limit could otherwise overflow it again and again. The live part is written out
    here rather than in a helper generator: with many subscribers per process, each layer of
    generators costs a noticeable share of every wake-up.
    """
    validate_session_id(session_id)
    if last_event_id is None:
        snapshot = await hub.snapshot(session_id, follow=follow)
        if first := _replay(snapshot):
            yield first
        if snapshot.terminal is not None and not follow:
            return
        place = _Place(session_id, snapshot.last_id, follow)
    else:
        place = _Place(session_id, normalize_stream_id(last_event_id), follow)
    backlog = last_event_id is not None  # a resume may be far behind: read it at our own pace

    while True:
        try:
            while True:  # one round per overflow (the subscriber fell too far behind)
                if backlog:
                    async for page in _pages(hub, session_id, place, "+"):
                        if out := place.take(page):
                            yield out
                        if place.finished():
                            return
                sub = hub.attach(session_id, place.cursor)
                try:
                    # What the hub's reader had already passed when we attached comes from Redis.
                    async for page in _pages(hub, session_id, place, sub.start):
                        if out := place.take(page):
                            yield out
                        if place.finished():
                            return
                    watch, log = sub.watch, sub.watch.log
                    # Whether we took the batch before the one at our position whole: then if
                    # ours is part of a segment (it follows that one, see Batch.segment), the
                    # segment's events from ours on are ours whole too, with nothing to check
                    # event by event. The last batch so taken, until `place` is told.
                    synced, taken = False, None
                    while True:  # live
                        # The usual cases first, written out (each call saved is a share of
                        # every wake-up, with a thousand subscribers in a process): nothing new
                        # yet (wait), or the segment that goes on from what we took whole.
                        index = sub.position - watch.base
                        if index >= len(log):
                            if sub.error is None:
                                waiter = watch.waiter()
                                try:
                                    await waiter
                                except asyncio.CancelledError:
                                    if not _cancelled_by_another(waiter):
                                        raise
                                continue
                        elif index >= 0 and synced:
                            # Every batch from ours to the end of its segment (those that
                            # follow one another with no terminal event), as one list.
                            ready = log[index]
                            segment = ready.segment
                            if segment is not None:
                                taken = segment.last
                                sub.position = segment.end
                                yield segment.events[ready.at :]
                                continue
                        # The rest: the subscriber's error, an overflow, or a batch to look at
                        # event by event, from where the batches taken whole got us.
                        if taken is not None:
                            place.reach(taken)
                            taken = None
                        batch = sub.next()
                        assert batch is not None
                        if out := place.take(batch):
                            yield out
                        if place.finished():
                            return
                        synced = place.at == batch.last
                except Overflow:
                    backlog = True  # we fell too far behind: catch up from Redis ourselves
                finally:
                    hub.detach(session_id, sub)
        except _Gap:
            pass
        # Say how many events we will not deliver, then start again from a fresh snapshot.
        snapshot = await hub.snapshot(session_id, follow=follow)
        assert place.expect is not None
        # Everything after our last event up to the snapshot, but the terminal event that the
        # snapshot hands over itself.
        replayed = 1 if snapshot.terminal is not None else 0
        missed = max(0, parse_stream_id(snapshot.last_id)[1] - (place.expect - 1) - replayed)
        gap = StreamEvent(id=None, run_id=snapshot.run_id or "", event=Gap(missed=missed))
        yield [gap, *_replay(snapshot)]
        if snapshot.terminal is not None and not follow:
            return
        place, backlog = _Place(session_id, snapshot.last_id, follow), False

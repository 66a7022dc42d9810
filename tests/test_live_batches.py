"""The live part of a subscription (runstate.subscription.subscribe_batches) on a watch whose
batches the test appends by hand: the batches that follow the last one taken whole are handed
over without a look at each event, and what comes after them (a hole, an overflow) still
starts from exactly the last event handed out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from runstate.batches import Batch, Subscriber, Watch
from runstate.events import Complete, Gap, StreamEvent, Token
from runstate.replies import Snapshot
from runstate.subscription import subscribe_batches

Batches = AsyncIterator[list[StreamEvent]]


def batch(first: int, count: int = 1) -> Batch:
    return Batch(
        [
            StreamEvent(id=f"1-{n}", run_id="r1", event=Token(content=str(n)))
            for n in range(first, first + count)
        ]
    )


class HandHub:
    """What subscribe_batches asks of a Hub, with one watch the test appends to, a stream that
    ends at ``last_id`` and nothing to read from it but ``entries``."""

    def __init__(self, limit: int = 100) -> None:
        self.watch = Watch("1-0", limit)
        self.last_id = "1-0"
        self.entries: list[tuple[str, StreamEvent | None]] = []
        self.ranges: list[str] = []  # the `after` of each read_range

    async def snapshot(self, session_id: str, *, follow: bool = False) -> Snapshot:
        return Snapshot("r1", "running", self.last_id, None, [], None)

    async def read_range(
        self, session_id: str, after: str, before: str
    ) -> list[tuple[str, StreamEvent | None]]:
        self.ranges.append(after)
        return [(eid, e) for eid, e in self.entries if int(eid.split("-")[1]) > int(after[2:])]

    def attach(self, session_id: str, after: str) -> Subscriber:
        sub = Subscriber(self.watch)
        self.watch.subs.add(sub)
        return sub

    def detach(self, session_id: str, sub: Subscriber) -> None:
        self.watch.subs.discard(sub)


async def waiting_for_a_batch(hub: HandHub, it: Batches) -> asyncio.Future[list[StreamEvent]]:
    """The subscriber's next batch, once it waits for one at the end of the log."""
    future: asyncio.Future[list[StreamEvent]] = asyncio.ensure_future(anext(it))
    for _ in range(100):
        if hub.watch.waiting:
            return future
        await asyncio.sleep(0)
    raise AssertionError("the subscriber never waited for a batch")


def ordinals(got: list[StreamEvent]) -> list[int]:
    return [int(e.id.split("-")[1]) for e in got if e.id is not None]


async def handed(hub: HandHub, it: Batches, appended: Batch) -> list[StreamEvent]:
    """What the subscriber is handed when ``appended`` is appended while it waits."""
    future = await waiting_for_a_batch(hub, it)
    hub.watch.append(appended)
    return await asyncio.wait_for(future, 2)


async def test_a_hole_after_batches_taken_whole_counts_from_the_last_event_handed_out() -> None:
    # Given a live subscriber that took three batches in a row (events 1-8), the first after
    # a look at each event, the next two whole
    hub = HandHub()
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    got = [e for b in (batch(1, 3), batch(4, 3), batch(7, 2)) for e in await handed(hub, it, b)]
    assert ordinals(got) == list(range(1, 9))
    # When the reader's next batch skips events 9 and 10 (trimmed before it read them), and
    # the stream now ends at 12
    hub.last_id = "1-12"
    notice = await handed(hub, it, batch(11, 2))
    # Then the subscriber hears it missed exactly 9-12: the hole, and what it will not get
    # from this batch since it starts again from the snapshot
    assert isinstance(notice[0].event, Gap)
    assert notice[0].event.missed == 4
    # And it goes on live from there
    assert ordinals(await handed(hub, it, batch(13, 2))) == [13, 14]
    await it.aclose()


async def test_an_overflow_after_batches_taken_whole_catches_up_from_the_last_event() -> None:
    # Given a live subscriber with room for 4 unread events that took events 1-5 in two batches
    hub = HandHub(limit=4)
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    got = [e for b in (batch(1, 3), batch(4, 2)) for e in await handed(hub, it, b)]
    # When six more events pass while it does not read (more than its room)
    for n in range(6, 12, 2):
        hub.watch.append(batch(n, 2))
    hub.entries = [(f"1-{n}", batch(n).events[0]) for n in range(1, 12)]
    hub.last_id = "1-11"
    got += await asyncio.wait_for(anext(it), 2)
    # Then it reads the rest from the stream, from right after the last event it was handed
    assert hub.ranges[-1] == "1-5"
    assert ordinals(got) == list(range(1, 12))
    await it.aclose()


async def test_batches_the_subscriber_is_ahead_of_are_looked_at_not_handed_over_whole() -> None:
    # Given a watch that has read events 1-3, and a subscriber whose snapshot already saw
    # events through 9 (read by the snapshot before the hub's reader got to them)
    hub = HandHub()
    hub.watch.append(batch(1, 3))
    hub.last_id = "1-9"
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    pending = await waiting_for_a_batch(hub, it)
    # When the reader catches up in batches that each follow the last (4-6, 7-9), then reads on
    hub.watch.append(batch(4, 3))
    hub.watch.append(batch(7, 3))
    hub.watch.append(batch(10, 2))
    # Then the subscriber is handed only what comes after what it already has
    assert ordinals(await asyncio.wait_for(pending, 2)) == [10, 11]
    await it.aclose()


async def test_batches_that_wait_in_the_log_are_handed_over_as_one_list() -> None:
    # Given a live subscriber that took events 1-5 (the second batch whole)
    hub = HandHub()
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    got = [e for b in (batch(1, 3), batch(4, 2)) for e in await handed(hub, it, b)]
    # When three more batches are read while it does not read (within its room)
    for first, count in ((6, 2), (8, 1), (9, 2)):
        hub.watch.append(batch(first, count))
    # Then its next list holds all of them, in order, once each
    merged = await asyncio.wait_for(anext(it), 2)
    assert ordinals(merged) == [6, 7, 8, 9, 10]
    # And it goes on live after them
    assert ordinals(await handed(hub, it, batch(11, 1))) == [11]
    assert ordinals(got) == [1, 2, 3, 4, 5]
    await it.aclose()


async def test_a_backlog_across_a_full_segment_comes_as_two_lists_each_event_once() -> None:
    # Given a live subscriber with room for 4 unread events that took events 1-5 (the second
    # batch whole, the first of a segment)
    hub = HandHub(limit=4)
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    got = [e for b in (batch(1, 3), batch(4, 2)) for e in await handed(hub, it, b)]
    # When events 6-7 fill that segment and event 8 starts the next, while it does not read
    for first, count in ((6, 2), (8, 1)):
        hub.watch.append(batch(first, count))
    # Then it gets the rest of the first segment, then the next, each event once and in order
    assert ordinals(await asyncio.wait_for(anext(it), 2)) == [6, 7]
    assert ordinals(await asyncio.wait_for(anext(it), 2)) == [8]
    # And it goes on live after them
    assert ordinals(await handed(hub, it, batch(9, 1))) == [9]
    assert ordinals(got) == [1, 2, 3, 4, 5]
    await it.aclose()


async def test_a_follower_takes_the_terminal_event_and_goes_on_whole_after_it() -> None:
    # Given a subscriber that follows on after the run, and took events 1-5
    hub = HandHub()
    it = subscribe_batches(hub, "s1", follow=True)  # type: ignore[arg-type]
    for b in (batch(1, 3), batch(4, 2)):
        await handed(hub, it, b)
    # When the run's terminal event comes between two batches of tokens
    end = StreamEvent(id="1-6", run_id="r1", event=Complete())
    hub.watch.append(Batch([end, StreamEvent(id="1-7", run_id="r1", event=Token(content="x"))]))
    hub.watch.append(batch(8, 2))
    # Then it gets the terminal event's batch (looked at event by event), then the next whole
    assert ordinals(await asyncio.wait_for(anext(it), 2)) == [6, 7]
    assert ordinals(await asyncio.wait_for(anext(it), 2)) == [8, 9]
    assert ordinals(await handed(hub, it, batch(10, 1))) == [10]
    await it.aclose()


async def test_a_list_handed_over_at_once_stops_at_the_terminal_event() -> None:
    # Given a subscriber that does not follow on after the run, and took events 1-5
    hub = HandHub()
    it = subscribe_batches(hub, "s1")  # type: ignore[arg-type]
    for b in (batch(1, 3), batch(4, 2)):
        await handed(hub, it, b)
    # When events 6-7, then the run's terminal event with one more after it, wait in the log
    hub.watch.append(batch(6, 2))
    end = StreamEvent(id="1-8", run_id="r1", event=Complete())
    hub.watch.append(Batch([end, StreamEvent(id="1-9", run_id="r1", event=Token(content="x"))]))
    # Then it gets 6-7, then the terminal event, and nothing after it
    assert ordinals(await asyncio.wait_for(anext(it), 2)) == [6, 7]
    assert await asyncio.wait_for(anext(it), 2) == [end]
    assert [b async for b in it] == []


async def test_a_group_cancelled_while_it_waits_its_turn_still_wakes_the_rest() -> None:
    # Given 250 live subscribers waiting in three groups (100, 100, 50)
    hub = HandHub()
    its = [subscribe_batches(hub, "s1", follow=True) for _ in range(250)]  # type: ignore[arg-type]
    pending = [asyncio.ensure_future(anext(it)) for it in its]
    for _ in range(100):
        if len(hub.watch.waiting) == 3 and hub.watch.grouped == 50:
            break
        await asyncio.sleep(0)
    else:
        raise AssertionError("the subscribers never waited")
    # When a batch is appended, and a subscriber of the last group goes away before its turn
    # (which cancels the group's shared future)
    hub.watch.append(batch(1, 2))
    pending[-1].cancel()
    # Then every other subscriber is handed the batch, the rest of that group included
    got = await asyncio.wait_for(asyncio.gather(*pending[:-1]), 2)
    assert all(ordinals(g) == [1, 2] for g in got)
    assert len(got) == 249
    assert not hub.watch.queue
    for it in its:
        await it.aclose()

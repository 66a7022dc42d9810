"""The hub's shared log of batches (runstate.batches): one append serves every subscriber, each
reads at its own pace, the log holds what someone still has to read (and, until the next sweep, a
few batches all have read), and a subscriber that falls too far behind overflows instead of
holding it."""

from __future__ import annotations

import asyncio

import pytest

from runstate import RunstateError
from runstate.batches import SWEEP_FROM, Batch, Overflow, Subscriber, Watch
from runstate.events import Complete, StreamEvent, Token


def batch(first: int, count: int = 1) -> Batch:
    return Batch(
        [
            StreamEvent(id=f"1-{n}", run_id="r1", event=Token(content=str(n)))
            for n in range(first, first + count)
        ]
    )


def subscriber(watch: Watch) -> Subscriber:
    sub = Subscriber(watch)
    watch.subs.add(sub)
    return sub


def test_every_subscriber_reads_each_appended_batch_once_in_order() -> None:
    # Given two subscribers of one watch
    watch = Watch("0-0", limit=100)
    a, b = subscriber(watch), subscriber(watch)
    # When three batches are appended
    appended = [batch(1), batch(2, 3), batch(5)]
    for item in appended:
        watch.append(item)
    # Then each subscriber reads all three, in order, then finds nothing more
    for sub in (a, b):
        assert [sub.next() for _ in range(3)] == appended
        assert sub.next() is None


def test_a_subscriber_starts_at_the_end_of_the_log() -> None:
    # Given a watch that already handed out a batch
    watch = Watch("0-0", limit=100)
    early = subscriber(watch)
    watch.append(batch(1))
    # When another subscriber attaches, then a batch is appended
    late = subscriber(watch)
    watch.append(batch(2))
    # Then the late one reads only the new batch
    assert [late.next(), late.next()] == [watch.log[-1], None]
    assert early.next() is not None and early.next() is watch.log[-1]


def test_the_log_keeps_only_batches_someone_still_has_to_read() -> None:
    # Given two subscribers and a long stream of batches
    watch = Watch("0-0", limit=1000)
    a, b = subscriber(watch), subscriber(watch)
    for n in range(1, 51):
        watch.append(batch(n))
        assert a.next() is not None
    # Then the log holds what b has not read yet, no more
    assert len(watch.log) == 50
    for _ in range(50):
        assert b.next() is not None
    # When both keep reading, appends drop what both have read at the next sweep (the log
    # held 50 unread batches, so that is at 64), and from then on the log stays below
    # SWEEP_FROM batches
    lengths = []
    for n in range(51, 51 + 64 + 5 * SWEEP_FROM):
        watch.append(batch(n))
        assert a.next() is watch.log[-1] and b.next() is watch.log[-1]
        lengths.append(len(watch.log))
    assert max(lengths) == 63 and lengths.index(1) == 13
    assert max(lengths[13:]) == SWEEP_FROM - 1
    assert watch.end - watch.base == len(watch.log)


def test_the_log_looks_at_every_place_once_per_many_appends() -> None:
    # Given 1,000 subscribers that keep up, and one that reads nothing
    watch = Watch("0-0", limit=100_000)
    subs = [subscriber(watch) for _ in range(1000)]
    stalled = subscriber(watch)

    class CountingSet(set[Subscriber]):
        looks = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            CountingSet.looks += 1
            return super().__iter__()

    watch.subs = CountingSet(watch.subs)
    # When 2,000 batches are appended, each read at once by the 1,000
    for n in range(1, 2001):
        watch.append(batch(n))
        for sub in subs:
            sub.next()
    # Then the stalled one's place was looked at a few times (at 16, 30, 58, ... batches), not
    # at every append, and the log kept everything it has not read (within the limit)
    assert CountingSet.looks <= 10
    assert len(watch.log) == 2000 and stalled.next() is watch.log[0]


def test_a_subscriber_beyond_the_limit_overflows_and_the_others_read_on() -> None:
    # Given a limit of 4 events, a reader that keeps up and one that does not read
    watch = Watch("0-0", limit=4)
    fast, slow = subscriber(watch), subscriber(watch)
    for n in range(1, 11):
        watch.append(batch(n))
        assert fast.next() is not None
    # Then the log holds no more than the limit, the slow one overflows (it must catch up from
    # Redis), and the fast one still reads every new batch
    assert sum(len(b.events) for b in watch.log) <= 4
    with pytest.raises(Overflow):
        slow.next()
    watch.append(batch(11))
    assert fast.next() is watch.log[-1]


def test_one_batch_larger_than_the_limit_overflows_its_readers() -> None:
    watch = Watch("0-0", limit=4)
    sub = subscriber(watch)
    watch.append(batch(1, 5))
    with pytest.raises(Overflow):
        sub.next()


async def test_one_append_wakes_every_waiting_subscriber() -> None:
    # Given three subscribers waiting for the next batch
    watch = Watch("0-0", limit=100)
    subs = [subscriber(watch) for _ in range(3)]

    async def read(sub: Subscriber) -> Batch:
        while (item := sub.next()) is None:
            await sub.watch.waiter()
        return item

    readers = [asyncio.create_task(read(sub)) for sub in subs]
    await asyncio.sleep(0)
    assert all(sub.watch.waiter() is subs[0].watch.waiter() for sub in subs)  # one future for all
    # When one batch is appended
    appended = batch(1)
    watch.append(appended)
    # Then all of them get it
    assert await asyncio.wait_for(asyncio.gather(*readers), 1) == [appended] * 3


async def test_a_failed_subscriber_raises_its_error_once_the_log_is_read() -> None:
    watch = Watch("0-0", limit=100)
    sub = subscriber(watch)
    watch.append(batch(1))
    sub.fail(RunstateError("closed"))
    assert sub.next() is not None  # what was handed out before still comes first
    with pytest.raises(RunstateError, match="closed"):
        sub.next()


async def test_a_wake_up_lets_the_loop_run_between_groups_of_subscribers() -> None:
    # Given 250 subscribers waiting (three groups: 100, 100, 50)
    watch = Watch("0-0", limit=100)
    subs = [subscriber(watch) for _ in range(250)]
    woken: list[int] = []

    async def read(sub: Subscriber) -> None:
        while sub.next() is None:
            await sub.watch.waiter()
        woken.append(1)

    readers = [asyncio.create_task(read(sub)) for sub in subs]
    await asyncio.sleep(0)
    assert len({id(sub.watch.waiter()) for sub in subs}) == 3
    # When a batch is appended, and something else is scheduled right after
    seen_then: list[int] = []
    watch.append(batch(1))
    asyncio.get_running_loop().call_soon(lambda: seen_then.append(len(woken)))
    await asyncio.wait_for(asyncio.gather(*readers), 1)
    # Then it ran once the first group was woken, not after all 250: the loop handles I/O
    # between groups (the hub's next read lands while the wake-up goes on), and all are woken
    assert seen_then == [100]
    assert len(woken) == 250


async def test_subscribers_woken_first_wait_behind_those_not_woken_yet() -> None:
    # Given 250 subscribers waiting (three groups: 100, 100, 50), each reading all it can
    # whenever it is woken
    watch = Watch("0-0", limit=100)
    subs = [subscriber(watch) for _ in range(250)]
    second: list[int] = []  # who got the second batch, in order

    async def read_two(i: int, sub: Subscriber) -> None:
        taken = 0
        while taken < 2:
            while (got := sub.next()) is not None:
                taken += 1
                if got.first == (1, 2):
                    second.append(i)
            if taken < 2:
                await sub.watch.waiter()

    readers = [asyncio.create_task(read_two(i, sub)) for i, sub in enumerate(subs)]
    await asyncio.sleep(0)
    # When a batch is appended, and a second one while the first wake-up goes on (once the
    # first group has read the first batch and waits again)
    watch.append(batch(1))
    asyncio.get_running_loop().call_soon(watch.append, batch(2))
    await asyncio.wait_for(asyncio.gather(*readers), 1)
    # Then the two groups not woken yet get both batches before the first group is woken again
    assert sorted(second[:150]) == list(range(100, 250))
    assert sorted(second[150:]) == list(range(100))


def test_a_failed_subscriber_that_fell_behind_gets_its_error_not_an_overflow() -> None:
    # Given a subscriber far behind (it would overflow) when its stream fails
    watch = Watch("0-0", limit=2)
    sub = subscriber(watch)
    for n in range(1, 6):
        watch.append(batch(n))
    sub.fail(RunstateError("cannot read events of session 's1': junk"))
    # Then it is told why it ends, rather than sent back to Redis to catch up
    with pytest.raises(RunstateError, match="junk"):
        sub.next()


async def test_cancelled_groups_do_not_pile_up_on_a_quiet_stream() -> None:
    # Given subscribers that wait on a stream where nothing arrives, and clients that come,
    # wait and are cancelled (disconnects)
    watch = Watch("0-0", limit=100)
    steady = [subscriber(watch) for _ in range(5)]

    async def wait(sub: Subscriber) -> None:
        while sub.next() is None:
            waiter = sub.watch.waiter()
            try:
                await waiter
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not waiter.cancelled() or (task is not None and task.cancelling()):
                    raise

    waiting = [asyncio.create_task(wait(sub)) for sub in steady]
    for _ in range(50):
        passing = asyncio.create_task(wait(subscriber(watch)))
        await asyncio.sleep(0)
        passing.cancel()
        await asyncio.gather(passing, return_exceptions=True)
        await asyncio.sleep(0)
    # Then the watch holds a group or two, not one per disconnect
    assert len(watch.waiting) <= 2
    watch.append(batch(1))
    await asyncio.wait_for(asyncio.gather(*waiting), 1)


def test_a_batch_follows_the_last_one_appended_only_when_no_event_is_missing_or_repeated() -> None:
    # Given a watch
    watch = Watch("0-0", limit=100)
    # When batches are appended: a first one, one right after it, one after a hole, one
    # overlapping the previous, one with a hole inside, then one right after that
    appended = [batch(1, 3), batch(4, 2), batch(8, 2), batch(9, 3)]
    holed = Batch([*batch(12).events, *batch(14).events])
    appended += [holed, batch(15, 2)]
    for b in appended:
        watch.append(b)
    # Then only those that go on exactly from the last one appended (trimmed or not) follow it
    assert [b.follows for b in appended] == [False, True, False, False, False, True]


def test_batches_that_follow_with_no_terminal_event_share_a_segment() -> None:
    # Given a watch
    watch = Watch("0-0", limit=100)
    # When batches are appended: a first one, two that follow it, one after a hole, one that
    # follows that, one that follows but ends the run, and one after that
    end = Batch([StreamEvent(id="1-12", run_id="r1", event=Complete())])
    appended = [batch(1, 3), batch(4, 2), batch(6), batch(9, 2), batch(11), end, batch(13)]
    for b in appended:
        watch.append(b)
    first, second, third, holed, fifth, ending, last = appended
    # Then those that follow with no terminal event are segments' parts, at their own events
    assert first.segment is None and holed.segment is None and ending.segment is None
    assert second.segment is not None and third.segment is second.segment
    assert [e.id for e in second.segment.events] == ["1-4", "1-5", "1-6"]
    assert (second.at, third.at) == (0, 2)
    assert second.segment.last is third and second.segment.end == 3
    # And a hole or a terminal event ends a segment: the next one that follows starts anew
    assert fifth.segment is not None and fifth.segment is not second.segment
    assert last.segment is not None and last.segment is not fifth.segment
    assert last.segment.end == watch.end == 7


def test_a_segment_takes_no_more_batches_once_it_holds_the_limit() -> None:
    # Given a watch whose subscribers may leave 4 events unread
    watch = Watch("0-0", limit=4)
    # When batches of two that follow one another are appended
    appended = [batch(1, 2), batch(3, 2), batch(5, 2), batch(7, 2), batch(9, 2)]
    for b in appended:
        watch.append(b)
    # Then a segment stops taking them once it holds 4 events, so that trimmed batches' events
    # are not kept by a segment that goes on and on
    segments = [b.segment for b in appended]
    assert segments[0] is None
    assert segments[1] is segments[2] and segments[3] is segments[4]
    assert segments[2] is not segments[3]
    assert segments[3] is not None and len(segments[3].events) == 4

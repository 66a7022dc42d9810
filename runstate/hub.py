"""The hub: one Redis reader per process for every session stream its subscribers watch.

A :class:`Hub` owns one connection that blocks in a single ``XREAD`` over every stream watched in
this process, decodes each entry once and appends it to the stream's log of batches, which every
local subscriber of the stream reads at its own pace (:mod:`runstate.batches`). It reads again as
soon as it has appended: with a thousand subscribers, waking them all takes milliseconds, and
what the next reads bring meanwhile is in the log when the last of them run, so they take it in
the same wake-up, as one list (there is no pause between reads to make batches bigger).

The read also covers the hub's own wake-up stream (``<prefix>:hub:<id>``, one entry at most):
when a new stream must be watched, one ``XADD`` there ends the blocked read, or, if the read has
not reached Redis yet, makes it return at once; either way the next read covers the new stream.

On a Redis Cluster one command may only name keys of one slot, and every session has its own
slot, so no single blocking read can cover them: there the reader polls instead, one pipeline
of non-blocking ``XREAD`` per round (redis-py sends each node its share at once), again at once
while events keep coming and backing off to ``cluster_poll_ms`` when they stop.

What a subscriber does with what the hub hands it is in :mod:`runstate.subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from redis import exceptions as rexc
from redis.crc import key_slot

from .autopipeline import exchange, reply_of
from .batches import Batch, Subscriber, Watch
from .codec import decode_entry, parse_stream_id
from .errors import RunstateError
from .events import StreamEvent
from .replies import Snapshot
from .retry import TRANSIENT_ERRORS, cancel_and_wait, describe
from .store import Store

log = logging.getLogger(__name__)

CATCH_UP_PAGE = 500
# Subscriber-side reads (snapshots, catch-up pages) in flight at once per process: a burst of
# new or lagging subscribers must not take one pooled connection each.
MAX_CONCURRENT_READS = 8
# The wake-up stream outlives its process by at most this long (every wake-up renews it).
WAKE_TTL_MS = 60_000
# How long a snapshot's wake-up counts as on its way to the reader (it takes a round trip; one
# the reader never saw, e.g. expired while it was idle, must not hold back kicks for long).
WAKE_PENDING_FOR = 0.5


class Hub:
    """Reads every watched session stream of this process over one connection and fans out.

    Args:
        store: the store whose client the reader connection comes from.
        block_ms: how long one XREAD blocks before looping.
        buffer: how many events one subscriber may leave unread before it must catch up
            from Redis by itself.
        count: the most entries read per stream per XREAD.
        cluster_poll_ms: on a Redis Cluster, the longest pause between two polls (the delivery
            latency of an event that follows a quiet spell).
    """

    def __init__(
        self,
        store: Store,
        *,
        block_ms: int = 5000,
        buffer: int = 1024,
        count: int = 1000,
        cluster_poll_ms: float = 20.0,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"subscriber buffer must be at least 1, got {buffer!r}")
        if cluster_poll_ms <= 0:
            raise ValueError(f"cluster_poll_ms must be positive, got {cluster_poll_ms!r}")
        self._cluster = store.cluster
        self._poll_max = cluster_poll_ms / 1000
        self._poll_wait = 0.0
        self._wake = asyncio.Event()
        self._store = store
        self._block_ms = block_ms
        self._buffer = buffer
        self._count = count
        self._watches: dict[str, Watch] = {}
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._gen = 0  # bumped whenever the set of watched streams changes
        self._reading_gen = -1  # the generation of the XREAD in flight, -1 when none
        self._reads = 0  # XREADs issued so far
        self._kicking = False
        self._wake_key = store.keys.hub(uuid.uuid4().hex[:16])
        self._wake_cursor = "0-0"  # the last wake-up the reader has seen
        self._wake_sent = (0, 0)  # the last wake-up written by a snapshot, and when
        self._wake_sent_at = 0.0
        self._closed = False
        self._side_reads = asyncio.Semaphore(MAX_CONCURRENT_READS)
        self._snapshots: dict[str, asyncio.Future[Snapshot]] = {}
        self._side_tasks: set[asyncio.Future[Any]] = set()

    @property
    def watched(self) -> int:
        """How many streams this process is reading (for tests and diagnostics)."""
        return len(self._watches)

    @property
    def subscribers(self) -> int:
        return sum(len(w.subs) for w in self._watches.values())

    async def snapshot(self, session_id: str, *, follow: bool = False) -> Snapshot:
        """The session's snapshot; subscribers arriving together share one read.

        Sharing is safe: a snapshot taken after a subscriber asked for it is as good a starting
        point as its own would be (replay as of S, then everything after S).

        For a session not watched yet, the snapshot also writes the reader's wake-up entry
        (when the subscriber will go on to watch it: the run is active, or ``follow``): the
        read in flight then returns and the next one covers the new stream, with no kick.
        """
        pending = self._snapshots.get(session_id)
        if pending is None:
            wake = None if session_id in self._watches else ("always" if follow else "active")
            pending = asyncio.ensure_future(self._read_snapshot(session_id, wake))
            self._track(pending)
            self._snapshots[session_id] = pending
            pending.add_done_callback(lambda _: self._snapshots.pop(session_id, None))
        return await asyncio.shield(pending)

    async def _read_snapshot(self, session_id: str, wake: str | None) -> Snapshot:
        async with self._side_reads:
            if wake is None:
                return await self._store.snapshot(session_id)
            snapshot = await self._store.snapshot(session_id, self._wake_key, wake, WAKE_TTL_MS)
        if snapshot.wake_id is not None:
            self._wake_sent = max(self._wake_sent, parse_stream_id(snapshot.wake_id))
            self._wake_sent_at = time.monotonic()
        return snapshot

    async def read_range(
        self, session_id: str, after: str, before: str
    ) -> list[tuple[str, StreamEvent | None]]:
        """A page of entries in ``(after, before]`` for a subscriber catching up."""
        async with self._side_reads:
            return await self._store.read_range(session_id, after, CATCH_UP_PAGE, before=before)

    def _track(self, task: asyncio.Future[Any]) -> None:
        """Keep a background task until it is done, so that closing can wait for it."""
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def attach(self, session_id: str, after: str) -> Subscriber:
        if self._closed:
            raise RunstateError("the coordinator is closed")
        watch = self._watches.get(session_id)
        if watch is None:
            key = self._store.keys.events(session_id)
            watch = self._watches[session_id] = Watch(after, self._buffer, key)
            self._gen += 1
            self._idle.set()
            self._ensure_reader()
            self._kick()
        sub = Subscriber(watch)
        watch.subs.add(sub)
        return sub

    def detach(self, session_id: str, sub: Subscriber) -> None:
        watch = self._watches.get(session_id)
        if watch is None:
            return
        watch.subs.discard(sub)
        if not watch.subs:
            del self._watches[session_id]
            self._gen += 1

    async def aclose(self) -> None:
        self._closed = True
        # One exception per subscriber: raised in many tasks, one would gather all their tracebacks.
        for watch in self._watches.values():
            for sub in watch.subs:
                sub.fail(RunstateError("the coordinator was closed"))
        self._watches.clear()
        for side in list(self._side_tasks):  # a kick or a shared snapshot still in flight
            await cancel_and_wait(side)
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._conn is not None:
            await self._store.client.connection_pool.release(self._conn)
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._store.client.delete(self._wake_key)

    # ---- the reader ---------------------------------------------------------------------------

    def _ensure_reader(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="runstate-hub")

    def _kick(self) -> None:
        """Make the XREAD in flight, if it is for an older set of streams, return now."""
        if self._cluster:
            self._poll_wait = 0.0
            self._wake.set()
            return
        if self._kicking or self._reading_gen < 0:
            return
        if (
            self._wake_sent > parse_stream_id(self._wake_cursor)
            and time.monotonic() - self._wake_sent_at < WAKE_PENDING_FOR
        ):
            return  # a snapshot's wake-up is on its way: the next read covers every watch
        self._kicking = True
        self._track(asyncio.get_running_loop().create_task(self._kick_reader()))

    async def _kick_reader(self) -> None:
        """Write a wake-up entry while a read of an older set of streams is in flight.

        A read issued before the entry was written returns at once, blocked or not (its cursor
        for the wake-up stream is older); one issued since may still be for an older set than
        the latest, when watches were added meanwhile: then once more.
        """
        try:
            while 0 <= self._reading_gen < self._gen:
                issued = self._reads
                async with self._store.client.pipeline(transaction=False) as pipe:
                    pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
                    pipe.pexpire(self._wake_key, WAKE_TTL_MS)
                    await pipe.execute()
                if self._reads == issued:
                    return
        except (rexc.RedisError, OSError) as exc:  # the reader's own read fails too and retries
            log.warning("could not wake the event reader (%s)", describe(exc))
        finally:
            self._kicking = False

    async def _run(self) -> None:
        # After a lost connection the first try is at once (one connection cut, say by CLIENT
        # KILL, costs no pause), then after a pause that doubles up to 2 s (Redis is down).
        wait = 0.0
        while not self._closed:
            if not self._watches:
                self._idle.clear()
                await self._idle.wait()
                continue
            gen = self._gen
            reading = dict(self._watches)  # the watches this read is for, at their cursors
            streams = {w.key: w.cursor for w in reading.values()}
            try:
                if self._cluster:
                    result = await self._poll(streams)
                else:
                    streams[self._wake_key] = self._wake_cursor
                    self._reading_gen = gen
                    self._reads += 1
                    try:
                        result = await self._xread(streams)
                    finally:
                        self._reading_gen = -1
            except TRANSIENT_ERRORS as exc:
                log.warning("event reader lost Redis (%s); retrying in %.2fs", describe(exc), wait)
                await asyncio.sleep(wait)
                wait = min(max(wait * 2, 0.05), 2.0)
                continue
            except Exception as exc:  # junk written by hand: the reader must never die of it
                await self._drop_broken_streams(exc)
                continue
            wait = 0.0
            self._dispatch(result, reading)

    async def _xread(self, streams: dict[str, str]) -> Any:
        """One blocking XREAD on the reader's own connection, written and read directly
        (:func:`~runstate.autopipeline.exchange`): with 100 subscribers that is a read per
        event, and redis-py's command layers cost a fifth of each."""
        client = self._store.client
        if self._conn is None:
            self._conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        command = ("XREAD", "COUNT", self._count, "BLOCK", self._block_ms, "STREAMS")
        (result,) = await exchange(client, self._conn, [(*command, *streams, *streams.values())])
        return reply_of(result)

    async def _poll(self, streams: dict[str, str]) -> list[Any]:
        """One round of non-blocking reads on a cluster, one XREAD per slot; when it finds
        nothing, a pause (woken early by a new watch) that doubles up to ``cluster_poll_ms``."""
        self._wake.clear()  # before the read: a watch added during it cuts the pause short
        by_slot: dict[int, dict[Any, Any]] = {}
        for key, cursor in streams.items():
            by_slot.setdefault(key_slot(key.encode()), {})[key] = cursor
        async with self._store.client.pipeline(transaction=False) as pipe:
            for group in by_slot.values():
                pipe.xread(group, count=self._count)
            replies = await pipe.execute()
        found: list[Any] = []
        for reply in replies:
            found.extend(reply.items() if isinstance(reply, dict) else reply or [])
        if any(entries for _, entries in found):
            self._poll_wait = 0.0
            return found
        self._poll_wait = min(max(self._poll_wait * 2, 0.001), self._poll_max)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._poll_wait)
        return found

    def _dispatch(self, result: Any, reading: dict[str, Watch]) -> None:
        """Hand what was read to the subscribers."""
        items = result.items() if isinstance(result, dict) else result or []
        keys = self._store.keys
        for key, entries in items:
            if key == self._wake_key:
                if entries:
                    self._wake_cursor = entries[-1][0]
                continue
            sid = keys.session_of(key)
            watch = self._watches.get(sid) if sid else None
            # Only to the watch this read was for: a watch dropped and made anew meanwhile
            # has its own cursor (maybe older than this read's) and gets its own read.
            if watch is None or not entries or reading.get(sid or "") is not watch:
                continue
            events = [e for eid, f in entries if (e := decode_entry(eid, f, sid or ""))]
            if events:
                watch.append(Batch(events))
            last = entries[-1][0]
            if parse_stream_id(last) > parse_stream_id(watch.cursor):
                watch.cursor = last

    async def _drop_broken_streams(self, exc: Exception) -> None:
        """A key that is not a stream, or an entry that is not UTF-8 text (for a client that
        decodes strictly), fails the whole XREAD: fail its subscribers, keep the rest."""
        keys = self._store.keys
        broken = False
        if str(await self._store.client.type(self._wake_key)) not in ("stream", "none"):
            log.error("event reader: %s is not a stream; waking through a new key", self._wake_key)
            self._wake_key, self._wake_cursor = keys.hub(uuid.uuid4().hex[:16]), "0-0"
            self._wake_sent = (0, 0)
            return
        for sid in list(self._watches):
            key = keys.events(sid)
            kind = str(await self._store.client.type(key))
            if kind not in ("stream", "none"):
                reason = f"{key} is a {kind}, not a stream"
            elif isinstance(exc, UnicodeDecodeError) and not await self._decodes(sid):
                reason = f"{key} holds an entry that is not UTF-8 text"
            else:
                continue
            broken = True
            error = f"cannot read events of session {sid!r}: {reason} ({exc})"
            if sid in self._watches:
                for sub in self._watches.pop(sid).subs:
                    sub.fail(RunstateError(error))
                self._gen += 1
        if not broken:
            log.error("event reader: %s", exc)
            await asyncio.sleep(1.0)

    async def _decodes(self, session_id: str) -> bool:
        """Whether what the reader would read next of the session decodes."""
        watch = self._watches.get(session_id)
        if watch is None:
            return True
        key = self._store.keys.events(session_id)
        try:
            await self._store.client.xrange(key, min=f"({watch.cursor}", count=self._count)
        except UnicodeDecodeError:
            return False
        return True

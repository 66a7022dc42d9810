"""Automatic pipelining: commands issued while others are in flight go together, as one pipeline.

Many runs share a process: a worker claims the runs one read brought, a subscriber process
starts the runs whose predecessors ended together. Sent one by one, each command costs a write,
a read and a pooled connection of its own; sent together they cost one of each, however many
callers issued them (ioredis's ``enableAutoPipelining``, which BullMQ relies on, works the same
way). A command issued while none of ours is in flight goes at once, alone, with no pipeline
around it and no turn of the event loop spent waiting for company: one caller awaiting its
commands one by one (a run emitting event after event) pays nothing for the batching.

The commands of one batch reach Redis in the order they were issued. A command sent alone goes
on a pooled connection of its own, so it may reach Redis before or after a batch issued in the
same turn by other callers, as any two commands on two connections may; one caller's commands,
awaited one after the other, always arrive in order.

Only for short commands: a blocking read would hold up every command queued behind it. Each
command keeps its own outcome: a reply error goes to its caller only; a lost connection fails
every command of the batch, and each caller's retry policy decides what to do, as it would have
without batching (every operation runstate sends this way is fenced or idempotent).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript

# The most commands one pipeline carries; more queued in one turn go in several.
MAX_BATCH = 128
# Connections kept between exchanges (taken from the client's pool once), and the share of the
# pool they may be at most; more in use at once go back to the pool when done.
KEEP_IDLE = 4
KEEP_IDLE_SHARE = 16

_REDIS_READ_RESPONSE = AbstractConnection.read_response


class AutoPipeline:
    """Queues commands and sends each turn's batch as one pipeline on ``client``.

    A command issued while nothing is in flight goes at once as a plain command. Otherwise the
    first one leads a batch: it yields once, so that the commands issued in the same turn join
    it, then sends them all and hands each its reply. A registered script runs batched with
    :meth:`run_script`.
    """

    def __init__(self, client: Redis, max_batch: int = MAX_BATCH) -> None:
        self._client = client
        self._max_batch = max_batch
        self._forming: list[tuple[tuple[Any, ...], asyncio.Future[Any] | None]] | None = None
        self._orphans: set[asyncio.Task[Any]] = set()  # kept until done
        self._in_flight = 0  # commands and batches sent and not answered yet
        self._idle: list[Any] = []  # connections of the client's pool kept for the next exchange
        pool_size = getattr(client.connection_pool, "max_connections", None) or 2**31
        self._keep = max(1, min(KEEP_IDLE, pool_size // KEEP_IDLE_SHARE))

    async def execute_command(self, *args: Any) -> Any:
        batch = self._forming
        if batch is not None and len(batch) < self._max_batch:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            batch.append((args, future))
            return await future
        if not self._in_flight:
            return await self._plain(args)
        batch = self._forming = [(args, None)]
        try:
            await asyncio.sleep(0)  # the commands issued in this turn join the batch
        except asyncio.CancelledError:
            if self._forming is batch:
                self._forming = None
            if len(batch) > 1:  # the others still go, without us
                task = asyncio.get_running_loop().create_task(self._send(batch[1:]))
                self._orphans.add(task)
                task.add_done_callback(self._orphan_done)
            raise
        if self._forming is batch:
            self._forming = None
        if len(batch) == 1:
            return await self._plain(args)
        return await self._send(batch)

    async def _plain(self, args: tuple[Any, ...]) -> Any:
        self._in_flight += 1
        try:
            (reply,) = await self._exchange([args])
        finally:
            self._in_flight -= 1
        return reply_of(reply)

    def _orphan_done(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its callers got it

    async def run_script(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """What ``script(keys, args)`` does, batched: EVALSHA, loading the script on NOSCRIPT
        (without redis-py's per-call bookkeeping: a quarter of an emit's Python time)."""
        try:
            return await self.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except rexc.NoScriptError:
            script.sha = await self._client.script_load(script.script)
            return await self.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """:func:`exchange` on a connection kept between exchanges (taken from the client's
        pool when none is; taking one and handing it back alone cost ~70 µs of CPU per
        exchange on the benchmark machine, a third of a three-command exchange)."""
        pool = self._client.connection_pool
        if self._idle:
            conn = self._idle.pop()
        else:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            return await exchange(self._client, conn, commands)
        finally:
            if len(self._idle) < self._keep:
                self._idle.append(conn)
            else:
                await pool.release(conn)

    async def aclose(self) -> None:
        """Hand the kept connections back to the client's pool (the client may live on)."""
        while self._idle:
            await self._client.connection_pool.release(self._idle.pop())

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any] | None]]) -> Any:
        """Send ``batch`` as one pipeline; returns the reply of its first command if that one
        has no future (the leader's), after handing the others theirs."""
        self._in_flight += 1
        try:
            results = await self._exchange([args for args, _ in batch])
        except BaseException as exc:  # the connection: every command of the batch shares it
            error = exc
            if not isinstance(exc, Exception):  # the leader was cancelled while sending
                error = rexc.ConnectionError("the batch was cut off: its sender was cancelled")
            for _, future in batch:
                if future is not None and not future.done():
                    future.set_exception(error)
            raise
        finally:
            self._in_flight -= 1
        for (_, future), result in zip(batch, results, strict=True):
            if future is None or future.done():  # the leader's, or its caller is gone
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if batch[0][1] is None:
            return reply_of(results[0])
        return None


def reply_of(result: Any) -> Any:
    """One command's result from :func:`exchange`: its reply, or raised if it is an error."""
    if isinstance(result, Exception):
        raise result
    return result


async def exchange(client: Redis, conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Write ``commands`` on ``conn`` (a connection of ``client``'s pool) in one go and read
    their replies in order; a reply error is returned in its place, not raised.

    What redis-py's ``execute_command`` and pipeline do, without their bookkeeping (a retry
    wrapper, metrics hooks, layers of per-command parsing; the caller's own policy retries
    instead). Anything that stops the exchange half way (a lost connection, a timeout, a
    cancellation) makes redis-py close the connection, so no reply is left on it for the next
    exchange; a closed connection opens again on its next use.
    """
    try:
        # Something to read with nothing in flight: the server closed it meanwhile (its idle
        # timeout, a restart). Opened again rather than used and failed (redis-py 8.1's pool
        # skips this check while maintenance notifications are on "auto").
        if conn.is_connected and await conn.can_read():
            await conn.disconnect()
        await conn.send_packed_command(conn.pack_commands(commands))
        results: list[Any] = []
        callbacks = client.response_callbacks
        for reply, args in zip(await read_replies(conn, len(commands)), commands, strict=True):
            if isinstance(reply, rexc.ResponseError):
                results.append(reply)
                continue
            callback = callbacks.get(args[0])
            if callback is not None:
                try:
                    reply = callback(reply)
                except Exception as exc:  # that reply was read whole: only its caller's
                    reply = exc
            results.append(reply)
        return results
    except BaseException:
        # redis-py has closed it if the exchange broke off; if anything else stopped the
        # reading half way, the replies left must not stay on it either.
        if conn.is_connected:
            await conn.disconnect(nowait=True)
        raise


async def read_replies(conn: Any, n: int) -> list[Any]:
    """The next ``n`` replies on ``conn``, reply errors in their place, within one socket timeout.

    redis-py's ``read_response`` arms a timer and builds an error message's host string for
    every reply (7% of the instructions of a no-op run, its worker's and its client's
    together); here one timer covers the batch, as one socket timeout covered the write. Reply
    by reply through ``read_response`` on a connection that reads otherwise (fakeredis's), or
    on a redis-py whose ``read_response`` does not read through ``_read_response_from_parser``.
    """
    read = getattr(conn, "_read_response_from_parser", None)
    if read is None or type(conn).read_response is not _REDIS_READ_RESPONSE:
        replies = []
        for _ in range(n):
            try:
                replies.append(await conn.read_response())
            except rexc.ResponseError as exc:
                replies.append(exc)
        return replies
    try:
        async with asyncio.timeout(conn.socket_timeout):
            replies = [await read() for _ in range(n)]
    except TimeoutError:
        await conn.disconnect(nowait=True)
        raise rexc.TimeoutError(f"Timeout reading from {conn._host_error()}") from None
    except OSError as exc:
        await conn.disconnect(nowait=True)
        raise rexc.ConnectionError(f"Error while reading from {conn._host_error()}: {exc}") from exc
    if conn.health_check_interval:  # as read_response does: a PING only after an idle spell
        conn.next_health_check = asyncio.get_running_loop().time() + conn.health_check_interval
    return replies

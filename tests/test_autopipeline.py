"""Automatic pipelining: commands issued together go as one pipeline, each keeps its outcome."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

from runstate.autopipeline import AutoPipeline


@pytest.fixture(params=["fake", "real"])
async def client(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Any]:
    made: Any
    if request.param == "fake":
        made = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    else:
        made = aioredis.Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
    try:
        yield made
    finally:
        await made.aclose()


class CountingPipelines:
    """Counts the writes on a client's connections and the commands each carried."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        cls = client.connection_pool.connection_class
        pack = cls.pack_commands

        def counted(conn: Any, commands: Any) -> Any:
            commands = list(commands)
            self.sizes.append(len(commands))
            return pack(conn, commands)

        monkeypatch.setattr(cls, "pack_commands", counted)


def counting(client: Any, monkeypatch: pytest.MonkeyPatch) -> CountingPipelines:
    return CountingPipelines(client, monkeypatch)


async def test_commands_issued_together_go_as_one_pipeline(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an auto-pipeline
    auto = AutoPipeline(client)
    pipelines = counting(client, monkeypatch)
    # When 20 callers issue a command in the same turn
    replies = await asyncio.gather(
        *(auto.execute_command("INCRBY", f"{prefix}:n{i % 4}", i) for i in range(20))
    )
    # Then the first went at once, alone (nothing was in flight), one pipeline carried the
    # other 19, and each caller got its own reply. The batch kept its order; the first command
    # went on a connection of its own, so it may reach Redis before or after the batch.
    assert sorted(pipelines.sizes) == [1, 19]
    for key in range(4):
        mine = [(i, reply) for i, reply in enumerate(replies) if i % 4 == key]
        increments = [i for i, _ in mine]
        assert max(reply for _, reply in mine) == sum(increments)
        batched = [reply for i, reply in mine if i > 0]
        assert batched == sorted(batched) and len(set(batched)) == len(batched)
        first = dict(mine).get(0)
        assert first is None or first in (0, sum(increments))  # before or after the batch


async def test_a_command_alone_goes_alone(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = AutoPipeline(client)
    pipelines = counting(client, monkeypatch)
    assert await auto.execute_command("SET", f"{prefix}:k", "v") is True
    assert await auto.execute_command("GET", f"{prefix}:k") == "v"
    assert pipelines.sizes == [1, 1]


async def test_a_command_alone_is_sent_without_waiting_a_turn(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller awaiting its commands one by one must not pay a loop turn per command
    auto = AutoPipeline(client)
    handed: list[tuple[Any, ...]] = []
    cls = client.connection_pool.connection_class
    pack = cls.pack_commands

    def recording(conn: Any, commands: Any) -> Any:
        handed.extend(commands)
        return pack(conn, commands)

    assert await auto.execute_command("PING") is True  # a connection is open and kept
    monkeypatch.setattr(cls, "pack_commands", recording)
    sent = asyncio.ensure_future(auto.execute_command("SET", f"{prefix}:k", "v"))
    await asyncio.sleep(0)  # the task's first step: with nothing in flight, it sends at once
    assert handed == [("SET", f"{prefix}:k", "v")]
    assert await sent is True


async def test_a_reply_error_goes_to_its_caller_only(client: Any, prefix: str) -> None:
    # Given a key of the wrong type for one of the commands
    await client.set(f"{prefix}:str", "x")
    auto = AutoPipeline(client)
    # When it is issued together with good ones
    results = await asyncio.gather(
        auto.execute_command("INCR", f"{prefix}:a"),
        auto.execute_command("LPUSH", f"{prefix}:str", "y"),
        auto.execute_command("INCR", f"{prefix}:b"),
        return_exceptions=True,
    )
    # Then only that caller gets the error
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], rexc.ResponseError) and "WRONGTYPE" in str(results[1])


async def test_a_lost_connection_fails_every_command_of_the_batch(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given batches whose write loses the connection
    cls = client.connection_pool.connection_class

    pack = cls.pack_commands

    def broken(conn: Any, commands: Any) -> Any:
        if len(commands) > 1:
            raise rexc.ConnectionError("injected: connection reset")
        return pack(conn, commands)

    monkeypatch.setattr(cls, "pack_commands", broken)
    auto = AutoPipeline(client)
    # When four commands go together (the first alone, at once: nothing was in flight)
    results = await asyncio.gather(
        *(auto.execute_command("INCR", f"{prefix}:{i}") for i in range(4)),
        return_exceptions=True,
    )
    # Then each caller of the batch gets the (retryable) error
    assert results[0] == 1
    assert all(isinstance(r, rexc.ConnectionError) for r in results[1:]), results


async def test_a_cancelled_leader_does_not_take_the_others_down(client: Any, prefix: str) -> None:
    # Given a command in flight, and a batch forming behind it: its first caller (which sends
    # it) and two more
    auto = AutoPipeline(client)
    opener = asyncio.ensure_future(auto.execute_command("INCR", f"{prefix}:open"))
    leader = asyncio.ensure_future(auto.execute_command("INCR", f"{prefix}:lead"))
    others = [asyncio.ensure_future(auto.execute_command("INCR", f"{prefix}:o{i}")) for i in (1, 2)]
    await asyncio.sleep(0)  # all four have run: the leader waits for the others to join
    # When the leader is cancelled before it sends
    leader.cancel()
    # Then the others still get their replies, and the leader's command was not sent
    assert await asyncio.gather(*others) == [1, 1]
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await client.get(f"{prefix}:lead") is None
    assert await opener == 1


async def test_batches_are_capped(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = AutoPipeline(client, max_batch=8)
    pipelines = counting(client, monkeypatch)
    replies = await asyncio.gather(
        *(auto.execute_command("INCR", f"{prefix}:c") for _ in range(20))
    )
    assert sorted(replies) == list(range(1, 21))
    assert sorted(pipelines.sizes) == [1, 3, 8, 8]  # the first went alone, at once


async def test_scripts_run_through_it_and_are_loaded_when_missing(client: Any, prefix: str) -> None:
    # Given a registered script the server does not know yet
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await client.script_flush()
    auto = AutoPipeline(client)
    # When it is called through the auto-pipeline, twice at once
    replies = await asyncio.gather(
        auto.run_script(script, [f"{prefix}:s"], [2]),
        auto.run_script(script, [f"{prefix}:s"], [3]),
    )
    # Then both ran once (each NOSCRIPT answer loaded it and ran again), in either order: the
    # first went alone on a connection of its own
    assert sorted(replies) in ([2, 5], [3, 5])
    assert await client.get(f"{prefix}:s") == "5"


async def test_batched_replies_are_parsed_as_the_client_parses_them(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given commands whose replies redis-py converts (SET's OK, HGETALL's pairs)
    await client.hset(f"{prefix}:h", mapping={"a": "1", "b": "2"})
    auto = AutoPipeline(client)
    pipelines = counting(client, monkeypatch)
    # When they go in one batch, behind a command in flight
    replies = await asyncio.gather(
        auto.execute_command("INCR", f"{prefix}:first"),
        auto.execute_command("SET", f"{prefix}:k", "v"),
        auto.execute_command("HGETALL", f"{prefix}:h"),
        auto.execute_command("GET", f"{prefix}:k"),
    )
    # Then each reply is what the client's own command would have returned
    assert sorted(pipelines.sizes) == [1, 3]
    assert replies == [1, True, {"a": "1", "b": "2"}, "v"]


@contextlib.asynccontextmanager
async def auto_pipeline(redis_url: str, **options: Any) -> AsyncIterator[tuple[Any, AutoPipeline]]:
    """A client of the real server made with ``options``, and an auto-pipeline on it."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, **options)
    try:
        yield client, AutoPipeline(client)
    finally:
        await client.aclose()


def behind_a_slow_reply(auto: AutoPipeline, prefix: str, wait: float) -> list[asyncio.Future[Any]]:
    """A command sent at once, then a batch of two whose first reply comes after ``wait``
    seconds (a blocking pop on an empty list) and whose second is a SET."""
    commands = [("INCR", f"{prefix}:open"), ("BLPOP", f"{prefix}:empty", wait)]
    commands.append(("SET", f"{prefix}:k", "v"))
    return [asyncio.ensure_future(auto.execute_command(*c)) for c in commands]


async def test_a_batch_cut_off_mid_reply_leaves_no_reply_behind(
    redis_url: str, prefix: str
) -> None:
    # Given a client with a pool of two connections, and a batch whose first reply is slow
    # (a blocking pop that times out after 0.3 s)
    async with auto_pipeline(redis_url, max_connections=2) as (client, auto):
        opener, leader, other = behind_a_slow_reply(auto, prefix, 0.3)
        assert await opener == 1
        await asyncio.sleep(0.05)  # the batch is written; its replies are awaited
        # When its sender is cancelled while it reads the replies
        leader.cancel()
        # Then the other caller gets a retryable error (its command may or may not have run)
        with pytest.raises(rexc.ConnectionError):
            await other
        with pytest.raises(asyncio.CancelledError):
            await leader
        # And the connection was not handed back with the replies still on it: every later
        # command, alone or batched, gets its own reply
        for _ in range(3):
            got = await asyncio.gather(
                auto.execute_command("INCR", f"{prefix}:n"),
                auto.execute_command("GET", f"{prefix}:open"),
                auto.execute_command("ECHO", "x"),
            )
            assert got[1:] == ["1", "x"]
        assert await client.get(f"{prefix}:n") == "3"


@pytest.mark.parametrize(("pool_size", "kept"), [(64, 4), (32, 2), (16, 1), (4, 1)])
async def test_it_keeps_a_few_connections_and_returns_the_rest(
    redis_url: str, prefix: str, pool_size: int, kept: int
) -> None:
    # Given an auto-pipeline on a client with a pool of pool_size connections
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=pool_size)
    try:
        auto = AutoPipeline(client)
        # When four exchanges are in flight at once (each a blocking pop that waits 0.5 s)
        pops = []
        for i in range(4):
            pops.append(asyncio.ensure_future(auto.execute_command("BLPOP", f"{prefix}:{i}", 0.5)))
            await asyncio.sleep(0.01)  # the next one forms a batch of its own
        assert await asyncio.gather(*pops) == [None] * 4
        # Then it keeps at most one connection per 16 of the pool (and at most 4) for its next
        # exchanges, and the others went back to the pool
        pool = client.connection_pool
        assert len(pool._in_use_connections) == kept
        assert len(pool._available_connections) == 4 - kept
        # And the kept ones serve the next commands
        assert await auto.execute_command("ECHO", "x") == "x"
    finally:
        await client.aclose()


async def test_closing_hands_the_kept_connections_back(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=64)
    try:
        auto = AutoPipeline(client)
        pool = client.connection_pool
        echoes = [auto.execute_command("ECHO", str(i)) for i in range(3)]
        assert await asyncio.gather(*echoes) == ["0", "1", "2"]
        assert len(pool._in_use_connections) == 2  # the lone first command's, and the batch's
        await auto.aclose()
        assert not pool._in_use_connections
        assert len(pool._available_connections) == 2
    finally:
        await client.aclose()


async def test_a_reply_that_fails_to_parse_fails_its_caller_only(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reply callback that raises, for the first command of a batch of three
    def broken(reply: Any, **options: Any) -> Any:
        raise ValueError("injected: unparsable reply")

    monkeypatch.setitem(client.response_callbacks, "ECHO", broken)
    auto = AutoPipeline(client)
    opener = asyncio.ensure_future(auto.execute_command("INCR", f"{prefix}:open"))
    batch = [
        auto.execute_command("ECHO", "x"),
        auto.execute_command("SET", f"{prefix}:k", "v"),
        auto.execute_command("GET", f"{prefix}:k"),
    ]
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert await opener == 1
    # Then only its caller gets the error, and the next commands get their own replies
    assert isinstance(results[0], ValueError) and results[1:] == [True, "v"]
    for _ in range(2):
        got = await asyncio.gather(
            auto.execute_command("INCR", f"{prefix}:n"), auto.execute_command("PING")
        )
        assert got[1] is True
    assert await client.get(f"{prefix}:n") == "2"


async def test_a_kept_connection_the_server_closed_is_opened_again_before_use(
    redis_url: str, prefix: str
) -> None:
    # Given a connection kept from an earlier command, which the server then closed (its idle
    # timeout, a restart, CLIENT KILL)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        auto = AutoPipeline(client)
        assert await auto.execute_command("PING") is True
        killed = await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
        await asyncio.sleep(0.05)  # the close reaches this process
        # When the next command goes out, alone and then in a batch
        # Then it is answered, on a connection opened again first, instead of failing once
        assert await auto.execute_command("PING") is True
        assert await asyncio.gather(*(auto.execute_command("ECHO", str(i)) for i in range(3))) == [
            "0",
            "1",
            "2",
        ]
    finally:
        await client.aclose()


async def test_replies_are_read_straight_from_the_parser_on_redis_py_connections(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given redis-py's own connections (the installed version), and a count of how replies
    # are read
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    cls = client.connection_pool.connection_class
    calls = {"read_response": 0, "parser": 0}
    read_response, from_parser = cls.read_response, cls._read_response_from_parser

    async def counted_read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
        calls["read_response"] += 1
        return await read_response(conn, *args, **kwargs)

    async def counted_from_parser(conn: Any, *args: Any, **kwargs: Any) -> Any:
        calls["parser"] += 1
        return await from_parser(conn, *args, **kwargs)

    monkeypatch.setattr(cls, "_read_response_from_parser", counted_from_parser)
    try:
        auto = AutoPipeline(client)
        for _ in range(2):  # both connections a batch and a lone command use are open
            await asyncio.gather(*(auto.execute_command("PING") for _ in range(3)))
        calls.update(read_response=0, parser=0)
        # When a batch goes out
        got = await asyncio.gather(*(auto.execute_command("ECHO", str(i)) for i in range(3)))
        # Then its replies come straight from the parser, one timer for all of them, not
        # through read_response's timer per reply (if redis-py moves its reading elsewhere,
        # this fails: the replies would still come, but by the slower path)
        assert got == ["0", "1", "2"]
        assert calls == {"read_response": 0, "parser": 3}
        # And a connection whose class reads otherwise (fakeredis's) is read reply by reply
        monkeypatch.setattr(cls, "read_response", counted_read_response)
        assert await asyncio.gather(
            auto.execute_command("ECHO", "a"), auto.execute_command("ECHO", "b")
        ) == ["a", "b"]
        assert calls["read_response"] == 2
    finally:
        await client.aclose()


async def test_replies_that_do_not_come_within_the_socket_timeout_fail_the_batch(
    redis_url: str, prefix: str
) -> None:
    # Given a client with a short socket timeout, and a batch whose first reply comes later
    # than that (a blocking pop that waits 1 s)
    async with auto_pipeline(redis_url, socket_timeout=0.2) as (_, auto):
        opener, slow, other = behind_a_slow_reply(auto, prefix, 1)
        # When the batch waits for its replies
        results = await asyncio.gather(opener, slow, other, return_exceptions=True)
        # Then every caller of the batch gets redis-py's (retryable) timeout error
        assert results[0] == 1
        assert all(isinstance(r, rexc.TimeoutError) for r in results[1:]), results
        assert "Timeout reading from" in str(results[1])
        # And the connection was closed, not handed on with the late replies still to come
        await asyncio.sleep(1.0)
        got = await asyncio.gather(*(auto.execute_command("ECHO", str(i)) for i in range(3)))
        assert got == ["0", "1", "2"]

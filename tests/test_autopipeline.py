"""Automatic pipelining: commands issued together go as one pipeline, each keeps its outcome."""

from __future__ import annotations

import asyncio
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
    """Counts the pipelines made on a client and the commands each carried."""

    def __init__(self, client: Any) -> None:
        self.make = client.pipeline
        self.sizes: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self.make(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **kw: Any) -> Any:
            self.sizes.append(len(pipe.command_stack))
            return await real_execute(*a, **kw)

        pipe.execute = execute
        return pipe


def counting(client: Any, monkeypatch: pytest.MonkeyPatch) -> CountingPipelines:
    counter = CountingPipelines(client)
    monkeypatch.setattr(client, "pipeline", counter)
    return counter


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
    # Then the first went at once (nothing was in flight), one pipeline carried the other 19,
    # and each caller got its own reply. The batch kept its order; the first command went on a
    # connection of its own, so it may reach Redis before or after the batch.
    assert pipelines.sizes == [19]
    for key in range(4):
        mine = [(i, reply) for i, reply in enumerate(replies) if i % 4 == key]
        increments = [i for i, _ in mine]
        assert max(reply for _, reply in mine) == sum(increments)
        batched = [reply for i, reply in mine if i > 0]
        assert batched == sorted(batched) and len(set(batched)) == len(batched)
        first = dict(mine).get(0)
        assert first is None or first in (0, sum(increments))  # before or after the batch


async def test_a_command_alone_goes_without_a_pipeline(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = AutoPipeline(client)
    pipelines = counting(client, monkeypatch)
    assert await auto.execute_command("SET", f"{prefix}:k", "v") is True
    assert await auto.execute_command("GET", f"{prefix}:k") == "v"
    assert pipelines.sizes == []


async def test_a_command_alone_is_sent_without_waiting_a_turn(
    client: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller awaiting its commands one by one must not pay a loop turn per command
    auto = AutoPipeline(client)
    handed: list[tuple[Any, ...]] = []
    send = client.execute_command

    async def recording(*args: Any, **kwargs: Any) -> Any:
        handed.append(args)
        return await send(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", recording)
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
    # Given pipelines whose execution loses the connection
    make = client.pipeline

    def broken(*args: Any, **kwargs: Any) -> Any:
        pipe = make(*args, **kwargs)

        async def execute(*a: Any, **kw: Any) -> Any:
            raise rexc.ConnectionError("injected: connection reset")

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(client, "pipeline", broken)
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
    assert sorted(pipelines.sizes) == [3, 8, 8]  # the first went alone, at once


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
    # Then both ran once (each NOSCRIPT answer loaded it and ran again)
    assert sorted(replies) == [2, 5]

"""One process, many runs: one pub/sub subscription serves every run's cancel token."""

from __future__ import annotations

from redis.asyncio import Redis

from runstate import Coordinator, RunHandle
from runstate.models import Reserved
from tests.helpers import eventually


async def test_one_pubsub_subscription_serves_many_runs(redis_url: str, prefix: str) -> None:
    # Given ten runs claimed by one process
    async with Coordinator.from_url(redis_url, prefix=prefix) as coord:
        handles: list[RunHandle] = []
        for i in range(10):
            reserved = await coord.execute(f"s{i}")
            assert isinstance(reserved, Reserved)
            handles.append(await coord.claim(f"s{i}", reserved.run_id, "w1"))
        await eventually(lambda: coord.cancel_watcher.listening.is_set(), what="listening")
        # Then the process holds one subscription to the cancel channel, not ten
        async with Redis.from_url(redis_url, decode_responses=True) as probe:
            [(_channel, count)] = await probe.pubsub_numsub(coord.keys.cancel_channel)
        assert count == 1
        # When one of them is cancelled
        assert await coord.cancel("s3")
        # Then exactly that run's token is cancelled, the others go on
        await eventually(lambda: handles[3].cancelled, what="run s3 saw its cancel")
        assert [h.cancelled for h in handles] == [i == 3 for i in range(10)]
        for i, handle in enumerate(handles):
            if i != 3:
                await handle.complete()

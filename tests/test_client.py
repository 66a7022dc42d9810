"""The client runstate makes: commands packed by hiredis, byte for byte as redis-py packs them."""

from __future__ import annotations

import math

import hiredis  # noqa: F401  (a dev dependency: without it these tests would compare nothing)
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from runstate import Coordinator, Reserved
from runstate.client import _hiredis_packing, connect

KWARGS = {"encoding_errors": "replace"}
HiredisConnection = _hiredis_packing(Connection)

arguments = st.one_of(
    st.text(),  # lone surrogates included: hiredis refuses them, redis-py's packer replaces them
    st.binary(max_size=7000),  # past redis-py's 6000-byte chunking cutoff
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
)


def packed(connection: Connection, *args: object) -> bytes:
    return b"".join(connection.pack_command(*args))


@given(
    name=st.sampled_from(["EVALSHA", "SET", b"XADD", "CLIENT ID", b"SCRIPT LOAD"]),
    args=st.lists(arguments, max_size=20),
)
def test_packs_what_redis_py_packs(name: str | bytes, args: list[object]) -> None:
    mine, theirs = HiredisConnection(**KWARGS), Connection(**KWARGS)
    assert packed(mine, name, *args) == packed(theirs, name, *args)


@pytest.mark.parametrize("bad", [True, None, [1], {"a": 1}])
def test_what_hiredis_will_not_pack_gets_redis_py_s_error(bad: object) -> None:
    with pytest.raises(DataError, match=type(bad).__name__):
        HiredisConnection(**KWARGS).pack_command("SET", "k", bad)


def test_memoryview_and_special_floats_pack_as_redis_py_packs_them() -> None:
    mine, theirs = HiredisConnection(**KWARGS), Connection(**KWARGS)
    for arg in (memoryview(b"abc"), bytearray(b"abc"), math.inf, -math.inf, math.nan, 1e300):
        assert packed(mine, "SET", "k", arg) == packed(theirs, "SET", "k", arg), arg


def test_every_connection_kind_gets_the_packer() -> None:
    for kind in (Connection, SSLConnection, UnixDomainSocketConnection):
        fast = _hiredis_packing(kind)
        assert issubclass(fast, kind) and fast.__name__ == f"Hiredis{kind.__name__}"


def test_connect_uses_it_for_utf8_only() -> None:
    assert connect("redis://h:1/0").connection_pool.connection_class is HiredisConnection
    tls = connect("rediss://h:1/0").connection_pool.connection_class
    assert tls is _hiredis_packing(SSLConnection)
    latin = connect("redis://h:1/0?encoding=latin-1").connection_pool.connection_class
    assert latin is Connection  # hiredis packs str as UTF-8 only


async def test_a_run_goes_through_a_real_server(redis_url: str) -> None:
    """Scripts with many arguments, unicode and events, packed by hiredis, on a real server."""
    async with Coordinator.from_url(redis_url, prefix="client-test") as coord:
        pool = coord.client.connection_pool
        assert pool.connection_class.__name__ == "HiredisConnection"
        reserved = await coord.execute("sess-e1")
        assert isinstance(reserved, Reserved)
        handle = await coord.claim("sess-e1", reserved.run_id, worker="w1")
        await handle.emit({"type": "token", "content": "héllo \U0001f600"})
        await handle.complete()
        events = [item.event async for item in coord.subscribe("sess-e1", last_event_id="0")]
        assert [e.type for e in events][-2:] == ["token", "complete"]
        assert events[-2].content == "héllo \U0001f600"
        async with coord.client.client() as single:  # a connection the pool really made
            await single.ping()
            assert type(single.connection).__name__ == "HiredisConnection"
        await coord.client.delete(*[k async for k in coord.client.scan_iter("client-test:*")])


async def test_a_coordinator_on_a_shared_client_hands_its_connections_back(
    redis_url: str, prefix: str
) -> None:
    # Given a client the application owns, and a coordinator made on it that ran scripts
    client = connect(redis_url)
    try:
        coord = Coordinator(client, prefix=prefix)
        assert isinstance(await coord.try_reserve("s1"), Reserved)
        assert await coord.cancel("s1") is True
        pool = client.connection_pool
        assert pool._in_use_connections  # kept for its next scripts
        # When the coordinator is closed
        await coord.aclose()
        # Then every connection it held is back in the pool, and the client still works
        assert not pool._in_use_connections
        assert await client.ping() is True
    finally:
        await client.aclose()

"""Making the redis-py client runstate works through, for one server or for a Redis Cluster.

Everything runstate sends works on both: per-session keys share a hash tag, scripts name their
keys in KEYS, and multi-slot work goes through pipelines that redis-py's cluster client splits
by node. What differs is only how the client is made and inspected, which is all here.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.utils import HIREDIS_AVAILABLE  # hiredis 3 or later is installed (runstate[fast])

if HIREDIS_AVAILABLE:
    from hiredis import pack_command as _hiredis_pack
else:  # pragma: no cover - hiredis is optional
    _hiredis_pack = None  # type: ignore[assignment]

__all__ = ["DEFAULT_SOCKET_TIMEOUT", "client_option", "connect", "is_cluster"]

DEFAULT_SOCKET_TIMEOUT = 10.0

_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    # Bytes written by hand that are not UTF-8 read as U+FFFD (and are then skipped as junk)
    # instead of failing the whole reply they are in.
    "encoding_errors": "replace",
    "socket_connect_timeout": 5.0,
    "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
    "health_check_interval": 30,
}


def connect(url: str, *, cluster: bool = False, max_connections: int = 64) -> Any:
    """An asyncio client for ``url``: a :class:`~redis.asyncio.Redis` on a blocking pool of
    ``max_connections``, or with ``cluster`` a :class:`~redis.asyncio.RedisCluster` that
    discovers the other nodes from this one (``max_connections`` per node)."""
    if cluster:
        return _Cluster.from_url(url, max_connections=max_connections, **_OPTIONS)
    # A blocking pool: a burst of concurrent operations waits for a connection instead of
    # failing, and the process never holds more than max_connections.
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=DEFAULT_SOCKET_TIMEOUT, **_OPTIONS
    )
    if _hiredis_pack is not None and pool.connection_kwargs.get("encoding", "utf-8") == "utf-8":
        pool.connection_class = _hiredis_packing(pool.connection_class)
    return Redis.from_pool(pool)  # closing the client closes the pool too


class _Cluster(RedisCluster):
    """redis-py's cluster client, which loads the slot map before it routes a command.

    redis-py (8.1) picks a command's nodes before it loads the slot map on first use (and after
    it closed itself on a topology error): without the map a keyed command goes to a random
    node and comes back MOVED, and every fifth MOVED makes redis-py close every connection of
    the client, cutting the commands other tasks have in flight on them.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.get_default_node() is None:  # no slot map yet (or any more)
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


class _HiredisPacking:
    """Packs commands with hiredis's C packer, as redis-py's sync client does.

    redis-py's asyncio connection packs in Python, argument by argument: a claim or finish
    script call (15-20 arguments) spent more CPU being packed than anything else a worker does.
    Anything hiredis will not pack (a bool, None, a lone surrogate) goes to redis-py's own
    packer, which raises its usual error or packs it as before.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        try:
            if isinstance(args[0], str):
                args = (*args[0].encode().split(), *args[1:])
            elif b" " in args[0]:
                args = (*args[0].split(), *args[1:])
            return [_hiredis_pack(args)]
        except Exception:
            return super().pack_command(*args)  # type: ignore[misc,no-any-return]


_PACKING: dict[type, type] = {}


def _hiredis_packing(connection_class: type) -> type:
    """``connection_class`` (plain, TLS or Unix socket) packing its commands with hiredis."""
    if connection_class not in _PACKING:
        name = f"Hiredis{connection_class.__name__}"
        _PACKING[connection_class] = type(name, (_HiredisPacking, connection_class), {})
    return _PACKING[connection_class]


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is redis-py's cluster client."""
    return isinstance(client, RedisCluster)


def client_option(client: Any, name: str, default: Any = None) -> Any:
    """A connection option (e.g. ``socket_timeout``) of a plain or a cluster client."""
    if is_cluster(client):
        if name == "decode_responses":
            return client.get_encoder().decode_responses
        return client.get_connection_kwargs().get(name, default)
    pool = getattr(client, "connection_pool", None)
    return getattr(pool, "connection_kwargs", {}).get(name, default)

"""Shared fixtures: one real server per session, a fake and a real client per test.

* ``redis_url`` (session): ``$REDIS_URL`` if set, else a private
  :class:`runstate.embedded.EmbeddedServer` started once for the session.
* ``cluster_url`` (session): a private 3-master Redis Cluster
  (:class:`runstate.embedded_cluster.EmbeddedCluster`), started once for the session.
* ``redis`` (function, parametrised ``fake`` / ``real`` / ``cluster``): an async client with
  ``decode_responses=True``; ``fake`` is fakeredis with Lua (lupa), ``real``
  talks to ``redis_url``, ``cluster`` is redis-py's cluster client on ``cluster_url``.
* ``real_redis``: only the real client (for tests that span processes).
* ``prefix``: a random key prefix per test, so tests never FLUSHALL and can run
  in parallel; keys under it on the real server are deleted afterwards.
* ``coord``: a ``runstate.Coordinator`` on ``redis`` and ``prefix``.

Tests that touch the real server are marked ``real`` automatically, so
``pytest -m "not real"`` runs the fake half alone. When ``$CI`` is set, a real
server that cannot start fails the run instead of skipping it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import fakeredis

# Imported here, at a shallow stack, on purpose: hypothesis's pytest plugin otherwise imports it
# lazily from deep inside the terminal summary, where CPython 3.11.7's AST check fails
# ("AST constructor recursion depth mismatch") while pytest rewrites its modules.
import hypothesis  # noqa: F401
import pytest
import redis as redis_sync
import redis.asyncio as aioredis

if TYPE_CHECKING:
    from runstate import Coordinator

_REAL_FIXTURES = frozenset({"real_redis", "redis_url", "cluster_url", "cluster_redis"})


def _in_ci() -> bool:
    """True when running under CI (``$CI`` set to anything but empty/false/0)."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _uses_real_server(item: Any) -> bool:
    """True if a test item (or fixture request) touches the real server."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("redis") in ("real", "cluster"):
        return True
    return bool(_REAL_FIXTURES.intersection(item.fixturenames))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real server with ``@pytest.mark.real``."""
    for item in items:
        if _uses_real_server(item):
            item.add_marker(pytest.mark.real)


def _start_or_skip(server: Any, what: str) -> None:
    """Start an embedded server or cluster; if it cannot start, skip (fail under CI)."""
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        message = f"cannot start {what}: {exc}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis-compatible server shared by the whole session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from runstate.embedded import EmbeddedServer

    server = EmbeddedServer()
    _start_or_skip(server, "a real Redis-compatible server")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """URL of one node of a private 3-master Redis Cluster shared by the whole session."""
    from runstate.embedded_cluster import EmbeddedCluster

    cluster = EmbeddedCluster()
    _start_or_skip(cluster, "a Redis Cluster")
    try:
        yield cluster.url
        # No command of the whole session was refused for naming keys of several slots, nor
        # redirected: the slots never move here, so a MOVED is a client that sent a command
        # before it knew the slot map (see the ``redis`` fixture).
        refused = {}
        for node in cluster.nodes:
            with redis_sync.Redis(port=node.port, decode_responses=True) as client:
                stats = client.info("errorstats")
            bad = {k: v for k, v in stats.items() if "CROSSSLOT" in k or "MOVED" in k}
            refused.update({f"{node.port} {k}": v for k, v in bad.items()})
        if refused:
            pytest.fail(f"the cluster refused or redirected commands: {refused}", pytrace=False)
    finally:
        cluster.stop()


@pytest.fixture(params=["fake", "real", "cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """An async client with ``decode_responses=True``: fakeredis, the real server or the
    cluster (through redis-py's cluster client)."""
    client: Any
    if request.param == "fake":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    elif request.param == "cluster":
        client = aioredis.RedisCluster.from_url(
            request.getfixturevalue("cluster_url"), decode_responses=True
        )
        # Load the slot map now, as redis-py asks: its client picks a command's node before it
        # loads the map on first use, so the first commands go to random nodes (MOVED), and
        # each fifth MOVED closes every connection of the client, under the commands of others.
        await client.initialize()
    else:
        url: str = request.getfixturevalue("redis_url")
        client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An async client to the real server only."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh key prefix; its keys on the real server are removed afterwards."""
    value = "t" + uuid.uuid4().hex[:10]
    url: str | None = None
    cluster = False
    if _uses_real_server(request.node):
        callspec = getattr(request.node, "callspec", None)
        cluster = callspec is not None and callspec.params.get("redis") == "cluster"
        cluster = cluster or "cluster_url" in request.node.fixturenames
        url = request.getfixturevalue("cluster_url" if cluster else "redis_url")
    yield value
    if url is not None:
        _delete_prefix(url, value, cluster)


def _delete_prefix(url: str, prefix: str, cluster: bool = False) -> None:
    """Best-effort removal of every ``{prefix}:*`` key, using SCAN (never KEYS); on a cluster
    one key at a time (UNLINK of several keys must stay in one slot)."""
    if cluster:
        try:
            with redis_sync.Redis.from_url(url, socket_timeout=5, decode_responses=True) as client:
                text = client.execute_command("CLUSTER", "NODES")
            for line in text.splitlines():  # "<id> <host>:<port>@<bus port> ..."
                host, port = line.split()[1].split("@")[0].rsplit(":", 1)
                with redis_sync.Redis(host=host, port=int(port), socket_timeout=5) as node:
                    for key in node.scan_iter(match=f"{prefix}:*", count=1000):
                        node.unlink(key)
        except (redis_sync.RedisError, OSError):
            pass
        return
    try:
        with redis_sync.Redis.from_url(url, socket_timeout=5) as client:
            batch: list[Any] = []
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
    except (redis_sync.RedisError, OSError):
        pass


@pytest.fixture
async def coord(redis: aioredis.Redis, prefix: str) -> AsyncIterator[Coordinator]:
    """A Coordinator over ``redis`` with this test's ``prefix``."""
    from runstate import Coordinator

    c = Coordinator(redis, prefix=prefix)
    try:
        yield c
    finally:
        await c.aclose()

"""A private Redis Cluster of embedded servers, for the tests and for trying runstate on a cluster.

Three (by default) :class:`~runstate.embedded.EmbeddedServer` processes started with
``--cluster-enabled yes``, the 16384 slots split evenly between them with ``CLUSTER ADDSLOTSRANGE``
and the nodes joined with ``CLUSTER MEET``: what ``redis-cli --cluster create`` does, without
needing ``redis-cli``. Masters only (no replicas): enough to prove that no command crosses slots.

Example::

    with EmbeddedCluster() as cluster:
        coord = Coordinator.from_url(cluster.url, cluster=True)
"""

from __future__ import annotations

import random
import socket
import time
from types import TracebackType
from typing import Any

import redis

from .embedded import EmbeddedServer

__all__ = ["EmbeddedCluster"]

SLOTS = 16384
_READY_TIMEOUT = 20.0


class EmbeddedCluster:
    """``masters`` embedded servers joined into one cluster that covers every slot.

    Args:
        masters: how many master nodes (at least 3, as Redis Cluster wants).
        binary: server executable; defaults to :func:`runstate.embedded.find_server_binary`.
    """

    def __init__(self, masters: int = 3, *, binary: str | None = None) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters!r}")
        self._binary = binary
        self._nodes = [self._node() for _ in range(masters)]
        self._started = False

    def _node(self) -> EmbeddedServer:
        # A node also listens on its port + 10000 (the cluster bus), so its port must leave room.
        return EmbeddedServer(
            self._binary,
            port=_free_cluster_port(),
            extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
        )

    @property
    def nodes(self) -> list[EmbeddedServer]:
        return list(self._nodes)

    @property
    def url(self) -> str:
        """The URL of the first node: a cluster client discovers the others from it."""
        return self._nodes[0].url

    def start(self) -> EmbeddedCluster:
        """Start the nodes, assign the slots, join them and wait until the cluster is ``ok``.

        Raises:
            RuntimeError: a node did not start, or the cluster did not converge in time.
        """
        try:
            for i in range(len(self._nodes)):
                for attempt in range(5):
                    try:
                        self._nodes[i].start()
                        break
                    except RuntimeError:  # the port was taken meanwhile: another one
                        self._nodes[i].stop()
                        if attempt == 4:
                            raise
                        self._nodes[i] = self._node()
            self._join()
        except BaseException:
            self.stop()
            raise
        self._started = True
        return self

    def _join(self) -> None:
        clients: list[Any] = [redis.Redis(port=n.port, socket_timeout=5) for n in self._nodes]
        try:
            per_node = SLOTS // len(clients)
            for i, client in enumerate(clients):
                first = i * per_node
                last = SLOTS - 1 if i == len(clients) - 1 else first + per_node - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node in self._nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + _READY_TIMEOUT
            while not all(_ready(c, len(clients)) for c in clients):
                if time.monotonic() > deadline:
                    states = [c.execute_command("CLUSTER", "INFO") for c in clients]
                    raise RuntimeError(f"the cluster did not converge: {states!r}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Stop every node and remove its files; safe to call twice."""
        for node in self._nodes:
            node.stop()
        self._started = False

    def __enter__(self) -> EmbeddedCluster:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = [node.port for node in self._nodes] if self._started else []
        return f"<EmbeddedCluster masters={len(self._nodes)} ports={ports}>"


def _ready(client: Any, masters: int) -> bool:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(masters)


def _free_cluster_port() -> int:
    """A port below 55535 that is free, with its cluster bus port (+10000) free too."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

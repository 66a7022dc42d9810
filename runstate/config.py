"""Settings for runstate: the one place that reads the process environment.

Everything else in the library takes explicit arguments; callers that want
environment-driven defaults call :func:`load_settings` and pass the result on.
Explicit arguments always win over the environment, and an environment
variable set to the empty string counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .keys import DEFAULT_PREFIX

__all__ = [
    "DEFAULT_PREFIX",
    "ENV_CLUSTER",
    "ENV_EVENT_LOOP",
    "ENV_PREFIX",
    "ENV_URL",
    "EVENT_LOOPS",
    "Settings",
    "load_settings",
]

ENV_URL = "RUNSTATE_REDIS_URL"
"""Environment variable holding the Redis URL (e.g. ``redis://host:6379/0``)."""

ENV_PREFIX = "RUNSTATE_PREFIX"
"""Environment variable holding the key prefix for every key runstate writes."""


ENV_CLUSTER = "RUNSTATE_REDIS_CLUSTER"
"""Environment variable: ``1`` / ``true`` / ``yes`` when the URL names a node of a Redis Cluster."""

ENV_EVENT_LOOP = "RUNSTATE_EVENT_LOOP"
"""Environment variable: the event loop runstate's own processes run on (see
:mod:`runstate.eventloop`): ``auto`` (uvloop when it is installed), ``uvloop`` or ``asyncio``."""

EVENT_LOOPS = ("auto", "uvloop", "asyncio")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class Settings:
    """Resolved connection settings.

    Attributes:
        redis_url: URL of the Redis-compatible server, or ``None`` when none was
            configured (callers may then start an embedded server).
        prefix: Namespace prefix for all keys.
        cluster: whether the server is a Redis Cluster (reached through the cluster client).
        event_loop: the event loop of runstate's own processes, one of :data:`EVENT_LOOPS`.
    """

    redis_url: str | None
    prefix: str
    cluster: bool = False
    event_loop: str = "auto"


def _env(name: str, environ: Mapping[str, str]) -> str | None:
    """Return the value of ``name`` in ``environ``, treating ``""`` as unset."""
    value = environ.get(name)
    return value if value else None


def load_settings(
    redis_url: str | None = None,
    prefix: str | None = None,
    cluster: bool | None = None,
    event_loop: str | None = None,
) -> Settings:
    """Resolve settings from arguments, then the environment, then defaults.

    Args:
        redis_url: Explicit Redis URL; overrides ``RUNSTATE_REDIS_URL``.
        prefix: Explicit key prefix; overrides ``RUNSTATE_PREFIX``.
        cluster: Explicit cluster mode; overrides ``RUNSTATE_REDIS_CLUSTER``.
        event_loop: Explicit event loop; overrides ``RUNSTATE_EVENT_LOOP``.

    Returns:
        The resolved :class:`Settings`. ``redis_url`` is ``None`` when neither
        the argument nor the environment provides one.

    Raises:
        ValueError: ``RUNSTATE_REDIS_CLUSTER`` is set to something that is not a yes or a no,
            or the event loop is not one of :data:`EVENT_LOOPS`.
    """
    environ = os.environ
    url = redis_url if redis_url is not None else _env(ENV_URL, environ)
    resolved_prefix = prefix if prefix is not None else _env(ENV_PREFIX, environ)
    if cluster is None:
        flag = (_env(ENV_CLUSTER, environ) or "0").strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ValueError(
                f"{ENV_CLUSTER} must be 1/true/yes or 0/false/no, got {environ[ENV_CLUSTER]!r}"
            )
        cluster = flag in _TRUE
    loop = event_loop if event_loop is not None else _env(ENV_EVENT_LOOP, environ)
    if loop is None:
        loop = "auto"
    elif loop.strip().lower() in EVENT_LOOPS:
        loop = loop.strip().lower()
    else:
        source = "event_loop" if event_loop is not None else ENV_EVENT_LOOP
        raise ValueError(f"{source} must be one of {', '.join(EVENT_LOOPS)}, got {loop!r}")
    return Settings(
        redis_url=url,
        prefix=resolved_prefix if resolved_prefix is not None else DEFAULT_PREFIX,
        cluster=cluster,
        event_loop=loop,
    )

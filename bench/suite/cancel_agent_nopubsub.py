"""The cancel benchmark's agent in a worker whose pub/sub is "blocked".

Imported by ``python -m workers`` before it creates its Coordinator, this module makes every
:class:`~runstate.cancellation.CancelWatcher` of the process skip its pub/sub subscription
(``_listen`` returns at once) and poll the cancel markers every ``$BENCH_POLL_INTERVAL``
seconds (default 0.05; the worker has no option for it), so cancels arrive by polling only.
"""

from __future__ import annotations

import os
from typing import Any

from runstate import cancellation

from .cancel_agent import agent

__all__ = ["POLL_INTERVAL", "agent"]

POLL_INTERVAL = float(os.environ.get("BENCH_POLL_INTERVAL", "0.05"))

_init = cancellation.CancelWatcher.__init__


def _patched_init(self: cancellation.CancelWatcher, *args: Any, **kwargs: Any) -> None:
    kwargs["poll_interval"] = POLL_INTERVAL
    _init(self, *args, **kwargs)


async def _no_listen(self: cancellation.CancelWatcher) -> None:
    return None  # never subscribes: published cancels are lost, as with pub/sub down


cancellation.CancelWatcher.__init__ = _patched_init  # type: ignore[method-assign]
cancellation.CancelWatcher._listen = _no_listen  # type: ignore[method-assign]

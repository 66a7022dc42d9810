"""runstate: coordinate AI-agent runs across processes through Redis.

One active run per session, its events on a Redis stream with replay and exact resume,
cancellation that lands, and every piece of state readable with ``redis-cli``.
"""

from .cancellation import CancelToken, CancelWatcher
from .coordinator import Coordinator
from .errors import (
    EventError,
    EventTooLarge,
    RedisAccessDenied,
    RedisUnavailable,
    RunCancelled,
    RunstateError,
    RunSuperseded,
    StaleRunError,
    UnknownEventType,
)
from .events import AgentEvent, StreamEvent
from .keys import Keys
from .models import AlreadyRunning, Reserved, RunnerState, RunStatus
from .retry import RetryPolicy
from .run import RunHandle

__all__ = [
    "AgentEvent",
    "AlreadyRunning",
    "CancelToken",
    "CancelWatcher",
    "Coordinator",
    "EventError",
    "EventTooLarge",
    "Keys",
    "RedisAccessDenied",
    "RedisUnavailable",
    "Reserved",
    "RetryPolicy",
    "RunCancelled",
    "RunHandle",
    "RunStatus",
    "RunSuperseded",
    "RunnerState",
    "RunstateError",
    "StaleRunError",
    "StreamEvent",
    "UnknownEventType",
]

__version__ = "0.1.0"

"""The runstate worker runtime: run loop, RunContext, heartbeats, reaper, graceful shutdown.

Run a worker with ``python -m workers module:function --redis-url URL``, or in code::

    worker = Worker(coord, agent, concurrency=4)
    await worker.run()          # until worker.stop() (SIGTERM in the CLI)
"""

from .cli import AppPathError, load_agent
from .context import Agent, ChildRun, RunContext, SpawnError
from .heartbeat import Heartbeat
from .reaper import Reaper, ReapReport, reap_once
from .scheduler import Scheduler
from .worker import ShutdownMode, Worker

__all__ = [
    "Agent",
    "AppPathError",
    "ChildRun",
    "Heartbeat",
    "ReapReport",
    "Reaper",
    "RunContext",
    "Scheduler",
    "ShutdownMode",
    "SpawnError",
    "Worker",
    "load_agent",
    "reap_once",
]

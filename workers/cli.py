"""``python -m workers module:function [options]``: run a worker process.

Exit codes:

* 0: stopped cleanly (SIGTERM or SIGINT, then the drain finished);
* 1: a runtime failure (e.g. Redis unreachable at startup);
* 2: bad usage, including an app path that does not name an async function;
* 128 + signal number (130 for SIGINT, 143 for SIGTERM): a second signal arrived while
  draining, and the process exited at once; its runs in flight are recovered by a reaper
  once its heartbeat lapses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, cast

from runstate import Coordinator, eventloop
from runstate.config import (
    ENV_CLUSTER,
    ENV_EVENT_LOOP,
    ENV_PREFIX,
    ENV_URL,
    EVENT_LOOPS,
    load_settings,
)
from runstate.embedded import redis_url_or_embedded

from .context import Agent
from .worker import SHUTDOWN_MODES, ShutdownMode, Worker

log = logging.getLogger("workers")


class AppPathError(ValueError):
    """``module:function`` does not name an async function that can be imported."""


def load_agent(path: str) -> Agent:
    """Import the run function named by ``"package.module:function"``.

    Raises:
        AppPathError: a malformed path, a module that cannot be imported, a missing attribute,
            or something that is not an async function; the message names ``path``.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise AppPathError(
            f"invalid app {path!r}: expected 'module:function', e.g. 'workers.demo_agent:agent'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppPathError(f"cannot import module {module_name!r} of app {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppPathError(
                f"app {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    call = obj.__call__ if callable(obj) else None  # an object with an async __call__ counts
    if not (inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(call)):
        raise AppPathError(
            f"app {path!r} is {obj!r}, not an async function: "
            "define it as 'async def agent(ctx: RunContext) -> None'"
        )
    return cast(Agent, obj)


def _number(kind: Callable[[str], float], minimum: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum or (strict and value == minimum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


SECONDS = _number(float, 0.0, strict=True)
SECONDS_OR_ZERO = _number(float, 0.0, strict=False)
COUNT = _number(int, 1, strict=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m workers",
        description="Run a runstate worker: consume dispatched runs and run APP for each.",
        epilog=(
            f"Redis URL and prefix default to ${ENV_URL} and ${ENV_PREFIX}; with no URL at all a "
            "private embedded server is started. SIGTERM/SIGINT drain and exit 0; a second "
            "signal exits at once with 128+signal."
        ),
    )
    p.add_argument("app", help="the run function, as 'module:function'")
    p.add_argument("--redis-url", help=f"Redis URL (default: ${ENV_URL}, else embedded)")
    p.add_argument("--prefix", help=f"key prefix (default: ${ENV_PREFIX}, else 'runstate')")
    p.add_argument(
        "--cluster",
        action="store_true",
        help=f"the URL names a node of a Redis Cluster (same as {ENV_CLUSTER}=1)",
    )
    p.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        help=f"event loop (default: ${ENV_EVENT_LOOP}, else auto: uvloop when installed)",
    )
    p.add_argument("--concurrency", type=COUNT, default=10, help="runs at once (default 10)")
    p.add_argument("--worker-id", help="this worker's id (default <host>-<pid>-<random>)")
    p.add_argument("--heartbeat-interval", type=SECONDS, default=5.0, metavar="S")
    p.add_argument(
        "--lost-after",
        type=SECONDS,
        default=30.0,
        metavar="S",
        help="seconds without a heartbeat before this worker counts as lost (default 30)",
    )
    p.add_argument("--reaper-interval", type=SECONDS, default=10.0, metavar="S")
    p.add_argument("--scan-interval", type=SECONDS, default=60.0, metavar="S")
    p.add_argument("--schedule-interval", type=SECONDS, default=1.0, metavar="S")
    p.add_argument(
        "--max-attempts",
        type=COUNT,
        default=3,
        help="attempts per run before a lost worker ends it as error (default 3)",
    )
    p.add_argument("--undispatched-after", type=SECONDS_OR_ZERO, default=30.0, metavar="S")
    p.add_argument("--stale-entry-after", type=SECONDS_OR_ZERO, default=None, metavar="S")
    p.add_argument(
        "--shutdown-grace",
        type=SECONDS_OR_ZERO,
        default=30.0,
        metavar="S",
        help="seconds runs in flight get to finish after SIGTERM (default 30)",
    )
    p.add_argument(
        "--shutdown-mode",
        choices=SHUTDOWN_MODES,
        default="requeue",
        help="runs still in flight after the grace period: requeue them or end them as error",
    )
    p.add_argument("--shutdown-cancel-wait", type=SECONDS_OR_ZERO, default=5.0, metavar="S")
    p.add_argument("--block-ms", type=COUNT, default=1000, metavar="MS")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run a worker until it is stopped; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        agent = load_agent(args.app)
    except AppPathError as exc:
        print(f"python -m workers: error: {exc}", file=sys.stderr)
        return 2
    if args.cluster:  # the environment carries it to every Coordinator this process makes
        os.environ[ENV_CLUSTER] = "1"
    try:
        settings = load_settings(args.redis_url, args.prefix, event_loop=args.loop)
        loop = eventloop.resolve(settings.event_loop)
    except ValueError as exc:
        print(f"python -m workers: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_url_or_embedded(settings.redis_url))
        if not settings.redis_url:
            log.info("no Redis URL given: using an embedded server at %s", url)
        try:
            log.info("event loop: %s", loop)
            return eventloop.run(_serve(url, settings.prefix, agent, args, stack.close), loop)
        except Exception as exc:
            log.error("worker failed: %s", exc, exc_info=args.log_level == "DEBUG")
            return 1


async def _serve(
    url: str,
    prefix: str,
    agent: Agent,
    args: argparse.Namespace,
    cleanup: Callable[[], None],
) -> int:
    coord = Coordinator.from_url(url, prefix=prefix)
    try:
        worker = Worker(
            coord,
            agent,
            worker_id=args.worker_id,
            concurrency=args.concurrency,
            heartbeat_interval=args.heartbeat_interval,
            lost_after=args.lost_after,
            reaper_interval=args.reaper_interval,
            scan_interval=args.scan_interval,
            schedule_interval=args.schedule_interval,
            max_attempts=args.max_attempts,
            undispatched_after=args.undispatched_after,
            stale_entry_after=args.stale_entry_after,
            shutdown_grace=args.shutdown_grace,
            shutdown_mode=cast(ShutdownMode, args.shutdown_mode),
            shutdown_cancel_wait=args.shutdown_cancel_wait,
            block_ms=args.block_ms,
        )
        _install_signal_handlers(worker, cleanup)
        await worker.run()
        return 0
    finally:
        await coord.aclose()


def _install_signal_handlers(worker: Worker, cleanup: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not worker.stopping:
            worker.stop(f"received {name}")
            return
        log.warning("received %s again: exiting at once with %d", name, 128 + signum)
        with contextlib.suppress(Exception):
            cleanup()  # e.g. stop an embedded server, which would outlive os._exit
        logging.shutdown()
        os._exit(128 + signum)

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)

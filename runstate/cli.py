"""The ``runstate`` command: the demo, the HTTP server, and what an operator types to see and
steer runs.

Exit codes: 0 success; 1 the thing asked about is not there (``show`` of an unknown session,
``cancel`` with nothing active); 2 bad usage or bad input, including junk found in Redis
(``serve``: also a server that could not start, e.g. its port is taken); 3 Redis unreachable or
refusing access (a wrong password, an ACL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import ResponseError

from . import eventloop
from .config import ENV_CLUSTER, ENV_EVENT_LOOP, EVENT_LOOPS, Settings, load_settings
from .coordinator import Coordinator
from .embedded import redis_url_or_embedded
from .errors import RedisUnavailable, RunstateError
from .keys import validate_prefix
from .models import RunnerState
from .retry import RetryPolicy

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Command = Callable[[Coordinator, argparse.Namespace], Coroutine[Any, Any, int]]


def _age(then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = int((datetime.now(UTC) - then).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    return f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


async def cmd_ls(coord: Coordinator, args: argparse.Namespace) -> int:
    runs = await coord.active_runs()
    if args.json:
        _print_json([r.summary() for r in runs])
        return EXIT_OK
    if not runs:
        print("no active runs")
        return EXIT_OK
    rows = [
        [
            r.session_id,
            r.run_id[:12],
            r.status.value,
            r.worker or "-",
            str(r.attempt),
            str(r.round_count),
            f"{r.last_tool_name or '-'}/{r.last_tool_phase or '-'}",
            _age(r.started_at),
            _age(r.last_event_at),
        ]
        for r in runs
    ]
    header = ["session", "run", "status", "worker", "att", "rounds", "tool", "age", "last event"]
    print(_table(rows, header))
    return EXIT_OK


async def cmd_show(coord: Coordinator, args: argparse.Namespace) -> int:
    state = await coord.runner(args.session)
    if state is None:
        print(f"no run for session {args.session!r}", file=sys.stderr)
        return EXIT_MISSING
    events = await coord.store.read_range(args.session, "0-0", 100_000)
    last = [e for _, e in events[-args.events :] if e is not None]
    if args.json:
        _print_json(
            {
                "runner": state.summary(),
                "events": [json.loads(e.model_dump_json()) for e in last],
            }
        )
        return EXIT_OK
    _print_state(state)
    print(f"\nlast {len(last)} events:")
    for e in last:
        print(f"  {e.id}  run={e.run_id[:8]} seq={e.seq}  {e.event.model_dump_json()[:110]}")
    return EXIT_OK


def _print_state(state: RunnerState) -> None:
    data = state.summary()
    critical = data.pop("last_critical_events")
    for key, value in data.items():
        print(f"{key:>18}: {'-' if value is None else value}")
    print(f"{'critical events':>18}: {len(critical)}")
    for item in critical:
        print(f"{'':>20}{json.dumps(item)[:110]}")


async def cmd_tail(coord: Coordinator, args: argparse.Namespace) -> int:
    async for item in coord.subscribe(args.session, args.from_id, follow=args.follow):
        if args.json:
            print(item.model_dump_json(), flush=True)
        else:
            tag = item.id or "replay"
            print(f"{tag:>20}  {item.event.model_dump_json()}", flush=True)
    return EXIT_OK


async def cmd_cancel(coord: Coordinator, args: argparse.Namespace) -> int:
    cancelled = await coord.cancel(args.session, args.reason)
    if args.json:
        _print_json({"session": args.session, "cancelled": cancelled})
    else:
        print("cancelled" if cancelled else f"nothing active in session {args.session!r}")
    return EXIT_OK if cancelled else EXIT_MISSING


async def cmd_workers(coord: Coordinator, args: argparse.Namespace) -> int:
    from .queue import Queue

    queue = Queue(coord.store)
    deadlines = await queue.worker_deadlines()
    infos = await queue.worker_info(list(deadlines))
    runs = await coord.active_runs()
    now_ms = datetime.now(UTC).timestamp() * 1000
    rows: list[dict[str, Any]] = []
    for (wid, deadline), info in zip(deadlines.items(), infos, strict=True):
        mine = [r.session_id for r in runs if r.worker == wid and r.status == "running"]
        rows.append(
            {
                "worker": wid,
                "alive": deadline >= now_ms,
                "deadline_in_s": round((deadline - now_ms) / 1000, 1),
                "host": info.get("host"),
                "pid": info.get("pid"),
                "concurrency": info.get("concurrency"),
                "started_at": info.get("started_at"),
                "last_heartbeat": info.get("beat_at"),
                "running": mine,
            }
        )
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no workers")
        return EXIT_OK
    table = [
        [
            str(r["worker"]),
            "alive" if r["alive"] else "LOST",
            f"{r['deadline_in_s']}s",
            f"{r['host'] or '-'}:{r['pid'] or '-'}",
            str(r["concurrency"] or "-"),
            str(len(r["running"])),
            ",".join(r["running"])[:60] or "-",
        ]
        for r in rows
    ]
    header = ["worker", "state", "deadline", "host:pid", "conc", "runs", "sessions"]
    print(_table(table, header))
    return EXIT_OK


async def cmd_reap(coord: Coordinator, args: argparse.Namespace) -> int:
    from workers.reaper import reap_once

    report = await reap_once(
        coord, max_attempts=args.max_attempts, undispatched_after=args.undispatched_after
    )
    data = {k: v for k, v in vars(report).items()}
    if args.json:
        _print_json(data)
        return EXIT_OK
    if not report.changed:
        print("nothing to repair")
    for key, value in data.items():
        if value and key != "scanned":
            print(f"{key}: {value}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runstate", description="Coordinate AI-agent runs through Redis."
    )
    parser.add_argument("--redis-url", help="Redis URL (default: $RUNSTATE_REDIS_URL)")
    parser.add_argument("--prefix", help="key prefix (default: $RUNSTATE_PREFIX or 'runstate')")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help=f"the URL names a node of a Redis Cluster (same as {ENV_CLUSTER}=1)",
    )
    parser.add_argument(
        "--loop",
        choices=EVENT_LOOPS,
        help=f"event loop (default: ${ENV_EVENT_LOOP}, else auto: uvloop when installed)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # --json is also accepted after the command (`runstate ls --json`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the demo on an embedded server")
    demo.add_argument("--local", action="store_true", help="library only: no worker processes")

    sub.add_parser("ls", parents=[common], help="active runs")
    show = sub.add_parser(
        "show", parents=[common], help="a session's runner, critical events and last events"
    )
    show.add_argument("session")
    show.add_argument("--events", type=int, default=10, help="how many last events (10)")
    tail = sub.add_parser("tail", parents=[common], help="follow a session's events (resumable)")
    tail.add_argument("session")
    tail.add_argument("--from", dest="from_id", help="resume after this stream id ('0': all)")
    tail.add_argument("--follow", action="store_true", help="keep going after the run ends")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a session's active run")
    cancel.add_argument("session")
    cancel.add_argument("--reason", default="cancelled by operator")
    sub.add_parser(
        "workers", parents=[common], help="live and lost workers, their runs and last heartbeat"
    )
    reap = sub.add_parser(
        "reap", parents=[common], help="one reaper pass: recover runs of lost workers, repair"
    )
    reap.add_argument("--max-attempts", type=int, default=3, help="attempts per run (3)")
    reap.add_argument(
        "--undispatched-after",
        type=float,
        default=30.0,
        help="seconds a pending run may wait undispatched before it is dispatched again (30)",
    )
    serve = sub.add_parser(
        "serve",
        help="serve the HTTP API and the ops page (an embedded server when no URL is set)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (8000)")
    serve.add_argument(
        "--keepalive",
        type=_seconds,
        default=15.0,
        help="seconds of silence before an event stream sends a keepalive comment (15)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=3.0,
        help="seconds open event streams get to end at shutdown before they are cut (3)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (info)",
    )
    return parser


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: use 0-65535")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}: use seconds > 0")
    return seconds


COMMANDS: dict[str, Command] = {
    "ls": cmd_ls,
    "show": cmd_show,
    "tail": cmd_tail,
    "cancel": cmd_cancel,
    "workers": cmd_workers,
    "reap": cmd_reap,
}


async def _ping(url: str, prefix: str) -> None:
    """Fail early (RedisUnavailable) when Redis does not answer, through the retry policy."""
    async with Coordinator.from_url(url, prefix) as coord:
        await coord.store.retry.call("ping", coord.client.ping)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Run the HTTP API under uvicorn until SIGINT/SIGTERM."""
    try:
        import uvicorn
        from uvicorn.config import STARTUP_FAILURE

        from .http import create_app
    except ImportError as exc:
        print(
            f"runstate: serve needs the http extra (pip install 'runstate[http]'): {exc}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    redis_url, prefix, loop = settings.redis_url, settings.prefix, settings.event_loop
    validate_prefix(prefix)
    with redis_url_or_embedded(redis_url) as url:
        if not redis_url:
            print(f"runstate: started an embedded Redis-compatible server at {url}", flush=True)
        eventloop.run(_ping(url, prefix), loop)
        app = create_app(redis_url=url, prefix=prefix, keepalive=args.keepalive)
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            lifespan="on",
            loop=eventloop.resolve(loop),
            # Event streams never end by themselves: without a bound, shutdown waits for
            # every client to leave. Clients resume elsewhere with Last-Event-ID.
            timeout_graceful_shutdown=math.ceil(args.shutdown_timeout),
        )
        server = uvicorn.Server(config)

        def after_drain(signum: int, frame: object) -> None:
            # uvicorn drains on SIGTERM/SIGINT, then raises the same signal again under the
            # handler it found (this one), expecting it to kill the process: that would skip
            # the cleanup below (an embedded server would outlive us). A signal uvicorn did not
            # drain on (before it started listening) exits now, through that cleanup.
            if not server.should_exit:
                raise SystemExit(128 + signum)

        previous = {sig: signal.signal(sig, after_drain) for sig in _STOP_SIGNALS}
        try:
            server.run()
        except SystemExit as exc:
            if exc.code != STARTUP_FAILURE:  # e.g. the port is taken; uvicorn logged why
                raise
            server.started = False
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if not server.started:
        print(
            f"runstate: the HTTP server did not start on {args.host}:{args.port}", file=sys.stderr
        )
        return EXIT_USAGE
    return EXIT_OK


# An operator at a terminal wants a down server reported in seconds, not a service's 20 s.
CLI_RETRY = RetryPolicy(deadline=5.0)


async def _run_ops(command: Command, args: argparse.Namespace, url: str, prefix: str) -> int:
    async with Coordinator.from_url(url, prefix, retry=CLI_RETRY) as coord:
        return await command(coord, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cluster:  # the environment carries it to every Coordinator this process makes
        os.environ[ENV_CLUSTER] = "1"
    if args.loop:  # and the loop to the demo's worker processes
        os.environ[ENV_EVENT_LOOP] = args.loop
    try:
        settings = load_settings(args.redis_url, args.prefix, event_loop=args.loop)
        loop = settings.event_loop
        if args.command == "demo":
            from .demo import run_local_demo, run_worker_demo

            with redis_url_or_embedded(settings.redis_url) as url:
                if args.local:
                    eventloop.run(run_local_demo(url, settings.prefix), loop)
                    return EXIT_OK
                return eventloop.run(run_worker_demo(url, settings.prefix), loop)
        if args.command == "serve":
            return cmd_serve(args, settings)
        if not settings.redis_url:
            print(
                "runstate: no Redis URL: pass --redis-url or set RUNSTATE_REDIS_URL",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return eventloop.run(
            _run_ops(COMMANDS[args.command], args, settings.redis_url, settings.prefix), loop
        )
    except RedisUnavailable as exc:
        print(f"runstate: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (ValueError, RunstateError, ResponseError) as exc:  # e.g. junk written by hand
        print(f"runstate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

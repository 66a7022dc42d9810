"""The ``runstate`` command: the demo, and what an operator types to see and steer runs.

Exit codes: 0 success; 1 the thing asked about is not there (``show`` of an unknown session,
``cancel`` with nothing active); 2 bad usage or bad input; 3 Redis unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from .config import load_settings
from .coordinator import Coordinator
from .embedded import redis_url_or_embedded
from .errors import RedisUnavailable
from .models import RunnerState

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runstate", description="Coordinate AI-agent runs through Redis."
    )
    parser.add_argument("--redis-url", help="Redis URL (default: $RUNSTATE_REDIS_URL)")
    parser.add_argument("--prefix", help="key prefix (default: $RUNSTATE_PREFIX or 'runstate')")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the demo on an embedded server")
    demo.add_argument("--local", action="store_true", help="library only: no worker processes")

    sub.add_parser("ls", help="active runs")
    show = sub.add_parser("show", help="a session's runner, critical events and last events")
    show.add_argument("session")
    show.add_argument("--events", type=int, default=10, help="how many last events (10)")
    tail = sub.add_parser("tail", help="follow a session's events (resumable)")
    tail.add_argument("session")
    tail.add_argument("--from", dest="from_id", help="resume after this stream id ('0': all)")
    tail.add_argument("--follow", action="store_true", help="keep going after the run ends")
    cancel = sub.add_parser("cancel", help="cancel a session's active run")
    cancel.add_argument("session")
    cancel.add_argument("--reason", default="cancelled by operator")
    return parser


COMMANDS: dict[str, Command] = {
    "ls": cmd_ls,
    "show": cmd_show,
    "tail": cmd_tail,
    "cancel": cmd_cancel,
}


async def _run_ops(command: Command, args: argparse.Namespace, url: str, prefix: str) -> int:
    async with Coordinator.from_url(url, prefix) as coord:
        return await command(coord, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings(args.redis_url, args.prefix)
    try:
        if args.command == "demo":
            from .demo import run_local_demo

            with redis_url_or_embedded(settings.redis_url) as url:
                asyncio.run(run_local_demo(url))
            return EXIT_OK
        if not settings.redis_url:
            print(
                "runstate: no Redis URL: pass --redis-url or set RUNSTATE_REDIS_URL",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return asyncio.run(
            _run_ops(COMMANDS[args.command], args, settings.redis_url, settings.prefix)
        )
    except RedisUnavailable as exc:
        print(f"runstate: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ValueError as exc:
        print(f"runstate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

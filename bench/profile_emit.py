"""Where the time of ``RunHandle.emit`` goes: the emit loop of benchmark 1 under cProfile.

    python bench/profile_emit.py [EVENTS]

Prints the top 25 functions by cumulative time, then the top 25 by own time. Uses ``$REDIS_URL``
if set, else a private embedded server (stopped afterwards).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.common import new_tag, redis_server, run_async
from suite.emit import EVENT_BYTES, claimed_run, emit_loop, end_run, token_of_size

from runstate import Coordinator

TOP = 25


async def profile(url: str, prefix: str, n: int) -> tuple[pstats.Stats, float]:
    event = token_of_size(EVENT_BYTES)
    async with Coordinator.from_url(url, prefix=prefix) as coord:
        warm = await claimed_run(coord, "warm")
        await emit_loop(warm, event, 300)
        await end_run(coord, warm)
        run = await claimed_run(coord, "profiled")
        profiler = cProfile.Profile()
        profiler.enable()
        elapsed = await emit_loop(run, event, n)
        profiler.disable()
        await end_run(coord, run)
    return pstats.Stats(profiler), elapsed


def shorten(text: str) -> str:
    """Paths relative to the repository, the virtualenv and the Python installation."""
    root = str(Path(__file__).resolve().parents[1])
    for path, name in ((sys.prefix, "<venv>"), (sys.base_prefix, "<python>"), (root, ".")):
        text = text.replace(str(Path(path)), name)
    return text


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    tag = new_tag()
    with redis_server(tag) as url:
        stats, elapsed = run_async(profile(url, tag, n))
    print(
        f"{n} emits of a {EVENT_BYTES}-byte Token in {elapsed:.2f}s under cProfile "
        f"({elapsed / n * 1e6:.0f} µs per emit with the profiler's overhead)\n"
    )
    for order, title in (("cumulative", "cumulative time"), ("tottime", "own time")):
        out = io.StringIO()
        stats.stream = out  # type: ignore[attr-defined]
        stats.sort_stats(order).print_stats(TOP)
        body = out.getvalue()
        body = body[body.find("   ncalls") :]
        print(f"== top {TOP} by {title} ==")
        print(shorten(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run runstate's benchmarks, print one markdown table per benchmark, write bench/results.md.

    python bench/run_all.py [emit fanout cancel lifecycle memory reserve]

Every figure is compared with a baseline measured in the same run on the same server (a private
embedded server per benchmark, or ``$REDIS_URL``), each measurement repeated ``$BENCH_REPS``
times (default 5) and the median reported. ``$BENCH_SCALE`` scales the counts (e.g. 0.2 for a
smoke run). Missed goals are reported, not failed: the exit code is non-zero only when a
benchmark could not run. arq, SAQ and RQ (bench/requirements.txt) are installed into
``bench/.venv`` on first use (see suite/common.py for why not into the project's venv).
Also writes ``bench/results-last.json`` with the raw figures.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.common import (
    BENCH_DIR,
    Section,
    compare_python,
    event_loop,
    reps,
    server_version,
)

BENCHMARKS = ("emit", "fanout", "cancel", "lifecycle", "memory", "reserve")


def environment() -> list[str]:
    import redis

    from runstate.embedded import EmbeddedServer

    url = os.environ.get("REDIS_URL")
    if url:
        server = f"{server_version(url)} ($REDIS_URL)"
    else:
        with EmbeddedServer() as srv:
            server = f"{server_version(srv.url)} (a private embedded server per benchmark)"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    loop = event_loop()
    if loop == "uvloop":
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    return [
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average at start {load}",
        f"- Python {platform.python_version()}, redis-py {redis.__version__}, server {server}",
        f"- event loop of every process (BENCH_LOOP): {loop}",
        f"- repetitions: {reps()} (median reported), scale {os.environ.get('BENCH_SCALE', '1')}",
    ]


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
        return 2
    if "lifecycle" in chosen:
        python, why = compare_python()  # install arq, SAQ and RQ now, not mid-benchmark
        if python is None:
            print(f"warning: {why}; benchmark 5 will only measure runstate", flush=True)
    header = ["# runstate benchmarks", "", *environment(), ""]
    print("\n".join(header), flush=True)
    sections: list[Section] = []
    failed = []
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        print(f"--- running {name} ...", flush=True)
        try:
            module = importlib.import_module(f"suite.{name}")
            done = module.run()
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            done = [Section(f"{name}", "", error=f"{type(exc).__name__}: {exc}"[:2000])]
        took = time.monotonic() - t0
        done[-1].notes.append(
            f"Took {took:.0f} s" + (f" (with the {len(done) - 1} above)." if len(done) > 1 else ".")
        )
        for section in done:
            print(section.markdown(), flush=True)
        sections += done
    total = time.monotonic() - started
    footer = [f"All benchmarks took {total:.0f} s.", ""]
    print("\n".join(footer))
    text = "\n".join([*header, *(s.markdown() for s in sections), *footer])
    (BENCH_DIR / "results.md").write_text(text)
    raw = {s.title: s.data for s in sections}
    (BENCH_DIR / "results-last.json").write_text(json.dumps(raw, indent=1, default=str))
    print("wrote bench/results.md and bench/results-last.json")
    if failed:
        print(f"benchmark(s) that could not run: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What every benchmark shares: a server, scale knobs, statistics, result tables, subprocesses.

Knobs (environment variables):

* ``REDIS_URL``: use this server instead of a private embedded one. Every key a benchmark
  writes carries its tag (a random ``bench-xxxxxxxx``) and is deleted afterwards.
* ``BENCH_REPS``: how many times each measurement is repeated (default 5; the median is
  reported).
* ``BENCH_SCALE``: multiplies every event / job / session count (default 1.0; e.g. 0.2 for
  a quick smoke run).
* ``BENCH_LOOP``: the event loop of every benchmark process, runstate's and its peers' alike:
  ``auto`` (default: uvloop when installed, as runstate's own processes pick), ``uvloop`` or
  ``asyncio``.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

BENCH_DIR = Path(__file__).resolve().parents[1]
ROOT = BENCH_DIR.parent
COMPARE_VENV = BENCH_DIR / ".venv"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
T = TypeVar("T")


# ---- knobs ------------------------------------------------------------------------------------


def reps() -> int:
    return max(1, int(os.environ.get("BENCH_REPS", "5")))


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times ``$BENCH_SCALE`` (at least ``minimum``)."""
    return max(minimum, round(n * float(os.environ.get("BENCH_SCALE", "1"))))


def event_loop() -> str:
    """The event loop every benchmark process runs on (``BENCH_LOOP``), resolved: ``uvloop`` or
    ``asyncio``. Subprocesses get it resolved in their environment (see :func:`child_env`)."""
    from runstate.eventloop import resolve

    return resolve(os.environ.get("BENCH_LOOP") or "auto")


def run_async(main: Coroutine[Any, Any, T], loop: str | None = None) -> T:
    """``asyncio.run(main)`` on the benchmark's event loop (or ``loop``)."""
    from runstate.eventloop import run as run_on

    return run_on(main, loop or event_loop())


def new_tag() -> str:
    """A random name part that every key of one benchmark carries (for cleanup)."""
    return f"bench-{uuid.uuid4().hex[:8]}"


# ---- the server -------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(tag: str) -> Iterator[str]:
    """The URL of a real server for one benchmark: ``$REDIS_URL``, else a private Valkey.

    On ``$REDIS_URL`` every key containing ``tag`` is deleted afterwards; a private server is
    simply stopped (its directory removed).
    """
    external = os.environ.get("REDIS_URL")
    if external:
        try:
            yield external
        finally:
            delete_tagged(external, tag)
        return
    from runstate.embedded import EmbeddedServer

    with EmbeddedServer() as server:
        yield server.url


def delete_tagged(url: str, tag: str) -> int:
    """Delete every key whose name contains ``tag`` (and RQ's registry members naming it).

    What remains is RQ's global ``rq:clean_groups`` lock, which expires by itself.
    """
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        n = 0
        batch: list[str] = []
        for key in client.scan_iter(match=f"*{tag}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += client.unlink(*batch)
                batch = []
        if batch:
            n += client.unlink(*batch)
        for registry in ("rq:workers", "rq:queues"):
            with contextlib.suppress(redis.ResponseError):
                members = [m for m in client.smembers(registry) if tag in m]
                if members:
                    client.srem(registry, *members)
        return n
    finally:
        client.close()


def server_version(url: str) -> str:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = client.info("server")
    finally:
        client.close()
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"


def with_query(url: str, **params: str) -> str:
    """``url`` with query parameters added, e.g. ``client_name`` (redis-py reads it)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


# ---- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ---- formatting -------------------------------------------------------------------------------


def fmt_rate(x: float, unit: str = "/s") -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:,.0f} {unit}" if x >= 100 else f"{x:,.1f} {unit}"


def fmt_ms(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    return f"{x:.3f} ms" if x < 10 else f"{x:.1f} ms"


def fmt_ratio(x: float) -> str:
    return "n/a" if math.isnan(x) or math.isinf(x) else f"{x:.2f}x"


def fmt_bytes(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.0f} B"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# ---- result tables ----------------------------------------------------------------------------


@dataclass
class Row:
    what: str
    runstate: str
    baseline: str
    ratio: str = ""
    goal: str = ""
    met: bool | None = None  # None: informative row, no goal

    def cells(self) -> list[str]:
        met = "-" if self.met is None else ("yes" if self.met else "**no**")
        return [self.what, self.runstate, self.baseline, self.ratio, self.goal or "-", met]


@dataclass
class Section:
    """One benchmark's markdown table, with what was compared and how."""

    title: str
    setup: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw figures, for results-last.json
    error: str | None = None

    def markdown(self) -> str:
        out = [f"## {self.title}", "", self.setup, ""]
        if self.rows:
            header = ["what", "runstate", "baseline", "ratio", "goal", "met?"]
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            for row in self.rows:
                out.append("| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |")
            out.append("")
        if self.error:
            out += [f"**FAILED**: `{self.error}`", ""]
        out += [f"- {note}" for note in self.notes]
        if self.notes:
            out.append("")
        return "\n".join(out)


# ---- subprocesses -----------------------------------------------------------------------------

_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _stop_live() -> None:
    for proc in list(_LIVE.values()):
        stop_process(proc, timeout=3.0)


atexit.register(_stop_live)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """End one process we started, by its pid: SIGTERM, then SIGKILL after ``timeout``."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                what = " ".join(str(a) for a in proc.args[1:5])  # type: ignore[index]
                print(
                    f"note: pid {proc.pid} ({what} ...) did not exit within {timeout:g}s of "
                    "SIGTERM; killed",
                    file=sys.stderr,
                    flush=True,
                )
                proc.kill()
                proc.wait(5.0)
    finally:
        _LIVE.pop(proc.pid, None)
    return proc.returncode


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark subprocess: ``bench/`` importable, no RUNSTATE_* vars but
    the event loop (``BENCH_LOOP`` resolved, for runstate's workers and the peers alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNSTATE_")}
    env["BENCH_LOOP"] = env["RUNSTATE_EVENT_LOOP"] = event_loop()
    paths = [str(BENCH_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Procs:
    """The subprocesses of one benchmark, their output in a private log directory."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="runstate-bench-"))
        self._files: list[IO[bytes]] = []
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("wb")
        self._files.append(log)
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=env or child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
        )
        _LIVE[proc.pid] = proc
        self.procs.append((name, proc))
        return proc

    def log(self, name: str, lines: int = 30) -> str:
        path = self.dir / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
        return stop_process(proc, timeout)

    def close(self) -> None:
        for _, proc in self.procs:
            stop_process(proc, timeout=5.0)
        for f in self._files:
            f.close()
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_instructions(argv: Sequence[str]) -> int:
    """The instructions ``python argv...`` executes, counted by valgrind's cachegrind (which must
    be installed); its subprocesses are not counted."""
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
    command += ["--cachegrind-out-file=/dev/null", sys.executable, *argv]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr}")
    return int(found.group(1).replace(",", ""))


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---- the competitors' environment ---------------------------------------------------------------


def compare_python() -> tuple[str | None, str]:
    """The Python of ``bench/.venv``, where arq, saq and rq live; created when missing.

    They get a virtual environment of their own because arq pins ``redis<6`` (and saq's
    extra ``redis<8``): installed beside runstate they would downgrade the redis-py that
    runstate itself is measured with. Returns ``(python, "")`` or ``(None, why not)``.
    """
    python = COMPARE_VENV / "bin" / "python"
    stamp = COMPARE_VENV / ".bench-installed"
    fresh = stamp.exists() and stamp.stat().st_mtime >= REQUIREMENTS.stat().st_mtime
    if python.exists() and fresh and _imports(python):
        return str(python), ""
    try:
        if not python.exists():
            print(f"creating {COMPARE_VENV.relative_to(ROOT)} for arq, saq and rq", flush=True)
            subprocess.run([sys.executable, "-m", "venv", str(COMPARE_VENV)], check=True)
        print(f"installing {REQUIREMENTS.relative_to(ROOT)} into it", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)],
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"could not install {REQUIREMENTS.name}: {exc}"
    if not _imports(python):
        return None, "arq, saq or rq does not import after installing"
    stamp.touch()
    return str(python), ""


def _imports(python: Path) -> bool:
    probe = subprocess.run(
        [str(python), "-c", "import arq, saq, rq"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0

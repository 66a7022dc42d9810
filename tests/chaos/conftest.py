"""Fixtures of the chaos tests: a private server per test, and every process stopped at the end.

Each test gets its own :class:`~runstate.embedded.EmbeddedServer` (so that killing or pausing it
disturbs no other test) and a :class:`Processes` that starts workers, ``runstate serve``
replicas and helper scripts, and kills whatever is still running at teardown.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from runstate.embedded import EmbeddedServer
from tests.agents.helpers import ROOT, WorkerProcess, start_worker, worker_env
from tests.http_support import Replica, start_serve, stop_serve, wait_ready


class Processes:
    """Starts the test's subprocesses, each logging to a file under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self.replicas: list[Replica] = []
        self.scripts: list[tuple[subprocess.Popen[bytes], Path]] = []

    def worker(
        self, url: str, prefix: str, name: str, *extra: str, app: str, fast: bool = True
    ) -> WorkerProcess:
        worker = start_worker(url, prefix, name, self.log_dir, *extra, app=app, fast=fast)
        self.workers.append(worker)
        return worker

    def replica(self, url: str, prefix: str, name: str, *args: str) -> Replica:
        """A ``runstate serve`` process; call :func:`wait_ready` before using it."""
        env = {"RUNSTATE_REDIS_URL": url, "RUNSTATE_PREFIX": prefix}
        replica = start_serve(self.log_dir, name, env, args)
        self.replicas.append(replica)
        return replica

    def ready(self, limit: float = 30.0) -> None:
        for replica in self.replicas:
            wait_ready(replica, limit)

    def script(self, module: str, *args: str, name: str) -> subprocess.Popen[bytes]:
        """``python -m module args...`` from the repository root."""
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=worker_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.scripts.append((proc, log))
        return proc

    def logs(self, tail: int = 3000) -> str:
        """The end of every process's log, for assertion messages."""
        parts = [f"--- {w.id}\n{w.output()[-tail:]}" for w in self.workers]
        parts += [f"--- {r.name}\n{r.output()[-tail:]}" for r in self.replicas]
        parts += [
            f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for _, log in self.scripts
        ]
        return "\n".join(parts)

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()
        for replica in self.replicas:
            stop_serve(replica)
        for proc, _ in self.scripts:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The test's subprocesses; any still running at teardown are stopped."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., EmbeddedServer]]:
    """Start a private server (``EmbeddedServer`` arguments); stopped at teardown."""
    servers: list[EmbeddedServer] = []

    def start(*, appendonly: bool = False, extra_args: Sequence[str] = ()) -> EmbeddedServer:
        server = EmbeddedServer(appendonly=appendonly, extra_args=extra_args)
        servers.append(server)
        try:
            return server.start()
        except RuntimeError as exc:
            pytest.fail(f"cannot start a Redis-compatible server: {exc}", pytrace=False)

    try:
        yield start
    finally:
        for server in servers:
            server.stop()

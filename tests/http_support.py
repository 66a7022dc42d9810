"""Helpers for the HTTP tests: an SSE frame parser, `runstate serve` processes, a raw ASGI client.

The parser is our own (not httpx-sse) because the tests must see which frames carry no ``id:``
line and the keepalive comments, which a spec-following client hides.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

# ---- SSE frames -------------------------------------------------------------------------------


@dataclass
class Frame:
    """One SSE frame, or one comment line (``comment`` set, nothing else)."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    comment: str | None = None

    @property
    def done(self) -> bool:
        return self.data == "[DONE]"


class FrameParser:
    """Feed it lines (without their line ending); it returns the frames they complete."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, line: str) -> list[Frame]:
        if line == "":
            if not self._fields and not self._data:
                return []
            frame = Frame(
                id=self._fields.get("id"),
                event=self._fields.get("event"),
                data="\n".join(self._data),
            )
            self._fields, self._data = {}, []
            return [frame]
        if line.startswith(":"):
            return [Frame(comment=line[1:].strip())]
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        else:
            self._fields[name] = value
        return []


def parse_frames(text: str) -> list[Frame]:
    """Every frame and comment of a complete SSE body."""
    parser = FrameParser()
    return [f for line in text.splitlines() for f in parser.feed(line)]


async def aiter_frames(response: httpx.Response) -> AsyncGenerator[Frame, None]:
    """The frames (and comments) of a streaming httpx response, as they arrive."""
    parser = FrameParser()
    async for line in response.aiter_lines():
        for frame in parser.feed(line):
            yield frame


def events_only(frames: Iterable[Frame]) -> list[Frame]:
    """The frames that are events (no comments, no ``[DONE]``)."""
    return [f for f in frames if f.comment is None and not f.done]


async def stream_ids(client: Any, key: str) -> list[str]:
    """The ids of every entry of a stream, as ``XRANGE`` lists them."""
    entries = await client.xrange(key)
    return [str(eid) for eid, _ in entries]


# ---- `runstate serve` processes ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def with_query(url: str, **params: str) -> str:
    """``url`` with extra query parameters (e.g. redis-py's ``client_name``)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit(parts._replace(query=query))


@dataclass
class Replica:
    """One ``python -m runstate.cli serve`` process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    client_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_serve(
    log_dir: Path,
    name: str,
    env: Mapping[str, str | None],
    args: Sequence[str] = (),
    port: int | None = None,
) -> Replica:
    """Start ``runstate serve`` (output to a file: a full pipe would block it).

    Args:
        env: entries set to None are removed from the child's environment.
        port: by default a free one.
    """
    port = port or free_port()
    child_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    log = log_dir / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runstate.cli", "serve", "--port", str(port), *args],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(name=name, port=port, proc=proc, log=log)


def wait_ready(replica: Replica, limit: float = 20.0) -> None:
    """Wait until the replica answers ``GET /api/v1/runs/active`` with 200."""
    deadline = time.monotonic() + limit
    with httpx.Client(timeout=2.0) as client:
        while True:
            if replica.proc.poll() is not None:
                raise AssertionError(
                    f"{replica.name} exited with {replica.proc.returncode}:\n{replica.output()}"
                )
            try:
                if client.get(f"{replica.url}/api/v1/runs/active").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"{replica.name} not ready in {limit}s:\n{replica.output()}")
            time.sleep(0.05)


def stop_serve(replica: Replica) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    proc = replica.proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


# ---- a raw ASGI client for live streams -------------------------------------------------------


class AsgiStream:
    """Drive one GET through an ASGI app by hand, seeing each body chunk as it is sent.

    httpx's ASGITransport buffers a whole response, which a live event stream never finishes;
    this sends the request, collects ``http.response.*`` messages, and disconnects on demand.
    """

    def __init__(self, app: Any, path: str, headers: Mapping[str, str] | None = None) -> None:
        raw_path, _, query = path.partition("?")
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": raw_path,
            "raw_path": raw_path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.app = app
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._disconnect = asyncio.Event()
        self._sent_request = False
        self._parser = FrameParser()
        self._buffer = ""
        self._frames: list[Frame] = []
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        if not self._sent_request:
            self._sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await self._chunks.put(message["body"])
            if not message.get("more_body", False):
                await self._chunks.put(None)

    async def __aenter__(self) -> AsgiStream:
        self.task = asyncio.get_running_loop().create_task(
            self.app(self.scope, self._receive, self._send)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def next_frame(self, limit: float = 5.0) -> Frame | None:
        """The next frame or comment; None once the response has ended."""
        async with asyncio.timeout(limit):
            while not self._frames:
                chunk = await self._chunks.get()
                if chunk is None:
                    return None
                self._buffer += chunk.decode()
                *lines, self._buffer = self._buffer.split("\n")
                for line in lines:
                    self._frames.extend(self._parser.feed(line))
            return self._frames.pop(0)

    async def disconnect(self, limit: float = 5.0) -> None:
        """Tell the app the client left and wait (at most ``limit`` s) for it to finish."""
        self._disconnect.set()
        if self.task is not None:
            async with asyncio.timeout(limit):
                await self.task

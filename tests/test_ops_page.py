"""The ops page in headless Chromium: a run's events appear live, and its cancel button works.

Drives Debian's Chromium (``/usr/bin/chromium``, installed in CI by ``.ci/install-chromium``)
through Playwright; ``playwright install`` is never needed. Without Chromium the test is
skipped, except under CI where it fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runstate import Coordinator
from runstate.events import TaskListUpdated, Token

from .helpers import claim, eventually
from .http_support import Replica, start_serve, stop_serve, stream_ids, wait_ready

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _unavailable(message: str) -> None:
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


SERVE_ARGS = ["--log-level", "warning"]


def _env(redis_url: str, prefix: str) -> dict[str, str | None]:
    return {"RUNSTATE_REDIS_URL": redis_url, "RUNSTATE_PREFIX": prefix}


@pytest.fixture
def server(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Replica]:
    replica = start_serve(tmp_path, "ops", _env(redis_url, prefix), SERVE_ARGS)
    try:
        wait_ready(replica)
        yield replica
    finally:
        stop_serve(replica)


@pytest.fixture
def chromium() -> str:
    """The system Chromium, or a skip (a failure under CI) when it or Playwright is missing."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (Debian package chromium: .ci/install-chromium)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def test_ops_page_streams_a_run_live_and_cancels_it(
    server: Replica, browser: Any, redis_url: str, prefix: str
) -> None:
    from playwright.async_api import expect

    sid = "ops-1"
    async with (
        Coordinator.from_url(redis_url, prefix) as worker,
        httpx.AsyncClient(base_url=server.url, timeout=5.0) as http,
    ):
        # Given a running run with a critical event
        started = await http.post(f"/api/v1/sessions/{sid}/execute", json={"q": "ops"})
        run = await claim(worker, sid, started.json()["run_id"], "test-worker")
        await run.emit(TaskListUpdated(task_list=["look", "answer"]))

        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        try:
            # When an operator opens the ops page, the run is in the active table
            await page.goto(f"{server.url}/")
            row = page.locator(f'tr[data-session="{sid}"]')
            await expect(row).to_contain_text("running", timeout=TIMEOUT_MS)
            await expect(row).to_contain_text("test-worker")

            # And clicking the session streams its events: the replayed critical event first
            await row.locator("button.session").click()
            events = page.locator("#events li")
            await expect(events.first).to_contain_text("task_list_updated", timeout=TIMEOUT_MS)
            await expect(page.locator("#stream-status")).to_have_text("live")

            # Then the run's events appear live, with their stream ids
            token_id = await run.emit(Token(content="hello from the run"))
            live = events.filter(has_text="hello from the run")
            await expect(live).to_have_count(1, timeout=TIMEOUT_MS)
            await expect(live.locator(".id")).to_have_text(token_id)

            # When the operator presses the run's cancel button
            await row.locator("button.cancel").click()

            # Then the run is cancelled, the worker learns it, and the page shows the end
            await expect(page.locator("#action-status")).to_have_text(
                f"cancelled the run of {sid}", timeout=TIMEOUT_MS
            )
            state = await worker.runner(sid)
            assert state is not None and state.status == "cancelled"
            await eventually(lambda: run.cancelled, what="the worker saw the cancel")
            await expect(page.locator("#events li.cancelled")).to_have_count(1)
            await expect(page.locator("#events li.done")).to_contain_text("[DONE]")
            await expect(page.locator("#stream-status")).to_have_text("run ended")
            # And the run leaves the active table at the next refresh
            await expect(row).to_have_count(0, timeout=TIMEOUT_MS)
            assert errors == []
        finally:
            await page.close()
            worker.release(run)


async def test_ops_page_resumes_after_the_connection_drops(
    server: Replica, browser: Any, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    sid = "ops-2"
    async with (
        Coordinator.from_url(redis_url, prefix) as worker,
        httpx.AsyncClient(base_url=server.url, timeout=5.0) as http,
    ):
        # Given the page streaming a running run (subscribed: it got the replay)
        started = await http.post(f"/api/v1/sessions/{sid}/execute")
        run = await claim(worker, sid, started.json()["run_id"], "test-worker")
        await run.emit(TaskListUpdated(task_list=["resume"]))
        page = await browser.new_page()
        try:
            await page.goto(f"{server.url}/")
            row = page.locator(f'tr[data-session="{sid}"]')
            await row.locator("button.session").click(timeout=TIMEOUT_MS)
            events = page.locator("#events li")
            await expect(events.first).to_contain_text("task_list_updated", timeout=TIMEOUT_MS)
            await run.emit(Token(content="before"))
            await expect(events.filter(has_text="before")).to_have_count(1, timeout=TIMEOUT_MS)

            # When the server dies (the connection drops) and events happen meanwhile
            server.proc.kill()
            server.proc.wait(timeout=10)
            await expect(page.locator("#stream-status")).to_contain_text("reconnecting")
            await run.emit_many([Token(content="while-down-1"), Token(content="while-down-2")])
            # And a server comes back on the same address
            server.proc = start_serve(
                tmp_path, "ops", _env(redis_url, prefix), SERVE_ARGS, port=server.port
            ).proc
            wait_ready(server)

            # Then the browser reconnects by itself with Last-Event-ID: every event once
            await expect(page.locator("#stream-status")).to_have_text("live", timeout=TIMEOUT_MS)
            await run.emit(Token(content="after"))
            await expect(events.filter(has_text="after")).to_have_count(1, timeout=TIMEOUT_MS)
            # (the replay, then every entry after the subscription's snapshot: execution_started
            # and the critical event came before it)
            ids = await page.locator("#events li .id").all_text_contents()
            entries = await stream_ids(worker.client, worker.keys.events(sid))
            assert ids == ["replay", *entries[2:]]
        finally:
            await page.close()
            await run.complete()
            worker.release(run)

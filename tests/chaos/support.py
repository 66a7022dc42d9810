"""What the chaos tests share: the checks of a subscriber's delivery and of a session's stream,
and waiting for every run to end.

A delivery is the list of what a subscriber got, one :data:`Seen` per item:
``(stream id or None, seq or None, type, missed)`` where ``missed`` is set for a gap notice.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from runstate import Coordinator, RunnerState, RunStatus, StreamEvent
from runstate.codec import parse_stream_id
from tests.agents.helpers import eventually

Seen = tuple[str | None, int | None, str, int | None]
TERMINAL = frozenset({"complete", "cancelled", "error"})
# What a subscriber may be replayed without a stream id (DESIGN §4): critical and budget events.
REPLAYED = frozenset(
    {
        "task_list_updated",
        "task_list_completed",
        "sub_agent_started",
        "sub_agent_completed",
        "need_clarification",
        "budget_exceeded",
        "session_title_updated",
        "token_budget_updated",
    }
)


def seen(item: StreamEvent) -> Seen:
    """One subscription item as a :data:`Seen`."""
    missed = getattr(item.event, "missed", None) if item.event.type == "gap" else None
    return (item.id, item.seq, item.event.type, missed)


async def collect(events: AsyncIterator[StreamEvent], out: list[Seen]) -> None:
    """Append every item of a subscription to ``out`` until it ends (after the terminal event)."""
    async for item in events:
        out.append(seen(item))


def ordinal(stream_id: str) -> int:
    """The session-wide event number in a runstate stream id (``<ms>-<ordinal>``)."""
    return parse_stream_id(stream_id)[1]


def check_delivery(
    delivered: Sequence[Seen],
    xrange_ids: Sequence[str],
    *,
    from_start: bool,
    who: str,
) -> int:
    """Assert that a subscriber got its session's events exactly once, in order, to the end.

    * every stream id delivered is unique and ascending, and follows the previous one with no
      hole (runstate's ids number the session's events), except right after a gap notice,
      which must say exactly how many events were skipped;
    * the ids delivered are the stream's entries (``XRANGE`` after the run), from the first one
      the subscriber got (``from_start``: from the first event of the session) to the end, less
      the ones a gap notice counted;
    * items without an id are replayed critical or budget events, or gap notices;
    * the last item is the run's terminal event.

    Returns:
        how many events gap notices said were missed.
    """
    assert delivered, f"{who}: got nothing"
    ids: list[str] = []
    skipped: set[int] = set()
    pending_gap: int | None = None
    missed_total = 0
    for i, (eid, _seq, etype, missed) in enumerate(delivered):
        if etype == "gap":
            assert eid is None and missed is not None, f"{who}: malformed gap #{i}"
            assert pending_gap is None, f"{who}: two gap notices in a row at #{i}"
            pending_gap = missed
            continue
        if eid is None:
            assert etype in REPLAYED, f"{who}: item #{i} of type {etype!r} has no stream id"
            continue
        n = ordinal(eid)
        if ids:
            prev = ids[-1]
            assert parse_stream_id(eid) > parse_stream_id(prev), (
                f"{who}: id {eid} (#{i}) does not follow {prev}: duplicate or out of order"
            )
            hole = n - ordinal(prev) - 1
            if pending_gap is None:
                assert hole == 0, f"{who}: {hole} event(s) missing between {prev} and {eid}"
            else:
                assert hole == pending_gap, (
                    f"{who}: a gap notice said {pending_gap} missed, but {hole} events lie "
                    f"between {prev} and {eid}"
                )
                skipped.update(range(ordinal(prev) + 1, n))
                missed_total += pending_gap
        elif from_start:
            assert pending_gap is not None or n == 1, (
                f"{who}: starts at event #{n} ({eid}), not at the session's first"
            )
            if pending_gap is not None:
                assert n - 1 == pending_gap, f"{who}: gap of {pending_gap} before event #{n}"
                skipped.update(range(1, n))
                missed_total += pending_gap
        pending_gap = None
        ids.append(eid)
    assert pending_gap is None, f"{who}: ends with a gap notice"
    assert delivered[-1][2] in TERMINAL and delivered[-1][0] is not None, (
        f"{who}: ends with {delivered[-1]!r}, not the run's terminal event"
    )
    # The stream after the run: what is retained of it from the subscriber's first event on.
    first = parse_stream_id(ids[0])
    retained = [x for x in xrange_ids if parse_stream_id(x) >= first]
    if from_start:
        retained = list(xrange_ids)
    window = parse_stream_id(xrange_ids[0]) if xrange_ids else (0, 0)
    expected = [x for x in retained if ordinal(x) not in skipped]
    got = [x for x in ids if parse_stream_id(x) >= window]
    assert got == expected, (
        f"{who}: delivered ids differ from the stream's: {len(got)} vs {len(expected)}; "
        f"first differences: {_first_difference(got, expected)}"
    )
    return missed_total


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"at #{i}: {x} vs {y}"
    return f"one is a prefix of the other ({len(a)} vs {len(b)})"


async def stream_entries(coord: Coordinator, session_id: str) -> list[dict[str, Any]]:
    """Every entry of the session's stream as ``{id, run, seq, type, event}``."""
    raw = await coord.store.retry.call(
        "xrange", lambda: coord.client.xrange(coord.keys.events(session_id))
    )
    return [
        {
            "id": eid,
            "run": f["run"],
            "seq": int(f["seq"]),
            "type": f["type"],
            "event": json.loads(f["data"]),
        }
        for eid, f in raw
    ]


def check_stream(entries: Sequence[dict[str, Any]], who: str) -> dict[str, list[dict[str, Any]]]:
    """Assert that each run's entries are numbered 1..N, each once, in stream order.

    Returns:
        the entries of each run.
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        runs.setdefault(entry["run"], []).append(entry)
    for run_id, mine in runs.items():
        seqs = [e["seq"] for e in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
            f"{who}: run {run_id}'s seq values are not contiguous and unique: {_runs_of(seqs)}"
        )
        assert seqs[0] == 1 or len(entries) >= 1000, f"{who}: run {run_id} starts at {seqs[0]}"
    return runs


def _runs_of(values: Sequence[int]) -> str:
    """``1-5, 5-9`` style summary of a sequence of ints (to show a duplicate or a hole)."""
    if not values:
        return "(none)"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:]:
        if v != prev + 1:
            parts.append(f"{start}-{prev}")
            start = v
        prev = v
    parts.append(f"{start}-{prev}")
    return ", ".join(parts)


def attempts(entries: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """One run's entries split at each ``execution_started`` (one list per attempt)."""
    out: list[list[dict[str, Any]]] = []
    for entry in entries:
        if entry["type"] == "execution_started" or not out:
            out.append([])
        out[-1].append(entry)
    return out


def token_numbers(entries: Sequence[dict[str, Any]]) -> list[int]:
    """The numbers of the chaos agent's tokens (``"<attempt>:<i>"``), in stream order."""
    return [int(e["event"]["content"].split(":")[1]) for e in entries if e["type"] == "token"]


async def wait_terminal(
    coord: Coordinator, sessions: Sequence[str], limit: float, what: str = "every run to end"
) -> list[RunnerState]:
    """Wait until every session's run is terminal; returns their states (in order)."""

    async def probe() -> list[RunnerState | None]:
        return [await coord.runner(sid) for sid in sessions]

    def done(states: list[RunnerState | None]) -> bool:
        return all(s is not None and s.status in RunStatus.TERMINAL for s in states)

    try:
        states = await eventually(probe, done, limit=limit, interval=0.2, what=what)
    except AssertionError:
        last = await probe()
        active = [(sid, s.status if s else None) for sid, s in zip(sessions, last, strict=True)]
        left = [(sid, st) for sid, st in active if st not in RunStatus.TERMINAL]
        raise AssertionError(f"not every run ended within {limit}s: {left}") from None
    return [s for s in states if s is not None]


async def wait_no_active(coord: Coordinator, limit: float) -> None:
    """Wait until the ``active`` index is empty."""

    async def probe() -> int:
        return int(
            await coord.store.retry.call("zcard", lambda: coord.client.zcard(coord.keys.active))
        )

    await eventually(probe, lambda n: n == 0, limit=limit, interval=0.1, what="active empty")


def exists(path: str | Path) -> bool:
    """Whether a file exists (a tiny local check, fine inside a coroutine)."""
    return Path(path).exists()


def write_text(path: str | Path, text: str) -> None:
    """Write a small file atomically (readers never see it half written)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


class Stopwatch:
    """Seconds since creation, for the figures the tests print."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0

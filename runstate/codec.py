"""How runstate's values look in Redis: stream ids, stream entries, timestamps, emit arguments.

Pure functions and types, no I/O: the store writes and reads with them, the subscription hub
decodes entries and orders ids with them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from .events import StreamEvent, parse_event

log = logging.getLogger(__name__)

__all__ = ["EncodedEvent", "decode_entry", "pairs", "parse_stream_id", "utcnow"]


def utcnow() -> str:
    """Now as the ISO-8601 UTC string stored in runner hashes."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_MAX_ID_PART = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit number


def parse_stream_id(value: str) -> tuple[int, int]:
    """``"<ms>-<n>"`` (or ``"<ms>"``) as a tuple that orders like Redis orders stream ids.

    Raises:
        ValueError: not a stream id.
    """
    ms, sep, n = value.partition("-")
    # ASCII digits only: int() would also take "+1", "1_000", " 1" or other scripts' digits.
    if ms.isascii() and ms.isdigit() and (not sep or (n.isascii() and n.isdigit())):
        out = (int(ms), int(n) if sep else 0)
        if out[0] <= _MAX_ID_PART and out[1] <= _MAX_ID_PART:
            return out
    raise ValueError(
        f"invalid stream id {value!r}: expected '<ms>-<n>' (two numbers below 2**64), e.g. '0-0'"
    )


def decode_entry(entry_id: str, fields: dict[str, str], where: str = "") -> StreamEvent | None:
    """A stream entry as a StreamEvent; None (with a warning) for an entry we did not write."""
    try:
        event = parse_event(fields["data"])
        return StreamEvent(id=entry_id, run_id=fields["run"], seq=int(fields["seq"]), event=event)
    except (KeyError, ValueError) as exc:
        log.warning("skipping malformed stream entry %s %s: %s", where, entry_id, exc)
        return None


def pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=False))


class EncodedEvent(NamedTuple):
    """An event as emit.lua receives it (see the ARGV block of emit.lua)."""

    type: str
    data: str
    meta: str  # '' for a plain event; else the JSON of its flags, tool, round and dedupe

"""How runstate's values look in Redis: stream ids, stream entries, timestamps, emit arguments,
payloads.

Pure functions and types, no I/O: the store writes and reads with them, the subscription hub
decodes entries and orders ids with them.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .errors import EventTooLarge
from .events import AgentEvent, StreamEvent, dump_event, parse_event

log = logging.getLogger(__name__)

__all__ = [
    "EncodedEvent",
    "decode_entry",
    "encode_events",
    "encode_payload",
    "new_nonce",
    "pairs",
    "parse_stream_id",
    "utcnow",
]


def new_nonce() -> str:
    """128 random bits in hex, as unlikely to repeat as a uuid4's, without its system call (a
    forked process reseeds the random module)."""
    return f"{random.getrandbits(128):032x}"


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
        return StreamEvent.from_entry(entry_id, fields["run"], int(fields["seq"]), event)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("skipping malformed stream entry %s %s: %s", where, entry_id, exc)
        return None


def pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=False))


class EncodedEvent(NamedTuple):
    """An event as emit.lua receives it (see the ARGV block of emit.lua)."""

    type: str
    data: str
    meta: str  # '' for a plain event; else the JSON of its flags, tool, round and dedupe


def encode_events(events: Sequence[AgentEvent], max_bytes: int) -> list[EncodedEvent]:
    """Events as emit.lua takes them; raises EventTooLarge before anything is sent."""
    out = []
    for event in events:
        tool = event.tool_update()
        rounds = event.round_count_update()
        dedupe = event.dedupe() if event.is_critical else None
        flags = ("c" if event.is_critical else "") + ("b" if event.is_budget else "")
        meta = ""
        if flags or tool or rounds is not None:
            meta = json.dumps(
                [
                    flags,
                    (tool[0] or "") if tool else "",
                    tool[1] if tool else "",
                    "" if rounds is None else str(rounds),
                    dedupe[0] if dedupe else "",
                    dedupe[1] if dedupe else "",
                ],
                separators=(",", ":"),
            )
        out.append(EncodedEvent(event.type, dump_event(event, max_bytes), meta))
    return out


def encode_payload(payload: Any, max_bytes: int) -> str:
    """A run's payload as JSON ('' for None); TypeError if it is not JSON, EventTooLarge if it
    is over ``max_bytes``."""
    if payload is None:
        return ""
    try:
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"payload must be JSON-serialisable, got {payload!r:.200}: {exc}") from exc
    if len(data.encode()) > max_bytes:
        raise EventTooLarge(f"payload is {len(data.encode())} bytes, over the limit of {max_bytes}")
    return data

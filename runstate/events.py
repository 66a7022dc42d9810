"""Agent events: JSON objects tagged by a snake_case ``type``, validated by pydantic, never pickled.

Every subclass of :class:`AgentEvent` whose ``type`` field has a literal default registers itself,
so the set of event types is a discriminated union that applications extend without editing the
library::

    class Citation(AgentEvent):
        type: Literal["citation"] = "citation"
        url: str
        is_critical: ClassVar[bool] = True   # replay it to late subscribers

The library validates the envelope (the declared fields); nested payloads such as ``usage``,
``task_list``, ``arguments`` and ``result`` are free-form JSON.

Classes of events: **critical** (replayed to late subscribers, 32 kept), **budget** (only the last
is kept), **terminal** (written by the library when a run ends), **tool** (updates the runner's
last tool name and phase).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import from_json

from .errors import EventTooLarge, UnknownEventType

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

_TYPE_NAME = re.compile(r"[a-z][a-z0-9_]*")
_REGISTRY: dict[str, type[AgentEvent]] = {}

JSONObject = dict[str, Any]


class AgentEvent(BaseModel):
    """Base of every event. Subclass with ``type: Literal["name"] = "name"`` to add a type."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str

    is_critical: ClassVar[bool] = False
    is_budget: ClassVar[bool] = False
    is_terminal: ClassVar[bool] = False
    # Written by the library itself (claim, finish, cancel, subscription); emit() refuses them.
    library_only: ClassVar[bool] = False

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.model_fields["type"].default
        if isinstance(name, str):
            register_event(cls, name)

    def tool_update(self) -> tuple[str | None, str] | None:
        """``(tool_name or None to keep the last, phase)`` for tool events, else None."""
        return None

    def round_count_update(self) -> int | None:
        """The new ``round_count`` for progress events, else None."""
        return None

    def dedupe(self) -> tuple[str, str] | None:
        """``(field, value)``: a critical event replaces earlier critical events with that value."""
        return None

    def to_json(self) -> str:
        return self.model_dump_json()


def register_event(cls: type[AgentEvent], name: str) -> None:
    """Register ``cls`` as the model of events of type ``name`` (done by subclassing)."""
    if not _TYPE_NAME.fullmatch(name):
        raise ValueError(f"invalid event type {name!r}: use snake_case, e.g. 'my_event'")
    known = _REGISTRY.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ValueError(
            f"event type {name!r} is already registered by {known.__module__}.{known.__qualname__}"
        )
    _REGISTRY[name] = cls


def event_types() -> dict[str, type[AgentEvent]]:
    """A copy of the registry: type name -> model."""
    return dict(_REGISTRY)


class GenericEvent(AgentEvent):
    """A well-formed event whose type this process has no model for (read side only)."""


# ---------------------------------------------------------------------------------------------
# Built-in events (DESIGN §3)


class ExecutionStarted(AgentEvent):
    type: Literal["execution_started"] = "execution_started"
    run_id: str
    attempt: int = 1
    library_only: ClassVar[bool] = True


class RunnerProgress(AgentEvent):
    type: Literal["runner_progress"] = "runner_progress"
    round_count: int = Field(ge=0)

    def round_count_update(self) -> int | None:
        return self.round_count


class Token(AgentEvent):
    type: Literal["token"] = "token"
    content: str


class ReasoningToken(AgentEvent):
    type: Literal["reasoning_token"] = "reasoning_token"
    content: str


class ToolStart(AgentEvent):
    type: Literal["tool_start"] = "tool_start"
    tool_call_id: str
    tool_name: str
    arguments: JSONObject = Field(default_factory=dict)

    def tool_update(self) -> tuple[str | None, str] | None:
        return (self.tool_name, "begin")


class ToolComplete(AgentEvent):
    type: Literal["tool_complete"] = "tool_complete"
    tool_call_id: str
    result: Any = None

    def tool_update(self) -> tuple[str | None, str] | None:
        return (None, "finished")


class ToolError(AgentEvent):
    type: Literal["tool_error"] = "tool_error"
    tool_call_id: str
    error: str

    def tool_update(self) -> tuple[str | None, str] | None:
        return (None, "error")


class ToolLifecycle(AgentEvent):
    type: Literal["tool_lifecycle"] = "tool_lifecycle"
    tool_call_id: str
    tool_name: str
    phase: Literal["begin", "finished", "error"]

    def tool_update(self) -> tuple[str | None, str] | None:
        return (self.tool_name, self.phase)


class TokenBudgetUpdated(AgentEvent):
    type: Literal["token_budget_updated"] = "token_budget_updated"
    usage: JSONObject
    is_budget: ClassVar[bool] = True


class TaskListUpdated(AgentEvent):
    type: Literal["task_list_updated"] = "task_list_updated"
    task_list: Any
    is_critical: ClassVar[bool] = True


class TaskListCompleted(AgentEvent):
    type: Literal["task_list_completed"] = "task_list_completed"
    is_critical: ClassVar[bool] = True


class SubAgentStarted(AgentEvent):
    type: Literal["sub_agent_started"] = "sub_agent_started"
    child_session_id: str
    child_run_id: str
    is_critical: ClassVar[bool] = True

    def dedupe(self) -> tuple[str, str] | None:
        return ("child_session_id", self.child_session_id)


class SubAgentHeartbeat(AgentEvent):
    type: Literal["sub_agent_heartbeat"] = "sub_agent_heartbeat"
    child_session_id: str
    child_run_id: str = ""


class SubAgentCompleted(AgentEvent):
    type: Literal["sub_agent_completed"] = "sub_agent_completed"
    child_session_id: str
    child_run_id: str
    status: str
    is_critical: ClassVar[bool] = True

    def dedupe(self) -> tuple[str, str] | None:
        return ("child_session_id", self.child_session_id)


class NeedClarification(AgentEvent):
    type: Literal["need_clarification"] = "need_clarification"
    question: str
    is_critical: ClassVar[bool] = True


class BudgetExceeded(AgentEvent):
    type: Literal["budget_exceeded"] = "budget_exceeded"
    message: str = ""
    usage: JSONObject | None = None
    is_critical: ClassVar[bool] = True


class SessionTitleUpdated(AgentEvent):
    type: Literal["session_title_updated"] = "session_title_updated"
    title: str
    is_critical: ClassVar[bool] = True


class Complete(AgentEvent):
    type: Literal["complete"] = "complete"
    usage: JSONObject | None = None
    is_terminal: ClassVar[bool] = True
    library_only: ClassVar[bool] = True


class Cancelled(AgentEvent):
    type: Literal["cancelled"] = "cancelled"
    message: str = "cancelled"
    is_terminal: ClassVar[bool] = True
    library_only: ClassVar[bool] = True


class Error(AgentEvent):
    type: Literal["error"] = "error"
    message: str
    is_terminal: ClassVar[bool] = True
    library_only: ClassVar[bool] = True


class Gap(AgentEvent):
    """Told to a subscriber instead of events it can no longer get (trimmed, or it fell behind)."""

    type: Literal["gap"] = "gap"
    missed: int = Field(ge=0)
    library_only: ClassVar[bool] = True


TERMINAL_TYPES = frozenset({"complete", "cancelled", "error"})

BuiltinEvent = Annotated[
    ExecutionStarted
    | RunnerProgress
    | Token
    | ReasoningToken
    | ToolStart
    | ToolComplete
    | ToolError
    | ToolLifecycle
    | TokenBudgetUpdated
    | TaskListUpdated
    | TaskListCompleted
    | SubAgentStarted
    | SubAgentHeartbeat
    | SubAgentCompleted
    | NeedClarification
    | BudgetExceeded
    | SessionTitleUpdated
    | Complete
    | Cancelled
    | Error
    | Gap,
    Field(discriminator="type"),
]
"""The built-in events as a pydantic discriminated union (for schemas and typed handlers)."""


@pydantic_dataclass(frozen=True, slots=True)
class StreamEvent:
    """One event as a subscriber sees it.

    ``id`` is the Redis stream id (the SSE ``id:``), or None for an item replayed from the
    snapshot (critical events, the last budget event) and for gap notices.

    A pydantic dataclass, validated when made and dumped like a model, rather than a model:
    every subscriber reads these attributes for every event, and reading one of a model costs
    about five times as much (``BaseModel`` defines ``__getattr__``, which keeps CPython's
    attribute reads off their fast path).
    """

    id: str | None
    run_id: str
    # SerializeAsAny: dump the event's own fields, not only those of the AgentEvent base.
    event: SerializeAsAny[AgentEvent]
    seq: int | None = None

    @classmethod
    def from_entry(cls, id: str, run_id: str, seq: int, event: AgentEvent) -> StreamEvent:
        """A stream entry just decoded, its fields of the right types already: made without
        validating them again (the hub makes one per entry it reads)."""
        item = object.__new__(cls)
        for name, value in (("id", id), ("run_id", run_id), ("event", event), ("seq", seq)):
            object.__setattr__(item, name, value)
        return item

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """As ``BaseModel.model_dump`` (the same keyword arguments)."""
        out: dict[str, Any] = _STREAM_EVENT.dump_python(self, **kwargs)
        return out

    def model_dump_json(self, **kwargs: Any) -> str:
        """As ``BaseModel.model_dump_json`` (the same keyword arguments)."""
        return _STREAM_EVENT.dump_json(self, **kwargs).decode()


_STREAM_EVENT = TypeAdapter(StreamEvent)


# ---------------------------------------------------------------------------------------------
# Parsing and serialising


def _loads(data: str | bytes | JSONObject) -> JSONObject:
    if isinstance(data, str | bytes):
        # pydantic-core's parser: 0.7 µs for a token event where json.loads takes 4 µs (and
        # orjson, a dependency more, 0.6 µs). It refuses what json.loads takes (nesting past
        # ~200 levels, which the writer allows; lone surrogates), so on any refusal json.loads
        # decides, and a bad document raises ValueError as before.
        try:
            obj = from_json(data)
        except (ValueError, TypeError):
            obj = json.loads(data)
    else:
        obj = data
    if not isinstance(obj, dict):
        raise ValueError(f"an event must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_event(data: str | bytes | JSONObject, *, strict: bool = False) -> AgentEvent:
    """Validate one event from JSON (or a decoded dict).

    Args:
        strict: raise UnknownEventType for a type with no registered model; otherwise such an
            event is returned as a GenericEvent so that readers forward application events.

    Raises:
        ValueError: not a JSON object with a string ``type`` (UnknownEventType, a ValueError,
            for an unregistered type when strict), or the fields do not validate.
    """
    obj = _loads(data)
    name = obj.get("type")
    if not isinstance(name, str) or not _TYPE_NAME.fullmatch(name):
        raise ValueError(f"an event needs a snake_case string 'type', got {name!r}")
    cls = _REGISTRY.get(name)
    if cls is None:
        if strict:
            raise UnknownEventType(
                f"unknown event type {name!r}: subclass runstate.events.AgentEvent with "
                f"type: Literal[{name!r}] to register it (known: {', '.join(sorted(_REGISTRY))})"
            )
        cls = GenericEvent
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise ValueError(f"invalid {name!r} event: {exc}") from exc


def coerce_event(event: AgentEvent | JSONObject) -> AgentEvent:
    """The event to write for ``emit(event)``: a registered model instance or a dict with a type.

    Raises:
        UnknownEventType: the type has no registered model.
        ValueError: the fields do not validate, or the type is written by the library only.
        TypeError: neither a model nor a dict.
    """
    if isinstance(event, AgentEvent):
        if type(event) is GenericEvent or _REGISTRY.get(event.type) is not type(event):
            raise UnknownEventType(f"unknown event type {event.type!r}: it is not registered")
    elif isinstance(event, dict):
        event = parse_event(event, strict=True)
    else:
        raise TypeError(f"emit() takes an AgentEvent or a dict with a 'type', got {event!r}")
    if event.library_only:
        raise ValueError(
            f"event type {event.type!r} is written by runstate itself and cannot be emitted"
        )
    return event


MAX_CACHED_REASON = 256  # characters: longer reasons are not kept by dump_cancelled


def dump_cancelled(message: str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> str:
    """The JSON of a ``cancelled`` event saying ``message``: made once per short reason (a
    cancel names one of a few, over and over, and every step before it is sent delays the
    stop); a long one, or one that is not a str (refused, naming the value), each time."""
    if type(message) is str and len(message) <= MAX_CACHED_REASON:
        return _dump_cancelled(message, max_bytes)
    return dump_event(Cancelled(message=message), max_bytes)


@functools.lru_cache(maxsize=64)
def _dump_cancelled(message: str, max_bytes: int) -> str:
    return dump_event(Cancelled(message=message), max_bytes)


def dump_event(event: AgentEvent, max_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> str:
    """Serialise ``event`` to JSON, refusing it when it is larger than ``max_bytes``."""
    data = event.to_json()
    size = len(data.encode()) if len(data) * 4 > max_bytes else len(data)
    if size > max_bytes:
        raise EventTooLarge(
            f"{event.type!r} event is {size} bytes, over the limit of {max_bytes} bytes"
        )
    return data

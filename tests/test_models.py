"""Models serialise what they hold: an event's own fields, not just the AgentEvent base."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from pydantic import ValidationError

from runstate.events import StreamEvent, TaskListUpdated, Token, TokenBudgetUpdated
from runstate.models import RunnerState, RunStatus


def test_stream_event_dumps_the_events_own_fields() -> None:
    item = StreamEvent(id="1-1", run_id="r", seq=1, event=Token(content="hi"))
    assert json.loads(item.model_dump_json())["event"] == {"type": "token", "content": "hi"}


def test_stream_event_validates_what_it_is_made_of_and_names_the_bad_field() -> None:
    # When a stream event is made with an id that is not a string
    with pytest.raises(ValidationError) as raised:
        StreamEvent(id=7, run_id="r", event=Token(content="hi"))  # type: ignore[arg-type]
    # Then the error names the field and the value
    assert "id" in str(raised.value) and "input_value=7" in str(raised.value)


def test_stream_event_is_immutable_and_compares_by_value() -> None:
    # Given a stream event as a subscriber gets it from the reader, and one made by hand
    read = StreamEvent.from_entry("1-1", "r", 1, Token(content="hi"))
    made = StreamEvent(id="1-1", run_id="r", seq=1, event=Token(content="hi"))
    # Then they are equal, hash alike, copy, and cannot be changed
    assert read == made and hash(read) == hash(made)
    assert copy.deepcopy(read) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.id = "2-2"  # type: ignore[misc]
    # And they dump as a model would
    assert read.model_dump(mode="json") == {
        "id": "1-1",
        "run_id": "r",
        "event": {"type": "token", "content": "hi"},
        "seq": 1,
    }


def test_runner_state_summary_keeps_event_fields() -> None:
    state = RunnerState(
        session_id="s",
        run_id="r",
        status=RunStatus.RUNNING,
        last_budget_event=TokenBudgetUpdated(usage={"total": 3}),
        last_critical_events=[TaskListUpdated(task_list=["a"])],
    )
    summary = state.summary()
    assert summary["last_budget_event"] == {"type": "token_budget_updated", "usage": {"total": 3}}
    assert summary["last_critical_events"] == [{"type": "task_list_updated", "task_list": ["a"]}]

"""Models serialise what they hold: an event's own fields, not just the AgentEvent base."""

from __future__ import annotations

import json

from runstate.events import StreamEvent, TaskListUpdated, Token, TokenBudgetUpdated
from runstate.models import RunnerState, RunStatus


def test_stream_event_dumps_the_events_own_fields() -> None:
    item = StreamEvent(id="1-1", run_id="r", seq=1, event=Token(content="hi"))
    assert json.loads(item.model_dump_json())["event"] == {"type": "token", "content": "hi"}


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

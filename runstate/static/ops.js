// The runstate ops page: active runs (polled), one session's events (EventSource), cancel.
// Plain browser JavaScript, no build step. URLs are relative so that the page works wherever
// the app is mounted.
"use strict";

const POLL_MS = 1000;
const MAX_EVENTS = 2000; // lines kept in the events list
// EventSource only delivers frames whose `event:` name has a listener, so every type is named
// here: the built-in ones, the gap notice and the stream's own error frame.
const EVENT_TYPES = [
  "execution_started", "runner_progress", "token", "reasoning_token", "tool_start",
  "tool_complete", "tool_error", "tool_lifecycle", "token_budget_updated",
  "task_list_updated", "task_list_completed", "sub_agent_started", "sub_agent_heartbeat",
  "sub_agent_completed", "need_clarification", "budget_exceeded", "session_title_updated",
  "complete", "cancelled", "error", "gap", "stream_error",
];
const TERMINAL = new Set(["complete", "cancelled", "error"]);

const rows = new Map(); // session id -> <tr>
let watching = null; // {session, source}

const $ = (selector) => document.querySelector(selector);

function sessionUrl(session, action) {
  return `api/v1/sessions/${encodeURIComponent(session)}/${action}`;
}

function setText(selector, text, bad = false) {
  const el = $(selector);
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

function age(iso) {
  if (!iso) return "-";
  const seconds = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (seconds < 120) return `${seconds}s`;
  return seconds < 7200 ? `${Math.floor(seconds / 60)}m` : `${Math.floor(seconds / 3600)}h`;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${response.status}`;
}

// ---- active runs ---------------------------------------------------------------------------

function newRow(session) {
  const tr = document.createElement("tr");
  tr.dataset.session = session;
  const cells = ["session", "run", "status", "worker", "attempt", "rounds", "tool", "age",
    "last-event", "actions"];
  for (const name of cells) {
    const td = document.createElement("td");
    td.className = name;
    tr.appendChild(td);
  }
  tr.cells[1].classList.add("mono");
  const watch = document.createElement("button");
  watch.type = "button";
  watch.className = "session";
  watch.textContent = session;
  watch.title = "stream this session's events";
  watch.addEventListener("click", () => watch_(session, $("#watch-follow").checked));
  tr.cells[0].appendChild(watch);
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel";
  cancel.textContent = "cancel";
  cancel.addEventListener("click", () => cancelRun(session, cancel));
  tr.cells[9].appendChild(cancel);
  return tr;
}

function renderRuns(runs) {
  const body = $("#runs tbody");
  const seen = new Set();
  // Rows are updated in place (not rebuilt) so that a click is never lost to a refresh.
  for (const run of runs) {
    seen.add(run.session_id);
    let tr = rows.get(run.session_id);
    if (!tr) {
      tr = newRow(run.session_id);
      rows.set(run.session_id, tr);
    }
    body.appendChild(tr); // keeps the server's order (reservation time)
    const values = [null, run.run_id.slice(0, 12), run.status, run.worker || "-",
      String(run.attempt), String(run.round_count),
      `${run.last_tool_name || "-"}/${run.last_tool_phase || "-"}`,
      age(run.started_at), age(run.last_event_at)];
    values.forEach((value, i) => {
      if (value !== null && tr.cells[i].textContent !== value) tr.cells[i].textContent = value;
    });
    tr.cells[1].title = run.run_id;
    tr.classList.toggle("selected", watching !== null && watching.session === run.session_id);
  }
  for (const [session, tr] of rows) {
    if (!seen.has(session)) {
      tr.remove();
      rows.delete(session);
    }
  }
  $("#no-runs").hidden = runs.length > 0;
}

async function refreshActive() {
  try {
    const response = await fetch("api/v1/runs/active", { cache: "no-store" });
    if (!response.ok) throw new Error(await errorMessage(response));
    renderRuns(await response.json());
    setText("#active-status", `updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setText("#active-status", `cannot load active runs: ${err.message}`, true);
  } finally {
    setTimeout(refreshActive, POLL_MS);
  }
}

async function cancelRun(session, button) {
  button.disabled = true;
  try {
    const response = await fetch(sessionUrl(session, "stop"), { method: "POST" });
    if (response.ok) {
      setText("#action-status", `cancelled the run of ${session}`);
    } else {
      setText("#action-status", `cancel ${session}: ${await errorMessage(response)}`, true);
    }
  } catch (err) {
    setText("#action-status", `cancel ${session}: ${err.message}`, true);
  } finally {
    button.disabled = false;
  }
}

// ---- one session's events ------------------------------------------------------------------

function addLine(className, parts) {
  const list = $("#events");
  const li = document.createElement("li");
  li.className = className;
  for (const [cls, text] of parts) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    li.appendChild(span);
  }
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.appendChild(li);
  while (list.childElementCount > MAX_EVENTS) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function showEvent(type, message) {
  let item;
  try {
    item = JSON.parse(message.data);
  } catch (_) {
    addLine("bad", [["type", type], ["data", message.data]]);
    return;
  }
  if (type === "stream_error") {
    addLine("bad", [["type", "stream error"], ["data", item.error || message.data]]);
    return;
  }
  const { type: _type, ...fields } = item.event || {};
  const id = item.id || (type === "gap" ? "gap" : "replay");
  const classes = ["event", type];
  if (TERMINAL.has(type)) classes.push("terminal");
  addLine(classes.join(" "), [["id", id], ["type", type], ["data", JSON.stringify(fields)]]);
}

function stopWatching(reason) {
  if (watching) {
    watching.source.close();
    watching = null;
  }
  setText("#stream-status", reason);
  $("#watched").textContent = "";
  for (const tr of rows.values()) tr.classList.remove("selected");
}

function watch_(session, follow) {
  stopWatching("");
  $("#events").replaceChildren();
  $("#watch-session").value = session;
  $("#watched").textContent = session;
  const url = sessionUrl(session, "events") + (follow ? "?follow=true" : "");
  // EventSource reconnects by itself after a dropped connection and sends the last `id:` it
  // saw as Last-Event-ID, so the stream resumes exactly where it stopped.
  const source = new EventSource(url);
  watching = { session, source };
  for (const [s, tr] of rows) tr.classList.toggle("selected", s === session);
  setText("#stream-status", "connecting…");
  source.addEventListener("open", () => setText("#stream-status", "live"));
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CONNECTING) {
      setText("#stream-status", "connection lost, reconnecting…", true);
    } else if (source.readyState === EventSource.CLOSED) {
      setText("#stream-status", "stream closed", true);
    }
  });
  for (const type of EVENT_TYPES) {
    source.addEventListener(type, (message) => showEvent(type, message));
  }
  // Unnamed frames: only the end-of-run marker.
  source.addEventListener("message", (message) => {
    if (message.data === "[DONE]") {
      addLine("done", [["data", "[DONE] the run ended"]]);
      // Closed by hand: an EventSource would otherwise reconnect after the server ends it.
      source.close();
      if (watching && watching.source === source) {
        watching = null;
        setText("#stream-status", "run ended");
      }
    } else {
      showEvent("message", message);
    }
  });
}

function main() {
  $("#watch-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const session = $("#watch-session").value.trim();
    if (session) watch_(session, $("#watch-follow").checked);
  });
  $("#watch-stop").addEventListener("click", () => stopWatching("not watching"));
  refreshActive();
}

main();

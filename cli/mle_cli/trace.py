"""The timeline of a run, read from the ledger: when each step queued, staged, ran and waited.

A timeline is one `Row` per attempt, plus one per step that never had an attempt (cached, skipped,
waiting for approval), in plan order. Times are seconds from `Timeline.origin`, the run's start.
Phases of an attempt come from its `state` events (pending, staging, running); agents' clocks may
differ from ours, so those are clamped into the attempt's span as the attempts table records it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mle_cli.ledger import Ledger
from mle_cli.states import Status
from mle_proto.errors import InvalidInput

__all__ = ["PHASES", "Phase", "Row", "Timeline", "build_timeline", "timeline_dict", "write_html"]

# queued: ready, not yet dispatched; retry: backoff before the next attempt; pending: sent, waiting
# on the agent for a slot; staging: inputs placed; running: the process; waiting: an approval gate.
PHASES = ("queued", "retry", "pending", "staging", "running", "waiting")
_AGENT_PHASES = ("staging", "running")
_LIVE = frozenset({Status.PENDING, Status.RUNNING, Status.RETRYING, Status.WAITING})
_GATE_DONE = frozenset({Status.SUCCEEDED, Status.FAILED})

Record = Mapping[str, Any]


@dataclass(frozen=True)
class Phase:
    """A stretch of time in one phase, in seconds from the run's start."""

    kind: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        """Seconds spent in the phase."""
        return self.end - self.start


@dataclass(frozen=True)
class Row:
    """One line of the timeline: an attempt, or a step that never had one."""

    step_id: str
    status: str
    attempt: int | None = None
    agent: str = ""
    exit_code: int | None = None
    message: str = ""
    last_line: str = ""
    start: float | None = None  # the attempt's start (or the step's mark); None: never started
    end: float | None = None
    phases: tuple[Phase, ...] = ()
    live: bool = False  # still going: `end` is now

    @property
    def duration(self) -> float | None:
        """Seconds from start to end (the attempt itself, not its queueing)."""
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """A run and its rows, ready to draw."""

    run_id: str
    recipe: str
    source: str
    status: str
    message: str
    origin: float  # epoch seconds of offset 0
    duration: float | None
    end: float  # the last offset worth drawing
    rows: tuple[Row, ...]

    @property
    def attempts(self) -> tuple[Row, ...]:
        """The rows that are attempts."""
        return tuple(r for r in self.rows if r.attempt is not None)


def build_timeline(ledger: Ledger, run_ref: str | None, now: float | None = None) -> Timeline:
    """The timeline of a run (id, unique prefix, or None for the latest)."""
    run_id = ledger.resolve_run(run_ref)
    run = ledger.run(run_id)
    attempts = ledger.attempts(run_id)
    clock = _clock(run, attempts, now or time.time())
    facts = _Facts(clock, _state_events(ledger, run_id), _last_lines(ledger, run_id))
    steps = ledger.steps(run_id)
    finished = {s["step_id"]: s["finished"] for s in steps}
    rows: list[Row] = []
    for step in steps:
        mine = [a for a in attempts if a["step_id"] == step["step_id"]]
        ready = _ready(run, step, finished)
        rows.extend(_step_rows(facts, step, sorted(mine, key=lambda a: a["attempt"]), ready))
    ends = [r.end for r in rows if r.end is not None]
    ends += [p.end for r in rows for p in r.phases]
    if run["finished"]:
        ends.append(clock.off(run["finished"]))
    started = run["started"]
    return Timeline(
        run_id=run_id,
        recipe=run["recipe"],
        source=run["source"],
        status=run["status"],
        message=run["message"] or "",
        origin=clock.origin,
        duration=(run["finished"] or clock.horizon) - started if started else None,
        end=max([0.0, *ends]),
        rows=tuple(rows),
    )


def timeline_dict(timeline: Timeline) -> dict[str, Any]:
    """The timeline as plain data for `--json`; seconds rounded to microseconds."""
    return {
        "run": {
            "id": timeline.run_id,
            "recipe": timeline.recipe,
            "source": timeline.source,
            "status": timeline.status,
            "message": timeline.message,
            "origin": timeline.origin,
            "duration": _round(timeline.duration),
        },
        "end": _round(timeline.end),
        "rows": [_row_dict(r) for r in timeline.rows],
    }


def write_html(timeline: Timeline, path: Path, state_dir: Path) -> Path:
    """Write the timeline as one self-contained HTML page; return the path written. Never
    inside `state_dir` (the project's `.mle/`): a page over the ledger would erase every run."""
    from mle_cli._trace_html import render_html

    if path.is_dir():
        raise InvalidInput(f"cannot write the trace to {path}: it is a directory")
    if path.resolve().is_relative_to(state_dir.resolve()):
        raise InvalidInput(
            f"cannot write the trace to {path}: {state_dir} holds mle's own state (the ledger, "
            "the artifacts); choose a file outside it"
        )
    try:
        path.write_text(render_html(timeline), encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"cannot write the trace to {path}: {e.strerror or e}") from None
    return path


# -- building -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clock:
    origin: float
    horizon: float  # where open things end: now for a live run, else the run's end
    live: bool

    def off(self, t: float) -> float:
        return t - self.origin


@dataclass(frozen=True)
class _Facts:
    clock: _Clock
    states: Mapping[str, Sequence[tuple[str, float]]]
    last_lines: Mapping[str, str]


def _clock(run: Record, attempts: Sequence[Record], now: float) -> _Clock:
    times = [run["created"], run["started"], *(a["started"] for a in attempts)]
    origin = min(t for t in times if t is not None)
    live = run["status"] in _LIVE or run["status"] == Status.DETACHED
    horizon = now if live or not run["finished"] else run["finished"]
    return _Clock(origin, max(horizon, origin), live)


def _state_events(ledger: Ledger, run_id: str) -> dict[str, list[tuple[str, float]]]:
    states: dict[str, list[tuple[str, float]]] = {}
    for row in ledger.query(
        "SELECT task_id, state, time FROM events WHERE run_id = ? AND kind = 'state' "
        "ORDER BY task_id, seq",
        [run_id],
    ):
        states.setdefault(row["task_id"], []).append((row["state"], row["time"]))
    return states


def _last_lines(ledger: Ledger, run_id: str) -> dict[str, str]:
    # SQLite takes a bare column of a max() aggregate from the row holding the maximum.
    rows = ledger.query(
        "SELECT task_id, text, max(seq) AS seq FROM events "
        "WHERE run_id = ? AND kind = 'log' GROUP BY task_id",
        [run_id],
    )
    return {r["task_id"]: r["text"] or "" for r in rows}


def _ready(run: Record, step: Record, finished: Mapping[str, float | None]) -> float | None:
    """When the step could start: the run started and every need finished."""
    start = float(run["started"] or run["created"])
    needs = [finished.get(n) for n in step["needs"]]
    if any(t is None for t in needs):
        return None
    return max([start, *(float(t) for t in needs if t is not None)])


def _step_rows(
    facts: _Facts, step: Record, attempts: Sequence[Record], ready: float | None
) -> list[Row]:
    if not attempts:
        return [_attemptless_row(facts.clock, step, ready)]
    rows = _attempt_rows(facts, step["step_id"], attempts, ready)
    last_end = attempts[-1]["finished"]
    if step["status"] == Status.RETRYING and last_end and facts.clock.live:
        retry = Phase("retry", facts.clock.off(last_end), facts.clock.off(facts.clock.horizon))
        rows.append(Row(step["step_id"], Status.RETRYING, phases=(retry,), live=True))
    return rows


def _attempt_rows(
    facts: _Facts, step_id: str, attempts: Sequence[Record], ready: float | None
) -> list[Row]:
    clock, rows = facts.clock, list[Row]()
    previous_end = ready
    for a in attempts:
        start, end = a["started"], a["finished"] or clock.horizon
        lead: tuple[Phase, ...] = ()
        if previous_end is not None and start > previous_end:
            kind = "retry" if rows else "queued"
            lead = (Phase(kind, clock.off(previous_end), clock.off(start)),)
        phases = _agent_phases(clock, start, end, facts.states.get(a["task_id"], ()))
        rows.append(
            Row(
                step_id=step_id,
                status=a["status"],
                attempt=a["attempt"],
                agent=a["agent"],
                exit_code=a["exit_code"],
                message=a["message"] or "",
                last_line=facts.last_lines.get(a["task_id"], ""),
                start=clock.off(start),
                end=clock.off(end),
                phases=lead + phases,
                live=a["finished"] is None,
            )
        )
        previous_end = end
    return rows


def _agent_phases(
    clock: _Clock, start: float, end: float, states: Sequence[tuple[str, float]]
) -> tuple[Phase, ...]:
    """pending from the dispatch, then staging and running as the agent reported them."""
    marks = [("pending", start)]
    for state, t in states:
        if state in _AGENT_PHASES and state != marks[-1][0]:
            marks.append((state, min(max(t, marks[-1][1]), end)))
    ends = [t for _, t in marks[1:]] + [end]
    return tuple(
        Phase(kind, clock.off(t0), clock.off(t1))
        for (kind, t0), t1 in zip(marks, ends, strict=True)
    )


def _attemptless_row(clock: _Clock, step: Record, ready: float | None) -> Row:
    """A cached or skipped step (a mark), or a wait: approval, or queued in a live run."""
    status, since, done = step["status"], step["started"] or ready, step["finished"]
    base = Row(step["step_id"], status, agent=step["target"], message=step["message"] or "")
    if status == Status.WAITING and since is not None:
        return _wait_row(clock, base, "waiting", since, clock.horizon, live=clock.live)
    if status == Status.PENDING and ready is not None and clock.live:
        return _wait_row(clock, base, "queued", ready, clock.horizon, live=True)
    if status in _GATE_DONE and since is not None and done:
        return _wait_row(clock, base, "waiting", since, done, live=False)
    if done:
        mark = clock.off(done)
        return replace(base, start=mark, end=mark, exit_code=step["exit_code"])
    return base


def _wait_row(clock: _Clock, base: Row, kind: str, since: float, until: float, live: bool) -> Row:
    phase = Phase(kind, clock.off(since), clock.off(max(since, until)))
    return replace(base, start=phase.start, end=phase.end, phases=(phase,), live=live)


# -- plain data -----------------------------------------------------------------------------------


def _row_dict(row: Row) -> dict[str, Any]:
    return {
        "step_id": row.step_id,
        "attempt": row.attempt,
        "agent": row.agent,
        "status": row.status,
        "exit_code": row.exit_code,
        "message": row.message,
        "last_line": row.last_line,
        "start": _round(row.start),
        "end": _round(row.end),
        "duration": _round(row.duration),
        "live": row.live,
        "phases": [
            {
                "kind": p.kind,
                "start": _round(p.start),
                "end": _round(p.end),
                "duration": _round(p.duration),
            }
            for p in row.phases
        ],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)

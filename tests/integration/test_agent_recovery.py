"""An agent starting on what an earlier agent left in agent.db: migrate, re-queue, fail."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from mle_agent.outbox import SCHEMA_VERSION, Outbox
from mle_agent.tasks import REQUEUED_MESSAGE, RESTART_MESSAGE
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import agent_settings, leak_check, lines, run, running_agent

pytestmark = pytest.mark.timeout(60)

# agent.db as the first released agent wrote it (schema version 1), verbatim.
_V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    step        TEXT NOT NULL,
    spec        BLOB NOT NULL,
    state       TEXT NOT NULL,
    exit_code   INTEGER NOT NULL DEFAULT 0,
    created     REAL NOT NULL,
    finished    REAL NOT NULL DEFAULT 0,
    last_seq    INTEGER NOT NULL DEFAULT 0,
    acked_seq   INTEGER NOT NULL DEFAULT 0,
    pid         INTEGER NOT NULL DEFAULT 0,
    pid_started REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (run_id);
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    time    REAL NOT NULL,
    body    BLOB NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
PRAGMA user_version=1;
"""


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def test_a_version_1_agent_db_is_migrated_and_its_tasks_settled(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    settings.data_dir.mkdir(parents=True)
    done = [_state_event("r.done.1", 1, pb.TASK_STATE_PENDING), _log_event("r.done.1", 2, "hi")]
    done.append(_result_event("r.done.1", 3, pb.TASK_STATE_SUCCEEDED))
    with sqlite3.connect(settings.outbox_path) as db:
        db.executescript(_V1_SCHEMA)
        _insert_v1(db, "r.done.1", "SUCCEEDED", done, last_seq=3)
        # A version 1 agent left last_seq at 0 until a task's second event.
        _insert_v1(db, "r.wait.1", "PENDING", [_state_event("r.wait.1", 1, 1)], last_seq=0)
        running = [_state_event("r.run.1", 1, pb.TASK_STATE_PENDING)]
        running.append(_state_event("r.run.1", 2, pb.TASK_STATE_RUNNING))
        _insert_v1(db, "r.run.1", "RUNNING", running, last_seq=2)
    db.close()
    task_root = settings.data_dir / "tasks"
    task_root.mkdir()
    for name in ("r.done.1.out", "r.done.1.status", "notes.txt"):  # an agent died before cleanup
        (task_root / name).write_text("0\n")

    async def scenario() -> dict[str, list[pb.TaskEvent]]:
        async with running_agent(settings) as agent:
            return {t: await agent.events(t) for t in ("r.done.1", "r.wait.1", "r.run.1")}

    events = run(scenario())
    assert lines(events["r.done.1"]) == ["hi"]
    assert events["r.done.1"][-1].result.state == pb.TASK_STATE_SUCCEEDED
    assert events["r.wait.1"][1].state.message == REQUEUED_MESSAGE
    assert events["r.wait.1"][-1].result.state == pb.TASK_STATE_SUCCEEDED  # it ran, once
    assert lines(events["r.wait.1"]) == ["r.wait.1"]
    lost = events["r.run.1"][-1]  # an agent from before the shim: there is nothing to follow
    assert (lost.seq, lost.result.state, lost.result.message) == (
        3,
        pb.TASK_STATE_FAILED,
        RESTART_MESSAGE,
    )
    for task_events in events.values():
        assert [e.seq for e in task_events] == list(range(1, len(task_events) + 1))
    with sqlite3.connect(settings.outbox_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        columns = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
    db.close()
    assert {"deadline", "out_offset", "err_offset"} <= columns
    assert sorted(p.name for p in task_root.iterdir()) == ["notes.txt"]


def test_an_agent_db_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(Exception, match="newer than this agent understands"):
        Outbox(path)


def test_tasks_waiting_or_staging_are_queued_again(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    outbox = Outbox(settings.outbox_path)
    for task_id, state in (
        ("r.pend.1", pb.TASK_STATE_PENDING),
        ("r.stage.1", pb.TASK_STATE_STAGING),
    ):
        spec = pb.TaskSpec(task_id=task_id, shell='echo "$MLE_TASK_ID"')
        outbox.insert_task(spec, 1.0, _state_event(task_id, 1, pb.TASK_STATE_PENDING))
        if state == pb.TASK_STATE_STAGING:
            outbox.append(task_id, [_state_event(task_id, 2, state)], state=state)
    outbox.close()
    (settings.work_root / "r.stage.1").mkdir(parents=True)
    (settings.work_root / "r.stage.1" / "half-copied").write_text("x")

    async def scenario() -> tuple[list[pb.TaskEvent], list[pb.TaskEvent]]:
        async with running_agent(settings) as agent:
            return await agent.events("r.pend.1"), await agent.events("r.stage.1")

    pending, staging = run(scenario())
    assert _states(pending) == [
        (pb.TASK_STATE_PENDING, ""),
        (pb.TASK_STATE_PENDING, REQUEUED_MESSAGE),
        (pb.TASK_STATE_STAGING, ""),
        (pb.TASK_STATE_RUNNING, ""),
    ]
    assert _states(staging) == [
        (pb.TASK_STATE_PENDING, ""),
        (pb.TASK_STATE_STAGING, ""),
        (pb.TASK_STATE_PENDING, REQUEUED_MESSAGE),
        (pb.TASK_STATE_STAGING, ""),  # staged again, from a fresh work dir
        (pb.TASK_STATE_RUNNING, ""),
    ]
    for events, task_id in ((pending, "r.pend.1"), (staging, "r.stage.1")):
        assert lines(events) == [task_id]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED
    assert not (settings.work_root / "r.stage.1").exists()  # removed after success


def _states(events: list[pb.TaskEvent]) -> list[tuple[int, str]]:
    return [(e.state.state, e.state.message) for e in events if e.HasField("state")]


def _state_event(task_id: str, seq: int, state: int) -> pb.TaskEvent:
    return pb.TaskEvent(task_id=task_id, seq=seq, time=1.0, state=pb.StateChange(state=state))


def _log_event(task_id: str, seq: int, text: str) -> pb.TaskEvent:
    return pb.TaskEvent(task_id=task_id, seq=seq, time=1.0, log=pb.LogLine(text=text))


def _result_event(task_id: str, seq: int, state: int) -> pb.TaskEvent:
    return pb.TaskEvent(task_id=task_id, seq=seq, time=1.0, result=pb.TaskResult(state=state))


def _insert_v1(
    db: sqlite3.Connection, task_id: str, state: str, events: list[pb.TaskEvent], last_seq: int
) -> None:
    spec = pb.TaskSpec(task_id=task_id, run_id="r", step="s", shell='echo "$MLE_TASK_ID"')
    db.execute(
        "INSERT INTO tasks (task_id, run_id, step, spec, state, created, last_seq) "
        "VALUES (?, 'r', 's', ?, ?, 1.0, ?)",
        (task_id, spec.SerializeToString(), state, last_seq),
    )
    db.executemany(
        "INSERT INTO events (task_id, seq, time, body) VALUES (?, ?, ?, ?)",
        [(task_id, e.seq, e.time, e.SerializeToString()) for e in events],
    )

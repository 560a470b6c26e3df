"""The agent-local SQLite outbox: every task and every event, written before it is sent.

Used only from the event loop's thread. Events of a finished task are pruned once the operator has
acked them, except the final result, so a late watcher still learns how the task ended.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from mle_proto.errors import FailedPrecondition
from mle_proto.v1 import agent_pb2 as pb

__all__ = [
    "FINAL_STATES",
    "SCHEMA_VERSION",
    "Outbox",
    "ProcessRecord",
    "State",
    "TaskRow",
    "state_name",
]

State: TypeAlias = pb.TaskState.ValueType

FINAL_STATES: frozenset[State] = frozenset(
    {
        pb.TASK_STATE_SUCCEEDED,
        pb.TASK_STATE_FAILED,
        pb.TASK_STATE_CANCELLED,
        pb.TASK_STATE_TIMED_OUT,
        pb.TASK_STATE_LOST,
    }
)
# Migration N takes agent.db from user_version N-1 to N; an existing agent.db is moved forward on
# open. Never edit a shipped migration: append a new one.
_MIGRATIONS: tuple[str, ...] = (
    """
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
    """,
    # What a restarted agent needs to re-adopt a running task: its deadline (time.monotonic(),
    # i.e. CLOCK_MONOTONIC, one clock for every process of a boot) and how far each log was read.
    # Version 1 left last_seq at 0 until a task's second event; a revived task counts on it.
    """
    ALTER TABLE tasks ADD COLUMN deadline REAL NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN out_offset INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN err_offset INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET last_seq = MAX(last_seq, COALESCE(
        (SELECT MAX(seq) FROM events WHERE events.task_id = tasks.task_id), 0));
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
_SELECT = (
    "SELECT task_id, run_id, step, spec, state, exit_code, created, finished, last_seq, acked_seq "
    "FROM tasks"
)


def state_name(state: State) -> str:
    """The short name stored in the outbox, e.g. RUNNING."""
    return pb.TaskState.Name(state).removeprefix("TASK_STATE_")


def _state_value(name: str) -> State:
    return pb.TaskState.Value(f"TASK_STATE_{name}")


@dataclass(frozen=True)
class TaskRow:
    """One task as the outbox knows it."""

    task_id: str
    run_id: str
    step: str
    spec: pb.TaskSpec
    state: State
    exit_code: int
    created: float
    finished: float
    last_seq: int
    acked_seq: int

    @property
    def final(self) -> bool:
        """Whether the task has its result."""
        return self.state in FINAL_STATES

    def status(self) -> pb.TaskStatus:
        """The row as a ListTasks entry."""
        return pb.TaskStatus(
            task_id=self.task_id,
            run_id=self.run_id,
            step=self.step,
            state=self.state,
            exit_code=self.exit_code,
            last_seq=self.last_seq,
            created=self.created,
            finished=self.finished,
        )


@dataclass(frozen=True)
class ProcessRecord:
    """What the outbox remembers of a task's process, so a restarted agent can find it again."""

    pid: int  # the shim: session and process group leader; 0 when none was recorded
    started: float  # its create time (unix seconds), to tell it from a process that reused the pid
    deadline: float  # time.monotonic() at which the task times out; 0 = no timeout
    offsets: tuple[int, int]  # bytes of stdout and stderr already turned into events


class Outbox:
    """Tasks and their events in `agent.db` (WAL, synchronous=NORMAL)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"agent.db has schema version {version}, newer than this agent understands"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._migrate(target)

    def _migrate(self, target: int) -> None:
        """Apply one migration and record its version, all in one transaction."""
        script = f"BEGIN IMMEDIATE;{_MIGRATIONS[target - 1]}PRAGMA user_version={target};COMMIT;"
        try:
            self._db.executescript(script)
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database (checkpoints the WAL)."""
        self._db.close()

    def insert_task(self, spec: pb.TaskSpec, created: float, first: pb.TaskEvent) -> None:
        """Record a new task and its first event in one transaction."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO tasks (task_id, run_id, step, spec, state, created, last_seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    spec.task_id,
                    spec.run_id,
                    spec.step,
                    spec.SerializeToString(),
                    state_name(pb.TASK_STATE_PENDING),
                    created,
                    first.seq,
                ),
            )
            self._insert_events(spec.task_id, [first])

    def append(
        self,
        task_id: str,
        events: Sequence[pb.TaskEvent],
        *,
        state: State | None = None,
        exit_code: int | None = None,
        finished: float | None = None,
        offsets: Mapping[int, int] | None = None,
    ) -> None:
        """Commit a batch of events, the task's new state and log offsets (by stream) they reach."""
        offsets = offsets or {}
        with self._transaction():
            self._insert_events(task_id, events)
            self._db.execute(
                "UPDATE tasks SET last_seq = ?, state = COALESCE(?, state), "
                "exit_code = COALESCE(?, exit_code), finished = COALESCE(?, finished), "
                "out_offset = COALESCE(?, out_offset), err_offset = COALESCE(?, err_offset) "
                "WHERE task_id = ?",
                (
                    events[-1].seq,
                    None if state is None else state_name(state),
                    exit_code,
                    finished,
                    offsets.get(pb.LOG_STREAM_STDOUT),
                    offsets.get(pb.LOG_STREAM_STDERR),
                    task_id,
                ),
            )
            if finished is not None:
                self._prune(task_id)

    def set_process(self, task_id: str, pid: int, started: float, deadline: float = 0.0) -> None:
        """Remember a task's process (group leader) so a restarted agent can re-adopt or kill it."""
        with self._transaction():
            self._db.execute(
                "UPDATE tasks SET pid = ?, pid_started = ?, deadline = ?, out_offset = 0, "
                "err_offset = 0 WHERE task_id = ?",
                (pid, started, deadline, task_id),
            )

    def process_of(self, task_id: str) -> ProcessRecord:
        """The recorded process of a task; pid 0 when none."""
        row = self._db.execute(
            "SELECT pid, pid_started, deadline, out_offset, err_offset FROM tasks "
            "WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            return ProcessRecord(0, 0.0, 0.0, (0, 0))
        return ProcessRecord(int(row[0]), float(row[1]), float(row[2]), (int(row[3]), int(row[4])))

    def get(self, task_id: str) -> TaskRow | None:
        """One task, or None."""
        cursor = self._db.execute(f"{_SELECT} WHERE task_id = ?", (task_id,))
        return next(_rows(cursor), None)

    def tasks(self, run_id: str = "") -> list[TaskRow]:
        """All tasks, or the tasks of one run, oldest first."""
        if run_id:
            query = f"{_SELECT} WHERE run_id = ? ORDER BY created, task_id"
            cursor = self._db.execute(query, (run_id,))
        else:
            cursor = self._db.execute(f"{_SELECT} ORDER BY created, task_id")
        return list(_rows(cursor))

    def unfinished(self) -> list[TaskRow]:
        """Tasks without a result."""
        return [row for row in self.tasks() if not row.final]

    def events_after(self, task_id: str, after_seq: int, limit: int = 256) -> list[pb.TaskEvent]:
        """Up to `limit` events of a task with seq > after_seq, in order."""
        cursor = self._db.execute(
            "SELECT body FROM events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (task_id, min(after_seq, 2**63 - 1), limit),
        )
        return [pb.TaskEvent.FromString(body) for (body,) in cursor]

    def ack(self, task_id: str, upto_seq: int) -> int | None:
        """Record that events up to upto_seq are safe elsewhere; return acked_seq or None."""
        return self.ack_many([(task_id, upto_seq)])[0]

    def ack_many(self, acks: Sequence[tuple[str, int]]) -> list[int | None]:
        """`ack` for several tasks in one transaction: each one's acked_seq, None when unknown."""
        with self._transaction():
            return [self._ack(task_id, upto_seq) for task_id, upto_seq in acks]

    def _ack(self, task_id: str, upto_seq: int) -> int | None:
        row = self.get(task_id)
        if row is None:
            return None
        acked = max(row.acked_seq, min(upto_seq, row.last_seq))
        self._db.execute("UPDATE tasks SET acked_seq = ? WHERE task_id = ?", (acked, task_id))
        if row.final:
            self._prune(task_id)
        return acked

    def _prune(self, task_id: str) -> None:
        # The final event (seq == last_seq) is kept: it is the task's outcome.
        self._db.execute(
            "DELETE FROM events WHERE task_id = ? AND seq <= "
            "(SELECT MIN(acked_seq, last_seq - 1) FROM tasks WHERE task_id = ?)",
            (task_id, task_id),
        )

    def _insert_events(self, task_id: str, events: Iterable[pb.TaskEvent]) -> None:
        self._db.executemany(
            "INSERT INTO events (task_id, seq, time, body) VALUES (?, ?, ?, ?)",
            [(task_id, e.seq, e.time, e.SerializeToString()) for e in events],
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _rows(cursor: sqlite3.Cursor) -> Iterator[TaskRow]:
    for task_id, run_id, step, spec, state, exit_code, created, finished, last, acked in cursor:
        yield TaskRow(
            task_id=task_id,
            run_id=run_id,
            step=step,
            spec=pb.TaskSpec.FromString(spec),
            state=_state_value(state),
            exit_code=exit_code,
            created=created,
            finished=finished,
            last_seq=last,
            acked_seq=acked,
        )

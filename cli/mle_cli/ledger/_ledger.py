"""The ledger: a SQLite file (WAL) that records every run, step, attempt, event and artifact."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mle_cli.ledger._schema import migrate
from mle_cli.states import FINAL, Status
from mle_proto.errors import MleError, NotFound

__all__ = ["ArtifactRecord", "EventRecord", "Ledger", "LedgerError"]

Row = dict[str, Any]


class LedgerError(MleError):
    """The ledger file cannot be opened or written."""

    exit_code = 9


@dataclass(frozen=True)
class EventRecord:
    """One task event as stored in the ledger."""

    task_id: str
    seq: int
    run_id: str
    step_id: str
    time: float
    kind: str  # state | log | result
    stream: str | None = None
    state: str | None = None
    text: str | None = None


@dataclass(frozen=True)
class ArtifactRecord:
    """A declared output of a step, stored by digest."""

    run_id: str
    step_id: str
    path: str
    digest: str
    size: int


_BUSY_TIMEOUT = 10.0
_COLUMN = re.compile(r"[a-z_]+")


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying: while another process creates the same new ledger, SQLite
    answers "database is locked" at once, without waiting for the busy timeout."""
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Ledger:
    """Reads and writes the ledger. One instance per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(conn)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {path}: {e}") from None
        self.conn = conn

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        """Run a SELECT now; its rows, as dicts by column name, are fetched as they are read."""
        cursor = self.conn.execute(sql, params)
        columns = [d[0] for d in cursor.description]
        return (dict(zip(columns, row, strict=True)) for row in cursor)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit everything inside at once. BEGIN IMMEDIATE takes the write lock up front, so
        another `mle` process writing at the same time makes us wait (busy timeout) instead of
        failing with SQLITE_BUSY when a read would upgrade to a write."""
        if self.conn.in_transaction:  # nested in the writer's batch: part of it
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- writes ---------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        *,
        recipe: str,
        source: str,
        recipe_digest: str,
        params: Mapping[str, Any],
        steps: Sequence[tuple[str, str, Sequence[str]]],
        plan: str = "",
        plan_hash: str = "",
    ) -> None:
        """Record a new run, its plan (JSON, for resume) and its steps (id, target, needs)."""
        run = (
            run_id,
            recipe,
            source,
            recipe_digest,
            json.dumps(params, sort_keys=True),
            Status.PENDING,
            time.time(),
            plan or None,
            plan_hash or None,
        )
        with self.transaction():  # the run and its steps, or nothing
            self.conn.execute(
                "INSERT INTO runs (id, recipe, source, recipe_digest, params, status, created, "
                "plan, plan_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                run,
            )
            self.conn.executemany(
                "INSERT INTO steps (run_id, step_id, position, status, target, needs) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (run_id, step_id, i, Status.PENDING, target, json.dumps(list(needs)))
                    for i, (step_id, target, needs) in enumerate(steps)
                ],
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set fields of a run (status, started, finished, message...)."""
        self._update("runs", {"id": run_id}, fields)

    def update_step(self, run_id: str, step_id: str, **fields: Any) -> None:
        """Set fields of a step."""
        self._update("steps", {"run_id": run_id, "step_id": step_id}, fields)

    def start_attempt(
        self, task_id: str, run_id: str, step_id: str, attempt: int, agent: str, address: str
    ) -> None:
        """Record that an attempt is being dispatched to an agent."""
        now = time.time()
        row = {
            "task_id": task_id,
            "run_id": run_id,
            "step_id": step_id,
            "attempt": attempt,
            "agent": agent,
            "address": address,
            "status": Status.RUNNING,
            "started": now,
        }
        self._upsert("attempts", ("task_id",), [row])
        self.conn.execute(
            "UPDATE steps SET status = ?, attempts = ?, started = coalesce(started, ?) "
            "WHERE run_id = ? AND step_id = ?",
            (Status.RUNNING, attempt, now, run_id, step_id),
        )

    def update_attempt(self, task_id: str, **fields: Any) -> None:
        """Set fields of an attempt."""
        self._update("attempts", {"task_id": task_id}, fields)

    def _update(self, table: str, key: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
        """UPDATE one row; the column names go into the SQL text, so they are checked first."""
        names = [*fields, *key]
        if not all(_COLUMN.fullmatch(name) for name in names):
            raise ValueError(f"not a column name: {names}")
        columns = ", ".join(f"{name} = ?" for name in fields)
        where = " AND ".join(f"{name} = ?" for name in key)
        sql = f"UPDATE {table} SET {columns} WHERE {where}"  # noqa: S608 - names checked above
        if self.conn.execute(sql, (*fields.values(), *key.values())).rowcount == 0:
            raise NotFound(f"no row in {table} with {dict(key)}")

    def _upsert(self, table: str, pk: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        """INSERT rows (all with the same columns); one whose primary key is already there gets
        the given columns updated and keeps the others."""
        if not rows:
            return
        names = list(rows[0])
        if not all(_COLUMN.fullmatch(name) for name in names) or not set(pk) <= set(names):
            raise ValueError(f"not columns with the primary key {pk}: {names}")
        columns = ", ".join(names)
        values = ", ".join(f":{name}" for name in names)
        updates = ", ".join(f"{name} = excluded.{name}" for name in names if name not in pk)
        sql = (
            f"INSERT INTO {table} ({columns}) VALUES ({values}) "  # noqa: S608 - names checked
            f"ON CONFLICT ({', '.join(pk)}) DO UPDATE SET {updates}"
        )
        self.conn.executemany(sql, rows)

    def finish_attempt(
        self,
        task_id: str,
        *,
        status: str,
        exit_code: int | None,
        message: str,
        finished: float,
        outputs: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Record an attempt's result. A fenced attempt keeps its status: the result is late."""
        row = self.conn.execute("SELECT fenced FROM attempts WHERE task_id = ?", (task_id,))
        fenced = (row.fetchone() or (0,))[0]
        if fenced:
            self.conn.execute(
                "UPDATE attempts SET late_status = ?, message = coalesce(message, '') || ? "
                "WHERE task_id = ?",
                (status, f"; late result {status} ignored (fenced)", task_id),
            )
            return
        self.update_attempt(
            task_id,
            status=status,
            exit_code=exit_code,
            message=message,
            finished=finished,
            outputs=json.dumps(list(outputs)),
        )

    def fence_attempt(self, task_id: str, message: str, now: float | None = None) -> None:
        """Declare an attempt lost: whatever it reports later cannot change its step."""
        self.update_attempt(
            task_id, status=Status.LOST, fenced=1, message=message, finished=now or time.time()
        )

    def record_metrics(self, run_id: str, step_id: str, metrics: Mapping[str, Any]) -> None:
        """Record a step's metrics as JSON text, numbers also as values for SQL to sort on."""
        rows = [
            {
                "run_id": run_id,
                "step_id": step_id,
                "name": name,
                "value": float(value) if isinstance(value, int | float) else None,
                "text": json.dumps(value),
            }
            for name, value in metrics.items()
        ]
        self._upsert("metrics", ("run_id", "step_id", "name"), rows)

    def record_approval(
        self, run_id: str, step_id: str, *, decision: str, who: str, reason: str = ""
    ) -> None:
        """Record who approved or rejected a gate, and why."""
        row = {
            "run_id": run_id,
            "step_id": step_id,
            "decision": decision,
            "who": who,
            "reason": reason,
            "time": time.time(),
        }
        self._upsert("approvals", ("run_id", "step_id"), [row])

    def record_events(self, events: Iterable[EventRecord]) -> None:
        """Insert events; a (task_id, seq) already recorded is ignored (idempotent replay)."""
        rows = [
            (e.task_id, e.seq, e.run_id, e.step_id, e.time, e.kind, e.stream, e.state, e.text)
            for e in events
        ]
        self.conn.executemany(
            "INSERT OR IGNORE INTO events "
            "(task_id, seq, run_id, step_id, time, kind, stream, state, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        self.conn.executemany(
            "UPDATE attempts SET last_seq = max(last_seq, ?) WHERE task_id = ?",
            [(r[1], r[0]) for r in rows],
        )

    def record_artifacts(self, artifacts: Iterable[ArtifactRecord]) -> None:
        """Record the declared outputs of a step."""
        now = time.time()
        rows = [
            {
                "run_id": a.run_id,
                "step_id": a.step_id,
                "path": a.path,
                "digest": a.digest,
                "size": a.size,
                "created": now,
            }
            for a in artifacts
        ]
        self._upsert("artifacts", ("run_id", "step_id", "path"), rows)

    def request_cancel(self, run_id: str) -> None:
        """Ask the scheduler driving this run to cancel it."""
        self.conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))

    def finish_abandoned_run(
        self, run_id: str, status: Status, message: str, now: float | None = None
    ) -> None:
        """Close a run nobody drives any more: it and its unfinished steps and attempts."""
        now = now or time.time()
        final = tuple(FINAL)
        marks = ",".join("?" * len(final))
        with self.transaction():
            self.conn.execute(
                f"UPDATE attempts SET status = ?, finished = ?, message = ? "  # noqa: S608
                f"WHERE run_id = ? AND status NOT IN ({marks})",
                (status, now, message, run_id, *final),
            )
            self.conn.execute(
                f"UPDATE steps SET status = ?, finished = ?, message = ? "  # noqa: S608
                f"WHERE run_id = ? AND status NOT IN ({marks})",
                (status, now, message, run_id, *final),
            )
            self.update_run(run_id, status=status, finished=now, message=message)

    # -- reads ----------------------------------------------------------------------------------

    def resolve_run(self, ref: str | None) -> str:
        """A run id from a full id, a unique prefix, or None for the latest run."""
        if ref is None:
            row = self.conn.execute("SELECT id FROM runs ORDER BY created DESC LIMIT 1").fetchone()
            if row is None:
                raise NotFound("no runs yet; start one with `mle run RECIPE`")
            return str(row[0])
        ids = [
            r[0]
            for r in self.conn.execute(
                "SELECT id FROM runs WHERE id = ? OR id LIKE ? ESCAPE '\\' LIMIT 3",
                (ref, ref.replace("%", "\\%").replace("_", "\\_") + "%"),
            )
        ]
        if ref in ids:
            return ref
        if len(ids) == 1:
            return str(ids[0])
        if not ids:
            raise NotFound(f"no run {ref!r}; `mle runs` lists them")
        raise NotFound(f"run prefix {ref!r} is ambiguous ({', '.join(ids[:2])}, ...)")

    def runs(self, limit: int = 20) -> list[Row]:
        """The latest runs, newest first, with their step counts."""
        return list(
            self.query(
                "SELECT r.id, r.recipe, r.status, r.created, r.started, r.finished, r.message, "
                "count(s.step_id) AS steps, "
                "sum(s.status = 'succeeded') AS succeeded, sum(s.status = 'failed') AS failed "
                "FROM runs r LEFT JOIN steps s ON s.run_id = r.id "
                "GROUP BY r.id ORDER BY r.created DESC LIMIT ?",
                [limit],
            )
        )

    def run(self, run_id: str) -> Row:
        """One run with its params decoded."""
        rows = list(self.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        if not rows:
            raise NotFound(f"no run {run_id!r}")
        row = rows[0]
        row["params"] = json.loads(row["params"])
        row["cancel_requested"] = bool(row["cancel_requested"])
        return row

    def steps(self, run_id: str) -> list[Row]:
        """The steps of a run in plan order."""
        rows = list(self.query("SELECT * FROM steps WHERE run_id = ? ORDER BY position", [run_id]))
        for row in rows:
            row["needs"] = json.loads(row["needs"])
        return rows

    def attempts(self, run_id: str) -> list[Row]:
        """Every attempt of a run, by step then attempt number."""
        return list(
            self.query(
                "SELECT * FROM attempts WHERE run_id = ? ORDER BY step_id, attempt", [run_id]
            )
        )

    def artifacts(self, run_id: str) -> list[Row]:
        """The recorded outputs of a run."""
        return list(
            self.query(
                "SELECT a.step_id, a.path, a.digest, a.size FROM artifacts a "
                "JOIN steps s ON s.run_id = a.run_id AND s.step_id = a.step_id "
                "WHERE a.run_id = ? ORDER BY s.position, a.path",
                [run_id],
            )
        )

    def logs(
        self, run_id: str, step_id: str | None = None, after: int = 0, tail: int | None = None
    ) -> list[Row]:
        """Log lines of a run (or one step), in order; `after` is a rowid cursor for following."""
        sql = (
            "SELECT e.rowid AS cursor, e.task_id, e.step_id, e.seq, e.time, e.stream, e.text "
            "FROM events e JOIN attempts a ON a.task_id = e.task_id "
            "WHERE e.run_id = ? AND e.kind = 'log' AND e.rowid > ?"
        )
        args: list[Any] = [run_id, after]
        if step_id is not None:
            sql += " AND e.step_id = ?"
            args.append(step_id)
        sql += " ORDER BY e.rowid"
        rows = list(self.query(sql, args))
        return rows[-tail:] if tail else rows

    def events(self, task_id: str) -> list[Row]:
        """Every event of one attempt, by seq."""
        return list(self.query("SELECT * FROM events WHERE task_id = ? ORDER BY seq", [task_id]))

"""The ledger on a real SQLite file: schema, idempotent events, run lookup, the batching writer."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mle_cli.ledger import (
    ArtifactRecord,
    EventRecord,
    Ledger,
    LedgerError,
    LedgerWriter,
    queries,
)
from mle_cli.ledger._schema import SCHEMA_VERSION
from mle_cli.states import Status
from mle_proto.errors import FailedPrecondition, NotFound


def _run(ledger: Ledger, run_id: str, steps: tuple[str, ...] = ("a", "b")) -> None:
    ledger.create_run(
        run_id,
        recipe="r",
        source="r.yaml",
        recipe_digest="sha256:" + "0" * 64,
        params={"x": 1},
        steps=[(s, "local", []) for s in steps],
    )


def _event(seq: int, text: str = "line") -> EventRecord:
    return EventRecord("run1.a.1", seq, "run1", "a", 1.0 + seq, "log", "stdout", None, text)


def test_schema_is_created_in_wal_mode_and_versioned(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    conn = sqlite3.connect(tmp_path / "l.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "steps", "attempts", "events", "artifacts"} <= tables


def test_a_ledger_from_a_newer_mle_is_refused(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(FailedPrecondition, match="newer than this mle"):
        Ledger(tmp_path / "l.db")


def test_a_ledger_with_a_table_dropped_is_called_damaged(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    conn = sqlite3.connect(tmp_path / "l.db")
    conn.execute("DROP TABLE events")
    conn.close()
    with pytest.raises(FailedPrecondition) as caught:
        Ledger(tmp_path / "l.db")
    assert str(caught.value) == (
        "the ledger is damaged: its events table is missing; move the ledger away to start a "
        "new one (its runs stay in the moved file)"
    )


def test_a_file_that_is_not_a_ledger_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "l.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match=r"cannot open the ledger .*l\.db"):
        Ledger(tmp_path / "l.db")


def test_events_are_idempotent_on_task_and_seq(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.start_attempt("run1.a.1", "run1", "a", 1, "local", "127.0.0.1:1")
    ledger.record_events([_event(1, "first"), _event(2)])
    ledger.record_events(
        [_event(1, "replayed"), _event(2), _event(3)]
    )  # a replay after a reconnect
    rows = ledger.events("run1.a.1")
    assert [(r["seq"], r["text"]) for r in rows] == [(1, "first"), (2, "line"), (3, "line")]
    assert ledger.attempts("run1")[0]["last_seq"] == 3


def test_runs_are_found_by_prefix_and_latest(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "20260101-000000-aaaa")
    _run(ledger, "20260102-000000-bbbb")
    assert ledger.resolve_run("20260101") == "20260101-000000-aaaa"
    assert ledger.resolve_run(None) == "20260102-000000-bbbb"
    with pytest.raises(NotFound, match="ambiguous"):
        ledger.resolve_run("2026")
    with pytest.raises(NotFound, match="no run 'nope'"):
        ledger.resolve_run("nope")
    with pytest.raises(NotFound, match="no run '2026_1%'"):
        ledger.resolve_run("2026_1%")  # LIKE wildcards are literal


def test_an_abandoned_run_is_closed_with_its_steps_and_attempts(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.start_attempt("run1.a.1", "run1", "a", 1, "local", "127.0.0.1:1")
    ledger.update_step("run1", "b", status=Status.SUCCEEDED)
    ledger.finish_abandoned_run("run1", Status.CANCELLED, "gone")
    assert ledger.run("run1")["status"] == "cancelled"
    assert {s["step_id"]: s["status"] for s in ledger.steps("run1")} == {
        "a": "cancelled",
        "b": "succeeded",
    }
    assert ledger.attempts("run1")[0]["status"] == "cancelled"


def test_query_returns_rows_as_dicts_by_column_name(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    rows = ledger.query("SELECT step_id, position AS pos FROM steps WHERE run_id = ?", ["run1"])
    assert list(rows) == [{"step_id": "a", "pos": 0}, {"step_id": "b", "pos": 1}]
    assert list(ledger.query("SELECT * FROM runs WHERE id = ?", ["nope"])) == []


def test_recording_again_updates_metrics_approvals_and_artifacts_in_place(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.record_metrics("run1", "a", {"loss": 0.5, "accuracy": 0.8})
    ledger.record_metrics("run1", "a", {"accuracy": 0.9, "note": "ok"})
    found = queries.metrics(ledger, "run1")["a"]
    assert list(found.items()) == [("loss", 0.5), ("accuracy", 0.9), ("note", "ok")]  # same rows
    ledger.record_approval("run1", "b", decision="rejected", who="ann", reason="too slow")
    ledger.record_approval("run1", "b", decision="approved", who="bob")
    approval = queries.approval(ledger, "run1", "b")
    assert approval is not None
    assert (approval["decision"], approval["who"], approval["reason"]) == ("approved", "bob", "")
    for digest in ("sha256:" + "1" * 64, "sha256:" + "2" * 64):
        ledger.record_artifacts([ArtifactRecord("run1", "a", "o.txt", digest, 3)])
    assert ledger.artifacts("run1") == [
        {"step_id": "a", "path": "o.txt", "digest": "sha256:" + "2" * 64, "size": 3}
    ]


def test_an_upsert_keeps_the_columns_it_is_not_given(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.record_metrics("run1", "a", {"accuracy": 0.8})
    # The record_* methods give every column today; a column a later migration adds must survive.
    key = {"run_id": "run1", "step_id": "a", "name": "accuracy"}
    ledger._upsert("metrics", tuple(key), [{**key, "value": 0.9}])
    assert list(ledger.query("SELECT value, text FROM metrics")) == [{"value": 0.9, "text": "0.8"}]
    with pytest.raises(ValueError, match="primary key"):
        ledger._upsert("metrics", tuple(key), [{**key, "value = 1; --": 1}])


_OPEN_AND_USE = """
import json, sys
from pathlib import Path
from mle_cli.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]))
ledger.create_run("r1", recipe="r", source="r.yaml", recipe_digest="d", params={}, steps=[])
ledger.record_metrics("r1", "a", {"accuracy": 0.9})
assert ledger.run("r1")["status"] == "pending"
print(json.dumps(sorted(sys.modules)))
"""


def test_the_ledger_imports_neither_sqlite_utils_nor_numpy(tmp_path: Path) -> None:
    """Every `mle run` and `mle show` opens the ledger: numpy (and pandas) would cost it 100 ms."""
    out = subprocess.run(
        [sys.executable, "-c", _OPEN_AND_USE, str(tmp_path / "l.db")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded = {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}
    assert loaded & {"sqlite_utils", "numpy", "pandas"} == set()


def test_writer_commits_in_order_and_flush_waits_for_it(tmp_path: Path) -> None:
    path = tmp_path / "l.db"

    async def scenario() -> None:
        writer = LedgerWriter(path)
        writer.submit(lambda led: _run(led, "run1"))
        writer.submit(lambda led: led.start_attempt("run1.a.1", "run1", "a", 1, "local", "x"))
        for seq in range(1, 201):
            writer.submit(lambda led, s=seq: led.record_events([_event(s)]))
        writer.submit(
            lambda led: led.record_artifacts(
                [ArtifactRecord("run1", "a", "o.txt", "sha256:" + "1" * 64, 3)]
            )
        )
        await writer.flush()
        reader = Ledger(path)  # another connection sees everything once flush returns
        assert [r["seq"] for r in reader.events("run1.a.1")] == list(range(1, 201))
        assert reader.artifacts("run1")[0]["path"] == "o.txt"
        reader.close()
        writer.close()

    asyncio.run(scenario())


def test_a_write_nobody_flushes_is_committed_soon_all_the_same(tmp_path: Path) -> None:
    writer = LedgerWriter(tmp_path / "l.db")
    writer.submit(lambda led: _run(led, "run1"))  # no flush: the writer lingers, then commits
    reader = sqlite3.connect(tmp_path / "l.db")
    try:
        while not reader.execute("SELECT count(*) FROM runs").fetchone()[0]:
            time.sleep(0.005)  # bounded by the test timeout; never waits on a flush
    finally:
        reader.close()
        writer.close()


def test_other_writers_get_the_lock_while_writes_wait_for_their_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("mle_cli.ledger._writer._LINGER", 30.0)  # a batch that stays open
    writer = LedgerWriter(tmp_path / "l.db")
    other = sqlite3.connect(tmp_path / "l.db", timeout=0, isolation_level=None)
    try:
        writer.submit(lambda led: _run(led, "run1"))
        while not writer._queue.empty():  # the writer thread has it, and lingers for more
            time.sleep(0.001)
        other.execute("BEGIN IMMEDIATE")  # "database is locked" if the linger held the lock
        other.execute("ROLLBACK")
    finally:
        other.close()
        writer.close()  # commits what waits
    reader = Ledger(tmp_path / "l.db")
    assert [r["id"] for r in reader.query("SELECT id FROM runs")] == ["run1"]
    reader.close()


def test_a_failed_write_fails_the_next_flush(tmp_path: Path) -> None:
    async def scenario() -> None:
        writer = LedgerWriter(tmp_path / "l.db")
        writer.submit(lambda led: _run(led, "run1"))
        writer.submit(lambda led: led.update_run("missing-run", status="x"))
        with pytest.raises(LedgerError, match="ledger write failed: NotFound no row in runs"):
            await writer.flush()
        writer.submit(lambda led: _run(led, "run2"))  # nothing is written after a failure
        with pytest.raises(LedgerError, match="ledger write failed: NotFound no row in runs"):
            await writer.flush()
        writer.close()
        reader = Ledger(tmp_path / "l.db")
        assert [r["id"] for r in reader.query("SELECT id FROM runs")] in ([], ["run1"])
        reader.close()

    asyncio.run(scenario())


def test_the_ledger_opens_in_the_sqlite3_cli(tmp_path: Path) -> None:
    import shutil

    if shutil.which("sqlite3") is None:
        pytest.skip("the sqlite3 command-line tool is not installed (apt-get install sqlite3)")
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.close()
    out = subprocess.run(
        ["sqlite3", str(tmp_path / "l.db"), "SELECT id, status FROM runs; PRAGMA integrity_check;"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["run1|pending", "ok"]


def test_the_ledger_opens_in_the_sqlite_utils_cli(tmp_path: Path) -> None:
    import shutil

    cli = shutil.which("sqlite-utils", path=str(Path(sys.executable).parent)) or shutil.which(
        "sqlite-utils"
    )
    if cli is None:
        pytest.skip("the sqlite-utils command is not installed (pip install sqlite-utils)")
    ledger = Ledger(tmp_path / "l.db")
    _run(ledger, "run1")
    ledger.close()
    out = subprocess.run(
        [
            cli,
            "query",
            str(tmp_path / "l.db"),
            "select step_id, status from steps order by position",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == [
        {"step_id": "a", "status": "pending"},
        {"step_id": "b", "status": "pending"},
    ]


def test_a_version_1_ledger_is_migrated_in_place_keeping_its_runs(tmp_path: Path) -> None:
    from mle_cli.ledger._schema import _MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0])
    conn.execute(
        "INSERT INTO runs (id, recipe, source, recipe_digest, params, status, created) "
        "VALUES ('r1', 'old', 'old.yaml', 'sha256:x', '{}', 'succeeded', 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    try:
        assert ledger.run("r1")["status"] == "succeeded"
        assert ledger.run("r1")["plan"] is None
        ledger.record_metrics("r1", "s", {"accuracy": 0.9, "note": "ok"})
        assert ledger.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    finally:
        ledger.close()

"""Ledger schema migrations, applied in order and tracked by `PRAGMA user_version`."""

from __future__ import annotations

import re
import sqlite3

__all__ = ["migrate"]

# Append only: never edit a migration that has shipped.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        recipe TEXT NOT NULL,
        source TEXT NOT NULL,
        recipe_digest TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        message TEXT
    );
    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs(id),
        step_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        status TEXT NOT NULL,
        target TEXT NOT NULL,
        needs TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        started REAL,
        finished REAL,
        exit_code INTEGER,
        message TEXT,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE attempts (
        task_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        agent TEXT NOT NULL,
        address TEXT NOT NULL,
        status TEXT NOT NULL,
        exit_code INTEGER,
        message TEXT,
        started REAL NOT NULL,
        finished REAL,
        last_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX attempts_run ON attempts(run_id, step_id);
    CREATE TABLE events (
        task_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        stream TEXT,
        state TEXT,
        text TEXT,
        PRIMARY KEY (task_id, seq)
    );
    CREATE INDEX events_run ON events(run_id, step_id);
    CREATE TABLE artifacts (
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        path TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (run_id, step_id, path)
    );
    """,
    # 2: resume (the plan itself), fencing, the step cache, metrics and approvals.
    """
    ALTER TABLE runs ADD COLUMN plan TEXT;
    ALTER TABLE runs ADD COLUMN plan_hash TEXT;
    ALTER TABLE steps ADD COLUMN cache_key TEXT;
    ALTER TABLE steps ADD COLUMN cache_parts TEXT;
    ALTER TABLE steps ADD COLUMN cached_from TEXT;
    CREATE INDEX steps_cache ON steps(cache_key);
    ALTER TABLE attempts ADD COLUMN fenced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN late_status TEXT;
    ALTER TABLE attempts ADD COLUMN outputs TEXT;
    CREATE TABLE metrics (
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        name TEXT NOT NULL,
        value REAL,
        text TEXT,
        PRIMARY KEY (run_id, step_id, name)
    );
    CREATE TABLE approvals (
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        decision TEXT NOT NULL,
        who TEXT NOT NULL,
        reason TEXT,
        time REAL NOT NULL,
        PRIMARY KEY (run_id, step_id)
    );
    """,
    # 3: model deployments and route changes (`mle deploy`), with their lineage; served models'
    # stats as read by `mle models` (a time series: one row per version per read).
    """
    CREATE TABLE deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        target TEXT NOT NULL,
        agent TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER,
        digest TEXT,
        runtime TEXT,
        filename TEXT,
        size INTEGER,
        uploaded INTEGER NOT NULL DEFAULT 0,
        action TEXT NOT NULL,
        route TEXT,
        created INTEGER NOT NULL DEFAULT 0,
        source_run TEXT,
        source_step TEXT,
        operator TEXT NOT NULL
    );
    CREATE INDEX deployments_model ON deployments(target, model, time);
    CREATE INDEX artifacts_digest ON artifacts(digest);
    CREATE TABLE model_stats (
        time REAL NOT NULL,
        target TEXT NOT NULL,
        model TEXT NOT NULL,
        version INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        p50_seconds REAL,
        p95_seconds REAL,
        p99_seconds REAL,
        batches INTEGER,
        shadow_requests INTEGER,
        disagreements INTEGER,
        fallbacks INTEGER,
        since REAL
    );
    CREATE INDEX model_stats_version ON model_stats(target, model, version, time);
    """,
    # 4: agents found by mDNS, cached so `mle agents` answers at once; never dropped, only aged.
    """
    CREATE TABLE discovered_agents (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        port INTEGER NOT NULL,
        arch TEXT NOT NULL,
        os TEXT NOT NULL,
        runtimes TEXT NOT NULL,
        labels TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        version TEXT NOT NULL,
        source TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    );
    """,
    # 5: agents' heartbeats (machine load), one row per beat; capped per agent, oldest dropped.
    # `time` is the operator's clock when the beat arrived: a board without an RTC may not know
    # the date yet, and rows from several agents must sort on one clock.
    """
    CREATE TABLE agent_metrics (
        agent TEXT NOT NULL,
        time REAL NOT NULL,
        boot_id TEXT NOT NULL,
        cpu_percent REAL NOT NULL,
        load1 REAL NOT NULL,
        memory_used INTEGER NOT NULL,
        memory_total INTEGER NOT NULL,
        disk_free INTEGER NOT NULL,
        temperature REAL,
        running_tasks INTEGER NOT NULL,
        slots INTEGER NOT NULL
    );
    CREATE INDEX agent_metrics_agent_time ON agent_metrics(agent, time);
    """,
)

SCHEMA_VERSION = len(_MIGRATIONS)
# Every table a current ledger has. A migration that drops or renames one must change this.
_TABLES = frozenset(re.findall(r"CREATE TABLE (\w+)", "".join(_MIGRATIONS)))


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to date; return the version. Refuses a ledger from a newer mle.

    Runs under BEGIN IMMEDIATE, so two `mle` processes opening a new ledger at once do not both
    try to create it.
    """
    if _version(conn) == SCHEMA_VERSION:
        _check_tables(conn)
        return SCHEMA_VERSION
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _version(conn)
        if current > SCHEMA_VERSION:
            from mle_proto.errors import FailedPrecondition

            raise FailedPrecondition(
                f"the ledger has schema version {current}, newer than this mle "
                f"understands ({SCHEMA_VERSION}); upgrade mle"
            )
        for version in range(current, SCHEMA_VERSION):
            for statement in _MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def _check_tables(conn: sqlite3.Connection) -> None:
    """A ledger at the current version with a table gone (dropped by hand) is damaged: say so
    once here, not as "no such table" from whichever command reads it first."""
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    missing = sorted(_TABLES - {name for (name,) in rows})
    if missing:
        from mle_proto.errors import FailedPrecondition

        raise FailedPrecondition(
            f"the ledger is damaged: its {missing[0]} table is missing; move the ledger away "
            "to start a new one (its runs stay in the moved file)"
        )


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])

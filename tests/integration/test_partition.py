"""Network partitions between the scheduler and an agent, made by a TCP proxy that stops
forwarding bytes (as a cut link does: connections stay open, nothing arrives) and later heals.

A partition shorter than the grace period causes no re-dispatch. A longer one marks the attempt
lost and fenced, the step is retried on another agent, and when the link heals the first task's
late result is recorded on the fenced attempt without changing the step.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from mle_cli.executor import Executor
from mle_cli.ledger import Ledger, LedgerWriter
from mle_cli.recipe import compile_recipe, plan_to_json
from mle_cli.scheduler import Scheduler, SchedulerOptions
from mle_cli.states import Status
from mle_cli.targets import Endpoint
from mle_cli.targets.connection import AgentConnection, connect
from mle_proto.store import ArtifactStore
from tests.agent_helpers import agent_settings, run, running_agent

TOKEN = "partition-token"
GRACE = 1.5
HEARTBEAT = 0.1


class BlackholeProxy:
    """Forwards TCP to an upstream port until cut; while cut, bytes are held, not delivered."""

    def __init__(self, upstream: int) -> None:
        self._upstream = upstream
        self._open = asyncio.Event()
        self._open.set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._open.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()


@asynccontextmanager
async def _fleet(
    tmp_path: Path,
) -> AsyncIterator[tuple[AgentConnection, AgentConnection, BlackholeProxy]]:
    """Agent `far` behind a proxy, agent `near` direct, each with its own store."""
    far_settings = agent_settings(tmp_path / "far", artifacts_dir=tmp_path / "far-store")
    near_settings = agent_settings(tmp_path / "near", artifacts_dir=tmp_path / "near-store")
    async with (
        running_agent(far_settings, token=TOKEN) as far,
        running_agent(near_settings, token=TOKEN) as near,
    ):
        proxy = BlackholeProxy(far.port)
        await proxy.start()
        far_conn = await connect(Endpoint("far", f"127.0.0.1:{proxy.port}", TOKEN), 10, HEARTBEAT)
        near_conn = await connect(Endpoint("near", f"127.0.0.1:{near.port}", TOKEN), 10, HEARTBEAT)
        try:
            yield far_conn, near_conn, proxy
        finally:
            proxy.heal()
            await far_conn.close()
            await near_conn.close()
            await proxy.close()


def _scheduler(
    tmp_path: Path, recipe: str, far: Executor, near: Executor
) -> tuple[Scheduler, LedgerWriter, Ledger]:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    plan = compile_recipe(path)
    ledger_path = tmp_path / "ledger.db"
    writer = LedgerWriter(ledger_path)
    writer.submit(
        lambda led: led.create_run(
            "run1",
            recipe=plan.name,
            source=str(path),
            recipe_digest=plan.digest,
            params={},
            steps=[(s.id, s.target, s.needs) for s in plan.steps],
            plan=plan_to_json(plan),
        )
    )
    used: list[str] = []

    async def executor_for(target: str) -> Executor:
        # The first attempt lands on `far`; a retry of the step goes to `near`, as placement
        # over several matching agents would do. A name asks for that agent itself.
        if target in ("far", "near"):
            return far if target == "far" else near
        used.append(target)
        return far if len(used) == 1 else near

    reader = Ledger(ledger_path)
    scheduler = Scheduler(
        plan,
        "run1",
        executor_for=executor_for,
        writer=writer,
        reader=reader,
        store=ArtifactStore(tmp_path / "project-store"),
        progress=_Quiet(),
        options=SchedulerOptions(agent_grace=GRACE, poll_interval=0.05),
    )
    return scheduler, writer, reader


class _Quiet:
    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        pass

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        pass


RECIPE = """\
name: partition
steps:
  work:
    run: echo started; sleep {sleep}; echo done > out.txt
    outputs: [out.txt]
    retries: {{max: 1, backoff: 0s}}
"""


def _attempts(tmp_path: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(tmp_path / "ledger.db")
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM attempts ORDER BY attempt"))
    finally:
        conn.close()


async def _wait_running(tmp_path: Path) -> None:
    for _ in range(600):
        try:
            if any(a["status"] == "running" for a in _attempts(tmp_path)):
                await asyncio.sleep(0.3)  # the task is up and printing
                return
        except sqlite3.OperationalError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the attempt never started")


def test_a_partition_shorter_than_the_grace_period_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _fleet(tmp_path) as (far, near, proxy):
            scheduler, writer, reader = _scheduler(tmp_path, RECIPE.format(sleep=3), far, near)
            driving = asyncio.create_task(scheduler.run())
            await _wait_running(tmp_path)
            proxy.cut()
            await asyncio.sleep(GRACE / 2)
            proxy.heal()
            outcome = await driving
            writer.close()
            reader.close()
            assert outcome.status == Status.SUCCEEDED
            [attempt] = _attempts(tmp_path)
            assert attempt["agent"] == "far" and attempt["status"] == "succeeded"
            assert not attempt["fenced"]

    run(scenario())


def test_a_longer_partition_retries_elsewhere_and_fences_the_late_result(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _fleet(tmp_path) as (far, near, proxy):
            scheduler, writer, reader = _scheduler(tmp_path, RECIPE.format(sleep=4), far, near)
            driving = asyncio.create_task(scheduler.run())
            await _wait_running(tmp_path)
            proxy.cut()
            while len(_attempts(tmp_path)) < 2:  # lost after the grace period, then retried
                await asyncio.sleep(0.05)
            first = _attempts(tmp_path)[0]
            assert first["status"] == "lost" and first["fenced"] == 1
            assert "agent far silent for 1.5s" in first["message"]
            proxy.heal()
            outcome = await driving
            assert outcome.status == Status.SUCCEEDED
            assert outcome.steps["work"].target == "near"
            # The far task started earlier and ends before the retry does; the scheduler
            # follows the fenced attempt until the run ends, so its late result is on record.
            writer.close()
            reader.close()
            first, second = _attempts(tmp_path)
            assert second["agent"] == "near" and second["status"] == "succeeded"
            assert first["status"] == "lost" and first["late_status"] == "succeeded"
            assert first["message"].endswith("late result succeeded ignored (fenced)")
            conn = sqlite3.connect(tmp_path / "ledger.db")
            [(step_status,)] = conn.execute("SELECT status FROM steps").fetchall()
            conn.close()
            assert step_status == "succeeded"

    run(scenario(), timeout=90)

"""The scheduler and the agent connection against a real in-process agent on 127.0.0.1:0.

The embedded local agent shares the project's artifact store, so `mle run` never ships or fetches
anything; here the agent has its own store, as a remote agent does, so both directions are real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from mle_cli.executor import Executor
from mle_cli.ledger import Ledger, LedgerWriter
from mle_cli.recipe import compile_recipe
from mle_cli.scheduler import Scheduler
from mle_cli.states import Status
from mle_cli.targets import Endpoint
from mle_cli.targets.connection import connect
from mle_proto.errors import Unauthenticated
from mle_proto.store import ArtifactStore
from tests.agent_helpers import agent_settings, run, running_agent

TOKEN = "integration-token"

RECIPE = """\
name: shipping
params: {word: ship}
files: [tool.sh]
steps:
  make:
    run: sh tool.sh {{ params.word }} > made.txt
    outputs: [made.txt]
  use:
    needs: [make]
    run: cat made.txt made.txt > twice.txt
    outputs: [twice.txt]
"""


class Recorder:
    """Progress sink that remembers every status a step went through."""

    def __init__(self) -> None:
        self.statuses: dict[str, list[Status]] = {}

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        self.statuses.setdefault(step_id, []).append(status)

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        pass


def _project(tmp_path: Path, text: str) -> Path:
    (tmp_path / "tool.sh").write_text('echo "made by tool: $1"\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return recipe


async def _run_plan(
    tmp_path: Path, executor: Executor, store: ArtifactStore, text: str = RECIPE
) -> tuple[Status, Recorder]:
    plan = compile_recipe(_project(tmp_path, text))
    for shipped in plan.files:
        store.put_file(shipped.source)
    writer = LedgerWriter(tmp_path / "ledger.db")
    writer.submit(
        lambda led: led.create_run(
            "run1",
            recipe=plan.name,
            source="r.yaml",
            recipe_digest=plan.digest,
            params=dict(plan.params),
            steps=[(s.id, s.target, s.needs) for s in plan.steps],
        )
    )
    recorder = Recorder()

    async def executor_for(target: str) -> Executor:
        return executor

    reader = Ledger(tmp_path / "ledger.db")
    scheduler = Scheduler(
        plan,
        "run1",
        executor_for=executor_for,
        writer=writer,
        reader=reader,
        store=store,
        progress=recorder,
    )
    try:
        outcome = await scheduler.run()
    finally:
        writer.close()
        reader.close()
    return outcome.status, recorder


def test_files_are_shipped_and_outputs_fetched_across_stores(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, artifacts_dir=tmp_path / "agent-store")
    project_store = ArtifactStore(tmp_path / "project-store")

    async def scenario() -> None:
        async with running_agent(settings, token=TOKEN) as agent:
            endpoint = Endpoint("edge", f"127.0.0.1:{agent.port}", TOKEN)
            conn = await connect(endpoint, rpc_timeout=10)
            try:
                status, recorder = await _run_plan(tmp_path, conn, project_store)
                assert status == Status.SUCCEEDED
                for task_id in ("run1.make.1", "run1.use.1"):  # acked by the end of the run:
                    kept = await agent.events(task_id)  # the agent pruned all but the result
                    assert [e.HasField("result") for e in kept] == [True]
                assert recorder.statuses["use"] == [Status.RUNNING, Status.SUCCEEDED]
                shipped = compile_recipe(tmp_path / "r.yaml").files[0]
                assert await conn.missing([shipped.digest]) == []
                on_agent = ArtifactStore(tmp_path / "agent-store").path_of(shipped.digest)
                before = on_agent.stat().st_mtime_ns
                await conn.ship([shipped.digest], project_store)  # already there: nothing sent
                assert on_agent.stat().st_mtime_ns == before
            finally:
                await conn.close()

    run(scenario())
    ledger = Ledger(tmp_path / "ledger.db")
    outputs = {a["path"]: a["digest"] for a in ledger.artifacts("run1")}
    assert set(outputs) == {"made.txt", "twice.txt"}
    twice = project_store.path_of(outputs["twice.txt"]).read_text()
    assert twice == "made by tool: ship\n" * 2
    events = ledger.events("run1.use.1")
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    ledger.close()


def test_an_agent_without_run_task_or_batched_acks_gets_the_v1_calls(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, artifacts_dir=tmp_path / "agent-store")

    async def scenario() -> None:
        async with running_agent(settings, token=TOKEN) as agent:
            endpoint = Endpoint("edge", f"127.0.0.1:{agent.port}", TOKEN)
            conn = await connect(endpoint, rpc_timeout=10)
            try:
                assert conn.features == {"run-task", "ack-batch"}  # what this agent lists
                conn.features = frozenset()  # as the first v1 agents: neither
                store = ArtifactStore(tmp_path / "project-store")
                status, recorder = await _run_plan(tmp_path, conn, store)
                assert status == Status.SUCCEEDED
                assert recorder.statuses["use"] == [Status.RUNNING, Status.SUCCEEDED]
                for task_id in ("run1.make.1", "run1.use.1"):  # each acked on its own
                    kept = await agent.events(task_id)
                    assert [e.HasField("result") for e in kept] == [True]
            finally:
                await conn.close()

    run(scenario())


TRIGGERS = """\
name: triggers
steps:
  a: {run: exit 3}
  b: {run: 'true', needs: [a]}
  c: {run: 'true', needs: [b]}
  d: {run: 'true', needs: [a], trigger: all-done}
  e: {run: 'true', needs: [b], trigger: none-failed}
  f: {run: 'true', needs: [d, c]}
  g: {run: 'true', needs: [e, d], trigger: none-failed}
  h: {run: 'true'}
"""


def test_a_failure_closes_exactly_the_steps_its_trigger_rules_say(tmp_path: Path) -> None:
    async def scenario() -> tuple[Status, Recorder]:
        async with running_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            endpoint = Endpoint("edge", f"127.0.0.1:{agent.port}", TOKEN)
            conn = await connect(endpoint, rpc_timeout=10)
            try:
                return await _run_plan(tmp_path, conn, ArtifactStore(tmp_path / "s"), TRIGGERS)
            finally:
                await conn.close()

    status, recorder = run(scenario())
    assert status == Status.FAILED
    final = {step: statuses[-1] for step, statuses in recorder.statuses.items()}
    assert final == {
        "a": Status.FAILED,
        "b": Status.SKIPPED,  # after a failure
        "c": Status.SKIPPED,  # after a skip, transitively
        "d": Status.SUCCEEDED,  # all-done: runs once a is final, whatever it became
        "e": Status.SUCCEEDED,  # none-failed: a skipped need is not a failure
        "f": Status.SKIPPED,
        "g": Status.SUCCEEDED,
        "h": Status.SUCCEEDED,
    }
    ledger = Ledger(tmp_path / "ledger.db")
    assert {s["step_id"]: s["status"] for s in ledger.steps("run1")} == {
        k: v.value for k, v in final.items()
    }
    ledger.close()


def test_a_wrong_token_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            endpoint = Endpoint("edge", f"127.0.0.1:{agent.port}", "not-the-token")
            with pytest.raises(Unauthenticated) as error:
                await connect(endpoint, rpc_timeout=10)
            assert str(error.value) == "agent edge: missing or wrong token"

    run(scenario())


def test_a_cancelled_scheduler_kills_the_task_on_the_agent(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, artifacts_dir=tmp_path / "agent-store")
    (tmp_path / "r.yaml").write_text("name: c\nsteps:\n  slow:\n    run: echo up; sleep 300\n")

    async def scenario() -> None:
        async with running_agent(settings, token=TOKEN) as agent:
            conn = await connect(Endpoint("edge", f"127.0.0.1:{agent.port}", TOKEN), 10)
            plan = compile_recipe(tmp_path / "r.yaml")
            writer = LedgerWriter(tmp_path / "ledger.db")
            writer.submit(
                lambda led: led.create_run(
                    "run1",
                    recipe="c",
                    source="r.yaml",
                    recipe_digest=plan.digest,
                    params={},
                    steps=[("slow", "local", [])],
                )
            )
            recorder = Recorder()

            async def executor_for(target: str) -> Executor:
                return conn

            reader = Ledger(tmp_path / "ledger.db")
            scheduler = Scheduler(
                plan, "run1", executor_for=executor_for, writer=writer, reader=reader,
                store=ArtifactStore(tmp_path / "project-store"), progress=recorder,
            )  # fmt: skip
            driving = asyncio.create_task(scheduler.run())
            while True:  # the task exists once the scheduler has started it
                try:
                    await agent.wait_state("run1.slow.1", 3)  # RUNNING
                    break
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    await asyncio.sleep(0.02)
            scheduler.cancel("test cancels")
            outcome = await driving
            writer.close()
            reader.close()
            assert outcome.status == Status.CANCELLED
            assert outcome.steps["slow"].status == Status.CANCELLED
            result = await agent.result("run1.slow.1")
            assert result.state == 6  # CANCELLED
            assert "test cancels" in result.message
            await conn.close()

    run(scenario())

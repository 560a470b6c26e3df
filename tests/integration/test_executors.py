"""Placement among real agents: two in-process agents with mutual TLS from the project CA (one
slot each) and a matching inventory entry that accepts connections and never answers, all on
127.0.0.1 and all labelled role=edge."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mle_cli.executors import Executors
from mle_cli.ledger import Ledger, LedgerWriter
from mle_cli.recipe import compile_recipe, plan_to_json
from mle_cli.scheduler import Scheduler, SchedulerOptions
from mle_cli.settings import Settings
from mle_cli.states import Status
from mle_cli.targets.connection import AgentConnection
from mle_proto.store import ArtifactStore
from tests.agent_helpers import agent_settings, leak_check, run, running_agent
from tests.pki_helpers import issue_agent_tls

# A dial of the silent entry that held placement up would last rpc_timeout (60 s) per look:
# past this test timeout.
pytestmark = pytest.mark.timeout(45)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A port that accepts connections and never says anything."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@contextlib.asynccontextmanager
async def _fleet(tmp_path: Path) -> AsyncIterator[tuple[Settings, Executors]]:
    project = tmp_path / "project"
    (project / "targets").mkdir(parents=True)
    settings = Settings(project_dir=project, mdns_browse_seconds=0, rpc_timeout=60.0)
    with _silent_listener() as silent:
        async with contextlib.AsyncExitStack() as stack:
            lines = [f"- name: pi-dead\n  host: 127.0.0.1\n  agent: {{port: {silent}}}\n"]
            for name in ("pi-a", "pi-b"):
                tls = issue_agent_tls(settings, name, out_dir=tmp_path / name)
                agent = tls.apply(agent_settings(tmp_path / name, name=name, slots=1))
                running = await stack.enter_async_context(running_agent(agent))
                lines.append(
                    f"- name: {name}\n  host: 127.0.0.1\n  agent: {{port: {running.port}}}\n"
                )
            (project / "targets" / "edge.yaml").write_text(
                "group: edge\nlabels: {role: edge}\ntargets:\n"
                + "".join("  " + line.replace("\n  ", "\n    ") for line in lines)
            )
            writer = LedgerWriter(settings.ledger_path)
            executors = Executors(settings, writer)
            try:
                yield settings, executors
            finally:
                await executors.close()
                writer.close()


def test_a_busy_fleet_places_the_next_step_on_whichever_agent_frees_a_slot_first(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[str]:
        async with _fleet(tmp_path) as (_settings, executors):
            first = await executors.get("role=edge")  # while pi-dead is still being dialled
            assert isinstance(first, AgentConnection)
            async with first.slot():
                second = await executors.get("role=edge")
                assert isinstance(second, AgentConnection)
                async with second.slot():
                    third = asyncio.create_task(executors.get("role=edge"))
                    await asyncio.sleep(0.5)
                    waited = not third.done()  # both agents are busy: it waits
                # second's slot is free again: the third step goes there, not to the busy first
                placed = await asyncio.wait_for(third, 10)
            return [first.name, second.name, placed.name, str(waited)]

    first, second, third, waited = run(scenario())
    assert {first, second} == {"pi-a", "pi-b"}
    assert (third, waited) == (second, "True")


class _Progress:
    def __init__(self) -> None:
        self.retrying = asyncio.Event()

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        if status == Status.RETRYING:
            self.retrying.set()

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_step_whose_agents_do_not_answer_yet_is_retried_until_one_does(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "targets").mkdir(parents=True)
    settings = Settings(project_dir=project, mdns_browse_seconds=0, rpc_timeout=10.0)
    port = _free_port()
    (project / "targets" / "late.yaml").write_text(
        f"name: pi-late\nhost: 127.0.0.1\nlabels: {{role: edge}}\nagent: {{port: {port}}}\n"
    )
    recipe = project / "r.yaml"
    recipe.write_text(
        "name: late\nsteps:\n  work:\n    on: {labels: {role: edge}}\n"
        "    retries: {max: 5, backoff: 1s}\n    run: echo ran on $MLE_TARGET\n"
    )
    plan = compile_recipe(recipe)
    tls = issue_agent_tls(settings, "pi-late", out_dir=tmp_path / "tls")
    agent = tls.apply(agent_settings(tmp_path, name="pi-late", listen=f"127.0.0.1:{port}"))

    async def scenario() -> str:
        writer = LedgerWriter(settings.ledger_path)
        writer.submit(
            lambda led: led.create_run(
                "run1", recipe=plan.name, source=str(recipe), recipe_digest=plan.digest,
                params={}, steps=[(s.id, s.target, s.needs) for s in plan.steps],
                plan=plan_to_json(plan),
            )
        )  # fmt: skip
        reader = Ledger(settings.ledger_path)
        executors = Executors(settings, writer)
        progress = _Progress()
        scheduler = Scheduler(
            plan, "run1", executor_for=executors.get, writer=writer, reader=reader,
            store=ArtifactStore(tmp_path / "store"), progress=progress,
            options=SchedulerOptions(agent_grace=5.0, poll_interval=0.05),
        )  # fmt: skip
        try:
            running = asyncio.create_task(scheduler.run())
            await asyncio.wait_for(progress.retrying.wait(), 30)  # no agent answered the 1st try
            async with running_agent(agent):
                outcome = await asyncio.wait_for(running, 30)
                return str(outcome.steps["work"].status.value)
        finally:
            await executors.close()
            reader.close()
            writer.close()

    assert run(scenario()) == "succeeded"

"""The mle/deploy rollout across several agents (two `mle-agentd` daemons and one unreachable
target): batches, the failure threshold, and the rollback of what the rollout already changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from mle_cli.ledger import DeploymentRecord
from mle_cli.models._client import open_client
from mle_cli.models.deploy import ModelFile
from mle_cli.models.rollout import RolloutPlan, RolloutReport, roll_out
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint
from mle_proto.store import ArtifactStore
from tests.agent_helpers import daemon, run

pytestmark = pytest.mark.timeout(300)

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"
UNREACHABLE = Endpoint("bad", "127.0.0.1:1")  # nothing listens on port 1


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[dict[str, Endpoint]]:
    """Targets a and b (two daemons) and bad (no agent)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with (
        daemon(tmp_path / "a", "--listen", "127.0.0.1:0", "--name", "a") as a,
        daemon(tmp_path / "b", "--listen", "127.0.0.1:0", "--name", "b") as b,
    ):
        yield {
            "a": Endpoint("a", a.wait_ready()["address"]),
            "b": Endpoint("b", b.wait_ready()["address"]),
            "bad": UNREACHABLE,
        }


class Rollouts:
    """Rolls fixture models out to the test's targets; keeps every ledger record."""

    def __init__(self, tmp_path: Path, endpoints: dict[str, Endpoint]) -> None:
        self.settings = Settings(project_dir=tmp_path, rpc_timeout=10.0)
        self.store = ArtifactStore(tmp_path / "store")
        self.endpoints = endpoints
        self.records: list[DeploymentRecord] = []

    def roll_out(
        self,
        filename: str,
        targets: str,
        stop: Callable[[], bool] = lambda: False,
        **fields: object,
    ) -> RolloutReport:
        digest, size = self.store.put_file(MODELS / filename)
        plan = RolloutPlan(
            name="digits",
            targets=tuple(targets.split()),
            model=ModelFile(digest, size, filename, "run-1", "export"),
            **fields,  # type: ignore[arg-type]
        )
        report: RolloutReport = run(
            roll_out(
                self.settings,
                self.store,
                plan,
                self.records.append,
                stop,
                resolve=self.endpoints.__getitem__,
            ),
            timeout=240,
        )
        return report

    def actions(self) -> list[tuple[str, str, int | None]]:
        return [(r.action, r.target, r.version) for r in self.records]

    def route(self, target: str) -> list[tuple[int, float]]:
        """The split the target serves digits with ([] when it does not serve it)."""

        async def ask() -> list[tuple[int, float]]:
            async with open_client(self.endpoints[target], 10.0) as client:
                found = [m for m in await client.models() if m.name == "digits"]
            return [(w.version, w.percent) for m in found for w in m.route.split]

        result: list[tuple[int, float]] = run(ask())
        return result


def test_a_failure_past_the_threshold_rolls_back_and_stops(
    tmp_path: Path, agents: dict[str, Endpoint]
) -> None:
    rollouts = Rollouts(tmp_path, agents)
    first = rollouts.roll_out("digits_fp32.onnx", "a b", batch=2)
    assert first.ok, first.message
    assert first.message == "deployed digits to a (v1), b (v1)"
    assert first.metrics["versions"] == {"a": 1, "b": 1}

    rollouts.records.clear()
    second = rollouts.roll_out("digits_int8.onnx", "a bad b", batch=1)
    assert not second.ok
    assert second.message.startswith("rollout of digits stopped: 1 of 3 targets failed (bad: "), (
        second.message
    )
    assert second.message.endswith("); rolled back: a; not attempted: b"), second.message
    assert rollouts.actions() == [("deploy", "a", 2), ("rollback", "a", 1)]
    assert rollouts.records[0].source_run == "run-1"
    assert rollouts.records[0].source_step == "export"
    assert (second.metrics["deployed"], second.metrics["rolled_back"]) == (0, ["a"])
    assert rollouts.route("a") == [(1, 100.0)]
    assert rollouts.route("b") == [(1, 100.0)]


def test_failures_within_the_threshold_let_the_rollout_go_on(
    tmp_path: Path, agents: dict[str, Endpoint]
) -> None:
    rollouts = Rollouts(tmp_path, agents)
    smoke = tmp_path / "smoke.npz"
    smoke.write_bytes((MODELS / "digits_test.npz").read_bytes())
    report = rollouts.roll_out(
        "digits_int8.onnx",
        "a bad b",
        batch=2,
        max_failures=1,
        canary=25.0,
        smoke=smoke,
        smoke_min_accuracy=0.9,
    )
    assert report.ok, report.message
    assert report.metrics["targets"] == ["a", "b"]
    assert list(report.metrics["failed"]) == ["bad"]
    assert all(report.metrics["smoke_accuracy"][t] >= 0.9 for t in ("a", "b"))
    assert "; failed within max_failures=1: bad: " in report.message
    assert rollouts.actions() == [("deploy", "a", 1), ("deploy", "b", 1)]
    # A first version takes all the traffic whatever the canary says: there is nothing to split.
    assert rollouts.route("a") == rollouts.route("b") == [(1, 100.0)]

    failing = rollouts.roll_out(
        "digits_h64_fp32.onnx", "a b", batch=2, smoke=smoke, smoke_min_accuracy=1.01
    )
    assert not failing.ok
    assert failing.message.startswith("rollout of digits stopped: 2 of 2 targets failed (a: ")
    assert failing.message.endswith("; rolled back: a, b"), failing.message
    # Both targets of the batch deployed at once, then both were rolled back.
    assert sorted(rollouts.actions()[2:]) == [
        ("deploy", "a", 2),
        ("deploy", "b", 2),
        ("rollback", "a", 1),
        ("rollback", "b", 1),
    ]
    assert rollouts.route("a") == rollouts.route("b") == [(1, 100.0)]


def test_a_rollback_restores_the_route_of_a_version_the_rollout_only_rerouted(
    tmp_path: Path, agents: dict[str, Endpoint]
) -> None:
    # The agent holds the file already (v1), so the deploy creates nothing but moves the traffic
    # back to v1: the rollback must move it to v2 again.
    rollouts = Rollouts(tmp_path, agents)
    assert rollouts.roll_out("digits_fp32.onnx", "a").ok
    assert rollouts.roll_out("digits_int8.onnx", "a").ok
    assert rollouts.route("a") == [(2, 100.0)]

    rollouts.records.clear()
    report = rollouts.roll_out("digits_fp32.onnx", "a bad", batch=1)
    assert not report.ok
    assert report.message.endswith("; rolled back: a"), report.message
    assert rollouts.actions() == [("deploy", "a", 1), ("rollback", "a", 2)]
    assert rollouts.route("a") == [(2, 100.0)]


def test_a_target_already_serving_the_file_is_left_alone_by_a_rollback(
    tmp_path: Path, agents: dict[str, Endpoint]
) -> None:
    rollouts = Rollouts(tmp_path, agents)
    assert rollouts.roll_out("digits_fp32.onnx", "a").ok
    rollouts.records.clear()
    report = rollouts.roll_out("digits_fp32.onnx", "a bad", batch=1)
    assert not report.ok
    assert report.message.endswith("; rolled back: none"), report.message
    assert rollouts.actions() == [("deploy", "a", 1)]
    assert rollouts.route("a") == [(1, 100.0)]


def test_a_cancel_during_the_smoke_test_stops_it_and_rolls_back(
    tmp_path: Path, agents: dict[str, Endpoint]
) -> None:
    # Cancelled once the model is deployed, so the smoke test (minutes with a big file on a slow
    # model) must give up at its next request, and the one batch must not end as a success.
    rollouts = Rollouts(tmp_path, agents)
    smoke = tmp_path / "smoke.npz"
    smoke.write_bytes((MODELS / "digits_test.npz").read_bytes())
    report = rollouts.roll_out(
        "digits_fp32.onnx", "a", stop=lambda: bool(rollouts.records), smoke=smoke
    )
    assert not report.ok
    assert report.message.startswith("rollout of digits stopped: the run was cancelled; ")
    assert report.message.endswith("; rolled back: a"), report.message
    assert report.metrics["failed"] == {"a": "digits v1 on a: smoke test cancelled"}
    assert rollouts.actions() == [("deploy", "a", 1), ("undeploy", "a", None)]
    assert rollouts.route("a") == []

"""Deploys and restarts at their edges: redeploying a file that is already a version, the first
deploy of a model, a restart that restores in the background and checks each file first, and
the bounded rollback history."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from mle_agent.serving.dispatch import plan_request  # noqa: E402
from mle_agent.serving.loadcheck import FAULT_ENV, RELEASE_ENV  # noqa: E402
from mle_agent.serving.loaded import LoadedVersion  # noqa: E402
from mle_agent.serving.registry import InferRequest, ModelRegistry  # noqa: E402
from mle_agent.serving.repository import HISTORY_LIMIT  # noqa: E402
from mle_agent.serving.state import ModelState  # noqa: E402
from mle_proto.errors import AlreadyExists, FailedPrecondition, MleError  # noqa: E402
from mle_proto.store import ArtifactStore  # noqa: E402
from mle_proto.v1 import agent_pb2 as pb  # noqa: E402
from tests.agent_helpers import leak_check  # noqa: E402
from tests.integration._serving import (  # noqa: E402
    FP32,
    INT8,
    deploy,
    digit_rows,
    infer,
    model_status,
    open_registry,
    registry_settings,
    rollback,
    route,
    split,
    version_of,
)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def shares(status: pb.ModelStatus) -> list[tuple[int, float]]:
    """The route's split as (version, percent) pairs."""
    return [(w.version, w.percent) for w in status.route.split]


def test_redeploying_a_version_the_route_does_not_use_routes_to_it_as_asked(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    deploy(registry, INT8)
    canary = deploy(registry, FP32, canary_percent=20)
    assert (canary.version, canary.created) == (1, False)
    assert shares(canary.model) == [(2, 80.0), (1, 20.0)]
    served = {infer(registry, x[:1], request_id=f"id-{i}").version for i in range(200)}
    assert served == {1, 2}

    again = deploy(registry, FP32, canary_percent=20)  # already serving as asked: no change
    assert (again.version, again.created, shares(again.model)) == (1, False, [(2, 80.0), (1, 20.0)])
    assert shares(rollback(registry)) == [(2, 100.0)]  # the no-op added no route to roll back

    full = deploy(registry, FP32)
    assert (full.version, full.created, shares(full.model)) == (1, False, [(1, 100.0)])
    assert infer(registry, x[:2]).version == 1


def test_the_same_file_with_other_batching_is_a_new_version(registry: ModelRegistry) -> None:
    deploy(registry, FP32)
    batching = pb.Batching(max_batch_size=8, max_queue_delay_seconds=0.005)
    batched = deploy(registry, FP32, batching=batching)
    assert (batched.version, batched.created, shares(batched.model)) == (2, True, [(2, 100.0)])
    assert version_of(batched.model, 2).batching.max_batch_size == 8
    assert deploy(registry, FP32, batching=batching).created is False
    with pytest.raises(AlreadyExists, match="version 1 already exists with other batching"):
        deploy(registry, FP32, version=1, batching=batching)
    # Batching of 0 or 1 is no batching, whatever the delay says.
    plain = deploy(
        registry, FP32, batching=pb.Batching(max_batch_size=1, max_queue_delay_seconds=1)
    )
    assert (plain.version, plain.created, shares(plain.model)) == (1, False, [(1, 100.0)])


def test_a_new_version_above_the_highest_a_version_can_be_is_refused(
    registry: ModelRegistry,
) -> None:
    top = 2**32 - 1  # versions travel as uint32
    assert deploy(registry, FP32, version=top).version == top
    with pytest.raises(FailedPrecondition, match=f"version {top} is the highest there can be"):
        deploy(registry, INT8)  # the next one would be 2**32
    # Nothing was recorded: the model still lists, served by the version it had.
    assert [v.version for v in model_status(registry).versions] == [top]
    assert shares(model_status(registry)) == [(top, 100.0)]
    assert deploy(registry, INT8, version=7).version == 7


def test_redeploying_after_a_crash_mid_deploy_serves_the_version(tmp_path: Path) -> None:
    x, _ = digit_rows()
    settings = registry_settings(tmp_path)
    with open_registry(settings) as first:
        deploy(first, FP32)
    # A crash between writing the version and switching to it leaves a version with no route.
    (settings.models_root / "digits" / "route.json").unlink()
    with open_registry(settings) as second:
        assert version_of(model_status(second), 1).state == pb.VERSION_STATE_AVAILABLE
        with pytest.raises(FailedPrecondition, match="model digits has no route"):
            infer(second, x[:1])
        again = deploy(second, FP32)
        assert (again.version, again.created, shares(again.model)) == (1, False, [(1, 100.0)])
        assert version_of(again.model, 1).state == pb.VERSION_STATE_READY
        assert infer(second, x[:1]).version == 1


class _Watching(ModelRegistry):
    """Records what a request would meet at the moment a version starts loading."""

    seen: list[Any]

    def load(self, model: ModelState, version: int) -> LoadedVersion:
        state = version_of(self.status(model.name)[0], version).state
        try:
            plan = plan_request(model, InferRequest(model.name, {}))
        except MleError as exc:
            self.seen.append((state, exc))
        else:
            self.seen.append((state, plan))
        return super().load(model, version)


def test_a_first_deploy_is_loading_the_moment_the_model_appears(tmp_path: Path) -> None:
    settings = registry_settings(tmp_path)
    registry = _Watching(settings, ArtifactStore(settings.artifacts_root))
    registry.seen = []
    try:
        registry.start()
        deploy(registry, FP32)
    finally:
        registry.close()
    # A request arriving then waits for the version (no plan yet) instead of "no route".
    assert registry.seen == [(pb.VERSION_STATE_LOADING, None)]


def test_the_rollback_history_keeps_as_many_routes_in_memory_as_on_disk(
    registry: ModelRegistry,
) -> None:
    deploy(registry, FP32)
    deploy(registry, INT8)
    for index in range(HISTORY_LIMIT + 5):
        route(registry, split=split((1 + index % 2, 100)))
    for _ in range(HISTORY_LIMIT):
        rollback(registry)
    with pytest.raises(FailedPrecondition, match="no previous route to roll back to"):
        rollback(registry)


def test_a_restart_checks_each_file_in_a_child_before_loading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = registry_settings(tmp_path)
    with open_registry(settings) as first:
        deploy(first, FP32)
    # A file that now crashes its runtime: the check in a child process must meet it first.
    monkeypatch.setenv(FAULT_ENV, "loadcheck-crash")
    with open_registry(settings) as second:
        v1 = version_of(model_status(second), 1)
        assert (v1.state, v1.message) == (
            pb.VERSION_STATE_FAILED,
            f"{FP32} crashed the onnxruntime runtime while loading (SIGABRT)",
        )
        assert not second.ready()


def test_a_background_restore_answers_at_once_and_serves_once_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, _ = digit_rows()
    settings = registry_settings(tmp_path)
    with open_registry(settings) as first:
        deploy(first, FP32)
        deploy(first, INT8, canary_percent=30)
        before = model_status(first)
    release = tmp_path / "release"
    monkeypatch.setenv(FAULT_ENV, "loadcheck-sleep")
    monkeypatch.setenv(RELEASE_ENV, str(release))
    registry = ModelRegistry(settings, ArtifactStore(settings.artifacts_root))
    try:
        registry.start_background()  # returns while the check of the first version is held
        status = model_status(registry)
        assert status.route == before.route
        assert {v.state for v in status.versions} == {pb.VERSION_STATE_LOADING}
        assert not registry.ready() and not registry.ready("digits")
        release.touch()
        deadline = time.monotonic() + 60
        while not registry.ready():
            assert time.monotonic() < deadline, model_status(registry)
            time.sleep(0.02)
        assert infer(registry, x[:1], request_id="a").version in (1, 2)
    finally:
        release.touch()
        registry.close()

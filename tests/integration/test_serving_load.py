"""The serving core under concurrent load: dynamic batching, hot swap, unload-first, metrics."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mle_agent.serving.registry import ModelRegistry  # noqa: E402
from mle_agent.serving.stats import render_metrics  # noqa: E402
from mle_proto.errors import InvalidInput  # noqa: E402
from mle_proto.v1 import agent_pb2 as pb  # noqa: E402
from tests.agent_helpers import leak_check  # noqa: E402
from tests.integration._serving import (  # noqa: E402
    FP32,
    H64,
    INT8,
    deploy,
    digit_rows,
    infer,
    model_status,
    other_signature_model,
    reference,
    rollback,
    route,
    split,
    version_of,
)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@dataclass
class Load:
    """Threads calling infer in a loop; every answer and error recorded with its timing."""

    registry: ModelRegistry
    threads: int = 8
    results: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, version
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        x, _ = digit_rows()
        for index in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(x, index), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def more(self, n: int, timeout: float = 30.0) -> None:
        """Wait until n more requests were answered (or one failed)."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target and not self.errors:
            assert time.monotonic() < deadline, f"load stalled at {self.count()} answers"
            time.sleep(0.005)

    def _loop(self, x: Any, index: int) -> None:
        row = index
        while not self._stop.is_set():
            row = (row + self.threads) % len(x)
            started = time.monotonic()
            try:
                result = infer(self.registry, x[row : row + 1], request_id=uuid.uuid4().hex)
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)
                return
            with self._lock:
                self.results.append((started, time.monotonic(), result.version))


def test_concurrent_requests_are_batched_and_answer_like_unbatched_calls(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    batching = pb.Batching(max_batch_size=16, max_queue_delay_seconds=0.02)
    deploy(registry, FP32, batching=batching)
    threads, per_thread = 8, 20
    answers: dict[int, Any] = {}
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            for step in range(per_thread):
                row = index * per_thread + step
                answers[row] = infer(registry, x[row : row + 1]).outputs["probabilities"]
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors, errors
    rows = threads * per_thread
    got = np.concatenate([answers[row] for row in range(rows)])
    np.testing.assert_allclose(got, reference(FP32, x[:rows]), rtol=1e-5, atol=1e-7)
    stats = version_of(model_status(registry), 1).stats
    assert stats.requests == rows
    assert stats.batches < stats.requests
    # Requests of several rows are batched too, and each gets its own rows back.
    many = infer(registry, x[:5]).outputs["probabilities"]
    np.testing.assert_allclose(many, reference(FP32, x[:5]), rtol=1e-5, atol=1e-7)


def test_batching_needs_a_dynamic_first_dimension(registry: ModelRegistry, tmp_path: Path) -> None:
    fixed = other_signature_model(tmp_path / "fixed.onnx", rows=1, width=64)
    digest, _ = registry.store.put_file(fixed)
    request = pb.DeployRequest(
        name="fixed", digest=digest, filename="fixed.onnx", batching=pb.Batching(max_batch_size=8)
    )
    with pytest.raises(InvalidInput, match=r"dynamic first dimension; input 'input' has shape \[1"):
        registry.deploy(request)
    assert registry.status() == []


def test_hot_swap_under_load_fails_nothing_and_names_live_versions(
    registry: ModelRegistry,
) -> None:
    deploy(registry, FP32)
    changes: list[tuple[float, float, frozenset[int]]] = [(-math.inf, -math.inf, frozenset({1}))]

    def change(action: Callable[[], pb.ModelStatus | pb.DeployResponse]) -> None:
        started = time.monotonic()
        outcome = action()
        status = outcome.model if isinstance(outcome, pb.DeployResponse) else outcome
        routed = {w.version for w in status.route.split} | set(status.route.members)
        changes.append((started, time.monotonic(), frozenset(routed)))

    with Load(registry) as load:
        load.more(50)
        steps: list[Callable[[], pb.ModelStatus | pb.DeployResponse]] = [
            lambda: deploy(registry, INT8, canary_percent=30),
            lambda: route(registry, split=split((2, 100))),
            lambda: rollback(registry),
            lambda: deploy(registry, H64),
            lambda: rollback(registry),
            lambda: route(registry, split=split((1, 50), (3, 50))),
            lambda: route(registry, split=split((3, 100))),
            lambda: rollback(registry),
        ]
        for step in steps:
            change(step)
            load.more(50)
    assert not load.errors, load.errors[:3]
    for started, ended, version in load.results:
        assert _was_live(version, started, ended, changes), (version, started, ended)
    assert {v for _, _, v in load.results} == {1, 2, 3}


def _was_live(
    version: int, started: float, ended: float, changes: list[tuple[float, float, frozenset[int]]]
) -> bool:
    """Whether a route holding `version` was live at some instant of [started, ended].

    Route i became current during call i ([s_i, e_i]) and stopped being current during call
    i+1, so it was live somewhere inside [s_i, e_{i+1}].
    """
    for index, (s_i, _, versions) in enumerate(changes):
        until = changes[index + 1][1] if index + 1 < len(changes) else math.inf
        if version in versions and s_i <= ended and until >= started:
            return True
    return False


def test_an_unload_first_swap_makes_requests_wait_instead_of_failing(
    registry: ModelRegistry,
) -> None:
    deploy(registry, FP32)
    with Load(registry, threads=4) as load:
        load.more(30)
        swapped = deploy(registry, INT8, swap=pb.SWAP_MODE_UNLOAD_FIRST)
        load.more(30)
    assert not load.errors, load.errors[:3]
    assert {v for _, _, v in load.results} <= {1, 2}
    assert load.results[-1][2] == 2
    states = {v.version: v.state for v in model_status(registry).versions}
    assert states == {1: pb.VERSION_STATE_AVAILABLE, 2: pb.VERSION_STATE_READY}  # none kept
    assert version_of(swapped.model, 2).state == pb.VERSION_STATE_READY


def test_metrics_expose_every_version_in_prometheus_text(registry: ModelRegistry) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    deploy(registry, INT8, canary_percent=50)
    served = [infer(registry, x[:2], request_id=str(i)).version for i in range(40)]
    body, content_type = render_metrics(registry)
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, s.labels.get("version", ""), s.labels.get("le", "")): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    for version in (1, 2):
        count = float(served.count(version))
        key = str(version)
        assert samples[("mle_model_requests_total", key, "")] == count
        assert samples[("mle_model_request_duration_seconds_count", key, "")] == count
        assert samples[("mle_model_request_duration_seconds_bucket", key, "+Inf")] == count
        assert samples[("mle_model_batch_size_count", key, "")] == count
        assert samples[("mle_model_errors_total", key, "")] == 0
        assert samples[("mle_model_ready", key, "")] == 1
    assert samples[("mle_agent_memory_total_bytes", "", "")] > 0
    assert samples[("mle_agent_memory_used_bytes", "", "")] > 0
    assert 0 <= samples[("mle_agent_cpu_percent", "", "")] <= 100

"""The built-in steps through `mle run` on the local agent: mle/quantize and mle/benchmark run the
agent's model tools, mle/deploy ships the result with a smoke test, and a failing smoke test rolls
the deployment back. Everything is asserted from the ledger and from what the agent serves."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, Project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

MODELS = REPO / "tests/fixtures/models"
RUN_TIMEOUT = 240

EDGE = """\
name: edge
params: {min_accuracy: 0.9}
files: [digits_test.npz, fixture.onnx]
steps:
  export:
    run: cp fixture.onnx model.onnx
    outputs: [model.onnx]
  quantize:
    needs: [export]
    uses: mle/quantize
    with: {model: model.onnx, eval: digits_test.npz}
  bench:
    needs: [export, quantize]
    uses: mle/benchmark
    with:
      models: [model.onnx, "{{ steps.quantize.outputs[0] }}"]
      eval: digits_test.npz
      seconds: 0.3
      pick: p95<=1000ms
  deploy:
    needs: [quantize, bench]
    when: steps.quantize.metrics.accuracy_after >= params.min_accuracy
    uses: mle/deploy
    on: local
    each: true
    with: {model: model.int8.onnx, name: digits, smoke: digits_test.npz, smoke_min_accuracy: 0.9}
"""

SHIP = """\
name: ship
params: {source: fp32.onnx, min_smoke: 0.9, ship: true}
files: [digits_test.npz, fp32.onnx, h64.onnx]
steps:
  export:
    run: cp {{ params.source }} model.onnx
    outputs: [model.onnx]
  gate:
    needs: [export]
    when: params.ship
    uses: mle/approve
    with: {auto: true}
  deploy:
    needs: [gate]
    uses: mle/deploy
    each: true
    with:
      model: model.onnx
      name: digits
      smoke: digits_test.npz
      smoke_min_accuracy: "{{ params.min_smoke }}"
"""


def _project_with(project: Project, recipe: str, text: str) -> None:
    (project.root / recipe).write_text(text)
    shutil.copy(MODELS / "digits_test.npz", project.root / "digits_test.npz")
    shutil.copy(MODELS / "digits_fp32.onnx", project.root / "fixture.onnx")
    shutil.copy(MODELS / "digits_fp32.onnx", project.root / "fp32.onnx")
    shutil.copy(MODELS / "digits_h64_fp32.onnx", project.root / "h64.onnx")


def _run(project: Project, recipe: str, *params: str) -> tuple[int, str, str]:
    args = [arg for p in params for arg in ("-p", p)]
    proc = project.mle("run", recipe, *args, timeout=RUN_TIMEOUT)
    assert "Traceback" not in proc.stderr, proc.stderr
    (run,) = project.rows("SELECT id FROM runs ORDER BY created DESC LIMIT 1")
    return proc.returncode, run["id"], proc.stderr


def _metrics(project: Project, run_id: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for row in project.rows("SELECT step_id, name, text FROM metrics WHERE run_id = ?", run_id):
        found.setdefault(row["step_id"], {})[row["name"]] = json.loads(row["text"])
    return found


def _steps(project: Project, run_id: str) -> dict[str, dict[str, Any]]:
    rows = project.rows("SELECT step_id, status, message FROM steps WHERE run_id = ?", run_id)
    return {r["step_id"]: r for r in rows}


def _served(project: Project) -> list[dict[str, Any]]:
    proc = project.mle("models", "--target", "local", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _predicted_version(project: Project) -> int:
    with np.load(MODELS / "digits_test.npz") as data:
        np.save(project.root / "rows.npy", np.asarray(data["X"][:4], dtype=np.float32))
    proc = project.mle("predict", "digits", "-t", "local", "--input", "rows.npy", "--json")
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)["version"])


def test_quantize_benchmark_and_deploy_with_a_smoke_test(project: Project) -> None:
    _project_with(project, "edge.yaml", EDGE)
    plan = project.mle("plan", "edge.yaml")
    assert plan.returncode == 0, plan.stderr
    assert '"$MLE_PYTHON" -m mle_agent.tools.quantize model.onnx --mode int8-dynamic' in plan.stdout

    code, run_id, stderr = _run(project, "edge.yaml")
    assert code == 0, stderr
    steps = _steps(project, run_id)
    assert {s["status"] for s in steps.values()} == {"succeeded"}, steps
    found = _metrics(project, run_id)

    quantized = found["quantize"]
    assert quantized["accuracy_after"] >= 0.9
    assert abs(quantized["accuracy_after"] - quantized["accuracy_before"]) <= 0.01
    assert quantized["size_after"] * 2.5 <= quantized["size_before"]
    bench = found["bench"]
    assert [v["file"] for v in bench["variants"]] == ["model.onnx", "model.int8.onnx"]
    assert all(v["p95_ms"] > 0 for v in bench["variants"]), bench
    assert bench["picked"] in ("model.onnx", "model.int8.onnx")

    deployed = found["deploy"]
    assert (deployed["model"], deployed["deployed"], deployed["targets"]) == (
        "digits",
        1,
        ["local"],
    )
    assert deployed["versions"] == {"local": 1}
    assert deployed["smoke_accuracy"]["local"] >= 0.9
    assert re.fullmatch(
        r"deployed digits to local \(v1, smoke accuracy 0\.\d{3}\)", steps["deploy"]["message"]
    ), steps["deploy"]["message"]

    (row,) = project.rows("SELECT * FROM deployments")
    (int8,) = project.rows(
        "SELECT digest FROM artifacts WHERE run_id = ? AND step_id = 'quantize' "
        "AND path = 'model.int8.onnx'",
        run_id,
    )
    assert (row["action"], row["model"], row["target"], row["version"]) == (
        "deploy",
        "digits",
        "local",
        1,
    )
    assert (row["source_run"], row["source_step"]) == (run_id, "quantize")
    assert (row["digest"], row["filename"]) == (int8["digest"], "model.int8.onnx")
    assert _predicted_version(project) == 1


def test_a_failing_smoke_test_rolls_back_to_the_version_served_before(project: Project) -> None:
    _project_with(project, "ship.yaml", SHIP)
    code, first, stderr = _run(project, "ship.yaml")
    assert code == 0, stderr

    code, second, stderr = _run(project, "ship.yaml", "source=h64.onnx", "min_smoke=1.01")
    assert code == 10
    failed = (
        re.escape("rollout of digits stopped: 1 of 1 target failed (local: smoke accuracy ")
        + r"0\.\d{3} < 1\.01\); rolled back: local"
    )
    assert re.search(failed, stderr), stderr
    deploy = _steps(project, second)["deploy"]
    assert deploy["status"] == "failed"
    assert re.fullmatch(failed, deploy["message"]), deploy["message"]
    found = _metrics(project, second)["deploy"]
    assert (found["deployed"], found["targets"], found["rolled_back"]) == (0, [], ["local"])
    assert found["versions"] == {"local": 2}
    assert list(found["failed"]) == ["local"]

    rows = project.rows("SELECT * FROM deployments ORDER BY id")
    assert [(r["action"], r["version"]) for r in rows] == [
        ("deploy", 1),
        ("deploy", 2),
        ("rollback", 1),
    ]
    assert [(r["source_run"], r["source_step"]) for r in rows[:2]] == [
        (first, "export"),
        (second, "export"),
    ]
    assert json.loads(rows[2]["route"])["split"] == [{"version": 1, "percent": 100.0}]
    (model,) = _served(project)
    assert model["route"]["split"] == [{"version": 1, "percent": 100.0}]
    assert _predicted_version(project) == 1


def test_a_false_gate_skips_the_deploy_and_a_first_failed_deploy_is_undeployed(
    project: Project,
) -> None:
    _project_with(project, "ship.yaml", SHIP)
    code, skipped, stderr = _run(project, "ship.yaml", "ship=false")
    assert code == 0, stderr
    steps = _steps(project, skipped)
    assert (steps["gate"]["status"], steps["deploy"]["status"]) == ("skipped", "skipped")
    assert steps["deploy"]["message"] == "needs gate, which skipped"
    (run,) = project.rows("SELECT status FROM runs WHERE id = ?", skipped)
    assert run["status"] == "succeeded"
    assert project.rows("SELECT * FROM deployments") == []

    code, failed, stderr = _run(project, "ship.yaml", "min_smoke=1.01")
    assert code == 10, stderr
    message = _steps(project, failed)["deploy"]["message"]
    assert message.endswith("; rolled back: local"), message
    rows = project.rows("SELECT action, version, source_step FROM deployments ORDER BY id")
    assert [(r["action"], r["version"]) for r in rows] == [("deploy", 1), ("undeploy", None)]
    assert _served(project) == []

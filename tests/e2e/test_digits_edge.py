"""recipes/digits-edge.yaml end to end on the local agent, asserted from the ledger: training over
a matrix, the pick, int8 quantization, evaluation, the accuracy gate, approval, deployment with a
smoke test, a prediction from the deployed version, and its lineage."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mle_proto.store import ArtifactStore
from tests.conftest import Project

pytestmark = pytest.mark.e2e

RECIPE = "recipes/digits-edge.yaml"
CHILDREN = ("train[hidden=16]", "train[hidden=32]", "train[hidden=64]")
RUN_TIMEOUT = 300  # three trainings, a quantization and a deploy on a shared 2-core machine


def metrics(project: Project, run_id: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for row in project.rows("SELECT step_id, name, text FROM metrics WHERE run_id = ?", run_id):
        found.setdefault(row["step_id"], {})[row["name"]] = json.loads(row["text"])
    return found


def statuses(project: Project, run_id: str) -> dict[str, str]:
    rows = project.rows("SELECT step_id, status FROM steps WHERE run_id = ?", run_id)
    return {r["step_id"]: r["status"] for r in rows}


def ok(project: Project, *args: str) -> str:
    proc = project.mle(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_digits_edge_trains_quantizes_gates_and_deploys_with_lineage(project: Project) -> None:
    ok(project, "plan", RECIPE)
    proc = project.mle("run", RECIPE, "-p", "auto_approve=true", timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    (run,) = project.rows("SELECT id, status FROM runs")
    run_id = run["id"]
    assert run["status"] == "succeeded"
    assert set(statuses(project, run_id).values()) == {"succeeded"}
    found = metrics(project, run_id)

    # Each matrix child trained its hidden size; pick chose the most accurate one.
    for child in CHILDREN:
        hidden = int(re.sub(r"\D", "", child))
        assert found[child]["hidden"] == hidden
        assert 0.85 <= found[child]["accuracy"] <= 1.0
    best = max(CHILDREN, key=lambda c: found[c]["accuracy"])
    assert found["pick"]["selected"] == best
    assert found["pick"]["accuracy"] == found[best]["accuracy"]

    # int8 is within one point of fp32 on the test split, and at least 2.5x smaller.
    quantized = found["quantize"]
    assert abs(quantized["accuracy_after"] - quantized["accuracy_before"]) <= 0.01
    assert quantized["ratio"] >= 2.5, quantized
    evaluated = found["evaluate"]
    assert evaluated["test_rows"] == 450
    assert abs(evaluated["accuracy_fp32"] - evaluated["accuracy_int8"]) <= 0.01
    assert evaluated["accuracy_int8"] >= 0.9
    assert evaluated["size_ratio"] >= 2.5

    # One deployment, of quantize's file, traced back to this run.
    (row,) = project.rows("SELECT * FROM deployments")
    (int8,) = project.rows(
        "SELECT digest FROM artifacts WHERE run_id = ? AND step_id = 'quantize' "
        "AND path = 'model.int8.onnx'",
        run_id,
    )
    assert (row["model"], row["target"], row["action"]) == ("digits", "local", "deploy")
    assert (row["source_run"], row["source_step"]) == (run_id, "quantize")
    assert row["digest"] == int8["digest"]
    version = row["version"]

    # The deployed version answers, with the test rows' labels.
    with np.load(prepared_test_split(project, run_id)) as data:
        x, y = data["X"][:8], data["y"][:8]
    (project.root / "rows.json").write_text(json.dumps({"input": x.tolist()}))
    answer = json.loads(
        ok(project, "predict", "digits", "--target", "local", "--input", "rows.json", "--json")
    )
    assert answer["version"] == version
    predicted = np.asarray(answer["outputs"]["probabilities"]).argmax(axis=1)
    assert (predicted == y).mean() >= 0.75

    # Lineage: the run, the step that made the file, and the child pick chose.
    lineage = json.loads(ok(project, "models", "--lineage", f"digits@{version}", "--json"))
    assert lineage["source"] == {"run": run_id, "step": "quantize"}
    assert lineage["run"]["params"]["auto_approve"] is True
    chain = [s["step"] for s in lineage["steps"]]
    assert chain == ["prepare", best, "pick", "quantize"]
    assert lineage["placements"][0]["state"] == "serving 100%"
    text = ok(project, "models", "--lineage", f"digits@{version}", "--target", "local")
    assert f"made by run {run_id}, step quantize" in text
    assert f"picked {best} among" in text

    # mle show lists the model the run deployed.
    project.env["COLUMNS"] = "200"
    shown = ok(project, "show", run_id)
    assert "models (deployments of files this run produced):" in shown
    assert re.search(rf"digits\s+{version}\s+local\s+deploy\s+quantize\s+model\.int8\.onnx", shown)
    detail = json.loads(ok(project, "show", run_id, "--json"))
    assert [(m["model"], m["version"], m["now"]) for m in detail["models"]] == [
        ("digits", version, "serving 100%")
    ]


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_a_false_accuracy_gate_skips_the_deploy_without_failing_the_run(project: Project) -> None:
    # No auto_approve: the gate is false, so the approval is never asked for.
    proc = project.mle("run", RECIPE, "-p", "min_accuracy=1.01", timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    (run,) = project.rows("SELECT id, status FROM runs")
    assert run["status"] == "succeeded"
    found = statuses(project, run["id"])
    assert (found["approve"], found["deploy"]) == ("skipped", "skipped")
    assert found["evaluate"] == "succeeded"
    assert project.rows("SELECT * FROM deployments") == []
    gone = project.mle("models", "--lineage", "digits@1")
    assert gone.returncode != 0
    assert gone.stderr.strip().splitlines()[0] == (
        "error: digits was never deployed (the ledger has no deployment of it)"
    )


def prepared_test_split(project: Project, run_id: str) -> Path:
    """Where the project's store keeps the test split the run prepared."""
    (row,) = project.rows(
        "SELECT digest FROM artifacts WHERE run_id = ? AND step_id = 'prepare' "
        "AND path = 'test.npz'",
        run_id,
    )
    return ArtifactStore(project.root / ".mle" / "artifacts").path_of(row["digest"])

"""`mle deploy`, `mle models`, `mle predict` as a user runs them, against the local agent; the
ledger read afterwards. Answers are compared with onnxruntime run in this process."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, Project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

MODELS = REPO / "tests/fixtures/models"
FP32 = MODELS / "digits_fp32.onnx"
INT8 = MODELS / "digits_int8.onnx"
ROWS = 6


def _assert_one_error_line(stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert re.fullmatch(expected, lines[0]), stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines), stderr


def _classes(model: Path, x: np.ndarray) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"input": x})
    return [int(c) for c in np.asarray(probabilities).argmax(axis=1)]


def _test_rows() -> np.ndarray:
    with np.load(MODELS / "digits_test.npz") as data:
        return np.asarray(data["X"][:ROWS], dtype=np.float32)


def _ok(project: Project, *args: str) -> str:
    proc = project.mle(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _json(project: Project, *args: str) -> Any:
    return json.loads(_ok(project, *args, "--json"))


def _deployments(project: Project) -> list[dict[str, Any]]:
    return project.rows("SELECT * FROM deployments ORDER BY id")


def test_deploy_redeploy_canary_predict_and_rollback(project: Project) -> None:
    line = _ok(project, "deploy", str(FP32), "--target", "local", "--name", "digits")
    assert re.fullmatch(
        r"digits v1 serving on local \(onnxruntime, [\d.]+ kB, loaded in [\d.]+ s\)\n", line
    ), line
    first = _deployments(project)[0]
    digest = "sha256:" + hashlib.sha256(FP32.read_bytes()).hexdigest()
    assert (first["action"], first["model"], first["version"], first["created"]) == (
        "deploy",
        "digits",
        1,
        1,
    )
    assert (first["target"], first["digest"], first["filename"]) == ("local", digest, FP32.name)
    assert first["runtime"] == "onnxruntime"
    assert first["operator"]
    assert json.loads(first["route"])["split"] == [{"version": 1, "percent": 100.0}]

    again = _ok(project, "deploy", str(FP32), "--target", "local", "--name", "digits")
    assert again == "digits v1 already deployed on local (same file); route: v1 100%\n"
    second = _deployments(project)[1]
    assert (second["version"], second["created"], second["uploaded"]) == (1, 0, 0)

    canary = _ok(project, "deploy", str(INT8), "-t", "local", "--name", "digits", "--canary", "10%")
    assert canary.startswith("digits v2 serving 10% on local (onnxruntime, "), canary
    assert canary.endswith("; route: v1 90%, v2 10%\n"), canary

    (model,) = _json(project, "models", "--target", "local")
    assert model["name"] == "digits"
    assert model["route"]["split"] == [
        {"version": 1, "percent": 90.0},
        {"version": 2, "percent": 10.0},
    ]
    assert [(v["version"], v["state"], v["traffic"]) for v in model["versions"]] == [
        (1, "ready", "90%"),
        (2, "ready", "10%"),
    ]
    table = _ok(project, "models", "--target", "local")
    assert table.split()[:9] == [
        "MODEL", "VER", "STATE", "RUNTIME", "TRAFFIC", "REQUESTS", "ERRORS", "P50_MS", "P95_MS"
    ]  # fmt: skip
    assert re.search(r"digits\s+1\s+ready\s+onnxruntime\s+90%\s+0\s+0", table), table
    assert re.search(r"digits\s+2\s+ready\s+onnxruntime\s+10%\s+0\s+0", table), table

    _predictions_match_onnxruntime(project)
    _stats_reach_the_ledger(project)

    shadow = _ok(
        project, "deploy", "digits", "--target", "local", "--version", "1", "--shadow", "2"
    )
    assert shadow == "digits on local: v1 100%; shadow v2\n"
    back = _ok(project, "deploy", "digits", "--target", "local", "--rollback")
    assert back == "digits on local rolled back: v1 90%, v2 10%\n"
    rows = _deployments(project)
    assert [r["action"] for r in rows] == ["deploy", "deploy", "deploy", "route", "rollback"]
    assert json.loads(rows[-1]["route"])["shadow"] is None
    assert json.loads(rows[-2]["route"])["shadow"] == 2


def _predictions_match_onnxruntime(project: Project) -> None:
    x = _test_rows()
    np.save(project.root / "x.npy", x)
    (project.root / "x.json").write_text(json.dumps(x.tolist()))

    answer = _json(
        project, "predict", "digits", "-t", "local", "--input", "x.npy", "--version", "1"
    )
    assert (answer["model"], answer["version"]) == ("digits", 1)
    probabilities = np.asarray(answer["outputs"]["probabilities"])
    assert probabilities.shape == (ROWS, 10)
    assert probabilities.argmax(axis=1).tolist() == _classes(FP32, x)

    text = _ok(project, "predict", "digits", "-t", "local", "--input", "x.json", "--version", "2")
    lines = text.splitlines()
    assert lines[0] == "digits v2 answered on local"
    assert lines[1] == f"probabilities: FP32 [{ROWS}, 10]"
    shown = [int(re.fullmatch(r"  row \d+: class (\d) \([\d.]+\)", ln)[1]) for ln in lines[2:]]  # type: ignore[index]
    assert shown == _classes(INT8, x)

    routed = _json(project, "predict", "digits", "-t", "local", "-i", "x.npy")
    assert routed["version"] in (1, 2)


def _stats_reach_the_ledger(project: Project) -> None:
    (model,) = _json(project, "models", "--target", "local")
    by_version = {v["version"]: v["stats"] for v in model["versions"]}
    assert by_version[1]["requests"] >= 1
    assert by_version[2]["requests"] >= 1
    rows = project.rows(
        "SELECT version, requests FROM model_stats WHERE target = 'local' AND model = 'digits' "
        "AND time = (SELECT MAX(time) FROM model_stats) ORDER BY version"
    )
    assert [(r["version"], r["requests"]) for r in rows] == [
        (1, by_version[1]["requests"]),
        (2, by_version[2]["requests"]),
    ]


def test_errors_are_one_line_and_leave_the_agent_serving(project: Project) -> None:
    missing = project.mle("deploy", "nope.onnx", "--target", "local")
    assert missing.returncode == 4
    _assert_one_error_line(
        missing.stderr, r"error: nope\.onnx is neither a model file nor a model deployed on local"
    )

    # An unknown name is looked for by mDNS first; zeroconf must not add a warning line.
    elsewhere = project.mle("deploy", str(FP32), "--target", "nosuch")
    assert elsewhere.returncode == 4
    _assert_one_error_line(elsewhere.stderr, r"error: unknown target 'nosuch'; known targets: .*")

    (project.root / "notes.onnx").write_text("these are notes, not a model\n" * 20)
    text = project.mle("deploy", "notes.onnx", "--target", "local")
    assert text.returncode == 2, text.stderr
    _assert_one_error_line(text.stderr, r"error: agent local: .*")

    _ok(project, "deploy", str(FP32), "--target", "local", "--name", "digits")
    unknown_version = project.mle(
        "deploy", "digits", "-t", "local", "--canary", "5%", "--version", "9"
    )
    assert unknown_version.returncode == 4
    _assert_one_error_line(
        unknown_version.stderr, r"error: digits on local: no version 9 \(versions: 1\)"
    )
    no_change = project.mle("deploy", "digits", "--target", "local")
    assert no_change.returncode == 2
    _assert_one_error_line(
        no_change.stderr, r"error: digits is a deployed model: say what to change .*"
    )

    (project.root / "short.json").write_text("[[1.0, 2.0, 3.0]]")
    shape = project.mle("predict", "digits", "-t", "local", "--input", "short.json")
    assert shape.returncode == 2, shape.stderr
    _assert_one_error_line(shape.stderr, r"error: agent local: .*")

    (project.root / "broken.json").write_text("[[1.0, 2.0")
    broken = project.mle("predict", "digits", "-t", "local", "--input", "broken.json")
    assert broken.returncode == 2
    _assert_one_error_line(broken.stderr, r"error: broken\.json: not valid JSON \(.*\)")

    np.save(project.root / "x.npy", _test_rows())
    unknown = project.mle("predict", "nosuch", "-t", "local", "--input", "x.npy")
    assert unknown.returncode == 4, unknown.stderr
    _assert_one_error_line(unknown.stderr, r"error: agent local: .*nosuch.*")

    # The agent is still up and still serves v1 after all of that.
    answer = _json(project, "predict", "digits", "-t", "local", "--input", "x.npy")
    assert answer["version"] == 1
    assert [r["action"] for r in _deployments(project)] == ["deploy"]


def test_a_model_made_by_a_run_is_deployed_with_its_lineage(project: Project) -> None:
    model = MODELS / "digits_h64_fp32.onnx"
    (project.root / "train.yaml").write_text(
        f"name: train\nsteps:\n  train:\n    run: cp {model} model.onnx\n"
        "    outputs: [model.onnx]\n"
    )
    project.mle("run", "train.yaml", check=True)
    (run,) = project.rows("SELECT id FROM runs")

    _ok(project, "deploy", str(model), "--target", "local", "--name", "digits")
    (row,) = _deployments(project)
    assert (row["source_run"], row["source_step"]) == (run["id"], "train")
    (served,) = _json(project, "models", "--target", "local")
    assert served["versions"][0]["source_run"] == run["id"]
    assert served["versions"][0]["source_step"] == "train"
    project.env["COLUMNS"] = "200"  # a pipe is 80 columns wide: room for the run id
    table = _ok(project, "models", "--target", "local")
    assert "SOURCE_RUN" in table and run["id"] in table, table

"""`mle bench` run by a user on the local agent; the run and its figures read from the ledger."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Project

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODELS = REPO / "tests/fixtures/models"
VARIANTS = ["digits_fp32.onnx", "digits_int8.onnx", "digits_int8.tflite", "digits_h64_fp32.onnx"]
HEADER = ["FILE", "RUNTIME", "SIZE", "LOAD", "MS", "P50", "MS", "P95", "MS", "ROWS/S", "PEAK"]


def _one_error(stderr: str) -> list[str]:
    """The error line and its hint, checked to be all there is: no traceback, no progress."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert lines and lines[0].startswith("error:"), stderr
    return lines


def _metrics(project: Project, run_id: str) -> dict[str, Any]:
    rows = project.rows(
        "SELECT name, text FROM metrics WHERE run_id = ? AND step_id = 'bench'", run_id
    )
    return {row["name"]: json.loads(row["text"]) for row in rows}


def test_bench_prints_the_table_and_the_ledger_has_the_run(project: Project) -> None:
    project.env["COLUMNS"] = "200"  # a pipe is 80 columns wide: room for every column
    proc = project.mle(
        "bench", *(str(MODELS / name) for name in VARIANTS), "--target", "local",
        "--eval", str(MODELS / "digits_test.npz"), "--seconds", "0.5", "--pick", "size<=15kB",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[: len(HEADER)] == HEADER
    rows = {line.split()[0]: line.split() for line in lines[1:5]}
    assert list(rows) == VARIANTS
    assert rows["digits_int8.tflite"][1] == "litert"
    assert rows["digits_h64_fp32.onnx"][-1] == "0.9800"  # most accurate, but 19.6 kB: not picked
    match = re.fullmatch(r"measured on local by run (\S+) \(mle show \1\)", lines[-1])
    assert match, proc.stdout
    run_id = match[1]
    picked_line = lines[-2]
    assert picked_line.startswith("picked ") and picked_line.endswith(
        ": the most accurate within size<=15kB"
    )
    picked = picked_line.split()[1].rstrip(":")
    assert rows[picked][-1] == "*"

    # The ledger: one succeeded run of the generated recipe, its step on local, its figures.
    (run,) = project.rows("SELECT * FROM runs WHERE id = ?", run_id)
    assert (run["recipe"], run["status"]) == ("bench", "succeeded")
    (step,) = project.rows("SELECT * FROM steps WHERE run_id = ?", run_id)
    assert (step["step_id"], step["status"], step["target"]) == ("bench", "succeeded", "local")
    figures = _metrics(project, run_id)
    assert [v["file"] for v in figures["variants"]] == VARIANTS
    assert all(v["error"] is None and v["p95_ms"] >= v["p50_ms"] > 0 for v in figures["variants"])
    assert figures["budget"] == "size<=15kB" and figures["picked"] == picked
    chosen = next(v for v in figures["variants"] if v["file"] == picked)
    assert figures["picked_p95_ms"] == chosen["p95_ms"]
    assert figures["picked_accuracy"] == chosen["accuracy"]
    (number,) = project.rows(
        "SELECT value FROM metrics WHERE run_id = ? AND name = 'picked_p95_ms'", run_id
    )
    assert number["value"] == chosen["p95_ms"]  # a number SQL can sort on

    # `mle show RUN` knows the run; the staged copies are gone, the generated recipe stays.
    shown = json.loads(project.mle("show", run_id, "--json", check=True).stdout)
    assert shown["steps"][0]["step_id"] == "bench"
    assert any(o["path"] == "bench.json" for o in shown["outputs"])
    recipe = Path(shown["source"])
    assert recipe.parent.parent == project.root / ".mle" / "bench"
    assert [p.name for p in recipe.parent.iterdir()] == ["bench.yaml"]


def test_json_output_is_the_ledger_figures(project: Project) -> None:
    # Inside the project, two files share a name: both are measured, under distinct names.
    for folder in ("a", "b"):
        (project.root / folder).mkdir()
        shutil.copy(MODELS / "digits_fp32.onnx", project.root / folder / "model.onnx")
    proc = project.mle(
        "bench", "a/model.onnx", "b/model.onnx", "--target", "local", "--seconds", "0.2", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["target"] == "local"
    assert [v["file"] for v in document["variants"]] == ["model.onnx", "2-model.onnx"]
    assert all(v["accuracy"] is None for v in document["variants"])  # no --eval
    assert document["picked"] is None and document["budget"] is None
    figures = _metrics(project, document["run"])
    assert {"run": document["run"], "target": "local", **figures} == document


def test_bad_input_is_one_line(project: Project) -> None:
    (project.root / "notes.onnx").write_text("not a model\n")
    good = str(MODELS / "digits_fp32.onnx")

    proc = project.mle("bench", "notes.onnx", "--target", "local")
    assert proc.returncode == 2
    error, hint = _one_error(proc.stderr)
    assert error == "error: on local: notes.onnx is not an ONNX or TFLite model"
    run_id = hint.removeprefix("hint: mle show ")
    (run,) = project.rows("SELECT status FROM runs WHERE id = ?", run_id)
    assert run["status"] == "failed"  # recorded, like any run

    proc = project.mle("bench", good, "--target", "local", "--pick", "p95<20ms")
    assert proc.returncode == 2
    assert _one_error(proc.stderr)[0] == (
        "error: on local: --pick 'p95<20ms': 'p95<20ms': a budget is an upper limit, write <="
    )

    runs_before = len(project.rows("SELECT id FROM runs"))
    benches_before = sorted((project.root / ".mle/bench").iterdir())
    cases = [
        (("missing.onnx", "--target", "local"), 4, "error: missing.onnx: no such file"),
        (
            (good, "--target", "pi-01"),
            4,
            "error: unknown target 'pi-01'; known targets: local",
        ),
        ((good, "--target", "local", "--seconds", "0"), 2, None),
        # Not templates of the generated recipe: {{ run.id }} was rendered, {% blamed its file.
        (
            (good, "--target", "local", "--pick", "{{ run.id }}"),
            2,
            "error: --pick '{{ run.id }}' is not a budget such as p95<=20ms",
        ),
        (
            (good, "--target", "local", "--pick", "p95<={% x %}"),
            2,
            "error: --pick 'p95<={% x %}' is not a budget such as p95<=20ms",
        ),
        ((good, "--target", " "), 2, "error: --target needs a target name (e.g. local)"),
    ]
    for args, code, line in cases:
        proc = project.mle("bench", *args)
        assert proc.returncode == code, (args, proc.stderr)
        error = _one_error(proc.stderr)[0]
        assert line is None or error == line, proc.stderr
    # Nothing ran for those: no run recorded, no generated recipe left behind.
    assert len(project.rows("SELECT id FROM runs")) == runs_before
    assert sorted((project.root / ".mle/bench").iterdir()) == benches_before


def test_help_has_an_example(project: Project) -> None:
    proc = project.mle("bench", "--help", check=True)
    assert "Example: mle bench" in proc.stdout
    assert "--pick" in proc.stdout and "--target" in proc.stdout

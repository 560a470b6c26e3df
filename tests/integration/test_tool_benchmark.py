"""`python -m mle_agent.tools.benchmark` on the committed model fixtures, as an agent runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the benchmark tool needs numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "models"
TOOL = [sys.executable, "-m", "mle_agent.tools.benchmark"]
# The same tool in an interpreter where no LiteRT provider can be imported (as on a bare agent).
NO_LITERT = [
    sys.executable,
    "-c",
    "import sys\n"
    "for name in ('ai_edge_litert', 'tflite_runtime', 'tensorflow'): sys.modules[name] = None\n"
    "from mle_agent.tools.benchmark import main\n"
    "sys.exit(main(sys.argv[1:]))",
]
FIGURES = ("load_ms", "p50_ms", "p95_ms", "p99_ms", "throughput_rps", "peak_rss_mb")


def bench(
    *args: str | Path, cwd: Path = MODELS, command: list[str] = TOOL
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
    )


def bench_json(*args: str | Path) -> dict[str, Any]:
    proc = bench(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    document: dict[str, Any] = json.loads(proc.stdout)
    return document


def by_file(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["file"]: v for v in document["variants"]}


@pytest.fixture
def few_rows(tmp_path: Path) -> Path:
    """The first 40 test rows: enough for an accuracy, quick even through slow.onnx."""
    data = np.load(MODELS / "digits_test.npz")
    path = tmp_path / "few.npz"
    np.savez(path, X=data["X"][:40], y=data["y"][:40])
    return path


def test_every_variant_is_measured_and_the_pick_follows_the_budget(tmp_path: Path) -> None:
    metrics = tmp_path / "bench.json"
    files = ["digits_fp32.onnx", "digits_int8.onnx", "digits_int8.tflite", "digits_h64_fp32.onnx"]
    document = bench_json(
        *files, "--eval", "digits_test.npz", "--seconds", "0.5", "--pick", "size<=15kB",
        "--metrics", metrics,
    )  # fmt: skip
    assert json.loads(metrics.read_text()) == document
    variants = by_file(document)
    assert list(variants) == files
    assert [v["runtime"] for v in variants.values()] == ["onnxruntime"] * 2 + ["litert"] + [
        "onnxruntime"
    ]
    for name, v in variants.items():
        assert v["error"] is None
        assert v["size_bytes"] == (MODELS / name).stat().st_size
        assert all(v[f] > 0 for f in FIGURES), v
        assert v["p99_ms"] >= v["p95_ms"] >= v["p50_ms"] > 0
        assert 0.95 <= v["accuracy"] <= 0.99
    fp32 = variants["digits_fp32.onnx"]["accuracy"]
    assert abs(variants["digits_int8.onnx"]["accuracy"] - fp32) <= 0.01
    assert abs(variants["digits_int8.tflite"]["accuracy"] - fp32) <= 0.01
    # The hidden-64 model is the most accurate but 19.6 kB: over the budget.
    assert variants["digits_h64_fp32.onnx"]["accuracy"] > fp32
    within = [v for v in variants.values() if v["size_bytes"] <= 15_000]
    best = max(v["accuracy"] for v in within)
    tied = [v for v in within if v["accuracy"] == best]
    expected = min(tied, key=lambda v: v["p95_ms"])
    assert document["budget"] == "size<=15kB"
    assert document["picked"] == expected["file"]
    assert document["picked_p95_ms"] == expected["p95_ms"]
    assert document["picked_accuracy"] == best


def test_each_variant_runs_in_its_own_process(few_rows: Path) -> None:
    # slow.onnx first: had digits_fp32 been measured in the same process, its peak RSS could
    # not be below slow.onnx's (the peak of a process never goes down).
    document = bench_json(
        "slow.onnx", "digits_fp32.onnx", "--eval", few_rows, "--seconds", "0.5",
        "--pick", "size<=50kB",
    )  # fmt: skip
    slow, fast = by_file(document)["slow.onnx"], by_file(document)["digits_fp32.onnx"]
    assert slow["p50_ms"] > 10 * fast["p50_ms"]
    assert slow["p95_ms"] > 10 * fast["p95_ms"]
    assert fast["peak_rss_mb"] < slow["peak_rss_mb"]
    assert slow["accuracy"] == fast["accuracy"]  # the same answers, far slower
    assert document["picked"] == "digits_fp32.onnx"  # slow.onnx is 1.25 MB


def test_the_table_marks_the_pick() -> None:
    proc = bench(
        "digits_fp32.onnx", "digits_h64_fp32.onnx", "--eval", "digits_test.npz",
        "--seconds", "0.2", "--pick", "size<=50kB",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == [
        "FILE", "RUNTIME", "SIZE", "LOAD", "MS", "P50", "MS", "P95", "MS", "ROWS/S", "PEAK",
        "RSS", "MB", "ACCURACY",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["digits_h64_fp32.onnx"][-1] == "*"
    assert rows["digits_h64_fp32.onnx"][-2] == "0.9800"
    assert rows["digits_fp32.onnx"][-1] == "0.9733"
    assert lines[3] == "picked digits_h64_fp32.onnx: the most accurate within size<=50kB"
    assert proc.stderr.splitlines() == [
        "measuring digits_fp32.onnx (onnxruntime) for 0.2 s",
        "measuring digits_h64_fp32.onnx (onnxruntime) for 0.2 s",
    ]


def test_no_variant_within_the_budget_picks_nothing() -> None:
    proc = bench("digits_fp32.onnx", "--seconds", "0.2", "--pick", "size<=1kB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "no variant meets size<=1kB"
    document = bench_json("digits_fp32.onnx", "--seconds", "0.2", "--pick", "size<=1kB")
    assert document["picked"] is None
    assert document["picked_p95_ms"] is None and document["picked_accuracy"] is None
    assert document["variants"][0]["accuracy"] is None  # no --eval
    without = bench_json("digits_fp32.onnx", "--seconds", "0.2")
    assert without["budget"] is None and without["picked"] is None


def test_a_missing_runtime_is_a_row_that_says_what_to_install() -> None:
    proc = bench(
        "digits_int8.tflite", "digits_fp32.onnx", "--seconds", "0.2", "--pick", "size<=50kB",
        "--json", command=NO_LITERT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    tflite, onnx = document["variants"]
    assert tflite["error"] == (
        "the litert runtime is not installed on this agent: pip install 'mle-toolchain[litert]'"
    )
    assert tflite["runtime"] == "litert" and tflite["size_bytes"] == 5520
    assert all(tflite[f] is None for f in FIGURES)
    assert onnx["error"] is None and onnx["p50_ms"] > 0
    assert document["picked"] == "digits_fp32.onnx"


def test_nothing_measurable_exits_3_with_the_install_line() -> None:
    proc = bench("digits_int8.tflite", "--seconds", "0.2", command=NO_LITERT)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        "error: no variant could be measured: the litert runtime is not installed on this "
        "agent: pip install 'mle-toolchain[litert]'"
    ]
    assert "digits_int8.tflite: the litert runtime is not installed" in proc.stdout


def test_bad_files_are_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("not a model\n")
    (tmp_path / "empty.tflite").write_bytes(b"")
    truncated = (MODELS / "digits_fp32.onnx").read_bytes()[:200]
    (tmp_path / "truncated.onnx").write_bytes(truncated)
    good = MODELS / "digits_fp32.onnx"
    cases = {
        ("notes.onnx",): "error: notes.onnx is not an ONNX or TFLite model",
        ("empty.tflite",): "error: empty.tflite is not an ONNX or TFLite model",
        ("missing.onnx",): "error: missing.onnx: no such model file",
        (".",): "error: . is a directory, not a model file",
        (str(good), "--eval", "."): "error: . is a directory, not an evaluation file",
        (str(good), "notes.onnx"): "error: notes.onnx is not an ONNX or TFLite model",
        (): "error: give one or more model files (.onnx, .tflite)",
    }
    for args, line in cases.items():
        proc = bench(*args, cwd=tmp_path)
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, line + "\n", ""), args
    proc = bench("truncated.onnx", "--seconds", "0.2", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: truncated.onnx cannot be loaded by onnxruntime: ")
    assert proc.stdout == ""


def test_bad_options_and_data_are_one_line(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, X=np.zeros((5, 10), np.float32), y=np.zeros(5, np.int64))
    model = MODELS / "digits_fp32.onnx"
    cases = {
        ("--pick", "p95<20ms"): "error: --pick 'p95<20ms': 'p95<20ms': a budget is an upper "
        "limit, write <=",
        ("--seconds", "0"): "error: --seconds must be above 0 and at most 3600, not 0",
        ("--seconds", "soon"): "error: argument --seconds: invalid float value: 'soon' "
        "(see --help)",
        ("--eval", "nowhere.npz"): "error: nowhere.npz: no such evaluation file",
        ("--eval", wrong, "--seconds", "0.2"): f"error: {wrong}: input 'input' has rows of "
        "shape [10]; the model takes Nx64",
    }
    for args, line in cases.items():
        proc = bench(model, *args, cwd=tmp_path)
        assert proc.returncode == 2, args
        assert proc.stderr.splitlines()[-1] == line
        assert proc.stdout == ""


def test_the_tool_imports_no_runtime_or_numpy() -> None:
    code = (
        "import sys, json, mle_agent.tools.benchmark\n"
        "heavy = ('numpy', 'onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'tensorflow')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(proc.stdout) == []

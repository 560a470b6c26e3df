"""`mle quantize` as a user runs it: the tool runs in a subprocess, its result and errors shown.

The quantized files are checked with onnxruntime and LiteRT in this process, not through mle.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Project

np = pytest.importorskip("numpy", reason="the quantize tests need numpy (the onnx extra)")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the quantize tool needs onnx (the onnx extra)")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(200)]

MODELS = REPO / "tests/fixtures/models"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
HEAVY = {"grpc", "numpy", "onnx", "onnxruntime", "tensorflow", "ai_edge_litert", "sqlite_utils"}


@pytest.fixture
def models(project: Project) -> Path:
    """The project directory holding the fp32 model, a TFLite model, test data, calibration."""
    for name in ("digits_fp32.onnx", "digits_int8.tflite", "digits_test.npz"):
        shutil.copy(MODELS / name, project.root / name)
    np.save(project.root / "calib.npy", np.load(MODELS / "digits_test.npz")["X"][:100])
    return project.root


def accuracy(path: Path) -> float:
    data = np.load(MODELS / "digits_test.npz")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (scores,) = session.run(["probabilities"], {"input": data["X"]})
    return float((np.asarray(scores).argmax(axis=1) == data["y"]).mean())


def only_error(stderr: str) -> str:
    """The one `error:` line on stderr (a hint line may follow), never a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[0].startswith("error: "), stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines), stderr
    return lines[0]


def test_quantize_prints_sizes_and_accuracies(project: Project, models: Path) -> None:
    proc = project.mle("quantize", "digits_fp32.onnx", "--eval", "digits_test.npz")
    assert proc.returncode == 0, proc.stderr
    out = models / "digits_fp32.int8.onnx"
    fp32, int8 = accuracy(models / "digits_fp32.onnx"), accuracy(out)
    ratio = (models / "digits_fp32.onnx").stat().st_size / out.stat().st_size
    expected = (
        r"digits_fp32\.onnx 10\.0 kB -> digits_fp32\.int8\.onnx [\d.]+ kB "
        rf"\({ratio:.2f}x smaller\); accuracy {fp32:.2%} -> {int8:.2%} "
        rf"\([+-]{abs(int8 - fp32) * 100:.2f} points\)"
    )
    assert re.fullmatch(expected, proc.stdout.strip()), proc.stdout
    assert ratio >= 2.5
    assert abs(int8 - fp32) <= 0.01


def test_quantize_json_static(project: Project, models: Path) -> None:
    proc = project.mle(
        *("quantize", "digits_fp32.onnx", "--mode", "int8-static", "--calibration", "calib.npy"),
        *("--out", "int8/static.onnx", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    out = models / "int8" / "static.onnx"
    assert result["output"] == str(Path("int8/static.onnx"))
    assert (result["mode"], result["to"]) == ("int8-static", "onnx")
    assert result["size_after"] == out.stat().st_size
    assert "accuracy_after" not in result
    assert abs(accuracy(out) - accuracy(models / "digits_fp32.onnx")) <= 0.01


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed (the tflite extra)")
def test_quantize_to_tflite(project: Project, models: Path) -> None:
    proc = project.mle(
        *("quantize", "digits_fp32.onnx", "--to", "tflite", "--mode", "int8-static"),
        *("--calibration", "calib.npy", "--eval", "digits_test.npz", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["output"] == "digits_fp32.int8.tflite"
    assert (models / "digits_fp32.int8.tflite").read_bytes()[4:8] == b"TFL3"
    assert abs(result["accuracy_after"] - result["accuracy_before"]) <= 0.01


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["digits_int8.tflite"],
            2,
            "error: digits_int8.tflite is not an ONNX model (it is TFLite); "
            "quantize the fp32 .onnx it came from",
        ),
        (
            ["digits_fp32.onnx", "--mode", "int8-static"],
            2,
            "error: int8-static needs calibration data: add --calibration FILE (.npy or .npz of "
            "typical inputs, e.g. a few hundred rows)",
        ),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "pixels.npz"],
            2,
            "error: pixels.npz: no array for the model's input 'input'",
        ),
    ],
)
def test_quantize_errors_are_one_line(
    project: Project, models: Path, args: list[str], code: int, message: str
) -> None:
    np.savez(models / "pixels.npz", pixels=np.zeros((3, 64), np.float32))  # no X, no 'input'
    before = sorted(p.name for p in models.iterdir())
    proc = project.mle("quantize", *args)
    assert proc.returncode == code, proc.stderr
    assert only_error(proc.stderr) == message
    assert sorted(p.name for p in models.iterdir()) == before


def test_missing_tensorflow_is_a_failed_precondition(project: Project, models: Path) -> None:
    hide = models.parent / "hide"
    hide.mkdir()
    (hide / "tensorflow.py").write_text("raise ImportError('hidden by the test')\n")
    project.env["PYTHONPATH"] = f"{hide}:{project.env['PYTHONPATH']}"
    proc = project.mle("quantize", "digits_fp32.onnx", "--to", "tflite")
    assert proc.returncode == 8, proc.stderr
    assert only_error(proc.stderr) == (
        "error: --to tflite needs TensorFlow, not installed here: "
        "pip install 'mle-toolchain[tflite]' (tensorflow-cpu)"
    )
    assert not (models / "digits_fp32.int8.tflite").exists()


def test_help_has_an_example_and_imports_nothing_heavy() -> None:
    code = (
        "import json, sys\n"
        "sys.argv = ['mle', 'quantize', '--help']\n"
        "from mle_cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert "Example: mle quantize model.onnx --eval data.npz" in proc.stdout
    loaded = {m.split(".")[0] for m in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert loaded & HEAVY == set()

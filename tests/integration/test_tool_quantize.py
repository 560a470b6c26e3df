"""`python -m mle_agent.tools.quantize` on the digits fixtures, as a recipe step or `mle` runs it.

Every quantized model is checked with the runtimes themselves (onnxruntime, LiteRT), never with
the tool's own figures: it loads, its accuracy on the digits test split is within 1 point of the
fp32 model's, and the ONNX variants are at least 2.5x smaller.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="the quantize tests need numpy (the onnx extra)")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx = pytest.importorskip("onnx", reason="the quantize tool needs onnx (the onnx extra)")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests.conftest import REPO  # noqa: E402

MODELS = REPO / "tests" / "fixtures" / "models"
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(
    not HAS_TF, reason="TensorFlow is not installed (pip install 'mle-toolchain[tflite]')"
)
SUMMARY = re.compile(
    r"^(?P<model>\S+) [\d.]+ kB -> (?P<out>\S+) [\d.]+ kB \((?P<ratio>[\d.]+)x smaller\); "
    r"accuracy (?P<before>[\d.]+)% -> (?P<after>[\d.]+)% \([+-][\d.]+ points\)$"
)


def run_tool(cwd: Path, *args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The tool as a subprocess in `cwd`; `path` goes first on PYTHONPATH (to hide packages)."""
    dirs = [str(REPO / d) for d in ("cli", "agent", "protos")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*([str(path)] if path else []), *dirs])}
    return subprocess.run(
        [sys.executable, "-m", "mle_agent.tools.quantize", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A directory with the fp32 model, a TFLite model, the test split and 100 calibration rows."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("digits_fp32.onnx", "digits_int8.tflite", "digits_test.npz"):
        shutil.copy(MODELS / name, work / name)
    x, _ = digits()
    np.save(work / "calib.npy", x[:100])
    return work


def digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return data["X"], data["y"]


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"input": x})[0])


def onnx_accuracy(path: Path) -> float:
    x, y = digits()
    return float((onnx_predict(path, x).argmax(axis=1) == y).mean())


def tflite_runner(path: Path) -> tuple[object, dict[str, object]]:
    """A LiteRT signature runner for the model and its signature list."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path))
    return interpreter.get_signature_runner(), interpreter.get_signature_list()


def tflite_accuracy(path: Path) -> float:
    runner, _ = tflite_runner(path)
    x, y = digits()
    scores = np.concatenate([runner(input=row[None, :])["probabilities"] for row in x])
    return float((scores.argmax(axis=1) == y).mean())


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def weights() -> dict[str, np.ndarray]:
    """digits_fp32.onnx's initializers (W1, B1, W2, B2)."""
    model = onnx.load(MODELS / "digits_fp32.onnx")
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def save_model(
    path: Path,
    nodes: list[onnx.NodeProto],
    arrays: dict[str, np.ndarray],
    batch: int | str = "N",
    opset: int = 17,
) -> Path:
    """An MLP-shaped graph: input [batch,64] -> probabilities [batch,10]."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def gemm_model(path: Path, hidden_op: str = "Relu") -> Path:
    """digits_fp32's weights as Gemm layers (transB=1, as PyTorch exports nn.Linear)."""
    w = weights()
    arrays = {"W1t": w["W1"].T.copy(), "B1": w["B1"], "W2t": w["W2"].T.copy(), "B2": w["B2"]}
    nodes = [
        helper.make_node("Gemm", ["input", "W1t", "B1"], ["h_pre"], transB=1),
        helper.make_node(hidden_op, ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "W2t", "B2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    return save_model(path, nodes, arrays)


def listing(directory: Path) -> dict[str, bytes | None]:
    """Every path under the directory, with the content of each file."""
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def test_dynamic_is_the_default_and_writes_next_to_the_model(work: Path) -> None:
    model = work / "digits_fp32.onnx"
    original = model.read_bytes()
    proc = run_tool(work, "digits_fp32.onnx", "--eval", "digits_test.npz")
    assert proc.returncode == 0, proc.stderr
    match = SUMMARY.match(proc.stdout.strip())
    assert match, proc.stdout
    out = work / "digits_fp32.int8.onnx"
    assert (match["model"], match["out"]) == ("digits_fp32.onnx", "digits_fp32.int8.onnx")
    fp32, int8 = onnx_accuracy(model), onnx_accuracy(out)
    assert abs(int8 - fp32) <= 0.01
    assert float(match["before"]) == pytest.approx(fp32 * 100, abs=0.006)
    assert float(match["after"]) == pytest.approx(int8 * 100, abs=0.006)
    assert out.stat().st_size * 2.5 <= model.stat().st_size
    assert model.read_bytes() == original
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_static_with_calibration_rows(work: Path) -> None:
    proc = run_tool(
        work,
        *("digits_fp32.onnx", "--mode", "int8-static", "--calibration", "calib.npy"),
        *("--eval", "digits_test.npz", "--out", "static/digits.int8.onnx", "--json"),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    out = work / "static" / "digits.int8.onnx"
    size_before, size_after = (work / "digits_fp32.onnx").stat().st_size, out.stat().st_size
    fp32, int8 = onnx_accuracy(work / "digits_fp32.onnx"), onnx_accuracy(out)
    assert result == {
        "model": "digits_fp32.onnx",
        "output": str(Path("static/digits.int8.onnx")),
        "mode": "int8-static",
        "to": "onnx",
        "size_before": size_before,
        "size_after": size_after,
        "ratio": pytest.approx(size_before / size_after, abs=0.001),
        "accuracy_before": pytest.approx(fp32),
        "accuracy_after": pytest.approx(int8),
    }
    assert abs(int8 - fp32) <= 0.01
    assert size_after * 2.5 <= size_before
    assert sorted(p.name for p in work.iterdir()) == [  # the calibration left nothing behind
        "calib.npy", "digits_fp32.onnx", "digits_int8.tflite", "digits_test.npz", "static",
    ]  # fmt: skip
    ops = {node.op_type for node in onnx.load(out).graph.node}
    assert "QLinearMatMul" in ops  # activations are int8 too, not only the weights
    # The output node stays float: probabilities are real probabilities, not 1/255 steps.
    x, _ = digits()
    np.testing.assert_allclose(onnx_predict(out, x[:50]).sum(axis=1), 1.0, rtol=1e-5)


def test_metrics_file_holds_the_json_object(work: Path) -> None:
    proc = run_tool(work, "digits_fp32.onnx", "--json", "--metrics", "quantize.json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert json.loads((work / "quantize.json").read_text()) == printed
    assert "accuracy_before" not in printed and "accuracy_after" not in printed
    assert printed["mode"] == "int8-dynamic"
    assert printed["size_after"] == (work / "digits_fp32.int8.onnx").stat().st_size


def test_gemm_layers_are_quantized_too(work: Path) -> None:
    model = gemm_model(work / "gemm.onnx")
    for args in ([], ["--mode", "int8-static", "--calibration", "calib.npy"]):
        proc = run_tool(work, "gemm.onnx", *args, "--out", "gemm.int8.onnx")
        assert proc.returncode == 0, proc.stderr
        out = work / "gemm.int8.onnx"
        assert abs(onnx_accuracy(out) - onnx_accuracy(model)) <= 0.01
        assert out.stat().st_size * 2.5 <= model.stat().st_size, args


def test_fixed_batch_model_is_calibrated_a_row_at_a_time(work: Path) -> None:
    w = weights()
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h_mm"]),
        helper.make_node("Add", ["h_mm", "B1"], ["h_pre"]),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["l_mm"]),
        helper.make_node("Add", ["l_mm", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    save_model(work / "one.onnx", nodes, w, batch=1)
    proc = run_tool(work, "one.onnx", "--mode", "int8-static", "--calibration", "calib.npy")
    assert proc.returncode == 0, proc.stderr
    x, y = digits()

    def rowwise_accuracy(path: Path) -> float:
        scores = np.concatenate([onnx_predict(path, row[None, :]) for row in x])
        return float((scores.argmax(axis=1) == y).mean())

    fp32, int8 = rowwise_accuracy(work / "one.onnx"), rowwise_accuracy(work / "one.int8.onnx")
    assert abs(int8 - fp32) <= 0.01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["digits_int8.tflite"], "digits_int8.tflite is not an ONNX model (it is TFLite)"),
        (["garbage.onnx"], "garbage.onnx is not an ONNX model"),
        (["missing.onnx"], "missing.onnx: no such model file"),
        (["."], ". is a directory, not a model file"),
        (["digits_fp32.onnx", "--eval", "."], ". is a directory, not an evaluation file"),
        (["digits_fp32.onnx", "--mode", "int8-static"], "int8-static needs calibration data"),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "narrow.npy"],
            "narrow.npy: input 'input' has rows of shape [32]; the model takes Nx64",
        ),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "none.npy"],
            "none.npy: no such calibration file",
        ),
        (
            ["digits_fp32.onnx", "--eval", "unlabelled.npz"],
            "unlabelled.npz: evaluation data needs the labels in 'y'",
        ),
        (["digits_fp32.onnx", "--calibration", "calib.npy"], "used by --mode int8-static only"),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "empty.npy"],
            "empty.npy: not a numpy .npy file (",
        ),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "empty.npz"],
            "empty.npz: cannot read calibration data (",
        ),
        (
            ["digits_fp32.onnx", "--mode", "int8-static", "--calibration", "words.npy"],
            "words.npy: the array for 'input' (<U1) cannot be float32: could not convert",
        ),
        (["digits_fp32.onnx", "--eval", "cut.npz"], "cut.npz: cannot read evaluation data ("),
        (["digits_fp32.onnx", "--out", "./digits_fp32.onnx"], "is the model itself"),
        (["digits_fp32.onnx", "--to", "tflite", "--mode", "bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    work: Path, args: list[str], message: str
) -> None:
    (work / "garbage.onnx").write_bytes(b"\x00not a model\xff" * 40)
    x, _ = digits()
    np.save(work / "narrow.npy", x[:100, :32])
    np.savez(work / "unlabelled.npz", X=x)
    (work / "empty.npy").touch()
    (work / "empty.npz").touch()
    np.save(work / "words.npy", np.full((4, 64), "a"))
    np.savez(work / "whole.npz", X=x, y=x[:, 0])
    (work / "cut.npz").write_bytes((work / "whole.npz").read_bytes()[:300])
    before = listing(work)
    proc = run_tool(work, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in one_error_line(proc)
    assert proc.stdout == ""
    assert listing(work) == before


def test_missing_onnx_says_what_to_install(work: Path, tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "onnx.py").write_text("raise ImportError('hidden by the test')\n")
    before = listing(work)
    proc = run_tool(work, "digits_fp32.onnx", path=hide)
    assert proc.returncode == 3, proc.stderr
    assert "pip install 'mle-toolchain[onnx]'" in one_error_line(proc)
    assert listing(work) == before


def test_missing_tensorflow_says_what_to_install(work: Path, tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "tensorflow.py").write_text("raise ImportError('hidden by the test')\n")
    before = listing(work)
    proc = run_tool(work, "digits_fp32.onnx", "--to", "tflite", path=hide)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    assert "--to tflite needs TensorFlow" in line
    assert "pip install 'mle-toolchain[tflite]' (tensorflow-cpu)" in line
    assert listing(work) == before


def test_op_outside_the_tflite_subset_is_named(work: Path) -> None:
    gemm_model(work / "leaky.onnx", hidden_op="LeakyRelu")
    before = listing(work)
    proc = run_tool(work, "leaky.onnx", "--to", "tflite")
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "ONNX op(s) LeakyRelu not supported by mle's TFLite converter" in line
    assert "onnx2tf" in line
    assert listing(work) == before


@needs_tf
@pytest.mark.parametrize(
    ("args", "mode"),
    [
        ([], "int8-dynamic"),
        (["--mode", "int8-static", "--calibration", "calib.npy"], "int8-static"),
    ],
)
def test_tflite_int8_keeps_the_accuracy(work: Path, args: list[str], mode: str) -> None:
    proc = run_tool(
        work, "digits_fp32.onnx", "--to", "tflite", *args, "--eval", "digits_test.npz", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    out = work / "digits_fp32.int8.tflite"
    assert (result["output"], result["to"], result["mode"]) == (out.name, "tflite", mode)
    runner, signatures = tflite_runner(out)
    assert signatures == {"serving_default": {"inputs": ["input"], "outputs": ["probabilities"]}}
    fp32, int8 = onnx_accuracy(work / "digits_fp32.onnx"), tflite_accuracy(out)
    assert abs(int8 - fp32) <= 0.01
    assert result["accuracy_after"] == pytest.approx(int8)
    assert out.stat().st_size < (work / "digits_fp32.onnx").stat().st_size
    x, _ = digits()
    assert runner(input=x[:7])["probabilities"].shape == (7, 10)  # the batch stays dynamic


@needs_tf
@pytest.mark.parametrize(
    ("opset", "args"),
    [(17, []), (12, ["--mode", "int8-static", "--calibration", "calib.npy"])],
)
def test_tflite_converter_covers_its_op_subset(work: Path, opset: int, args: list[str]) -> None:
    """Every supported op in one graph; the TFLite answers track onnxruntime's."""
    w = weights()
    arrays = {
        "mean": np.full(64, 0.25, np.float32),
        "scale": np.full(64, 2.0, np.float32),
        "two": np.array(2.0, np.float32),
        "W1t": w["W1"].T.copy(),
        "B1": w["B1"],
        "W2": w["W2"],
        "B2": w["B2"],
        "shape": np.array([0, 2, 16], np.int64),
    }
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "scale"], ["scaled"]),
        helper.make_node("Div", ["scaled", "two"], ["halved"]),
        helper.make_node("Constant", [], ["quarter"], value_float=0.25),
        helper.make_node("Add", ["halved", "quarter"], ["x"]),
        helper.make_node("Gemm", ["x", "W1t", "B1"], ["h_pre"], transB=1),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Reshape", ["h", "shape"], ["h3"]),
        helper.make_node("Tanh", ["h3"], ["t3"]),
        helper.make_node("Sigmoid", ["h3"], ["s3"]),
        helper.make_node("Add", ["t3", "s3"], ["ts3"]),
        helper.make_node("Flatten", ["ts3"], ["flat"], axis=1),
        helper.make_node("Identity", ["flat"], ["same"]),
        helper.make_node("MatMul", ["same", "W2"], ["l_mm"]),
        helper.make_node("Add", ["l_mm", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    model = save_model(work / "ops.onnx", nodes, arrays, opset=opset)
    proc = run_tool(work, "ops.onnx", "--to", "tflite", *args)
    assert proc.returncode == 0, proc.stderr
    runner, _ = tflite_runner(work / "ops.int8.tflite")
    x, _ = digits()
    expected = onnx_predict(model, x)
    got = np.asarray(runner(input=x)["probabilities"])
    assert float((got.argmax(axis=1) == expected.argmax(axis=1)).mean()) >= 0.97
    assert float(np.abs(got - expected).max()) < 0.15  # int8 weights (and activations)

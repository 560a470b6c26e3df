#!/usr/bin/env python3
"""Build the small model fixtures the serving tests use (tests/fixtures/models/).

    python scripts/make_model_fixtures.py [--out DIR]            ONNX models + digits_test.npz
    /tmp/tfvenv/bin/python scripts/make_model_fixtures.py --tflite   also the two .tflite models

Deterministic: fixed split and seeds. An MLP is trained with scikit-learn on its bundled digits
data (offline) and its learned weights are written BY HAND into an ONNX graph with onnx.helper
(MatMul+Add rather than Gemm, because onnxruntime's dynamic quantizer only rewrites MatMul). The
int8 model is onnxruntime's dynamic quantization of the fp32 one. With --tflite (needs TensorFlow,
which is not in the project environment), the same weights become a TFLite model through a
SavedModel whose signature is named like the ONNX graph: input "input" [1,64], output
"probabilities" [1,10]; the int8 variant is post-training quantization with a representative
dataset, keeping float32 input and output.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "models"
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; old enough for every onnxruntime >= 1.14
SLOW_WIDTH = 512  # the slow model's intermediate: [N, SLOW_ROWS, SLOW_WIDTH] per step
SLOW_ROWS = 160
SLOW_STEPS = 64

Weights = list[tuple[np.ndarray, np.ndarray]]  # [(W [in,out], b [out]), ...] per layer


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0,1] as float32, split 75/25 with a fixed seed, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, x_test, y_train, y_test


def train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, seed: int) -> Weights:
    """Train a one-hidden-layer ReLU MLP; return its float32 weights."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return [
        (w.astype(np.float32), b.astype(np.float32))
        for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
    ]


def _io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])
    return inp, out


def _mlp_nodes(weights: Weights) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """input -> MatMul+Add -> Relu -> MatMul+Add -> "logits"."""
    (w1, b1), (w2, b2) = weights
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "B1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(b2, "B2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h_mm"], name="fc1"),
        helper.make_node("Add", ["h_mm", "B1"], ["h_pre"], name="fc1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "W2"], ["l_mm"], name="fc2"),
        helper.make_node("Add", ["l_mm", "B2"], ["logits"], name="fc2_bias"),
    ]
    return nodes, inits


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mle-fixtures"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def mlp_onnx(weights: Weights, name: str) -> onnx.ModelProto:
    """The MLP as an ONNX graph with a softmax on top."""
    nodes, inits = _mlp_nodes(weights)
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    inp, out = _io()
    return _model(helper.make_graph(nodes, name, [inp], [out], inits))


def slow_onnx(weights: Weights) -> onnx.ModelProto:
    """The digits MLP plus a heavy branch whose result is added times zero.

    Its answers equal digits_fp32's (adding 0.0 is exact; tanh keeps the branch finite), so
    fallback and consensus tests can compare them, but each row costs ~SLOW_STEPS MatMuls of
    [SLOW_ROWS, SLOW_WIDTH] x [SLOW_WIDTH, SLOW_WIDTH] reusing ONE initializer (file ~1 MB).
    """
    rng = np.random.default_rng(7)
    square = (rng.standard_normal((SLOW_WIDTH, SLOW_WIDTH)) / np.sqrt(SLOW_WIDTH)).astype(
        np.float32
    )
    nodes, inits = _mlp_nodes(weights)
    inits += [
        numpy_helper.from_array(rng.random((SLOW_ROWS, 64), np.float32) / 8, "S_spread"),
        numpy_helper.from_array(rng.standard_normal((64, SLOW_WIDTH)).astype(np.float32), "S_in"),
        numpy_helper.from_array(square, "S_sq"),
        numpy_helper.from_array(np.zeros((SLOW_WIDTH, 10), np.float32), "S_out"),
        numpy_helper.from_array(np.array([1], np.int64), "S_axis"),
    ]
    # Each input row is spread into SLOW_ROWS rows so the work per request row is a real GEMM.
    nodes += [
        helper.make_node("Unsqueeze", ["input", "S_axis"], ["s_u"]),  # [N,1,64]
        helper.make_node("Add", ["s_u", "S_spread"], ["s_rows"]),  # [N,R,64]
        helper.make_node("MatMul", ["s_rows", "S_in"], ["s_0"]),  # [N,R,W]
    ]
    for step in range(SLOW_STEPS):
        nodes += [
            helper.make_node("MatMul", [f"s_{step}", "S_sq"], [f"s_mm{step}"]),
            helper.make_node("Tanh", [f"s_mm{step}"], [f"s_{step + 1}"]),
        ]
    nodes += [
        helper.make_node("ReduceMean", [f"s_{SLOW_STEPS}"], ["s_mean"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["s_mean", "S_out"], ["s_zero"]),  # [N,10] of zeros
        helper.make_node("Add", ["logits", "s_zero"], ["logits_slow"]),
        helper.make_node("Softmax", ["logits_slow"], ["probabilities"], axis=1),
    ]
    inp, out = _io()
    return _model(helper.make_graph(nodes, "digits_slow", [inp], [out], inits))


def quantize_int8(src: Path, dst: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice about pre-processing big models
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    # Node names and intermediate shape hints are optional; on a 2.4k-weight MLP they are a
    # quarter of the quantized file, so dropping them is what gets the size ratio past 2.5x.
    model = onnx.load(dst)
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.name = ""
    onnx.checker.check_model(model)
    onnx.save(model, dst)


def onnx_predict(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ONNX model at `path` with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run(["probabilities"], {"input": x})[0])


def tflite_predict(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the batch-1 TFLite model at `path` row by row."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    runner = Interpreter(model_path=str(path)).get_signature_runner()

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate([runner(input=row[None, :])["probabilities"] for row in x])

    return predict


def build_tflite(weights: Weights, x_train: np.ndarray, out: Path) -> list[Path]:
    """digits_fp32.tflite and digits_int8.tflite from the same weights (needs TensorFlow)."""
    import tensorflow as tf

    tf.random.set_seed(0)
    (w1, b1), (w2, b2) = weights

    class Mlp(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vars = [tf.Variable(a, trainable=False) for a in (w1, b1, w2, b2)]

        @tf.function(input_signature=[tf.TensorSpec([1, 64], tf.float32, name="input")])
        def serve(self, input: Any) -> dict[str, Any]:
            v1, c1, v2, c2 = self.vars
            hidden = tf.nn.relu(tf.matmul(input, v1) + c1)
            return {"probabilities": tf.nn.softmax(tf.matmul(hidden, v2) + c2, axis=1)}

    module = Mlp()
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
        for kind in ("fp32", "int8"):
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if kind == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = _representative(x_train)
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            path = out / f"digits_{kind}.tflite"
            path.write_bytes(converter.convert())
            paths.append(path)
    return paths


def _representative(x: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    def rows() -> Iterator[list[np.ndarray]]:
        for row in x[:300]:
            yield [row[None, :]]

    return rows


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose argmax is the label, in percent."""
    return float((predict(x).argmax(axis=1) == y).mean() * 100)


def onnx_weights(path: Path) -> Weights:
    """The MLP weights back from an ONNX file this script wrote."""
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    return [(arrays["W1"], arrays["B1"]), (arrays["W2"], arrays["B2"])]


def build_onnx(out: Path, x_train: np.ndarray, y_train: np.ndarray) -> None:
    """The four ONNX fixtures."""
    small = train_mlp(x_train, y_train, hidden=32, seed=0)
    onnx.save(mlp_onnx(small, "digits"), out / "digits_fp32.onnx")
    wide = train_mlp(x_train, y_train, hidden=64, seed=1)
    onnx.save(mlp_onnx(wide, "digits_h64"), out / "digits_h64_fp32.onnx")
    onnx.save(slow_onnx(small), out / "slow.onnx")
    quantize_int8(out / "digits_fp32.onnx", out / "digits_int8.onnx")


def report(out: Path, x_test: np.ndarray, y_test: np.ndarray) -> None:
    """Print each fixture's size and test accuracy (with whichever runtimes are installed)."""
    for path in sorted(out.iterdir()):
        size = f"{path.name:24} {path.stat().st_size:>9,} bytes"
        if path.suffix == ".npz":
            print(f"{size}  {len(y_test)} test rows")
            continue
        predict = {".onnx": onnx_predict, ".tflite": tflite_predict}.get(path.suffix)
        if predict is None:
            continue
        try:
            print(f"{size}  accuracy {accuracy(predict(path), x_test, y_test):.2f}%")
        except ImportError as exc:
            print(f"{size}  (not checked here: {exc.name} is not installed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--tflite",
        action="store_true",
        help="build only the TFLite models, from OUT/digits_fp32.onnx's weights (needs TensorFlow)",
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_split()
    if args.tflite:
        build_tflite(onnx_weights(out / "digits_fp32.onnx"), x_train, out)
    else:
        np.savez(out / "digits_test.npz", X=x_test, y=y_test)
        build_onnx(out, x_train, y_train)
    report(out, x_test, y_test)


if __name__ == "__main__":
    main()

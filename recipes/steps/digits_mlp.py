"""The digits classifier of recipes/digits-edge.yaml: data, training, ONNX export, accuracy.

Shared by the digits_* step scripts (shipped with them by the recipe's `files:`). The model is a
scikit-learn MLPClassifier with one ReLU hidden layer whose learned weights are written BY HAND
into an ONNX graph with onnx.helper, as scripts/make_model_fixtures.py does: MatMul+Add -> Relu
-> MatMul+Add -> Softmax, opset 17, IR 8. MatMul rather than Gemm because onnxruntime's dynamic
quantizer only rewrites MatMul (that is what makes mle/quantize shrink the file).
Input "input" float32 [N,64] (pixels / 16), output "probabilities" float32 [N,10].
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; old enough for every onnxruntime >= 1.14

Weights = list[tuple[np.ndarray, np.ndarray]]  # [(W [in,out], b [out]), ...] per layer


def load_digits_scaled() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (offline): pixels scaled to [0,1] float32, labels int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def split(
    x: np.ndarray, y: np.ndarray, share: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed stratified split: (x_keep, x_held, y_keep, y_held), `share` of the rows held out."""
    from sklearn.model_selection import train_test_split

    x_keep, x_held, y_keep, y_held = train_test_split(
        x, y, test_size=share, random_state=seed, stratify=y
    )
    return x_keep, x_held, y_keep, y_held


def train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, max_iter: int, seed: int) -> Weights:
    """Train a one-hidden-layer ReLU MLP; return its float32 weights."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # A small max_iter is a choice here (the run stays short), not a mistake to warn about.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return [
        (w.astype(np.float32), b.astype(np.float32))
        for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
    ]


def mlp_onnx(weights: Weights, name: str) -> onnx.ModelProto:
    """The MLP as a checked ONNX model."""
    (w1, b1), (w2, b2) = weights
    initializers = [
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
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", w1.shape[0]])
    out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", w2.shape[1]])
    graph = helper.make_graph(nodes, name, [inp], [out], initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mle-digits-edge"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Share of rows an ONNX model classifies right (0..1), and its predicted classes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predicted = np.asarray(session.run(None, {name: x})[0]).argmax(axis=1)
    return float((predicted == y).mean()), predicted


def load_xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """X and y of an .npz written by the prepare step."""
    with np.load(path, allow_pickle=False) as data:
        return data["X"], data["y"]


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """The step's metrics file (a JSON object the ledger records)."""
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

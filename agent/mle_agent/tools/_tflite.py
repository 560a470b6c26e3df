"""ONNX -> int8 TFLite through TensorFlow, for the op subset small classifiers use.

The ONNX graph is evaluated node by node with TensorFlow ops inside a `tf.function` whose
signature is named like the ONNX graph (inputs and outputs keep their names; a batch dimension
that is dynamic in ONNX stays dynamic), with the initializers as constants; the TFLite converter
then quantizes it with `Optimize.DEFAULT`: dynamic-range int8 without calibration data, full int8
with it (the calibration rows are the representative dataset; float32 input and output are kept).
Anything outside the subset is refused before TensorFlow is imported, naming the ops and pointing
to onnx2tf, which converts whole ONNX opsets.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.tools._cli import first_line
from mle_proto.errors import FailedPrecondition, InvalidInput, MleError

if TYPE_CHECKING:
    import onnx

    from mle_agent.tools.quantize import Calibration

__all__ = [
    "SUPPORTED_OPS",
    "TENSORFLOW_MISSING",
    "check_convertible",
    "convert",
    "require_tensorflow",
]

TENSORFLOW_MISSING = (
    "--to tflite needs TensorFlow, not installed here: pip install 'mle-toolchain[tflite]' "
    "(tensorflow-cpu)"
)
_MAX_REPRESENTATIVE = 1000  # calibration calls; TF's docs find a few hundred samples enough

# An ONNX node's inputs as TF tensors or numpy constants, its attributes, the opset -> its output.
_Op = Callable[[Any, list[Any], dict[str, Any], int], Any]


def check_convertible(model: Path) -> None:
    """InvalidInput naming the ops outside the subset (with onnx2tf as the way out)."""
    import onnx

    graph = onnx.load(model).graph
    unsupported = sorted(
        _op_name(node)
        for node in graph.node
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS
    )
    if unsupported:
        ops = ", ".join(dict.fromkeys(unsupported))
        raise InvalidInput(
            f"{model}: ONNX op(s) {ops} not supported by mle's TFLite converter (it handles "
            f"{', '.join(sorted(SUPPORTED_OPS))}); convert it with onnx2tf (pip install onnx2tf) "
            "and quantize the result with TensorFlow's TFLiteConverter"
        )


def require_tensorflow() -> None:
    """FailedPrecondition saying what to install when TensorFlow is absent."""
    if importlib.util.find_spec("tensorflow") is None:
        raise FailedPrecondition(TENSORFLOW_MISSING)


def convert(source: Path, target: Path, calibration: Calibration | None) -> None:
    """Write the int8 TFLite model of the ONNX model at `source` to `target`."""
    import onnx

    model = onnx.load(source)
    with _quiet_tensorflow():
        tf = _tensorflow()
        try:
            data = _converter(tf, model, calibration).convert()
        except MleError:
            raise
        except Exception as exc:  # noqa: BLE001 - tracing and converting raise many types
            message = f"TensorFlow could not convert {source}: {first_line(exc)}"
            raise InvalidInput(message) from None
    target.write_bytes(data)


def _converter(tf: Any, model: onnx.ModelProto, calibration: Calibration | None) -> Any:
    """A TFLiteConverter for the graph traced as a tf.function, set up to quantize to int8."""
    module = tf.Module()
    module.serve = _function(tf, model)
    concrete = module.serve.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.exclude_conversion_metadata = True
    if calibration is not None:
        converter.representative_dataset = _representative(calibration, _names(model))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def _function(tf: Any, model: onnx.ModelProto) -> Any:
    """A tf.function computing the graph's outputs (by name) from its inputs."""
    from onnx import numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    names = _names(model)
    inputs = [i for i in graph.input if i.name not in constants]
    signature = [_spec(tf, value, names[value.name]) for value in inputs]

    def serve(*tensors: Any) -> dict[str, Any]:
        values: dict[str, Any] = dict(constants)
        values.update({value.name: t for value, t in zip(inputs, tensors, strict=True)})
        for node in graph.node:
            _evaluate(tf, node, values, opset)
        return {names[o.name]: tf.identity(values[o.name]) for o in graph.output}

    return tf.function(serve, input_signature=signature, autograph=False)


def _evaluate(tf: Any, node: onnx.NodeProto, values: dict[str, Any], opset: int) -> None:
    from onnx import helper

    args = [values[name] if name else None for name in node.input]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Constant":
        values[node.output[0]] = _constant(attrs)
        return
    values[node.output[0]] = SUPPORTED_OPS[node.op_type](tf, args, attrs, opset)


def _constant(attrs: Mapping[str, Any]) -> Any:
    import numpy as np
    from onnx import numpy_helper

    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key in ("value_float", "value_int"):
        if key in attrs:
            return np.array(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return np.array(list(attrs[key]))
    raise InvalidInput(f"Constant with attributes {sorted(attrs)} is not supported")


def _gemm(tf: Any, args: list[Any], attrs: dict[str, Any], opset: int) -> Any:
    product = tf.linalg.matmul(
        args[0],
        args[1],
        transpose_a=bool(attrs.get("transA", 0)),
        transpose_b=bool(attrs.get("transB", 0)),
    )
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        product = product * alpha
    if len(args) > 2 and args[2] is not None:
        product = product + (args[2] * beta if beta != 1.0 else args[2])
    return product


def _softmax(tf: Any, args: list[Any], attrs: dict[str, Any], opset: int) -> Any:
    x = args[0]
    if opset >= 13:
        return tf.nn.softmax(x, axis=attrs.get("axis", -1))
    # Before opset 13, Softmax flattened the input to 2-D at `axis` (default 1).
    axis = attrs.get("axis", 1) % len(x.shape)
    if axis == len(x.shape) - 1:
        return tf.nn.softmax(x, axis=-1)
    return tf.reshape(tf.nn.softmax(_flatten(tf, x, axis), axis=-1), tf.shape(x))


def _reshape(tf: Any, args: list[Any], attrs: dict[str, Any], opset: int) -> Any:
    import numpy as np

    x, shape = args[0], args[1]
    if not isinstance(shape, np.ndarray):
        raise InvalidInput("Reshape with a computed shape is not supported (only a constant one)")
    dims = [int(d) for d in shape.reshape(-1)]
    if 0 in dims and not attrs.get("allowzero", 0):  # 0 copies the input's dimension
        size = tf.shape(x)
        return tf.reshape(x, tf.stack([size[i] if d == 0 else d for i, d in enumerate(dims)]))
    return tf.reshape(x, dims)


def _flatten_op(tf: Any, args: list[Any], attrs: dict[str, Any], opset: int) -> Any:
    x = args[0]
    return _flatten(tf, x, attrs.get("axis", 1) % (len(x.shape) + 1))


def _flatten(tf: Any, x: Any, axis: int) -> Any:
    """x as 2-D: the dimensions before `axis` times those from it."""
    dims = list(x.shape)
    if None not in dims[axis:]:
        return tf.reshape(x, [-1, prod(dims[axis:])])
    if None not in dims[:axis]:
        return tf.reshape(x, [prod(dims[:axis]), -1])
    return tf.reshape(x, tf.stack([tf.reduce_prod(tf.shape(x)[:axis]), -1]))


def _unary(name: str) -> _Op:
    return lambda tf, args, attrs, opset: _attribute(tf, name)(args[0])


def _binary(name: str) -> _Op:
    return lambda tf, args, attrs, opset: _attribute(tf, name)(args[0], args[1])


def _attribute(tf: Any, dotted: str) -> Any:
    value = tf
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


SUPPORTED_OPS: Mapping[str, _Op] = {
    "Add": _binary("math.add"),
    "Constant": _unary("identity"),  # evaluated from its attributes in _evaluate
    "Div": _binary("math.divide"),
    "Flatten": _flatten_op,
    "Gemm": _gemm,
    "Identity": _unary("identity"),
    "MatMul": _binary("linalg.matmul"),
    "Mul": _binary("math.multiply"),
    "Relu": _unary("nn.relu"),
    "Reshape": _reshape,
    "Sigmoid": _unary("math.sigmoid"),
    "Softmax": _softmax,
    "Sub": _binary("math.subtract"),
    "Tanh": _unary("math.tanh"),
}


def _names(model: onnx.ModelProto) -> dict[str, str]:
    """Graph input and output name -> the name in the TFLite signature (a safe identifier)."""
    values = [*model.graph.input, *model.graph.output]
    return {v.name: "".join(c if c.isalnum() else "_" for c in v.name) or "x" for v in values}


def _spec(tf: Any, value: onnx.ValueInfoProto, name: str) -> Any:
    from onnx import helper

    tensor = value.type.tensor_type
    dtype = tf.as_dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return tf.TensorSpec(shape, dtype, name=name)


def _representative(
    calibration: Calibration, names: Mapping[str, str]
) -> Callable[[], Iterator[dict[str, Any]]]:
    def batches() -> Iterator[dict[str, Any]]:
        for index, batch in enumerate(calibration.batches(1)):
            if index == _MAX_REPRESENTATIVE:
                return
            yield {names[name]: array for name, array in batch.items()}

    return batches


def _tensorflow() -> Any:
    try:
        return importlib.import_module("tensorflow")
    except ImportError:
        raise FailedPrecondition(TENSORFLOW_MISSING) from None


@contextlib.contextmanager
def _quiet_tensorflow() -> Iterator[None]:
    """TensorFlow's start-up notices and deprecation warnings say nothing to a quantize user."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain else node.op_type

"""Edits of an ONNX graph around onnxruntime's quantizer: named nodes, Gemm as MatMul + Add (the
dynamic quantizer only rewrites MatMul), float outputs, and a compact result."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mle_agent.tools._cli import first_line
from mle_proto.errors import InvalidInput

if TYPE_CHECKING:
    import onnx

__all__ = ["compact", "output_nodes", "prepared"]


def prepared(source: Path, gemm_as_matmul: bool) -> onnx.ModelProto:
    """The model with every node named (to exclude some by name), optionally Gemm as MatMul."""
    import onnx

    model = onnx.load(source)
    nodes = []
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{index}_{node.op_type}"
        rewrite = gemm_as_matmul and node.op_type == "Gemm"
        nodes += _as_matmul(model, node) if rewrite else [node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _as_matmul(model: onnx.ModelProto, gemm: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Gemm(A, B, C) as MatMul(A, B) + C when it is a plain dense layer with constant B."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    weights = {t.name: t for t in model.graph.initializer}
    plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    if not plain or attrs.get("transA", 0) or gemm.input[1] not in weights:
        return [gemm]
    b = gemm.input[1]
    if attrs.get("transB", 0):
        transposed = numpy_helper.from_array(numpy_helper.to_array(weights[b]).T.copy(), b)
        shared = sum(list(node.input).count(b) for node in model.graph.node) > 1
        if shared:  # another node still needs the weight as it is
            transposed.name = b = f"{b}_t"
            model.graph.initializer.append(transposed)
        else:
            weights[b].CopyFrom(transposed)
    if len(gemm.input) < 3 or not gemm.input[2]:
        return [helper.make_node("MatMul", [gemm.input[0], b], list(gemm.output), gemm.name)]
    product = f"{gemm.output[0]}_mm"
    return [
        helper.make_node("MatMul", [gemm.input[0], b], [product], f"{gemm.name}_mm"),
        helper.make_node("Add", [product, gemm.input[2]], list(gemm.output), gemm.name),
    ]


def output_nodes(model: onnx.ModelProto) -> list[str]:
    outputs = {value.name for value in model.graph.output}
    return [node.name for node in model.graph.node if set(node.output) & outputs]


def compact(path: Path) -> None:
    """Drop node names and intermediate shape hints (optional in ONNX) from the written model."""
    import onnx

    model = onnx.load(path)
    del model.graph.value_info[:]
    for node in model.graph.node:
        node.name = ""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidInput(f"the quantized model is not valid ONNX: {first_line(exc)}") from None
    onnx.save(model, path)

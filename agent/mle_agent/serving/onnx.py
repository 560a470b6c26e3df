"""The onnxruntime adapter: one InferenceSession per loaded version (its `run` is thread-safe)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.serving.backend import DATATYPES, TensorSpec
from mle_agent.serving.runtimes import not_installed
from mle_proto.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["OnnxBackend", "load"]

RUNTIME = "onnxruntime"
# onnxruntime element type names that differ from the OIP name in more than case.
_TYPE_NAMES = {"float": "FP32", "double": "FP64", "float16": "FP16"}


class OnnxBackend:
    """A model loaded in an onnxruntime InferenceSession on the CPU."""

    runtime = RUNTIME

    def __init__(self, session: Any, name: str) -> None:
        self._session = session
        self._name = name
        self.inputs = _specs(session.get_inputs(), name)
        self.outputs = _specs(session.get_outputs(), name)
        self._output_names = [spec.name for spec in self.outputs]

    def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run the session; a failure inside the runtime becomes InvalidInput."""
        try:
            results = self._session.run(self._output_names, dict(inputs))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base but Exception
            raise InvalidInput(f"{self._name}: onnxruntime failed: {_first_line(exc)}") from None
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        """Drop the session; onnxruntime frees it when the last reference goes."""
        self._session = None


def load(path: Path, threads: int) -> OnnxBackend:
    """Open `path` with onnxruntime (CPU, graph optimizations on, `threads` intra-op if > 0)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FailedPrecondition(not_installed(RUNTIME)) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would go to the agent's stderr
    if threads > 0:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors share no base but Exception
        raise InvalidInput(
            f"{path.name} cannot be loaded by onnxruntime: {_first_line(exc)}"
        ) from None
    return OnnxBackend(session, path.name)


def _specs(args: Sequence[Any], model: str) -> tuple[TensorSpec, ...]:
    """TensorSpecs from onnxruntime NodeArgs ('tensor(float)' -> FP32, symbolic dims -> -1)."""
    return tuple(
        TensorSpec(arg.name, _datatype(arg.type, arg.name, model), _shape(arg.shape))
        for arg in args
    )


def _datatype(type_name: str, tensor: str, model: str) -> str:
    element = type_name.removeprefix("tensor(").removesuffix(")")
    datatype = _TYPE_NAMES.get(element, element.upper())
    if datatype not in DATATYPES:
        raise InvalidInput(f"{model}: tensor {tensor!r} has type {type_name}, not supported")
    return datatype


def _shape(dims: Sequence[Any] | None) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims or ())


def _first_line(exc: BaseException) -> str:
    """The runtime's message without its bracketed error-code prefix, first line only."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]  # "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : why"
    return text

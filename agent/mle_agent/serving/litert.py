"""The LiteRT adapter: ai_edge_litert, else tflite_runtime, else tensorflow.lite.

TFLite interpreters are not thread-safe, so a version keeps a small pool of them (one per
configured thread, two by default; each single-threaded) and a call borrows one. A model whose
every input and output has a fixed leading dimension of 1 (the usual TFLite export) is advertised
with a dynamic batch dimension (-1): a request of N rows runs row by row and the answers are
stacked, so clients send [N,64] as they would to the ONNX model. Dynamic dims (-1 in the shape
signature) are resized per call. When the model has one signature, tensors take its names.
"""

from __future__ import annotations

import importlib
import queue
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.serving.backend import DATATYPES, TensorSpec
from mle_agent.serving.runtimes import not_installed
from mle_proto.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["LiteRtBackend", "interpreter_class", "load"]

RUNTIME = "litert"
_NAMES_BY_DTYPE = {numpy_name: oip for oip, numpy_name in DATATYPES.items()}


class LiteRtBackend:
    """A TFLite model served from a pool of interpreters."""

    runtime = RUNTIME

    def __init__(self, interpreters: list[Any], name: str) -> None:
        first = interpreters[0]
        self._name = name
        inputs, outputs = _details(first)
        # Tensor index per name: the same in every interpreter of one model file.
        self._in_index = {key: int(d["index"]) for key, d in inputs.items()}
        self._out_index = {key: int(d["index"]) for key, d in outputs.items()}
        self._dynamic = {key: -1 in _signature(d) for key, d in inputs.items()}
        self._rowwise = all(_batch_of_one(d) for d in [*inputs.values(), *outputs.values()])
        self.inputs = tuple(_spec(k, d, self._rowwise, name) for k, d in inputs.items())
        self.outputs = tuple(_spec(k, d, self._rowwise, name) for k, d in outputs.items())
        self._pool: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for interpreter in interpreters:
            self._pool.put(_Slot(interpreter))

    def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run on a borrowed interpreter, row by row when the model takes one row at a time."""
        rows = _rows(inputs) if self._rowwise else 1
        with self._borrow() as slot:
            if not self._rowwise or rows == 1:
                return self._invoke(slot, inputs)
            if rows == 0:
                return self._empty()
            answers = [
                self._invoke(slot, {k: v[i : i + 1] for k, v in inputs.items()})
                for i in range(rows)
            ]
        import numpy as np

        return {key: np.concatenate([a[key] for a in answers]) for key in self._out_index}

    def close(self) -> None:
        """Drop the interpreters."""
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                return

    @contextmanager
    def _borrow(self) -> Iterator[_Slot]:
        slot = self._pool.get()
        try:
            yield slot
        finally:
            self._pool.put(slot)

    def _invoke(
        self, slot: _Slot, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        import numpy as np

        interpreter = slot.interpreter
        try:
            self._resize(slot, inputs)
            for key, index in self._in_index.items():
                interpreter.set_tensor(index, np.ascontiguousarray(inputs[key]))
            interpreter.invoke()
            return {key: interpreter.get_tensor(i) for key, i in self._out_index.items()}
        except (ValueError, RuntimeError) as exc:
            raise InvalidInput(f"{self._name}: LiteRT failed: {_first_line(exc)}") from None

    def _resize(self, slot: _Slot, inputs: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Resize dynamic inputs whose shape changed since this interpreter's last call."""
        changed = False
        for key, index in self._in_index.items():
            shape = tuple(inputs[key].shape)
            if self._dynamic[key] and slot.shapes.get(key) != shape:
                slot.interpreter.resize_tensor_input(index, list(shape), strict=True)
                slot.shapes[key] = shape
                changed = True
        if changed:
            slot.interpreter.allocate_tensors()

    def _empty(self) -> dict[str, npt.NDArray[np.generic]]:
        import numpy as np

        return {
            spec.name: np.zeros((0, *spec.shape[1:]), DATATYPES[spec.datatype])
            for spec in self.outputs
        }


@dataclass
class _Slot:
    """One interpreter and the input shapes it is allocated for (only it may touch them)."""

    interpreter: Any
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def interpreter_class() -> Any:
    """The Interpreter class of the first LiteRT provider that imports."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:  # tflite_runtime 2.14 fails to import under numpy 2 (AttributeError, not ImportError)
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except (ImportError, AttributeError):
        pass
    try:  # by name: tensorflow has no type stubs here, and is the last resort anyway
        tf = importlib.import_module("tensorflow")
    except ImportError:
        raise FailedPrecondition(not_installed(RUNTIME)) from None
    return tf.lite.Interpreter


def load(path: Path, threads: int) -> LiteRtBackend:
    """Open `path` in a pool of `threads` (default 2) single-threaded interpreters."""
    interpreter = interpreter_class()
    pool = []
    for _ in range(threads if threads > 0 else 2):
        try:
            instance = interpreter(model_path=str(path), num_threads=1)
            instance.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InvalidInput(
                f"{path.name} cannot be loaded by litert: {_first_line(exc)}"
            ) from None
        pool.append(instance)
    return LiteRtBackend(pool, path.name)


def _details(interpreter: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Input and output tensor details by name: the signature's names when there is one."""
    signatures = interpreter.get_signature_list()
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        return dict(runner.get_input_details()), dict(runner.get_output_details())
    return (
        {d["name"]: d for d in interpreter.get_input_details()},
        {d["name"]: d for d in interpreter.get_output_details()},
    )


def _signature(detail: Mapping[str, Any]) -> list[int]:
    shape = detail.get("shape_signature")
    return [int(d) for d in (shape if shape is not None and len(shape) else detail["shape"])]


def _batch_of_one(detail: Mapping[str, Any]) -> bool:
    shape = _signature(detail)
    return len(shape) >= 2 and shape[0] == 1


def _spec(name: str, detail: Mapping[str, Any], rowwise: bool, model: str) -> TensorSpec:
    import numpy as np

    dtype = np.dtype(detail["dtype"]).name
    if dtype not in _NAMES_BY_DTYPE:
        raise InvalidInput(f"{model}: tensor {name!r} has type {dtype}, not supported")
    shape = _signature(detail)
    if rowwise:
        shape[0] = -1
    return TensorSpec(name, _NAMES_BY_DTYPE[dtype], tuple(shape))


def _rows(inputs: Mapping[str, npt.NDArray[np.generic]]) -> int:
    return min((v.shape[0] if v.ndim else 1 for v in inputs.values()), default=1)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

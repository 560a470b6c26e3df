"""Which runtime a model file needs, and loading it with that runtime's adapter.

The format is told by magic bytes, never by the file name: a TFLite flatbuffer carries the
identifier "TFL3" at bytes 4..8; an ONNX file is a protobuf ModelProto whose first field on the
wire is ir_version (field 1, varint, tag byte 0x08) with a small value. The adapters (`onnx`,
`litert`) and numpy are imported only when a model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from mle_agent.serving.backend import DATATYPES, RUNTIME_EXTRAS
from mle_proto.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    from mle_agent.serving.backend import Backend, BackendLoader

__all__ = [
    "PLATFORMS",
    "available_runtimes",
    "detect_runtime",
    "load_backend",
    "not_installed",
    "warm_up",
]

# Runtime name -> OIP ModelMetadata.platform.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}

# Runtime name -> the importable packages that provide it, in order of preference.
_PROVIDERS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime",),
    "litert": ("ai_edge_litert", "tflite_runtime", "tensorflow"),
}
_ADAPTERS = {"onnxruntime": "mle_agent.serving.onnx", "litert": "mle_agent.serving.litert"}
_TFLITE_MAGIC = b"TFL3"
_ONNX_IR_VERSIONS = range(1, 21)  # plausible ir_version values; 10 is current in 2025


def detect_runtime(path: Path) -> str:
    """ "onnxruntime" or "litert" from the file's magic bytes; InvalidInput for anything else
    (empty, truncated, not a model), naming the file."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise InvalidInput(f"cannot read model file {path.name}: {exc.strerror}") from None
    if len(head) >= 8 and head[4:8] == _TFLITE_MAGIC:
        return "litert"
    if len(head) >= 8 and head[0] == 0x08 and _varint(head, 1) in _ONNX_IR_VERSIONS:
        return "onnxruntime"
    raise InvalidInput(f"{path.name} is not an ONNX or TFLite model")


def available_runtimes() -> tuple[str, ...]:
    """Runtime names importable here ("onnxruntime", "litert"), found without importing them."""
    return tuple(name for name, packages in _PROVIDERS.items() if any(map(_findable, packages)))


def load_backend(path: Path, runtime: str, threads: int = 0) -> Backend:
    """Load a model in this process. FailedPrecondition when the runtime is not installed (the
    message says which extra to install), InvalidInput when the runtime rejects the file."""
    if runtime not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        raise InvalidInput(f"unknown runtime {runtime!r}: one of {known}")
    if runtime not in available_runtimes() or not _findable("numpy"):
        raise FailedPrecondition(not_installed(runtime))
    module = importlib.import_module(_ADAPTERS[runtime])
    loader: BackendLoader = module.load
    return loader(path, threads)


def not_installed(runtime: str) -> str:
    """The message for a runtime missing on this agent, with the command that installs it."""
    return f"the {runtime} runtime is not installed on this agent: {RUNTIME_EXTRAS[runtime]}"


def warm_up(backend: Backend) -> None:
    """One inference on zeros shaped like the inputs (-1 dims as 1)."""
    import numpy as np

    zeros = {
        spec.name: np.zeros([1 if d < 0 else d for d in spec.shape], DATATYPES[spec.datatype])
        for spec in backend.inputs
    }
    backend.infer(zeros)


def _varint(data: bytes, start: int) -> int:
    """The protobuf varint at `start`; -1 when the bytes end before it does."""
    value, shift = 0, 0
    for byte in data[start : start + 10]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return -1


def _findable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or half-installed package
        return False

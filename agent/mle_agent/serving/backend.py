"""The contract between the serving core and a runtime adapter.

A Backend is one loaded model version. `infer` may be called from several threads at once: an
adapter whose runtime is not thread-safe (TFLite interpreters) serializes or pools internally.
Arrays are numpy arrays; numpy is imported only by adapters and the code that calls them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DATATYPES",
    "NUMPY_TO_OIP",
    "RUNTIME_EXTRAS",
    "Backend",
    "BackendLoader",
    "TensorSpec",
]

# Open Inference Protocol datatype name -> numpy dtype name.
DATATYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
# numpy dtype name -> Open Inference Protocol datatype name (the inverse of DATATYPES).
NUMPY_TO_OIP: Mapping[str, str] = {numpy_name: oip for oip, numpy_name in DATATYPES.items()}

# Runtime name (as in manifests and VersionStatus.runtime) -> what to install on the device.
RUNTIME_EXTRAS: Mapping[str, str] = {
    "onnxruntime": "pip install 'mle-toolchain[onnx]'",
    "litert": "pip install 'mle-toolchain[litert]'",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: OIP datatype name and shape (-1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def batched(self) -> bool:
        """Whether the first dimension is dynamic, so requests can be batched along it."""
        return bool(self.shape) and self.shape[0] == -1

    def to_json(self) -> dict[str, Any]:
        """The spec as stored in manifests and printed by the load check."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        """A spec read back (KeyError/TypeError/ValueError when malformed)."""
        return cls(str(data["name"]), str(data["datatype"]), tuple(int(d) for d in data["shape"]))


class Backend(Protocol):
    """One loaded model version."""

    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(
        self, inputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run the model on validated inputs (names, dtypes and shapes match `inputs`)."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; no call to infer follows."""
        ...


class BackendLoader(Protocol):
    """Loads a model file with one runtime: `load(path, threads)`."""

    def __call__(self, path: Path, threads: int) -> Backend: ...

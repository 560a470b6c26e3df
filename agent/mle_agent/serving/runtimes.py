"""Which runtime a model file needs, and loading it with that runtime's adapter.

CONTRACT SKELETON (lead): signatures the registry is written against; bodies to fill in.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mle_agent.serving.backend import Backend

__all__ = ["PLATFORMS", "available_runtimes", "detect_runtime", "load_backend", "warm_up"]

# Runtime name -> OIP ModelMetadata.platform.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}


def detect_runtime(path: Path) -> str:
    """ "onnxruntime" or "litert" from the file's magic bytes; InvalidInput for anything else
    (empty, truncated, not a model), naming the file."""
    raise NotImplementedError


def available_runtimes() -> tuple[str, ...]:
    """Runtime names importable here ("onnxruntime", "litert"), found without importing them."""
    raise NotImplementedError


def load_backend(path: Path, runtime: str, threads: int = 0) -> Backend:
    """Load a model in this process. FailedPrecondition when the runtime is not installed (the
    message says which extra to install), InvalidInput when the runtime rejects the file."""
    raise NotImplementedError


def warm_up(backend: Backend) -> None:
    """One inference on zeros shaped like the inputs (-1 dims as 1)."""
    raise NotImplementedError

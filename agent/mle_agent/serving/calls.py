"""What the front-ends ask the registry and what it answers: inference calls and metadata.

The registry re-exports these; numpy is only named for type checking.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.backend import TensorSpec

__all__ = ["InferRequest", "InferResult", "ModelMetadata"]


@dataclass(frozen=True)
class InferRequest:
    """One inference call as the front-ends decode it."""

    model: str
    inputs: Mapping[str, npt.NDArray[np.generic]]
    version: int | None = None  # None = the route decides
    request_id: str = ""  # split routing is sticky by this id; empty = random
    outputs: tuple[str, ...] = ()  # empty = every output


@dataclass(frozen=True)
class InferResult:
    """The answer and which version produced it."""

    model: str
    version: int
    outputs: dict[str, npt.NDArray[np.generic]]
    # Extra response parameters, e.g. {"mle_policy": "fallback"}, {"mle_consensus": "1,2,3"}.
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelMetadata:
    """What OIP ModelMetadata answers."""

    name: str
    versions: tuple[int, ...]
    platform: str  # "onnxruntime_onnx" or "tensorflow_lite"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

"""ModelRegistry: the models an agent serves, their versions and routes; thread-safe.

CONTRACT SKELETON (lead): the signatures and dataclasses below are what the gRPC servicers, the
REST front-end and the CLI are written against. The implementation fills in the bodies.

Semantics:
- Versions are integers per model name, stored under `<data_dir>/models/<name>/<version>/` with
  the model file and `manifest.json`; the route lives in `<data_dir>/models/<name>/route.json`
  with its history (for rollback). State survives an agent restart: `start()` reloads the routes
  and loads the versions they use.
- Versions the route uses are loaded (READY); the previous primary stays loaded too (fast
  rollback) unless the model was deployed with SWAP_MODE_UNLOAD_FIRST; others are AVAILABLE.
- `infer` picks a version from an immutable snapshot of the route taken when the request starts,
  so a swap never fails an in-flight request, and the version it names was live at that moment.
- Errors are `mle_proto.errors` classes (their gRPC status is what the client sees): NotFound for
  an unknown model or version, InvalidInput for wrong input names/dtypes/shapes or a file that is
  not a model, FailedPrecondition for a runtime not installed (the message names the extra) or an
  undeploy of a routed version, AgentUnavailable for a version still loading past the wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.backend import TensorSpec
    from mle_agent.settings import AgentSettings
    from mle_proto.store import ArtifactStore
    from mle_proto.v1 import agent_pb2 as pb

__all__ = ["InferRequest", "InferResult", "ModelMetadata", "ModelRegistry"]


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


class ModelRegistry:
    """Every model the agent serves."""

    def __init__(self, settings: AgentSettings, store: ArtifactStore) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Load the routes on disk and the versions they use (blocking; call off the loop)."""
        raise NotImplementedError

    def deploy(self, request: pb.DeployRequest) -> pb.DeployResponse:
        """Validate, check-load in a child process, load, warm up, then switch (blocking)."""
        raise NotImplementedError

    def route(self, request: pb.RouteRequest) -> pb.ModelStatus:
        """Apply a new route (loading what it needs first) or roll back (blocking)."""
        raise NotImplementedError

    def undeploy(self, request: pb.UndeployRequest) -> pb.ModelStatus:
        """Remove a version or a whole model."""
        raise NotImplementedError

    def status(self, name: str = "") -> list[pb.ModelStatus]:
        """Models (one, or all when name is empty) with versions, route and stats."""
        raise NotImplementedError

    def infer(self, request: InferRequest) -> InferResult:
        """Route, validate inputs, run (batched where configured), record stats (blocking)."""
        raise NotImplementedError

    def metadata(self, name: str, version: int | None = None) -> ModelMetadata:
        """Metadata of a model (its primary version) or of one version."""
        raise NotImplementedError

    def ready(self, name: str = "", version: int | None = None) -> bool:
        """Server readiness (every routed version loaded) or one model's / version's."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop batchers and release every backend."""
        raise NotImplementedError

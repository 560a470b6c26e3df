"""One model in memory: its versions, route, what is loaded; and its status on the wire.

A `ModelState` is owned by the registry and mutated only under the registry lock; the route is
replaced as a whole, never edited, so a snapshot of it stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from mle_agent.serving.backend import TensorSpec
    from mle_agent.serving.loaded import LoadedVersion
    from mle_agent.serving.repository import Manifest
    from mle_agent.serving.routing import Route
    from mle_agent.serving.stats import VersionCounters

__all__ = ["ModelState"]


@dataclass(eq=False)
class ModelState:
    """One model in memory."""

    name: str
    manifests: dict[int, Manifest] = field(default_factory=dict)
    route: Route | None = None
    history: list[Route] = field(default_factory=list)  # oldest first; rollback pops the last
    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)  # version -> why it did not load
    counters: dict[int, VersionCounters] = field(default_factory=dict)
    checked: set[int] = field(default_factory=set)  # files checked by this process (see registry)
    swapping: bool = False  # an unload-first swap is under way: requests wait for it

    def routed_ready(self) -> bool:
        """Whether every version the route uses is loaded."""
        if self.route is None or self.swapping:
            return False
        return all(version in self.loaded for version in self.route.versions)

    def state_of(self, version: int) -> pb.VersionState.ValueType:
        """A version's state."""
        if version in self.loaded:
            return pb.VERSION_STATE_READY
        if version in self.loading:
            return pb.VERSION_STATE_LOADING
        if version in self.failed:
            return pb.VERSION_STATE_FAILED
        return pb.VERSION_STATE_AVAILABLE

    def status(self) -> pb.ModelStatus:
        """The model as the Models service reports it."""
        route = self.route.to_proto() if self.route else pb.Route()
        versions = [self._version_status(m) for m in self.manifests.values()]
        return pb.ModelStatus(name=self.name, route=route, versions=versions)

    def _version_status(self, manifest: Manifest) -> pb.VersionStatus:
        version = manifest.version
        counters = self.counters.get(version)
        return pb.VersionStatus(
            version=version,
            digest=manifest.digest,
            runtime=manifest.runtime,
            state=self.state_of(version),
            message=self.failed.get(version, ""),
            created=manifest.created,
            source_run=manifest.source_run,
            source_step=manifest.source_step,
            size_bytes=manifest.size,
            inputs=[_tensor(s) for s in manifest.inputs],
            outputs=[_tensor(s) for s in manifest.outputs],
            batching=pb.Batching(
                max_batch_size=manifest.max_batch_size,
                max_queue_delay_seconds=manifest.max_queue_delay,
            ),
            stats=counters.snapshot().to_proto() if counters else pb.VersionStats(),
            filename=manifest.filename,
        )


def _tensor(spec: TensorSpec) -> pb.TensorInfo:
    return pb.TensorInfo(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))

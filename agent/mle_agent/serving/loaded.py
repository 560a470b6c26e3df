"""One loaded model version: its backend, batcher, counters, and the requests running on it.

Requests hold a lease (`acquire`/`release`) while they run; `close` refuses new leases, waits
for the running ones to finish, and only then closes the backend, so a backend is never closed
under a running call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mle_agent.serving.backend import DATATYPES, NUMPY_TO_OIP, Backend, TensorSpec
from mle_agent.serving.batching import Batcher
from mle_proto.errors import InvalidInput, MleError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.repository import Manifest
    from mle_agent.serving.stats import VersionCounters

    Array = npt.NDArray[np.generic]
    Inputs = Mapping[str, Array]
    Outputs = dict[str, Array]

__all__ = ["LoadedVersion", "check_inputs", "check_outputs"]

log = logging.getLogger(__name__)


class LoadedVersion:
    """A version in memory, ready to answer."""

    def __init__(self, manifest: Manifest, backend: Backend, counters: VersionCounters) -> None:
        self.manifest = manifest
        self.backend = backend
        self.counters = counters
        self.label = f"model {manifest.name} version {manifest.version}"
        self._cond = threading.Condition()
        self._inflight = 0
        self._closing = False
        self._batcher: Batcher | None = None
        if manifest.max_batch_size > 1:
            self._batcher = Batcher(
                self._infer,
                max_batch_size=manifest.max_batch_size,
                max_delay=manifest.max_queue_delay,
                counters=counters,
                label=f"{manifest.name}-{manifest.version}",
            )

    def acquire(self) -> bool:
        """Take a lease for one request; False once the version is being unloaded."""
        with self._cond:
            if self._closing:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        """Return a lease."""
        with self._cond:
            self._inflight -= 1
            if not self._inflight:
                self._cond.notify_all()

    def run(self, inputs: Inputs, *, record: bool = True) -> Outputs:
        """Check the inputs, run (batched where configured), count it; the caller holds a lease."""
        check_inputs(self.label, self.manifest.inputs, inputs)
        started = time.perf_counter()
        ok = False
        try:
            if self._batcher is not None:
                outputs = self._batcher.submit(inputs)
            else:
                outputs = self._infer(inputs)
                self.counters.record_batch(1)
            ok = True
            return outputs
        finally:
            if record:
                self.counters.record_request(time.perf_counter() - started, ok=ok)

    def close(self) -> None:
        """Refuse new leases, wait for running requests, stop batching, release the backend."""
        with self._cond:
            self._closing = True
            self._cond.wait_for(lambda: self._inflight == 0)
        if self._batcher is not None:
            self._batcher.close()
        try:
            self.backend.close()
        except Exception:  # unloading must go on; the log says what failed
            log.exception("closing %s failed", self.label)

    def _infer(self, inputs: Inputs) -> Outputs:
        try:
            return self.backend.infer(inputs)
        except MleError:
            raise
        except Exception as exc:  # noqa: BLE001 - a runtime's own error becomes one clear line
            log.warning("%s failed: %s", self.label, exc)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MleError(f"{self.label} failed: {reason[:300]}") from None


def check_inputs(label: str, specs: Sequence[TensorSpec], inputs: Inputs) -> None:
    """InvalidInput unless the inputs are exactly the model's: names, datatypes, shapes."""
    expected = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - expected)
    if unknown:
        raise InvalidInput(f"{label} has no input {unknown[0]!r}; its inputs: {_names(specs)}")
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            raise InvalidInput(f"{label}: input {spec.name!r} is missing")
        _check_array(label, spec, array)


def _check_array(label: str, spec: TensorSpec, array: Array) -> None:
    dtype = str(getattr(array, "dtype", ""))
    if dtype != DATATYPES.get(spec.datatype):
        got = NUMPY_TO_OIP.get(dtype, dtype or type(array).__name__)
        raise InvalidInput(f"{label}: input {spec.name!r} must be {spec.datatype}, got {got}")
    shape = tuple(int(d) for d in array.shape)
    fits = len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    )
    if not fits:
        raise InvalidInput(
            f"{label}: input {spec.name!r} must have shape {_shape(spec.shape)}, "
            f"got {_shape(shape)}"
        )


def check_outputs(label: str, specs: Sequence[TensorSpec], wanted: Sequence[str]) -> None:
    """InvalidInput when a requested output is not one of the model's."""
    names = {spec.name for spec in specs}
    for name in wanted:
        if name not in names:
            raise InvalidInput(f"{label} has no output {name!r}; its outputs: {_names(specs)}")


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(spec.name for spec in specs)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("-1" if d == -1 else str(d) for d in shape) + "]"

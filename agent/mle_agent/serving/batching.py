"""Dynamic batching for one model version: concurrent requests share one runtime call.

A worker thread takes the oldest request, then waits at most `max_delay` seconds for more
requests whose inputs can be stacked with it (same dtypes and same dims after the first), up to
`max_batch_size` rows in all; it concatenates them along axis 0, runs the model once and hands
each request its own rows back. Only versions whose inputs and outputs all have a dynamic first
dimension are batched (the registry checks that at deploy).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mle_proto.errors import AgentUnavailable, MleError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.stats import VersionCounters

    Array = npt.NDArray[np.generic]
    Inputs = Mapping[str, Array]
    Outputs = dict[str, Array]

__all__ = ["Batcher"]


@dataclass
class _Pending:
    """One queued request."""

    inputs: Inputs
    rows: int
    key: tuple[tuple[str, str, tuple[int, ...]], ...]  # what must match to stack with others
    future: Future[Outputs] = field(default_factory=Future)


class Batcher:
    """Queues requests for one version and runs them in batches on a worker thread."""

    def __init__(
        self,
        run: Callable[[Inputs], Outputs],
        *,
        max_batch_size: int,
        max_delay: float,
        counters: VersionCounters,
        label: str,
    ) -> None:
        self._run = run
        self._max_rows = max_batch_size
        self._max_delay = max_delay
        self._counters = counters
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"mle-batch-{label}", daemon=True)
        self._thread.start()

    def submit(self, inputs: Inputs) -> Outputs:
        """Queue a request and wait for its rows of the batch's outputs."""
        pending = _Pending(inputs, _rows(inputs), _key(inputs))
        with self._cond:
            if self._stopping:
                raise AgentUnavailable("this model version is being unloaded")
            self._queue.append(pending)
            self._cond.notify_all()
        return pending.future.result()

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self._execute(batch)

    def _take(self) -> list[_Pending] | None:
        """The next batch; None once stopping with nothing queued."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            deadline = time.monotonic() + self._max_delay
            while rows < self._max_rows:
                more = self._pop_fitting(batch[0].key, self._max_rows - rows)
                if more is not None:
                    batch.append(more)
                    rows += more.rows
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _pop_fitting(self, key: object, room: int) -> _Pending | None:
        """Remove and return the oldest queued request that stacks with the batch and fits."""
        for index, pending in enumerate(self._queue):
            if pending.key == key and pending.rows <= room:
                del self._queue[index]
                return pending
        return None

    def _execute(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                results = [self._run(batch[0].inputs)]
            else:
                results = _split(self._run(_concatenate(batch)), [p.rows for p in batch])
        except Exception as exc:  # noqa: BLE001 - every waiter must learn of the failure
            for pending in batch:
                pending.future.set_exception(exc)
            return
        self._counters.record_batch(len(batch))
        for pending, outputs in zip(batch, results, strict=True):
            pending.future.set_result(outputs)


def _rows(inputs: Inputs) -> int:
    first = next(iter(inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def _key(inputs: Inputs) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple(
        (name, str(array.dtype), tuple(array.shape[1:])) for name, array in sorted(inputs.items())
    )


def _concatenate(batch: list[_Pending]) -> dict[str, Array]:
    import numpy as np

    names = batch[0].inputs.keys()
    return {name: np.concatenate([p.inputs[name] for p in batch], axis=0) for name in names}


def _split(outputs: Outputs, rows: list[int]) -> list[Outputs]:
    """Each request's rows of every output."""
    results: list[Outputs] = [{} for _ in rows]
    for name, array in outputs.items():
        if not array.ndim or array.shape[0] != sum(rows):
            raise MleError(
                f"output {name!r} of a batch of {sum(rows)} rows has shape {list(array.shape)}: "
                "this model cannot be batched; deploy it without batching"
            )
        start = 0
        for index, count in enumerate(rows):
            results[index][name] = array[start : start + count]
            start += count
    return results

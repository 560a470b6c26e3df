"""Running the policies of a route (see routing.py for what each one does): fallback under a
deadline, consensus by majority vote, and the shadow mirror with its disagreement count.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mle_proto.errors import AgentUnavailable, FailedPrecondition

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.stats import VersionCounters

    Outputs = dict[str, npt.NDArray[np.generic]]

__all__ = ["ShadowMirror", "disagrees", "run_consensus", "run_fallback"]

log = logging.getLogger(__name__)


def disagrees(primary: Outputs, shadow: Outputs) -> bool:
    """Whether two answers differ: argmax per row of the first output, else allclose."""
    import numpy as np

    name = next(iter(primary))
    a, b = primary[name], shadow.get(name)
    if b is None or a.shape != b.shape:
        return True
    if _is_classification(a):
        return bool(np.any(np.argmax(a, axis=-1) != np.argmax(b, axis=-1)))
    return not bool(np.allclose(a, b, rtol=1e-3, atol=1e-5))


def _is_classification(array: npt.NDArray[np.generic]) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def run_fallback(
    primary: Callable[[], Outputs],
    secondary: Callable[[], Outputs],
    deadline: float,
    pool: Executor,
    *,
    cancelled: Callable[[], None],
) -> tuple[Outputs, bool]:
    """The primary's answer if it comes within the deadline, else the secondary's (True).

    `cancelled` runs when the primary never started (so its caller can release what it holds);
    a primary that started finishes in the background and its answer is discarded.
    """
    try:
        future = pool.submit(primary)
    except RuntimeError:  # the pool is shut down: the agent is stopping
        cancelled()
        raise AgentUnavailable("the agent is shutting down") from None
    try:
        return future.result(timeout=deadline), False
    except FutureTimeout:
        if future.cancel():
            cancelled()
    except Exception as exc:  # noqa: BLE001 - a failed primary is what the secondary is for
        log.info("primary failed, the secondary answers: %s", exc)
    return secondary(), True


def run_consensus(
    members: Sequence[tuple[int, Callable[[], Outputs]]], pool: Executor
) -> tuple[int, Outputs]:
    """Run every member concurrently; (answering version, outputs combined per row)."""
    futures: list[Future[Outputs]] = []
    try:
        for _, run in members[1:]:
            futures.append(pool.submit(run))
        first = members[0][1]()
    except RuntimeError as exc:
        if len(futures) < len(members) - 1:  # submit refused: the pool is shut down
            raise AgentUnavailable("the agent is shutting down") from exc
        raise
    finally:
        wait(futures)  # the caller releases its leases once this returns: nothing may still run
    answers = [first] + [f.result() for f in futures]
    versions = [version for version, _ in members]
    return _combine(versions, answers)


def _combine(versions: Sequence[int], answers: Sequence[Outputs]) -> tuple[int, Outputs]:
    import numpy as np

    first = next(iter(answers[0]))
    if answers[0][first].ndim == 0 or not len(answers[0][first]):
        return versions[0], answers[0]
    votes = np.stack([_votes(first, a[first]) for a in answers])  # member x row
    winners: list[int] = []
    chosen: list[int] = []  # per row, the index of the first member voting for the winner
    for row in range(votes.shape[1]):
        tally = Counter(int(v) for v in votes[:, row])
        best = max(tally.values())
        winner = next(int(v) for v in votes[:, row] if tally[int(v)] == best)
        winners.append(winner)
        chosen.append(int(np.flatnonzero(votes[:, row] == winner)[0]))
    outputs = {
        name: np.stack([answers[m][name][row] for row, m in enumerate(chosen)])
        for name in answers[0]
    }
    agreeing = [int(np.sum(votes[m] == np.array(winners))) for m in range(len(answers))]
    return versions[agreeing.index(max(agreeing))], outputs


def _votes(name: str, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """One member's vote per row: labels as they are, scores by argmax."""
    import numpy as np

    if array.ndim == 1 and array.dtype.kind in "biu":
        return array
    if array.ndim == 2 and array.shape[1] > 1:
        votes: npt.NDArray[np.generic] = np.argmax(array, axis=1)
        return votes
    # validate_route refuses such routes; one restored from an older agent may still name them
    raise FailedPrecondition(
        f"consensus cannot vote on output {name!r} of shape {list(array.shape)}: it needs class "
        "labels (integer [N]) or class scores ([N, C]); route the model with another policy"
    )


class ShadowMirror:
    """Runs mirrored requests on a background thread; a full queue drops (and counts) them."""

    def __init__(self, capacity: int = 64) -> None:
        self._queue: queue.Queue[_Mirrored | None] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self,
        run: Callable[[], Outputs],
        primary: Outputs,
        counters: VersionCounters,
        release: Callable[[], None],
    ) -> None:
        """Queue `run` (the shadow's inference) to compare with `primary`; `release` after."""
        with self._lock:
            if self._closed:
                counters.record_shadow_dropped()
                release()
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mle-shadow", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(_Mirrored(run, primary, counters, release))
        except queue.Full:
            counters.record_shadow_dropped()
            release()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                answer = item.run()
            except Exception:  # noqa: BLE001 - a failing shadow must not affect serving
                item.counters.record_shadow(disagreed=False, ok=False)
            else:
                item.counters.record_shadow(disagreed=disagrees(item.primary, answer))
            finally:
                item.release()


@dataclass(frozen=True)
class _Mirrored:
    run: Callable[[], Outputs]
    primary: Outputs
    counters: VersionCounters
    release: Callable[[], None]

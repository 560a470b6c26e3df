"""Child-process entry point of the load check: `python -m mle_agent.serving.loadcheck PATH
RUNTIME THREADS`.

Loads the model with its runtime, warms it up, prints one JSON line on stdout (runtime, inputs,
outputs, seconds) and exits 0. Any failure prints one line, prefixed `mle-loadcheck: `, on stderr
and exits 1. A runtime that crashes kills only this process; the agent reports the signal.

Test hooks (like the CLI's MLE_FAULT), from the environment:
- MLE_AGENT_FAULT=loadcheck-crash: the child calls os.abort() right before loading, as a runtime
  crashing on a hostile file would;
- MLE_AGENT_FAULT=loadcheck-sleep: the child waits right before loading until the file named by
  MLE_AGENT_FAULT_RELEASE exists (or its parent is gone, or an hour has passed), so a test can
  hold deploys and restores in flight for as long as it needs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mle_agent.serving.validation import ERROR_PREFIX
from mle_proto.errors import MleError

__all__ = ["main"]

FAULT_ENV = "MLE_AGENT_FAULT"
RELEASE_ENV = "MLE_AGENT_FAULT_RELEASE"
_HOLD_LIMIT = 3600.0  # seconds a held check waits at most


def main(argv: list[str]) -> int:
    """Run the check for `PATH RUNTIME THREADS`; return the exit status."""
    if len(argv) != 3 or not argv[2].isdigit():
        print(f"{ERROR_PREFIX}usage: loadcheck PATH RUNTIME THREADS", file=sys.stderr)  # noqa: T201
        return 2
    path, runtime, threads = Path(argv[0]), argv[1], int(argv[2])
    try:
        report = _check(path, runtime, threads)
    except MleError as exc:
        message = exc.message
    except Exception as exc:  # noqa: BLE001 - any failure here must become one line, not a trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"{path.name} cannot be loaded by {runtime}: {type(exc).__name__} {first}"
    else:
        print(json.dumps(report), flush=True)  # noqa: T201
        return 0
    print(f"{ERROR_PREFIX}{' '.join(message.split())}", file=sys.stderr, flush=True)  # noqa: T201
    return 1


def _check(path: Path, runtime: str, threads: int) -> dict[str, object]:
    from mle_agent.serving.runtimes import load_backend, warm_up

    started = time.monotonic()
    fault = os.environ.get(FAULT_ENV)
    if fault == "loadcheck-crash":
        os.abort()
    if fault == "loadcheck-sleep":
        _hold(Path(os.environ.get(RELEASE_ENV, "/nonexistent")))
    backend = load_backend(path, runtime, threads)
    try:
        warm_up(backend)
    finally:
        backend.close()
    return {
        "runtime": backend.runtime,
        "inputs": [spec.to_json() for spec in backend.inputs],
        "outputs": [spec.to_json() for spec in backend.outputs],
        "seconds": round(time.monotonic() - started, 6),
    }


def _hold(release: Path) -> None:
    """Wait until `release` exists, the parent (the agent) is gone, or the limit is reached."""
    parent, deadline = os.getppid(), time.monotonic() + _HOLD_LIMIT
    while not release.exists() and os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

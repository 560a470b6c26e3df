"""Child-process entry point of the load check: `python -m mle_agent.serving.loadcheck PATH
RUNTIME THREADS`.

Loads the model with its runtime, warms it up, prints one JSON line on stdout (runtime, inputs,
outputs, seconds) and exits 0. Any failure prints one line, prefixed `mle-loadcheck: `, on stderr
and exits 1. A runtime that crashes kills only this process; the agent reports the signal.

Test hook: with MLE_AGENT_FAULT=loadcheck-crash in the environment the child calls os.abort()
right before loading, as a runtime crashing on a hostile file would (like the CLI's MLE_FAULT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from mle_agent.serving.validation import ERROR_PREFIX
from mle_proto.errors import MleError

__all__ = ["main"]

FAULT_ENV = "MLE_AGENT_FAULT"


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
    if os.environ.get(FAULT_ENV) == "loadcheck-crash":
        os.abort()
    backend = load_backend(path, runtime, threads)
    try:
        warm_up(backend)
    finally:
        backend.close()
    return {
        "runtime": backend.runtime,
        "inputs": [dataclasses.asdict(spec) for spec in backend.inputs],
        "outputs": [dataclasses.asdict(spec) for spec in backend.outputs],
        "seconds": round(time.monotonic() - started, 6),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the benchmarks share: the results record, timing, a step's work, the user's env."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Results:
    """Seconds (and other figures) by name, plus peer versions and why a peer was skipped."""

    figures: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, peer: str, reason: str) -> None:
        self.skipped[peer] = reason
        print(f"{peer}: skipped ({reason})", file=sys.stderr)


MB = 1_000_000  # throughput in MB/s (10^6 bytes), as scp and the issues' targets count them


def console(name: str, module: str) -> list[str]:
    """The installed console script next to this Python, else `python -m module`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best(measure: Callable[[], float], repeat: int) -> float:
    """The fastest of `repeat` measurements (least disturbed by the shared machine)."""
    return min(measure() for _ in range(repeat))


def spawn_true(*_: object) -> int:
    """One step's work, the same for every runtime: a `true` process."""
    return subprocess.run(["/bin/sh", "-c", "true"], check=True).returncode


def user_env() -> dict[str, str]:
    """This environment as a user's shell has it. Installed from a wheel, mle's bytecode is
    cached: a PYTHONDONTWRITEBYTECODE here would make every `mle` compile its modules again,
    which no user pays. A first, untimed run writes the cache (Prefect and Dask run in-process)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

"""mle's side of bench/dispatch.py: the `mle` command, the recipes, a throwaway local agent."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from _measure import console, timed, user_env


def mle_command() -> list[str]:
    """The installed `mle` next to this Python, else `python -m mle_cli`."""
    return console("mle", "mle_cli")


# `cache: false`: every run runs every step (a repeat would otherwise reuse the first's results).
def chain_recipe(n: int) -> str:
    """N no-op steps, each needing the previous one."""
    lines = ["name: bench-chain", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", "    run: 'true'", "    cache: false"]
        if i:
            lines.append(f"    needs: [s{i - 1}]")
    return "\n".join(lines) + "\n"


def fanout_recipe(n: int) -> str:
    """N independent no-op steps."""
    lines = ["name: bench-fanout", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", "    run: 'true'", "    cache: false"]
    return "\n".join(lines) + "\n"


@dataclass
class LocalAgent:
    project: Path
    env: dict[str, str]
    start_s: float

    @property
    def ledger(self) -> Path:
        return self.project / ".mle" / "ledger.db"

    def run(self, recipe: str, steps: int) -> float:
        """Wall seconds of one `mle run` of the recipe text, which must run all its steps."""
        (self.project / "bench.yaml").write_text(recipe)
        start = time.perf_counter()
        proc = subprocess.run(
            [*mle_command(), "run", "bench.yaml", "--no-live"],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"mle run failed:\n{proc.stderr[-2000:]}")
        if f" {steps}/{steps} steps succeeded" not in proc.stdout + proc.stderr:
            raise SystemExit(f"mle run did not run all {steps} steps:\n{proc.stdout[-2000:]}")
        return wall


@contextmanager
def local_agent() -> Iterator[LocalAgent]:
    """A throwaway project with its local agent started (timed), stopped on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        env = {**user_env(), "MLE_PROJECT_DIR": str(project)}

        def start() -> None:
            subprocess.run(
                [*mle_command(), "agent", "start"],
                cwd=project,
                env=env,
                check=True,
                capture_output=True,
            )

        start_s = timed(start)
        try:
            yield LocalAgent(project, env, start_s)
        finally:
            subprocess.run(
                [*mle_command(), "agent", "stop"], cwd=project, env=env, capture_output=True
            )

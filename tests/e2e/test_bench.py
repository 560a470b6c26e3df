"""The benchmarks run (small sizes): CI proves they work; it never asserts speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, Project

pytestmark = pytest.mark.e2e


def test_dispatch_benchmark_runs_and_reports_every_figure(project: Project, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/dispatch.py"),
            "--steps",
            "5",
            "--repeat",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=project.env,
        cwd=project.root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    for key in (
        "mle_chain_ms_per_step",
        "mle_fanout_steps_per_s",
        "help_extra_ms",
        "chain_ratio_mle_vs_floor",
    ):
        assert figures[key] > 0
    text = out.read_text()
    assert "| chain: ms per step |" in text and "bench/dispatch.py --steps 5" in text

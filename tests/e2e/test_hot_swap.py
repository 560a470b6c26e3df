"""Hot swap under load, as a user does it: tritonclient at a constant concurrency against the local
agent while `mle deploy` deploys, canaries, shadows and rolls back versions of the model.

Zero failed requests, and every answer names a version that was live at some instant of its
request. A route's live window is bounded by the wall clock read just before the `mle deploy`
that set it and just after the one that replaced it (the switch happens inside each command).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, Project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODELS = REPO / "tests/fixtures/models"
LOAD = REPO / "bench/peers/oip_load.py"
PEERS = Path(os.environ.get("MLE_PEERS_DIR", REPO / ".peers"))
PEERS_PYTHON = PEERS / "bin" / "python"
PAUSE = 0.8  # seconds of load between route changes


@pytest.fixture
def peers_python() -> Path:
    if not PEERS_PYTHON.exists():
        pytest.skip(f"no peers venv at {PEERS} (run scripts/peers.sh, or set MLE_PEERS_DIR)")
    return PEERS_PYTHON


def _deploy(project: Project, *args: str) -> tuple[float, float, dict[str, Any]]:
    """Run `mle deploy ARGS --json`; return the wall clock before and after, and its answer."""
    before = time.time()
    proc = project.mle("deploy", *args, "--target", "local", "--json")
    after = time.time()
    assert proc.returncode == 0, proc.stderr
    return before, after, json.loads(proc.stdout)


def _live_versions(project: Project) -> set[int]:
    """The versions the current route answers from (split members with a share)."""
    proc = project.mle("models", "--target", "local", "--json", check=True)
    (model,) = [m for m in json.loads(proc.stdout) if m["name"] == "digits"]
    return {int(w["version"]) for w in model["route"]["split"] if float(w["percent"]) > 0}


def test_versions_swap_under_load_without_a_failed_request(
    project: Project, peers_python: Path, tmp_path: Path
) -> None:
    fp32, int8, h64 = (
        str(MODELS / f) for f in ("digits_fp32.onnx", "digits_int8.onnx", "digits_h64_fp32.onnx")
    )
    # (started before, finished after, versions live from then on)
    routes = [(*_deploy(project, fp32, "--name", "digits")[:2], {1})]
    state = json.loads((project.root / ".mle/agent/state.json").read_text())
    token = (project.root / ".mle/agent/token").read_text().strip()
    rows = tmp_path / "rows.npz"
    with np.load(MODELS / "digits_test.npz") as data:
        np.savez(rows, X=data["X"])
    trace = tmp_path / "trace.jsonl"
    load = subprocess.Popen(
        [
            str(peers_python),
            str(LOAD),
            "--url",
            state["address"],
            "--model",
            "digits",
            "--data",
            str(rows),
            "--concurrency",
            "4",
            "--seconds",
            "60",
            "--warmup",
            "0",
            "--token",
            token,
            "--trace",
            str(trace),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    project.spawned.append(load)
    changes = [
        (int8, "--name", "digits", "--canary", "30%"),  # v2 takes 30%
        ("digits", "--version", "2"),  # v2 takes everything
        ("digits", "--shadow", "1"),  # and v1 sees a copy of each request
        (h64, "--name", "digits", "--swap", "unload-first"),  # v3, the old one unloaded first
        ("digits", "--rollback"),  # back to v2
        ("digits", "--canary", "50%", "--version", "3"),
        ("digits", "--rollback"),
        ("digits", "--version", "1"),
    ]
    for change in changes:
        time.sleep(PAUSE)
        before, after, _ = _deploy(project, *change)
        routes.append((before, after, _live_versions(project)))
    time.sleep(PAUSE)
    load.terminate()  # ends the load early: the client stops at its own deadline otherwise
    summary, err = load.communicate(timeout=60)
    assert json.loads(summary.strip().splitlines()[-1])["errors"] == {}, err

    records = [json.loads(line) for line in trace.read_text().splitlines()]
    failed = [r for r in records if "error" in r]
    assert failed == [], failed[:5]
    assert len(records) > 100, len(records)
    windows = [
        (before, routes[i + 1][1] if i + 1 < len(routes) else float("inf"), versions)
        for i, (before, _, versions) in enumerate(routes)
    ]
    wrong = [
        r
        for r in records
        if not any(
            int(r["version"]) in versions and r["start"] <= end and r["end"] >= start
            for start, end, versions in windows
        )
    ]
    assert wrong == [], (wrong[:5], routes)
    assert {int(r["version"]) for r in records} == {1, 2, 3}

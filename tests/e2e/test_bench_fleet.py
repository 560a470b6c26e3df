"""bench/fleet.py runs in its small mode: CI proves it works; it never asserts speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def fleet_bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The JSON figures and the markdown section of a tiny run (one agent start, a 4 MB file)."""
    tmp = tmp_path_factory.mktemp("bench-fleet")
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "PYTEST_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / d) for d in ("cli", "agent", "protos"))
    out = tmp / "RESULTS.md"
    argv = [sys.executable, str(REPO / "bench/fleet.py"), "--repeat", "1", "--size-mb", "4"]
    proc = subprocess.run(
        [*argv, "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp, timeout=220
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), out.read_text()


def test_discovery_time_is_measured_from_agent_start_to_listed(
    fleet_bench: tuple[dict[str, Any], str],
) -> None:
    figures, text = fleet_bench
    assert figures["discovery_repeat"] == 1
    assert 0 < figures["discovery_listening_p50_s"] < figures["discovery_listed_p50_s"]
    assert figures["discovery_listed_max_s"] >= figures["discovery_listed_p50_s"]
    assert figures["agents_browse_p50_s"] > 0 and figures["agents_cached_p50_s"] > 0
    assert figures["agents_browse_vs_cached"] > 0
    assert "spawned → listed by a browse" in text and "bench/fleet.py --repeat 1" in text


def test_transfer_between_two_agents_is_measured_with_dedup(
    fleet_bench: tuple[dict[str, Any], str],
) -> None:
    figures, text = fleet_bench
    assert figures["transfer_bytes"] == 4_000_000
    for key in ("mle_fetch_mbps", "mle_ship_mbps", "mle_move_mbps", "mle_reship_ms"):
        assert figures[key] > 0, key
    assert figures["mle_move_s"] > 0
    assert "| mle A → B end to end" in text and "Dedup:" in text


@pytest.mark.parametrize("peer", ["sftp", "scp"])
def test_transfer_is_compared_with_each_ssh_peer(
    fleet_bench: tuple[dict[str, Any], str], peer: str
) -> None:
    figures, text = fleet_bench
    if peer in figures["skipped"]:
        reason = figures["skipped"][peer]
        assert reason in text  # the results say why the row is empty
        pytest.skip(f"{peer} did not run in the benchmark: {reason}")
    kinds = ["sftp_default", "sftp_tuned"] if peer == "sftp" else ["scp"]
    for kind in kinds:
        assert figures[f"{kind}_mbps"] > 0, kind
        assert figures[f"move_vs_{kind}"] > 0 and figures[f"ship_vs_{kind}"] > 0
    version = figures["versions"]["paramiko" if peer == "sftp" else "openssh"]
    assert version in text

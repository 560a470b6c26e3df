"""The benchmarks run (small sizes): CI proves they work; it never asserts speed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from tests.conftest import REPO

# One tiny dispatch run (5 steps, once; the resume cost on 10 steps killed at 5) is shared by the
# tests below: about 45 s, most of it Prefect: booting its server (one `prefect server start` for
# both Prefect measures: --one-prefect-server), then a new process per run, 2-3 s each.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PER_RUN = "| **per run (a new process each; agent / Prefect server kept running)** |"
IN_PROCESS = "| **in-process (Prefect's and Dask's best case: no interpreter start, no import)** |"
COLUMNS = {"mle": 1, "floor": 2, "dask": 3, "prefect": 4}  # cells of the table's rows


def processes_in(directory: Path) -> list[str]:
    """Processes whose working directory is in `directory`: what the benchmark left running."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if Path(proc.cwd()).is_relative_to(directory):
                left.append(f"{proc.info['pid']}: {' '.join(proc.info['cmdline'] or [])}")
        except (psutil.Error, OSError):
            continue
    return left


@pytest.fixture(scope="module")
def dispatch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The JSON figures and the markdown sections of `bench/dispatch.py --steps 5 --repeat 1`."""
    tmp = tmp_path_factory.mktemp("bench")
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "PYTEST_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / d) for d in ("cli", "agent", "protos"))
    out = tmp / "RESULTS.md"
    argv = [sys.executable, str(REPO / "bench/dispatch.py"), "--steps", "5", "--repeat", "1"]
    proc = subprocess.run(
        [*argv, "--resume-steps", "10", "--one-prefect-server", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    # The servers it started (agent, Prefect server, Dask scheduler and workers) are all gone:
    # they ran in its directory.
    deadline = time.monotonic() + 10
    while (left := processes_in(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    return json.loads(proc.stdout), out.read_text()


def test_dispatch_benchmark_reports_mle_figures_against_the_floor(
    dispatch: tuple[dict[str, Any], str],
) -> None:
    figures, text = dispatch
    for key in (
        "mle_chain_ms_per_step",
        "mle_fanout_steps_per_s",
        "mle_one_step_s",
        "mle_startup_s",
        "help_extra_ms",
        "chain_ratio_mle_vs_floor",
    ):
        assert figures[key] > 0, key
    assert "| chain: ms per step" in text and "bench/dispatch.py --steps 5" in text


def test_dispatch_benchmark_reports_the_least_a_chain_step_costs_through_an_agent(
    dispatch: tuple[dict[str, Any], str],
) -> None:
    figures, text = dispatch
    for key in ("shim_chain_s", "agent_rpc_chain_s"):
        assert figures[key] > 0, key
    floor = 1000 * (figures["shim_chain_s"] + figures["agent_rpc_chain_s"]) / figures["steps"]
    assert figures["agent_floor_ms_per_step"] == pytest.approx(floor)
    if "prefect" in figures["skipped"]:
        assert "³" not in text  # nothing to compare the floor with
        pytest.skip(f"prefect not installed: {figures['skipped']['prefect']}")
    third = 1000 * figures["prefect_chain_body_s"] / figures["steps"] / 3
    assert figures["prefect_in_flow_third_ms"] == pytest.approx(third)
    note = next(line for line in text.splitlines() if line.startswith("³"))
    assert f": {floor:.2f} ms. A third of Prefect's in-flow chain step is {third:.2f} ms" in note
    work = 1000 * figures["floor_chain_s"] / figures["steps"]  # the step's own process
    assert f"the floor is {floor - work:.2f} ms against a third of {third - work / 3:.2f}" in note


@pytest.mark.parametrize("peer", ["dask", "prefect"])
def test_dispatch_benchmark_compares_with_each_installed_peer(
    dispatch: tuple[dict[str, Any], str], peer: str
) -> None:
    figures, text = dispatch
    if peer in figures["skipped"]:
        reason = figures["skipped"][peer]
        assert reason in text  # the results say why the column is empty
        pytest.skip(f"{peer} not installed, its part of the benchmark did not run: {reason}")
    for key in ("chain_ms_per_step", "fanout_steps_per_s", "one_step_s", "startup_s"):
        assert figures[f"{peer}_{key}"] > 0, key
    assert figures[f"chain_ratio_mle_vs_{peer}"] > 0
    assert figures["versions"][peer] in text


@pytest.mark.parametrize("peer", ["dask", "prefect"])
def test_dispatch_benchmark_runs_each_installed_peer_as_a_new_process_per_run(
    dispatch: tuple[dict[str, Any], str], peer: str
) -> None:
    figures, text = dispatch
    if peer in figures["skipped"]:
        assert f"{peer}_run" in figures["skipped"]  # not installed: neither measure ran
        pytest.skip(f"{peer} not installed: {figures['skipped'][peer]}")
    # Installed: its server (Prefect) or scheduler and workers (Dask) must have started.
    assert f"{peer}_run" not in figures["skipped"], figures["skipped"]
    for key in ("chain_ms_per_step", "fanout_steps_per_s", "one_step_s"):
        assert figures[f"{peer}_run_{key}"] > 0, key
    for kind in ("chain", "fanout"):
        assert figures[f"{kind}_ratio_mle_vs_{peer}_run"] > 0
    # The report has both comparisons, named, the per-run rows first, with this peer's figures.
    assert text.index(PER_RUN) < text.index(IN_PROCESS)
    per_run = text[text.index(PER_RUN) : text.index(IN_PROCESS)]
    one_step = next(line for line in per_run.splitlines() if line.startswith("| a 1-step run"))
    cells = [cell.strip() for cell in one_step.strip("|").split("|")]
    assert cells[COLUMNS[peer]] == f"{1000 * figures[f'{peer}_run_one_step_s']:.0f}"
    assert cells[COLUMNS["mle"]] == f"{1000 * figures['mle_one_step_s']:.0f}"
    # The per-run ratios are printed before the in-process ones.
    ratios = next(line for line in text.splitlines() if line.startswith("Ratios of mle's"))
    head = "Per run (a new process each; agent / Prefect server kept running): "
    per_run_ratios = ratios.split(head)[1].split(" In-process (")[0]
    ratio = figures[f"chain_ratio_mle_vs_{peer}_run"]
    assert f"{peer.capitalize()} chain {ratio:.2f}" in per_run_ratios


def test_resume_cost_runs_no_succeeded_step_again(dispatch: tuple[dict[str, Any], str]) -> None:
    figures, text = dispatch
    assert figures["resume_steps"] == 10 and figures["resume_kill_at"] == 5
    assert figures["resume_done_at_kill_min"] >= 5
    assert figures["resume_reruns"] == 0
    assert (
        figures["resume_reattached"] + figures["resume_redispatched"]
        == (figures["resume_in_flight"])
    )
    for key in ("fresh_first_dispatch_s", "resume_first_dispatch_s", "resume_wall_s"):
        assert figures[key] > 0, key
    assert figures["resume_first_dispatch_ratio"] > 0
    assert "## resume cost" in text and "--resume-steps 10" in text
    assert "| succeeded steps run again | | 0 (" in text


def _load_dispatch(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/dispatch.py as a module (bench/ is scripts, not a package)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # its modules, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_dispatch", REPO / "bench/dispatch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_prefect_part_is_skipped_with_the_reason_when_prefect_is_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    venv.create(bare, system_site_packages=False, with_pip=False)
    bench = _load_dispatch(monkeypatch)
    results = bench.Results()
    bench.measure_prefect(results, 3, 1, 1, str(bare / "bin" / "python"))
    assert results.figures == {}
    assert "No module named 'prefect'" in results.skipped["prefect"]
    assert "pip install -e '.[bench]'" in results.skipped["prefect"]
    # Nor the per-run measure (no server started), alone or with the in-process one on its server.
    results = bench.Results()
    bench.measure_prefect_per_run(results, 3, 1, 1, str(bare / "bin" / "python"), True)
    assert results.figures == {}
    for peer in ("prefect_run", "prefect"):
        assert "No module named 'prefect'" in results.skipped[peer]


def test_serving_benchmark_measures_the_agent_against_the_floor_and_mlserver(
    tmp_path: Path,
) -> None:
    peers = Path(os.environ.get("MLE_PEERS_DIR", REPO / ".peers")) / "bin" / "python"
    if not peers.exists():
        pytest.skip(f"no peers venv at {peers.parent.parent} (run scripts/peers.sh)")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "PYTEST_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / d) for d in ("cli", "agent", "protos"))
    out = tmp_path / "RESULTS.md"
    argv = [sys.executable, str(REPO / "bench/serving.py"), "--seconds", "0.5", "--warmup", "0.2"]
    proc = subprocess.run(
        [*argv, "--concurrency", "2", "--peers-python", str(peers), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    for key in ("floor_p50_ms", "agent_p50_ms", "agent_rps", "mlserver_rps", "agent_idle_rss_mb"):
        assert figures[key] > 0, key
    assert figures["skipped"] == {}
    assert "| requests/s, 2 client threads |" in out.read_text()

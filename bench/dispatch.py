#!/usr/bin/env python3
"""Dispatch overhead of `mle run` on the local agent, and `mle --help` start-up time.

Runs N no-op steps (`true`) as a chain and as a fan-out through the real `mle` command on a warm
local agent, and reports wall / steps. For a side-by-side reference it runs the same work (one
`true` process per step, chained and fanned out) in Dask distributed's LocalCluster when Dask is
installed, and always against a floor: spawning the same processes directly from Python.

Usage: bench/dispatch.py [--steps 100] [--repeat 3] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def mle_command() -> list[str]:
    """The installed `mle` next to this Python, else `python -m mle_cli`."""
    script = Path(sys.executable).parent / "mle"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mle_cli"]


def chain_recipe(n: int) -> str:
    """N no-op steps, each needing the previous one."""
    lines = ["name: bench-chain", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", "    run: 'true'"]
        if i:
            lines.append(f"    needs: [s{i - 1}]")
    return "\n".join(lines) + "\n"


def fanout_recipe(n: int) -> str:
    """N independent no-op steps."""
    lines = ["name: bench-fanout", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", "    run: 'true'"]
    return "\n".join(lines) + "\n"


def time_mle_run(project: Path, recipe: str, env: dict[str, str]) -> float:
    """Wall seconds of one `mle run` of the recipe text (which must succeed)."""
    (project / "bench.yaml").write_text(recipe)
    start = time.perf_counter()
    proc = subprocess.run(
        [*mle_command(), "run", "bench.yaml", "--no-live"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mle run failed:\n{proc.stderr[-2000:]}")
    return wall


def floor_chain(n: int) -> float:
    """Spawn N `true` processes one after another, from Python."""
    start = time.perf_counter()
    for _ in range(n):
        subprocess.run(["/bin/sh", "-c", "true"], check=True)
    return time.perf_counter() - start


def floor_fanout(n: int, workers: int) -> float:
    """Spawn N `true` processes, `workers` at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: subprocess.run(["/bin/sh", "-c", "true"], check=True), range(n)))
    return time.perf_counter() - start


def dask_runs(n: int, workers: int) -> tuple[float, float] | None:
    """Chain and fan-out of N process-spawning tasks on a Dask LocalCluster, if Dask is here."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return None

    def step(*_: object) -> int:
        return subprocess.run(["/bin/sh", "-c", "true"], check=True).returncode

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.submit(step).result()  # warm up
        start = time.perf_counter()
        future = client.submit(step, pure=False)
        for _ in range(n - 1):
            future = client.submit(step, future, pure=False)
        future.result()
        chain = time.perf_counter() - start
        start = time.perf_counter()
        client.gather([client.submit(step, i, pure=False) for i in range(n)])
        fanout = time.perf_counter() - start
    return chain, fanout


def median_wall(argv: list[str], repeat: int, env: dict[str, str] | None = None) -> float:
    """Median wall seconds of running a command."""
    walls = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, env=env)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def best(measure: Callable[[], float], repeat: int) -> float:
    """The fastest of `repeat` measurements (least disturbed by the shared machine)."""
    return min(measure() for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()
    n = args.steps
    workers = os.cpu_count() or 1

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        env = {**os.environ, "MLE_PROJECT_DIR": str(project)}
        subprocess.run(
            [*mle_command(), "agent", "start"],
            cwd=project,
            env=env,
            check=True,
            capture_output=True,
        )
        try:
            results["mle_chain_s"] = best(
                lambda: time_mle_run(project, chain_recipe(n), env), args.repeat
            )
            results["mle_fanout_s"] = best(
                lambda: time_mle_run(project, fanout_recipe(n), env), args.repeat
            )
        finally:
            subprocess.run(
                [*mle_command(), "agent", "stop"], cwd=project, env=env, capture_output=True
            )
    results["floor_chain_s"] = best(lambda: floor_chain(n), args.repeat)
    results["floor_fanout_s"] = best(lambda: floor_fanout(n, workers), args.repeat)
    dask = dask_runs(n, workers)
    if dask is not None:
        results["dask_chain_s"], results["dask_fanout_s"] = dask
    results["help_s"] = median_wall([*mle_command(), "--help"], 2 * args.repeat + 1)
    results["python_pass_s"] = median_wall([sys.executable, "-c", "pass"], 2 * args.repeat + 1)

    summary = summarize(results, n)
    print(json.dumps({"steps": n, **results, **summary}, indent=2))
    if args.out:
        write_markdown(args.out, n, args.repeat, results, summary)
    return 0


def summarize(r: dict[str, float], n: int) -> dict[str, float]:
    """Per-step overhead, throughput, and ratios against the floor and Dask."""
    s = {
        "mle_chain_ms_per_step": 1000 * r["mle_chain_s"] / n,
        "mle_fanout_steps_per_s": n / r["mle_fanout_s"],
        "floor_chain_ms_per_step": 1000 * r["floor_chain_s"] / n,
        "floor_fanout_steps_per_s": n / r["floor_fanout_s"],
        "help_extra_ms": 1000 * (r["help_s"] - r["python_pass_s"]),
    }
    if "dask_chain_s" in r:
        s["dask_chain_ms_per_step"] = 1000 * r["dask_chain_s"] / n
        s["dask_fanout_steps_per_s"] = n / r["dask_fanout_s"]
        s["chain_ratio_mle_vs_dask"] = r["mle_chain_s"] / r["dask_chain_s"]
        s["fanout_ratio_mle_vs_dask"] = r["mle_fanout_s"] / r["dask_fanout_s"]
    s["chain_ratio_mle_vs_floor"] = r["mle_chain_s"] / r["floor_chain_s"]
    return s


def write_markdown(
    path: Path, n: int, repeat: int, r: dict[str, float], s: dict[str, float]
) -> None:
    """Append one dated section with the figures and the command that produced them."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [
        f"\n## dispatch — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `python bench/dispatch.py --steps {n} --repeat {repeat} --out {path}`; "
        "best of the repeats; "
        "warm local agent; each step runs `true` in its own process.\n",
        "| measure | mle | floor (direct spawn) | Dask LocalCluster | target |",
        "|---|---|---|---|---|",
        f"| chain: ms per step | {s['mle_chain_ms_per_step']:.1f} | {s['floor_chain_ms_per_step']:.1f} | "
        f"{_opt(s, 'dask_chain_ms_per_step', '{:.1f}')} | ≤ 25 |",
        f"| fan-out: steps/s | {s['mle_fanout_steps_per_s']:.0f} | {s['floor_fanout_steps_per_s']:.0f} | "
        f"{_opt(s, 'dask_fanout_steps_per_s', '{:.0f}')} | ≥ 100 |",
        f"| `mle --help` extra over `python -c pass` | {s['help_extra_ms']:.0f} ms "
        f"({1000 * r['help_s']:.0f} vs {1000 * r['python_pass_s']:.0f} ms) | | | ≤ 150 ms |",
        "",
        f"Ratios in the same run: chain mle/floor = {s['chain_ratio_mle_vs_floor']:.1f}×"
        + (
            f", chain mle/Dask = {s['chain_ratio_mle_vs_dask']:.2f}×, "
            f"fan-out wall mle/Dask = {s['fanout_ratio_mle_vs_dask']:.2f}×."
            if "dask_chain_s" in r
            else " (Dask not installed: `pip install 'dask[distributed]'` to compare)."
        ),
    ]
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def _opt(s: dict[str, float], key: str, fmt: str) -> str:
    return fmt.format(s[key]) if key in s else "n/a"


if __name__ == "__main__":
    if shutil.which("true") is None:
        raise SystemExit("needs the `true` command")
    sys.exit(main())

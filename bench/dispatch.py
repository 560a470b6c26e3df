#!/usr/bin/env python3
"""Dispatch overhead of `mle run` on the local agent vs Prefect 3 and Dask; `mle --help` start-up.

Runs N no-op steps (`true`) as a chain and as a fan-out through the real `mle` command on a warm
local agent, and reports wall / steps. Side by side, in the same run, it does the same work (one
`/bin/sh -c true` process per step, chained and fanned out at the agent's concurrency, its cpu
count) in each peer that is installed (`pip install -e '.[bench]'`), and always against a floor:
spawning the same processes directly from Python, and the least a chain step can cost through
an agent (_agent_floor.py: the process through the agent's shim, plus one call to the agent).

Each peer is measured two ways:
- per run (a new process each; agent / Prefect server kept running), as a user runs it: every
  `mle run recipe.yaml` is a new CLI process talking to the running agent; every Prefect run is
  a new `python bench/prefect_peer.py --once ...` process (`python flow.py`: interpreter start,
  `import prefect`, one flow run, exit) with PREFECT_API_URL pointing at a `prefect server start`
  started once (throwaway PREFECT_HOME, own process group, stopped at the end); every Dask run a
  new `python bench/dask_peer.py` process whose Client connects to a `dask scheduler` with one
  `dask worker --nthreads 1` process per cpu kept running. Timed from launch to exit; best of
  `--repeat` after one untimed warm-up run. These processes get the user's environment
  (`user_env()`: bytecode cached, as installed packages have it). `--no-per-run` skips the
  peers' part of it (mle's runs are per run anyway); `--one-prefect-server` (quick runs, CI) runs
  the in-process Prefect measure against that same server instead of booting an ephemeral one.
- in-process (Prefect's and Dask's best case: no interpreter start, no import): Prefect 3 in its
  default local mode (ephemeral API server, throwaway PREFECT_HOME), run by
  bench/prefect_peer.py in one process of its own that runs the flows back to back; Dask
  distributed's LocalCluster, in this process.
Prefect runs with `--prefect-python` (default: this Python).

Per-step figures come from warm runs (the agent started, the Prefect server booted, the cluster
up); each runtime's cold start-up and its fixed cost per run (a 1-step run) are reported apart.

Resume cost (mle only): a chain of `--resume-steps` no-op steps is started with `mle run`,
SIGKILLed once half its steps succeeded, and resumed with `mle resume`; it reports the time from
launching `mle resume` to its first new dispatch, next to the same measure for a fresh `mle run`
of the same recipe, the resume's wall, and how many succeeded steps ran again (must be none).

This file parses the options, runs the measures (mle's, the floor's and start-up here; the
peers' in _peers.py, the resume cost in _resume.py) and writes the report (_report.py); _measure.py
and _mle.py hold what they share. Adding a section: a `measure_*` function that puts figures into
`Results`, called from `main()`, and its rows in `markdown_section()`.

Usage: bench/dispatch.py [--steps 100] [--repeat 3] [--out bench/RESULTS.md]
                         [--prefect-python PATH] [--resume-steps 200]
                         [--section all|dispatch|resume] [--no-per-run | --one-prefect-server]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _agent_floor import measure_agent_floor
from _measure import Results, best, spawn_true, timed, user_env
from _mle import chain_recipe, fanout_recipe, local_agent, mle_command
from _peers import measure_dask, measure_dask_per_run, measure_prefect, measure_prefect_per_run
from _report import markdown_section, resume_section, summarize, summarize_resume
from _resume import measure_resume

# --- mle -----------------------------------------------------------------------------------------


def measure_mle(r: Results, n: int, repeat: int) -> None:
    with local_agent() as agent:
        first_run_s = agent.run(chain_recipe(1), 1)  # creates the ledger
        r.figures["mle_startup_s"] = agent.start_s + first_run_s
        r.figures["mle_one_step_s"] = best(lambda: agent.run(chain_recipe(1), 1), repeat)
        r.figures["mle_chain_s"] = best(lambda: agent.run(chain_recipe(n), n), repeat)
        r.figures["mle_fanout_s"] = best(lambda: agent.run(fanout_recipe(n), n), repeat)
        measure_agent_floor(r, agent.project, n, repeat)


# --- floor ---------------------------------------------------------------------------------------


def floor_chain(n: int) -> float:
    """Spawn N `true` processes one after another, from Python."""
    return timed(lambda: [spawn_true() for _ in range(n)])


def floor_fanout(n: int, workers: int) -> float:
    """Spawn N `true` processes, `workers` at a time."""

    def run() -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(spawn_true, range(n)))

    return timed(run)


def measure_floor(r: Results, n: int, repeat: int, workers: int) -> None:
    r.figures["floor_chain_s"] = best(lambda: floor_chain(n), repeat)
    r.figures["floor_fanout_s"] = best(lambda: floor_fanout(n, workers), repeat)


# --- start-up ------------------------------------------------------------------------------------


def median_wall(argv: list[str], repeat: int) -> float:
    """Median wall seconds of running a command (after one untimed run)."""
    env = user_env()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    walls = sorted(
        timed(lambda: subprocess.run(argv, check=True, capture_output=True, env=env))
        for _ in range(repeat)
    )
    return walls[len(walls) // 2]


def measure_help(r: Results, repeat: int) -> None:
    r.figures["help_s"] = median_wall([*mle_command(), "--help"], 2 * repeat + 1)
    r.figures["python_pass_s"] = median_wall([sys.executable, "-c", "pass"], 2 * repeat + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append a results section to this markdown file")
    parser.add_argument(
        "--prefect-python",
        default=sys.executable,
        help="the Python that has Prefect 3 (e.g. a separate venv's), default: this one",
    )
    parser.add_argument(
        "--resume-steps", type=int, default=200, help="steps of the resume-cost chain"
    )
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument(
        "--no-per-run",
        action="store_true",
        help="measure the peers in-process only, without a new process per run (no Prefect "
        "server, no Dask scheduler): quicker",
    )
    peers.add_argument(
        "--one-prefect-server",
        action="store_true",
        help="measure Prefect in-process against the per-run measure's `prefect server start` "
        "instead of its ephemeral server: one server boot, not two (its start-up figure is "
        "then import + a first flow on a running server); for quick runs",
    )
    parser.add_argument(
        "--section",
        choices=("all", "dispatch", "resume"),
        default="all",
        help="run only the dispatch comparison or only the resume cost",
    )
    args = parser.parse_args()
    n, repeat = args.steps, args.repeat
    workers = os.cpu_count() or 1
    dispatch = args.section in ("all", "dispatch")
    resume = args.section in ("all", "resume")

    flags = "".join(
        f" {flag}"
        for flag, given in (
            (f"--section {args.section}", args.section != "all"),
            (f"--prefect-python {args.prefect_python}", args.prefect_python != sys.executable),
            ("--no-per-run", args.no_per_run),
            ("--one-prefect-server", args.one_prefect_server),
        )
        if given
    )
    r = Results()
    summary: dict[str, float] = {}
    if dispatch:
        measure_mle(r, n, repeat)
        measure_floor(r, n, repeat, workers)
        measure_dask(r, n, repeat, workers)
        if not args.one_prefect_server:
            measure_prefect(r, n, repeat, workers, args.prefect_python)
        if not args.no_per_run:
            measure_dask_per_run(r, n, repeat, workers)
            one_server = args.one_prefect_server
            measure_prefect_per_run(r, n, repeat, workers, args.prefect_python, one_server)
        measure_help(r, repeat)
        summary.update(summarize(r.figures, n))
    if resume:
        measure_resume(r, args.resume_steps, repeat)
        summary.update(summarize_resume(r.figures))

    steps = {"steps": n} if dispatch else {}
    report = {**steps, **r.figures, **summary, "versions": r.versions, "skipped": r.skipped}
    print(json.dumps(report, indent=2))
    if args.out:
        with args.out.open("a") as out:
            if dispatch:
                section = markdown_section(
                    args.out, n, repeat, r, summary, not args.no_per_run, flags
                )
                out.write(section)
            if resume:
                out.write(resume_section(args.out, repeat, r, summary))
    return 0


if __name__ == "__main__":
    if shutil.which("true") is None:
        raise SystemExit("needs the `true` command")
    sys.exit(main())

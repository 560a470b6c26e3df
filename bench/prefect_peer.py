#!/usr/bin/env python3
"""Prefect 3 peer of bench/dispatch.py: the same no-op chain and fan-out as Prefect tasks.

Each task spawns `/bin/sh -c true`, as each mle step and each Dask task does
(`@task(cache_policy=NO_CACHE)`, `@flow(task_runner=ThreadPoolTaskRunner(max_workers=W))`).
Two modes, both started by dispatch.py with its environment:

- In-process (`--repeat R`, `measure_prefect`): Prefect's default local mode, no PREFECT_API_URL,
  so the first flow run boots the ephemeral API server (SQLite under a throwaway PREFECT_HOME),
  which lives until this process exits; the flows then run back to back in this process. Start-up
  (import, then the first 1-step flow, which boots the server) is measured apart from the warm
  runs that per-step overhead is computed from. Prints one JSON object on its last stdout line.
- One run (`--once chain|fanout`, `measure_prefect_per_run`): what `python flow.py` does, against
  the `prefect server start` that PREFECT_API_URL points at: import Prefect, run the one flow,
  exit. dispatch.py times the process from launch to exit. Prints nothing that matters.

Both check that every task ran its process (exit non-zero otherwise).
Usage: bench/prefect_peer.py --steps N --workers W (--repeat R | --once chain|fanout)
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--repeat", type=int, help="in-process: run each flow this many times")
    mode.add_argument("--once", choices=("chain", "fanout"), help="run this flow once, exit")
    args = parser.parse_args()
    n = args.steps

    start = time.perf_counter()
    import prefect
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import wait
    from prefect.task_runners import ThreadPoolTaskRunner

    import_s = time.perf_counter() - start

    spawned = itertools.count()  # next() is atomic: proves every task ran its process

    # NO_CACHE: every task must run its process (chain tasks all get the same input, 0).
    @task(cache_policy=NO_CACHE)
    def step(*_: object) -> int:
        next(spawned)
        return subprocess.run(["/bin/sh", "-c", "true"], check=True).returncode

    runner = ThreadPoolTaskRunner(max_workers=args.workers)

    # Each flow returns the seconds its body took, from its first line to the last task's result:
    # the flow's wall without the run's own creation and finishing.
    @flow(task_runner=runner)
    def chain(n: int) -> float:
        start = time.perf_counter()
        future = step.submit()
        for _ in range(n - 1):
            future = step.submit(future)
        future.result()
        return time.perf_counter() - start

    @flow(task_runner=runner)
    def fanout(n: int) -> float:
        start = time.perf_counter()
        futures = [step.submit(i) for i in range(n)]
        wait(futures)
        for f in futures:
            f.result()
        return time.perf_counter() - start

    if args.once:
        {"chain": chain, "fanout": fanout}[args.once](n)
        if (ran := next(spawned)) != n:
            raise SystemExit(f"{ran} tasks ran, not {n}")
        return 0

    start = time.perf_counter()
    chain(1)  # boots the ephemeral server, creates its database
    first_flow_s = time.perf_counter() - start
    one_step_s, one_step_body_s = best(lambda: chain(1), args.repeat)
    chain_s, chain_body_s = best(lambda: chain(n), args.repeat)
    fanout_s, fanout_body_s = best(lambda: fanout(n), args.repeat)
    expected = 1 + args.repeat * (1 + 2 * n)
    if (ran := next(spawned)) != expected:
        raise SystemExit(f"{ran} tasks ran, not {expected}")
    results = {
        "prefect_version": prefect.__version__,
        "prefect_import_s": import_s,
        "prefect_first_flow_s": first_flow_s,
        "prefect_one_step_s": one_step_s,
        "prefect_one_step_body_s": one_step_body_s,
        "prefect_chain_s": chain_s,
        "prefect_chain_body_s": chain_body_s,
        "prefect_fanout_s": fanout_s,
        "prefect_fanout_body_s": fanout_body_s,
    }
    sys.stdout.write(json.dumps(results) + "\n")
    return 0


def best(run: Callable[[], float], repeat: int) -> tuple[float, float]:
    """The fastest wall and the fastest body time of `repeat` flow runs."""
    walls, bodies = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        bodies.append(run())
        walls.append(time.perf_counter() - start)
    return min(walls), min(bodies)


if __name__ == "__main__":
    sys.exit(main())

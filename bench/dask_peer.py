#!/usr/bin/env python3
"""Dask peer of bench/dispatch.py, one run per process: what a user's `python script.py` does.

Connects a new `distributed.Client` to the `dask scheduler` at `--scheduler` (its `dask worker`
processes kept running by dispatch.py, `measure_dask_per_run`), runs one chain or one fan-out of
N tasks, each spawning `/bin/sh -c true` as each mle step does (`client.submit(..., pure=False)`,
the function shipped by value from this script), closes the client and exits. dispatch.py times
the process from launch to exit. Each task returns its input + 1 (chain) or 1 (fan-out): the
result proves that every task ran its process (exit non-zero otherwise). Prints nothing that
matters.

Usage: bench/dask_peer.py --scheduler tcp://HOST:PORT --once chain|fanout --steps N
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def step(previous: int = 0) -> int:
    """One step's work, as in dispatch.py: a `true` process; counts the steps run so far."""
    subprocess.run(["/bin/sh", "-c", "true"], check=True)
    return previous + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", required=True)
    parser.add_argument("--once", choices=("chain", "fanout"), required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    n = args.steps

    from distributed import Client

    with Client(args.scheduler, timeout=60) as client:
        if args.once == "chain":
            future = client.submit(step, pure=False)
            for _ in range(n - 1):
                future = client.submit(step, future, pure=False)
            ran = future.result()
        else:
            ran = sum(client.gather([client.submit(step, pure=False) for _ in range(n)]))
    if ran != n:
        raise SystemExit(f"{ran} tasks ran, not {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

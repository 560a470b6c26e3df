#!/usr/bin/env python3
"""Dispatch overhead of `mle run` on the local agent vs Prefect 3 and Dask; `mle --help` start-up.

Runs N no-op steps (`true`) as a chain and as a fan-out through the real `mle` command on a warm
local agent, and reports wall / steps. Side by side, in the same run, it does the same work (one
`/bin/sh -c true` process per step, chained and fanned out at the agent's concurrency, its cpu
count) in each peer that is installed (`pip install -e '.[bench]'`), and always against a floor:
spawning the same processes directly from Python.
- Prefect 3 in its default local mode (ephemeral API server, throwaway PREFECT_HOME), run by
  bench/prefect_peer.py in its own process, with `--prefect-python` (default: this Python).
- Dask distributed's LocalCluster, in this process.

Per-step figures come from warm runs (the agent started, the Prefect server booted, the cluster
up); each runtime's cold start-up and its fixed cost per run (a 1-step run) are reported apart.

Resume cost (mle only): a chain of `--resume-steps` no-op steps is started with `mle run`,
SIGKILLed once half its steps succeeded, and resumed with `mle resume`; it reports the time from
launching `mle resume` to its first new dispatch, next to the same measure for a fresh `mle run`
of the same recipe, the resume's wall, and how many succeeded steps ran again (must be none).

Adding a section: a `measure_*` function that puts figures into `Results`, called from `main()`,
and its rows in `markdown_section()`.

Usage: bench/dispatch.py [--steps 100] [--repeat 3] [--out bench/RESULTS.md]
                         [--prefect-python PATH] [--resume-steps 200]
                         [--section all|dispatch|resume]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFECT_PEER = Path(__file__).resolve().parent / "prefect_peer.py"

# Prefect's settings for the run, on top of a fresh PREFECT_HOME and no inherited PREFECT_*
# (so no PREFECT_API_URL: the ephemeral server). They only silence it; all are in the results.
PREFECT_SETTINGS = {
    "DO_NOT_TRACK": "1",  # client telemetry
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",  # no INFO line per flow and task run on the console
    # The shared 2-core machine can be slow to boot the server; Prefect's default is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


@dataclass
class Results:
    """Seconds (and other figures) by name, plus peer versions and why a peer was skipped."""

    figures: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, peer: str, reason: str) -> None:
        self.skipped[peer] = reason
        print(f"{peer}: skipped ({reason})", file=sys.stderr)


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


# --- mle -----------------------------------------------------------------------------------------


def user_env() -> dict[str, str]:
    """This environment as a user's shell has it. Installed from a wheel, mle's bytecode is
    cached: a PYTHONDONTWRITEBYTECODE here would make every `mle` compile its modules again,
    which no user pays. A first, untimed run writes the cache (Prefect and Dask run in-process)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def mle_command() -> list[str]:
    """The installed `mle` next to this Python, else `python -m mle_cli`."""
    script = Path(sys.executable).parent / "mle"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mle_cli"]


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


def measure_mle(r: Results, n: int, repeat: int) -> None:
    with local_agent() as agent:
        first_run_s = agent.run(chain_recipe(1), 1)  # creates the ledger
        r.figures["mle_startup_s"] = agent.start_s + first_run_s
        r.figures["mle_one_step_s"] = best(lambda: agent.run(chain_recipe(1), 1), repeat)
        r.figures["mle_chain_s"] = best(lambda: agent.run(chain_recipe(n), n), repeat)
        r.figures["mle_fanout_s"] = best(lambda: agent.run(fanout_recipe(n), n), repeat)


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


# --- Dask ----------------------------------------------------------------------------------------


def measure_dask(r: Results, n: int, repeat: int, workers: int) -> None:
    """Chain and fan-out of N process-spawning tasks on a Dask LocalCluster, if Dask is here."""
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        r.skip("dask", f"{e}; `pip install -e '.[bench]'` to compare")
        return
    r.versions["dask"] = dask.__version__

    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.submit(spawn_true, pure=False).result()
        r.figures["dask_startup_s"] = time.perf_counter() - start

        def chain() -> None:
            future = client.submit(spawn_true, pure=False)
            for _ in range(n - 1):
                future = client.submit(spawn_true, future, pure=False)
            future.result()

        def fanout() -> None:
            client.gather([client.submit(spawn_true, i, pure=False) for i in range(n)])

        def one_step() -> None:
            client.submit(spawn_true, pure=False).result()

        r.figures["dask_one_step_s"] = best(lambda: timed(one_step), repeat)
        r.figures["dask_chain_s"] = best(lambda: timed(chain), repeat)
        r.figures["dask_fanout_s"] = best(lambda: timed(fanout), repeat)


# --- Prefect 3 -----------------------------------------------------------------------------------


def prefect_env(home: Path) -> dict[str, str]:
    """This environment without PREFECT_* settings, plus PREFECT_SETTINGS and a fresh home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, **PREFECT_SETTINGS, "PREFECT_HOME": str(home)}


def measure_prefect(r: Results, n: int, repeat: int, workers: int, python: str) -> None:
    """Run bench/prefect_peer.py with `python` in a fresh PREFECT_HOME, if Prefect 3 is there."""
    probe = subprocess.run(
        [python, "-c", "import prefect; print(prefect.__version__)"],
        capture_output=True,
        text=True,
    )
    version = probe.stdout.strip()
    if probe.returncode != 0 or not version.startswith("3."):
        reason = probe.stderr.strip().splitlines()[-1:] or [f"Prefect {version} is not 3.x"]
        r.skip("prefect", f"{reason[0]}; `pip install -e '.[bench]'` to compare")
        return
    with tempfile.TemporaryDirectory() as home:
        argv = [python, str(PREFECT_PEER), "--steps", str(n), "--repeat", str(repeat)]
        proc = subprocess.run(
            [*argv, "--workers", str(workers)],
            env=prefect_env(Path(home)),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if proc.returncode != 0:
        raise SystemExit(f"the Prefect peer failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    r.versions["prefect"] = out.pop("prefect_version")
    r.figures.update(out)
    r.figures["prefect_startup_s"] = out["prefect_import_s"] + out["prefect_first_flow_s"]


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


# --- resume cost ---------------------------------------------------------------------------------


def ledger_rows(ledger: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of a query, in a connection of its own (an `mle` process may be writing)."""
    conn = sqlite3.connect(ledger, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def new_run_id(ledger: Path, known: set[str]) -> str | None:
    new = [row[0] for row in ledger_rows(ledger, "SELECT id FROM runs") if row[0] not in known]
    return new[0] if new else None


def attempts_of(ledger: Path, run_id: str) -> dict[str, tuple[str, str, float]]:
    """task_id: (step_id, status, started) of each attempt of the run."""
    sql = "SELECT task_id, step_id, status, started FROM attempts WHERE run_id = ?"
    return {
        task: (step, status, started)
        for task, step, status, started in ledger_rows(ledger, sql, run_id)
    }


def first_dispatch_s(ledger: Path, run_id: str, launched: float, known: set[str]) -> float:
    """Seconds from `launched` (unix time) to the first attempt of the run not in `known`."""
    starts = [a[2] for task, a in attempts_of(ledger, run_id).items() if task not in known]
    if not starts:
        raise SystemExit(f"run {run_id}: no attempt was dispatched")
    return min(starts) - launched


def mle_process(agent: LocalAgent, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`mle ARGS --no-live` in the agent's project, its output to a file (it is not read)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*mle_command(), *args, "--no-live"],
            cwd=agent.project,
            env=agent.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finished(proc: subprocess.Popen[bytes], log: Path, steps: int, what: str) -> None:
    """Wait for an `mle` process that must succeed with all the run's steps."""
    proc.wait(timeout=1800)
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or f" {steps}/{steps} steps succeeded" not in text:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{text[-2000:]}")


def kill_midway(agent: LocalAgent, recipe: Path, kill_at: int) -> tuple[str, float] | None:
    """Start `mle run`, SIGKILL it once `kill_at` of its steps succeeded in the ledger.

    Returns the run id and the launch time, or None if the run ended before that was seen.
    """
    known = {row[0] for row in ledger_rows(agent.ledger, "SELECT id FROM runs")}
    count = "SELECT count(*) FROM steps WHERE status = 'succeeded' AND run_id = ?"
    log = agent.project / "killed.log"
    launched = time.time()
    proc = mle_process(agent, log, "run", recipe.name)
    deadline = time.monotonic() + 600
    run_id = None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            run_id = run_id or new_run_id(agent.ledger, known)
            if run_id and ledger_rows(agent.ledger, count, run_id)[0][0] >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return run_id, launched
        except sqlite3.OperationalError:  # the ledger is being created or migrated
            pass
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise SystemExit(f"mle run never reached {kill_at} succeeded steps")
    print(f"resume: the run ended before {kill_at} steps were seen; again", file=sys.stderr)
    return None


def resume_cycle(agent: LocalAgent, recipe: Path, steps: int, kill_at: int) -> dict[str, float]:
    """A fresh `mle run` of the recipe, then one killed midway and resumed, on a warm agent."""
    ledger = agent.ledger
    known = {row[0] for row in ledger_rows(ledger, "SELECT id FROM runs")}
    log = agent.project / "fresh.log"
    launched = time.time()
    proc = mle_process(agent, log, "run", recipe.name)
    finished(proc, log, steps, "mle run")
    fresh = {"fresh_wall_s": time.time() - launched}
    fresh_id = new_run_id(ledger, known)
    assert fresh_id is not None
    fresh["fresh_first_dispatch_s"] = first_dispatch_s(ledger, fresh_id, launched, set())

    for _ in range(3):
        killed = kill_midway(agent, recipe, kill_at)
        if killed:
            break
    else:
        raise SystemExit(f"mle run always ended before {kill_at} steps were seen: fewer steps?")
    run_id = killed[0]
    step_status = "SELECT step_id, status FROM steps WHERE run_id = ?"
    done_before = {
        s for s, status in ledger_rows(ledger, step_status, run_id) if status == "succeeded"
    }
    before = attempts_of(ledger, run_id)
    in_flight = {a[0] for a in before.values()} - done_before

    log = agent.project / "resume.log"
    launched = time.time()
    proc = mle_process(agent, log, "resume", run_id)
    finished(proc, log, steps, f"mle resume {run_id}")
    wall = time.time() - launched

    after = attempts_of(ledger, run_id)
    new_steps = {step for task, (step, _, _) in after.items() if task not in before}
    reruns = sorted(new_steps & done_before)
    succeeded = [step for step, status, _ in after.values() if status == "succeeded"]
    steps_ok = [
        s for s, status in ledger_rows(ledger, step_status, run_id) if status == "succeeded"
    ]
    if reruns:
        raise SystemExit(f"resume ran {len(reruns)} succeeded steps again: {reruns[:10]}")
    if sorted(succeeded) != sorted(steps_ok) or len(set(succeeded)) != steps:
        raise SystemExit(
            f"run {run_id}: {len(succeeded)} succeeded attempts for {len(set(succeeded))} "
            f"steps, {len(steps_ok)} of {steps} steps succeeded; each needs exactly one"
        )
    return {
        **fresh,
        "resume_first_dispatch_s": first_dispatch_s(ledger, run_id, launched, set(before)),
        "resume_wall_s": wall,
        "resume_done_at_kill": len(done_before),
        "resume_reruns": len(reruns),
        "resume_in_flight": len(in_flight),
        "resume_reattached": len(in_flight - new_steps),
        "resume_redispatched": len(in_flight & new_steps),
    }


def measure_resume(r: Results, steps: int, repeat: int) -> None:
    """Resume cost of a chain of no-op steps killed at half way; timings: best of `repeat`."""
    kill_at = steps // 2
    if kill_at < 1 or kill_at >= steps:
        raise SystemExit("--resume-steps must be at least 2")
    with local_agent() as agent:
        agent.run(chain_recipe(1), 1)  # creates the ledger
        recipe = agent.project / "resume.yaml"
        recipe.write_text(chain_recipe(steps))
        cycles = [resume_cycle(agent, recipe, steps, kill_at) for _ in range(repeat)]
    for key in (
        "fresh_first_dispatch_s",
        "fresh_wall_s",
        "resume_first_dispatch_s",
        "resume_wall_s",
    ):
        r.figures[key] = min(c[key] for c in cycles)
    for key in ("resume_reruns", "resume_in_flight", "resume_reattached", "resume_redispatched"):
        r.figures[key] = sum(c[key] for c in cycles)
    r.figures["resume_steps"] = steps
    r.figures["resume_kill_at"] = kill_at
    r.figures["resume_cycles"] = repeat
    r.figures["resume_done_at_kill_min"] = min(c["resume_done_at_kill"] for c in cycles)
    r.figures["resume_done_at_kill_max"] = max(c["resume_done_at_kill"] for c in cycles)


# --- report --------------------------------------------------------------------------------------

RUNTIMES = ("mle", "floor", "dask", "prefect")


def summarize(f: dict[str, float], n: int) -> dict[str, float]:
    """Per-step overhead, throughput, and mle's ratios to the floor and to each peer."""
    s: dict[str, float] = {"help_extra_ms": 1000 * (f["help_s"] - f["python_pass_s"])}
    for rt in RUNTIMES:
        if f"{rt}_chain_s" not in f:
            continue
        s[f"{rt}_chain_ms_per_step"] = 1000 * f[f"{rt}_chain_s"] / n
        s[f"{rt}_fanout_ms_per_step"] = 1000 * f[f"{rt}_fanout_s"] / n
        s[f"{rt}_fanout_steps_per_s"] = n / f[f"{rt}_fanout_s"]
        if f"{rt}_one_step_s" in f and n > 1:
            # What a step adds to a run once its fixed cost (a 1-step run) is paid. From in-flow
            # times where a peer has them: Prefect's walls are rounded up to whole seconds.
            kind = "_body" if f"{rt}_chain_body_s" in f else ""
            extra = f[f"{rt}_chain{kind}_s"] - f[f"{rt}_one_step{kind}_s"]
            s[f"{rt}_chain_marginal_ms_per_step"] = 1000 * extra / (n - 1)
        if f"{rt}_fanout_body_s" in f:
            s[f"{rt}_fanout_body_steps_per_s"] = n / f[f"{rt}_fanout_body_s"]
        if rt != "mle":
            s[f"chain_ratio_mle_vs_{rt}"] = f["mle_chain_s"] / f[f"{rt}_chain_s"]
            s[f"fanout_ratio_mle_vs_{rt}"] = f["mle_fanout_s"] / f[f"{rt}_fanout_s"]
    return s


def markdown_section(path: Path, n: int, repeat: int, r: Results, s: dict[str, float]) -> str:
    """One dated section with the figures, the command and the peers' configuration."""
    f = r.figures
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    workers = os.cpu_count() or 1

    def cells(fmt: str, value: Callable[[str], float | None]) -> str:
        out = []
        for rt in RUNTIMES:
            try:
                v = value(rt)
            except KeyError:
                v = None
            out.append("n/a" if v is None else fmt.format(v))
        return " | ".join(out)

    def ratio(rt: str) -> str:
        if f"chain_ratio_mle_vs_{rt}" not in s:
            return f"{rt}: not run ({r.skipped.get(rt, 'not installed')})"
        return (
            f"chain {s[f'chain_ratio_mle_vs_{rt}']:.2f}×, "
            f"fan-out {s[f'fanout_ratio_mle_vs_{rt}']:.2f}×"
        )

    prefect_conf = (
        f"Prefect {r.versions['prefect']}: `@flow(task_runner=ThreadPoolTaskRunner"
        f"(max_workers={workers}))`, `@task(cache_policy=NO_CACHE)`, steps `.submit()`ted "
        "(chain: each gets the previous future); ephemeral API server (no PREFECT_API_URL), "
        "fresh PREFECT_HOME, "
        + ", ".join(f"`{k}={v}`" for k, v in PREFECT_SETTINGS.items())
        + "; start-up = import + first 1-step flow (boots the server)."
        if "prefect" in r.versions
        else f"Prefect: not run ({r.skipped.get('prefect', '')})."
    )
    dask_conf = (
        f"Dask {r.versions['dask']}: LocalCluster(n_workers={workers}, threads_per_worker=1, "
        "processes=True), `client.submit(..., pure=False)`; start-up = cluster + client + "
        "first task."
        if "dask" in r.versions
        else f"Dask: not run ({r.skipped.get('dask', '')})."
    )
    lines = [
        f"\n## dispatch — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `python bench/dispatch.py --steps {n} --repeat {repeat} --out {path}`; "
        f"best of the repeats; warm runtimes; each step runs `true` in its own process; "
        f"fan-out at a concurrency of {workers} everywhere (the agent's default slots).\n",
        "| measure | mle | floor (direct spawn) | Dask LocalCluster | Prefect 3 | target |",
        "|---|---|---|---|---|---|",
        f"| chain: ms per step (wall / N) | "
        f"{cells('{:.1f}', lambda rt: s[f'{rt}_chain_ms_per_step'])} | ≤ 25 |",
        f"| fan-out: steps/s | {cells('{:.0f}', lambda rt: s[f'{rt}_fanout_steps_per_s'])} | ≥ 100 |",
        f"| chain: marginal ms per step ((wall N − wall 1) / (N − 1))¹ | "
        f"{cells('{:.1f}', lambda rt: s.get(f'{rt}_chain_marginal_ms_per_step'))} | |",
        f"| fixed cost per run: a 1-step run, warm (ms) | "
        f"{cells('{:.0f}', lambda rt: 1000 * f[f'{rt}_one_step_s'])} | |",
        f"| start-up, cold (s) | {cells('{:.2f}', lambda rt: f[f'{rt}_startup_s'])} | |",
        f"| `mle --help` extra over `python -c pass` | {s['help_extra_ms']:.0f} ms "
        f"({1000 * f['help_s']:.0f} vs {1000 * f['python_pass_s']:.0f} ms) | | | | ≤ 150 ms |",
        "",
        f"Ratios of mle's wall to the peer's in the same run (below 1: mle is faster): floor "
        f"chain {s['chain_ratio_mle_vs_floor']:.1f}×; Dask {ratio('dask')}; "
        f"Prefect {ratio('prefect')} (issue target: ≤ 0.33, Prefect 3× slower).",
        "",
        f"Start-up: mle = `mle agent start` + first 1-step run; {prefect_conf} {dask_conf}",
    ]
    if "prefect_chain_body_s" in f:
        lines += [
            "",
            "¹ Prefect: from times taken inside the flow body (first line to the last task's "
            "result), because a sync flow's wall is rounded up to at least the next whole second "
            "after it starts: on exit it joins its heartbeat thread, which sleeps in 1 s slices "
            "(`prefect.flow_engine._send_heartbeats`; default heartbeat every 180 s). In-flow "
            f"fan-out: {s['prefect_fanout_body_steps_per_s']:.0f} steps/s; in-flow chain: "
            f"{1000 * f['prefect_chain_body_s'] / n:.1f} ms per step.",
        ]
    return "\n".join(lines) + "\n"


def summarize_resume(f: dict[str, float]) -> dict[str, float]:
    """Resume's first dispatch as a ratio to a fresh start's."""
    return {
        "resume_first_dispatch_ratio": f["resume_first_dispatch_s"] / f["fresh_first_dispatch_s"]
    }


def resume_section(path: Path, repeat: int, r: Results, s: dict[str, float]) -> str:
    """One dated section with the resume figures and the command."""
    f = r.figures
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    steps, kill_at = int(f["resume_steps"]), int(f["resume_kill_at"])
    lo, hi = int(f["resume_done_at_kill_min"]), int(f["resume_done_at_kill_max"])
    done = f"{lo}" if lo == hi else f"{lo}–{hi}"
    left = f"{steps - lo}" if lo == hi else f"{steps - hi}–{steps - lo}"
    in_flight, reattached = int(f["resume_in_flight"]), int(f["resume_reattached"])
    lines = [
        f"\n## resume cost — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `python bench/dispatch.py --section resume --resume-steps {steps} "
        f"--repeat {repeat} --out {path}`; a chain of {steps} no-op steps (`true`, "
        f"`cache: false`) on a warm local agent; per cycle, a fresh `mle run` of it to the end, "
        f"then another `mle run` SIGKILLed once the ledger shows {kill_at} steps succeeded, "
        f"and `mle resume RUN`; best of {repeat} cycle(s). First dispatch = the smallest "
        f"`attempts.started` among attempts not in the ledger before the command, minus its "
        f"launch time.\n",
        "| measure | fresh `mle run` | `mle resume` after SIGKILL | resume / fresh |",
        "|---|---|---|---|",
        f"| launch → first new dispatch (ms) | {1000 * f['fresh_first_dispatch_s']:.0f} | "
        f"{1000 * f['resume_first_dispatch_s']:.0f} | {s['resume_first_dispatch_ratio']:.2f}× |",
        f"| wall (s) | {f['fresh_wall_s']:.2f} ({steps} steps) | "
        f"{f['resume_wall_s']:.2f} ({left} steps left) | |",
        f"| succeeded steps run again | | {int(f['resume_reruns'])} "
        f"({done} succeeded at the kill) | |",
        "",
        f"Every step ended with exactly one succeeded attempt. Steps in flight at the kill "
        f"(an attempt in the ledger, not yet succeeded): {in_flight} over {int(f['resume_cycles'])}"
        f" cycle(s); re-attached by the resume: {reattached}, dispatched again: "
        f"{int(f['resume_redispatched'])}.",
    ]
    return "\n".join(lines) + "\n"


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

    r = Results()
    summary: dict[str, float] = {}
    if dispatch:
        measure_mle(r, n, repeat)
        measure_floor(r, n, repeat, workers)
        measure_dask(r, n, repeat, workers)
        measure_prefect(r, n, repeat, workers, args.prefect_python)
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
                out.write(markdown_section(args.out, n, repeat, r, summary))
            if resume:
                out.write(resume_section(args.out, repeat, r, summary))
    return 0


if __name__ == "__main__":
    if shutil.which("true") is None:
        raise SystemExit("needs the `true` command")
    sys.exit(main())

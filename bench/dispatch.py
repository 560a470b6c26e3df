#!/usr/bin/env python3
"""Dispatch overhead of `mle run` on the local agent vs Prefect 3 and Dask; `mle --help` start-up.

Runs N no-op steps (`true`) as a chain and as a fan-out through the real `mle` command on a warm
local agent, and reports wall / steps. Side by side, in the same run, it does the same work (one
`/bin/sh -c true` process per step, chained and fanned out at the agent's concurrency, its cpu
count) in each peer that is installed (`pip install -e '.[bench]'`), and always against a floor:
spawning the same processes directly from Python.

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

Adding a section: a `measure_*` function that puts figures into `Results`, called from `main()`,
and its rows in `markdown_section()`.

Usage: bench/dispatch.py [--steps 100] [--repeat 3] [--out bench/RESULTS.md]
                         [--prefect-python PATH] [--resume-steps 200]
                         [--section all|dispatch|resume] [--no-per-run | --one-prefect-server]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFECT_PEER = Path(__file__).resolve().parent / "prefect_peer.py"
DASK_PEER = Path(__file__).resolve().parent / "dask_peer.py"

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


# --- services kept running for the per-run measures ----------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it if anything is left after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(proc.pid):
                return
            time.sleep(0.05)
    if proc.poll() is None:
        proc.wait(grace)


@contextmanager
def service(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running command in a process group of its own, its output to `log`; stopped (the
    whole group, children too) on exit, however the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def wait_ready(
    ready: Callable[[], bool], services: dict[Path, subprocess.Popen[bytes]], timeout: float
) -> str | None:
    """None once `ready()` is true; else why not: a service (by its log) ended, or `timeout` s
    passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log, proc in services.items():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                return f"{log.stem} exited ({proc.returncode}): {tail[0]}"
        if ready():
            return None
        time.sleep(0.2)
    return f"{', '.join(log.stem for log in services)} not ready after {timeout:.0f} s"


def run_checked(argv: list[str], env: dict[str, str], what: str) -> None:
    """Run a peer's one-run process, which must succeed."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def measure_per_run(
    r: Results,
    rt: str,
    once: Callable[[str, int], list[str]],
    env: dict[str, str],
    n: int,
    repeat: int,
) -> None:
    """Best-of-`repeat` walls of new processes, launch to exit, after an untimed warm-up:
    `once(flow, steps)` is the argv of one run of a 1-step chain, the N-step chain, the fan-out."""
    run_checked(once("chain", 1), env, f"{rt}: warm-up run")
    for key, flow, steps in (
        ("one_step", "chain", 1),
        ("chain", "chain", n),
        ("fanout", "fanout", n),
    ):
        run = partial(run_checked, once(flow, steps), env, f"{rt}: {steps}-step {flow}")
        r.figures[f"{rt}_{key}_s"] = best(partial(timed, run), repeat)


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


def measure_dask_per_run(r: Results, n: int, repeat: int, workers: int) -> None:
    """A new client process per run (bench/dask_peer.py), on a `dask scheduler` and `workers`
    `dask worker --nthreads 1` processes kept running."""
    try:
        from dask.distributed import Client
    except ImportError as e:
        r.skip("dask_run", f"{e}; `pip install -e '.[bench]'` to compare")
        return
    env = user_env()
    address = f"tcp://127.0.0.1:{free_port()}"
    dask_cli = [sys.executable, "-m", "dask"]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        logs = Path(tmp)
        start = time.perf_counter()
        host, port = address.removeprefix("tcp://").split(":")
        scheduler = [*dask_cli, "scheduler", "--host", host, "--port", port, "--no-dashboard"]
        log = logs / "dask-scheduler.log"
        services = {log: stack.enter_context(service(scheduler, env, log))}
        worker = [*dask_cli, "worker", address, "--nthreads", "1", "--no-dashboard"]
        worker += ["--local-directory", tmp]
        for i in range(workers):
            log = logs / f"dask-worker-{i}.log"
            services[log] = stack.enter_context(service(worker, env, log))

        def ready() -> bool:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(workers, timeout=5)
                return True
            except (OSError, TimeoutError):
                return False

        if reason := wait_ready(ready, services, 120):
            r.skip("dask_run", reason)
            return
        r.figures["dask_run_cluster_start_s"] = time.perf_counter() - start

        def once(flow: str, steps: int) -> list[str]:
            argv = [sys.executable, str(DASK_PEER), "--scheduler", address, "--once", flow]
            return [*argv, "--steps", str(steps)]

        measure_per_run(r, "dask_run", once, env, n, repeat)


# --- Prefect 3 -----------------------------------------------------------------------------------


def prefect_env(home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this environment) without PREFECT_* settings, plus PREFECT_SETTINGS and
    a fresh home."""
    items = (os.environ if base is None else base).items()
    env = {k: v for k, v in items if not k.startswith("PREFECT_")}
    return {**env, **PREFECT_SETTINGS, "PREFECT_HOME": str(home)}


def has_prefect_3(r: Results, peer: str, python: str) -> bool:
    """Whether `python` imports Prefect 3; if not, `peer` is skipped with the reason."""
    probe = subprocess.run(
        [python, "-c", "import prefect; print(prefect.__version__)"],
        capture_output=True,
        text=True,
    )
    version = probe.stdout.strip()
    if probe.returncode != 0 or not version.startswith("3."):
        reason = probe.stderr.strip().splitlines()[-1:] or [f"Prefect {version} is not 3.x"]
        r.skip(peer, f"{reason[0]}; `pip install -e '.[bench]'` to compare")
        return False
    return True


def measure_prefect(
    r: Results, n: int, repeat: int, workers: int, python: str, api: str | None = None
) -> None:
    """Run bench/prefect_peer.py with `python` in a fresh PREFECT_HOME, if Prefect 3 is there:
    in its ephemeral server, or with `api`, against that running server."""
    if not has_prefect_3(r, "prefect", python):
        return
    with tempfile.TemporaryDirectory() as home:
        argv = [python, str(PREFECT_PEER), "--steps", str(n), "--repeat", str(repeat)]
        env = prefect_env(Path(home))
        proc = subprocess.run(
            [*argv, "--workers", str(workers)],
            env=env if api is None else {**env, "PREFECT_API_URL": api},
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
    if api is not None:
        r.figures["prefect_in_process_on_server"] = 1


def api_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def measure_prefect_per_run(
    r: Results, n: int, repeat: int, workers: int, python: str, in_process_too: bool = False
) -> None:
    """`python bench/prefect_peer.py --once ...` as a new process per run (`python flow.py`),
    against a `prefect server start` kept running, with PREFECT_API_URL pointing at it.

    `in_process_too`: run the in-process measure (`measure_prefect`) first, against the same
    server instead of its ephemeral one: one server boot instead of two (for CI's small run)."""
    if not has_prefect_3(r, "prefect_run", python):
        if in_process_too:
            r.skip("prefect", r.skipped["prefect_run"])
        return
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with tempfile.TemporaryDirectory() as home:
        env = prefect_env(Path(home), user_env())
        log = Path(home) / "prefect-server.log"
        server = [python, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        start = time.perf_counter()
        with service([*server, "--port", str(port)], env, log) as proc:
            if reason := wait_ready(lambda: api_healthy(api), {log: proc}, 120):
                r.skip("prefect_run", reason)
            else:
                r.figures["prefect_run_server_start_s"] = time.perf_counter() - start
                if in_process_too:
                    measure_prefect(r, n, repeat, workers, python, api)

                def once(flow: str, steps: int) -> list[str]:
                    argv = [python, str(PREFECT_PEER), "--once", flow, "--steps", str(steps)]
                    return [*argv, "--workers", str(workers)]

                run_env = {**env, "PREFECT_API_URL": api}
                measure_per_run(r, "prefect_run", once, run_env, n, repeat)
                return
    if in_process_too:  # no server: the in-process measure in its ephemeral one, as usual
        measure_prefect(r, n, repeat, workers, python)


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

# The table's columns; the peers measured per run are "dask_run" and "prefect_run" in the figures.
RUNTIMES = ("mle", "floor", "dask", "prefect")
PER_RUN = ("dask_run", "prefect_run")


def summarize(f: dict[str, float], n: int) -> dict[str, float]:
    """Per-step overhead, throughput, and mle's ratios to the floor and to each peer."""
    s: dict[str, float] = {"help_extra_ms": 1000 * (f["help_s"] - f["python_pass_s"])}
    for rt in RUNTIMES + PER_RUN:
        if f"{rt}_chain_s" not in f:
            continue
        s[f"{rt}_chain_ms_per_step"] = 1000 * f[f"{rt}_chain_s"] / n
        s[f"{rt}_fanout_ms_per_step"] = 1000 * f[f"{rt}_fanout_s"] / n
        s[f"{rt}_fanout_steps_per_s"] = n / f[f"{rt}_fanout_s"]
        if f"{rt}_one_step_s" in f and n > 1 and rt not in PER_RUN:
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


def markdown_section(
    path: Path,
    n: int,
    repeat: int,
    r: Results,
    s: dict[str, float],
    per_run: bool = True,
    flags: str = "",
) -> str:
    """One dated section with the figures, the command (`flags`: its other options) and the
    peers' configuration."""
    f = r.figures
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    workers = os.cpu_count() or 1
    per_run_heading = "per run (a new process each; agent / Prefect server kept running)"
    in_process_heading = (
        "in-process (Prefect's and Dask's best case: no interpreter start, no import)"
    )

    def cells(
        fmt: str, value: Callable[[str], float | None], columns: tuple[str | None, ...] = RUNTIMES
    ) -> str:
        out = []
        for rt in columns:
            try:
                v = None if rt is None else value(rt)
            except KeyError:
                v = None
            out.append("n/a" if v is None else fmt.format(v))
        return " | ".join(out)

    # The per-run rows: mle's own figures (each `mle run` is a new process), no floor.
    run_columns = ("mle", None, "dask_run", "prefect_run")

    def run_cells(fmt: str, value: Callable[[str], float | None]) -> str:
        return cells(fmt, value, run_columns)

    def not_run(rt: str) -> str:
        if rt in PER_RUN and not per_run:
            return "not measured: --no-per-run"
        return r.skipped.get(rt, "not installed")

    def ratio(rt: str) -> str:
        if f"chain_ratio_mle_vs_{rt}" not in s:
            return f"not run ({not_run(rt)})"
        return (
            f"chain {s[f'chain_ratio_mle_vs_{rt}']:.2f}×, "
            f"fan-out {s[f'fanout_ratio_mle_vs_{rt}']:.2f}×"
        )

    prefect_conf = (
        f"Prefect {r.versions['prefect']}: `@flow(task_runner=ThreadPoolTaskRunner"
        f"(max_workers={workers}))`, `@task(cache_policy=NO_CACHE)`, steps `.submit()`ted "
        "(chain: each gets the previous future); "
        + (
            "against the per-run measure's `prefect server start` (`--one-prefect-server`), "
            "fresh PREFECT_HOME, "
            + ", ".join(f"`{k}={v}`" for k, v in PREFECT_SETTINGS.items())
            + "; start-up = import + first 1-step flow (the server already up)."
            if "prefect_in_process_on_server" in f
            else "ephemeral API server (no PREFECT_API_URL), fresh PREFECT_HOME, "
            + ", ".join(f"`{k}={v}`" for k, v in PREFECT_SETTINGS.items())
            + "; start-up = import + first 1-step flow (boots the server)."
        )
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
    prefect_run_conf = (
        "Prefect: the same flows, one run per `python bench/prefect_peer.py --once chain|fanout` "
        "process (`python flow.py`: interpreter start, `import prefect`, the flow, exit), "
        "with PREFECT_API_URL pointing at a `prefect server start --host 127.0.0.1` kept running "
        f"(same settings and PREFECT_HOME; up in {f['prefect_run_server_start_s']:.1f} s, not "
        "counted)²."
        if "prefect_run_chain_s" in f
        else f"Prefect: not run ({not_run('prefect_run')})."
    )
    dask_run_conf = (
        f"Dask: a `dask scheduler` and {workers} `dask worker --nthreads 1` processes kept "
        f"running (up in {f['dask_run_cluster_start_s']:.1f} s, not counted), one run per "
        "`python bench/dask_peer.py` process (interpreter start, `import distributed`, a "
        "`Client` connects, the tasks `client.submit(..., pure=False)`, the client closes, exit)."
        if "dask_run_chain_s" in f
        else f"Dask: not run ({not_run('dask_run')})."
    )
    command = f"python bench/dispatch.py --steps {n} --repeat {repeat} --out {path}{flags}"
    lines = [
        f"\n## dispatch — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `{command}`; "
        f"best of the repeats; warm runtimes; each step runs `true` in its own process; "
        f"fan-out at a concurrency of {workers} everywhere (the agent's default slots). "
        f"Two comparisons: **{per_run_heading}**, every run a new process timed from launch to "
        f"exit, as a user runs `mle run recipe.yaml` or `python flow.py`; and "
        f"**{in_process_heading}**: each peer runs its flows back to back in one process, "
        "against mle's same per-run figures (each `mle run` is a new process).\n",
        "| measure | mle | floor (direct spawn) | Dask distributed | Prefect 3 | target |",
        "|---|---|---|---|---|---|",
        f"| **{per_run_heading}** | | | | | |",
        f"| chain: ms per step (wall / N) | "
        f"{run_cells('{:.1f}', lambda rt: s[f'{rt}_chain_ms_per_step'])} | ≤ 25 |",
        f"| fan-out: steps/s | "
        f"{run_cells('{:.0f}', lambda rt: s[f'{rt}_fanout_steps_per_s'])} | ≥ 100 |",
        f"| a 1-step run (ms) | {run_cells('{:.0f}', lambda rt: 1000 * f[f'{rt}_one_step_s'])} | |",
        f"| **{in_process_heading}** | | | | | |",
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
        f"Ratios of mle's wall to the peer's in the same run (below 1: mle is faster). "
        f"P{per_run_heading[1:]}: Prefect {ratio('prefect_run')}; "
        f"Dask {ratio('dask_run')}. I{in_process_heading[1:]}: floor "
        f"chain {s['chain_ratio_mle_vs_floor']:.1f}×; Dask {ratio('dask')}; "
        f"Prefect {ratio('prefect')}. Issue target vs Prefect: ≤ 0.33 (Prefect 3× slower).",
        "",
        f"Per run: mle = `mle run bench.yaml --no-live`, a new CLI process, on the agent started "
        f"once; {prefect_run_conf} {dask_run_conf} One untimed warm-up run each; the per-run "
        "processes get the user's environment (bytecode cached).",
        "",
        f"In-process and start-up: mle = `mle agent start` + first 1-step run; {prefect_conf} "
        f"{dask_conf}",
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
    if "prefect_run_chain_s" in f:
        imported = (
            f" ({f['prefect_import_s']:.2f} s in the in-process peer)"
            if "prefect_import_s" in f
            else ""
        )
        lines += [
            "",
            "² Prefect per run: each process's wall holds the interpreter's start, "
            f"`import prefect`{imported}, the flow run's creation on the server and its end, "
            "which the heartbeat join rounds up to a whole second (¹); that fixed cost is in "
            "wall / N here, as mle's own fixed cost per run is in its figures.",
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

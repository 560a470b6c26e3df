"""The peers of bench/dispatch.py: Dask and Prefect 3, in-process and as a new process per run,
and the services (Prefect server, Dask scheduler and workers) kept running for the per-run measures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path

from _measure import Results, best, spawn_true, timed, user_env

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

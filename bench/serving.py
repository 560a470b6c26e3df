#!/usr/bin/env python3
"""Serving overhead of an mle agent vs in-process onnxruntime (the floor) and MLServer (the peer).

The same ONNX model, the same client and the same concurrency, in one run:
- floor: C threads in this process calling `InferenceSession.run` on one row at a time;
- agent: the project's local agent (`mle agent start`), the model shipped with `mle deploy`,
  driven over Open Inference Protocol v2 gRPC by bench/peers/oip_load.py (tritonclient);
- peer: MLServer serving the same file through bench/peers/mlserver_onnx.py, driven by the very
  same load client.
The load client and MLServer pin protobuf < 7, so they run from the peers venv
(scripts/peers.sh; `--peers-python`, default $MLE_PEERS_DIR/bin/python, else .peers/bin/python).
Also reported: the agent's resident memory idle with no model, and with the model loaded.

Prints one JSON object of figures on stdout; with --out, appends a section to bench/RESULTS.md.
Usage: bench/serving.py [--model tests/fixtures/models/digits_int8.onnx] [--concurrency 4]
                        [--seconds 5] [--peers-python PATH] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
from _measure import Results  # bench/ is this script's directory
from _mle import local_agent, mle_command

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
FIXTURES = REPO / "tests" / "fixtures" / "models"
MODEL_NAME = "digits"


def default_peers_python() -> Path:
    base = os.environ.get("MLE_PEERS_DIR")
    return Path(base) / "bin" / "python" if base else REPO / ".peers" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_floor(r: Results, model: Path, data: Path, args: argparse.Namespace) -> None:
    """In-process onnxruntime: latency one call at a time, throughput at the concurrency."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = np.load(data)["X"].astype(np.float32)
    single = floor_load(session, rows, 1, args.seconds)
    loaded = floor_load(session, rows, args.concurrency, args.seconds)
    r.figures.update(
        floor_p50_ms=single["p50_ms"],
        floor_p99_ms=single["p99_ms"],
        floor_rps=loaded["rps"],
        floor_loaded_p50_ms=loaded["p50_ms"],
    )
    r.versions["onnxruntime"] = ort.__version__


def floor_load(session: object, rows: np.ndarray, concurrency: int, seconds: float) -> dict:
    """C threads calling session.run on one row at a time for `seconds`."""
    name = session.get_inputs()[0].name  # type: ignore[attr-defined]
    run = session.run  # type: ignore[attr-defined]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    run(None, {name: rows[:1]})
    stop_at = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        i = slot
        while (start := time.perf_counter()) < stop_at:
            run(None, {name: rows[i % len(rows)][None, :]})
            latencies[slot].append(time.perf_counter() - start)
            i += concurrency

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array([v for per in latencies for v in per]) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": ms.size / seconds,
    }


def measure_server(
    r: Results,
    prefix: str,
    peers: Path,
    url: str,
    data: Path,
    args: argparse.Namespace,
    token: str = "",
) -> None:
    """Latency with one client thread, throughput (and loaded latency) with C threads."""
    single = run_load(peers, url, data, args, 1, token)
    loaded = run_load(peers, url, data, args, args.concurrency, token)
    r.figures.update(
        {
            f"{prefix}_p50_ms": single["p50_ms"],
            f"{prefix}_p99_ms": single["p99_ms"],
            f"{prefix}_rps": loaded["rps"],
            f"{prefix}_loaded_p50_ms": loaded["p50_ms"],
        }
    )


def run_load(
    peers: Path, url: str, data: Path, args: argparse.Namespace, concurrency: int, token: str = ""
) -> dict:
    """bench/peers/oip_load.py against one OIP v2 gRPC server; its JSON figures."""
    argv = [
        str(peers), str(PEERS / "oip_load.py"), "--url", url, "--model", MODEL_NAME,
        "--data", str(data), "--concurrency", str(concurrency),
        "--seconds", str(args.seconds), "--warmup", str(args.warmup),
    ]  # fmt: skip
    if token:
        argv += ["--token", token]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds * 4 + 60)
    if proc.returncode != 0:
        raise SystemExit(f"load client failed against {url}:\n{proc.stderr[-2000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    if figures["errors"]:
        raise SystemExit(f"failed requests against {url}: {figures['errors']}")
    return figures


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def measure_agent(
    r: Results, model: Path, data: Path, peers: Path, args: argparse.Namespace
) -> None:
    """The local agent: idle RSS, deploy, RSS with the model, then the load client over gRPC."""
    with local_agent() as agent:
        project, env = agent.project, agent.env
        shutil.copy(model, project / model.name)
        agent_dir = project / ".mle" / "agent"
        state = json.loads((agent_dir / "state.json").read_text())
        token = (agent_dir / "token").read_text().strip()
        time.sleep(1.0)  # let start-up allocations settle before reading idle memory
        r.figures["agent_idle_rss_mb"] = rss_mb(int(state["pid"]))
        deploy = [*mle_command(), "deploy", model.name, "--target", "local", "--name", MODEL_NAME]
        proc = subprocess.run(deploy, cwd=project, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"mle deploy failed: {proc.stderr.strip()}")
        r.figures["agent_model_rss_mb"] = rss_mb(int(state["pid"]))
        measure_server(r, "agent", peers, str(state["address"]), data, args, token)
        r.figures["agent_loaded_rss_mb_after_load"] = rss_mb(int(state["pid"]))


def mlserver_settings(root: Path, model: Path, grpc_port: int, http_port: int) -> None:
    """An MLServer repository: server settings and one model folder for our custom runtime."""
    (root / "settings.json").write_text(
        json.dumps(
            {
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": free_port(),
                "debug": False,
                "load_models_at_startup": True,
            }
        )
    )
    folder = root / MODEL_NAME
    folder.mkdir()
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL_NAME,
                "implementation": "mlserver_onnx.OnnxModel",
                "parameters": {"uri": str(model)},
            }
        )
    )


def wait_http_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"MLServer exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"MLServer not ready at {url} after {timeout:.0f} s")


def measure_mlserver(
    r: Results, model: Path, data: Path, peers: Path, args: argparse.Namespace
) -> None:
    """MLServer (defaults, our ONNX runtime) driven by the same client."""
    mlserver = peers.parent / "mlserver"
    version = subprocess.run(
        [str(peers), "-c", "import mlserver; print(mlserver.__version__)"],
        capture_output=True,
        text=True,
    )
    if version.returncode != 0 or not mlserver.exists():
        r.skip("mlserver", f"not installed in {peers.parent.parent} (run scripts/peers.sh)")
        return
    r.versions["mlserver"] = version.stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grpc_port, http_port = free_port(), free_port()
        mlserver_settings(root, model.resolve(), grpc_port, http_port)
        env = {**os.environ, "PYTHONPATH": str(PEERS)}
        log = (root / "mlserver.log").open("wb")
        proc = subprocess.Popen(
            [str(mlserver), "start", str(root)], env=env, stdout=log, stderr=log, cwd=root
        )
        try:
            ready = f"http://127.0.0.1:{http_port}/v2/models/{MODEL_NAME}/ready"
            wait_http_ready(ready, proc, timeout=120)
            measure_server(r, "mlserver", peers, f"127.0.0.1:{grpc_port}", data, args)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def summarize(f: dict[str, float]) -> dict[str, float]:
    """Ratios in the same run: the issue's targets are agent p50 - floor p50 <= 1 ms and agent
    throughput >= 1.5x the peer's."""
    out: dict[str, float] = {}
    if "agent_p50_ms" in f:
        out["agent_overhead_p50_ms"] = f["agent_p50_ms"] - f["floor_p50_ms"]
    if "agent_rps" in f and "mlserver_rps" in f:
        out["agent_vs_mlserver_rps"] = f["agent_rps"] / f["mlserver_rps"]
        out["agent_vs_mlserver_p50"] = f["agent_p50_ms"] / f["mlserver_p50_ms"]
    return out


def markdown_section(args: argparse.Namespace, r: Results, s: dict[str, float]) -> str:
    f = r.figures
    when = time.strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    model = (
        Path(args.model).relative_to(REPO) if Path(args.model).is_relative_to(REPO) else args.model
    )

    def row(label: str, key: str, fmt: str = "{:.2f}") -> str:
        cells = [
            fmt.format(f[k]) if k in f else "n/a"
            for k in (f"floor_{key}", f"agent_{key}", f"mlserver_{key}")
        ]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        f"## serving — {when} ({machine})",
        "",
        f"Command: `python bench/serving.py --concurrency {args.concurrency} --seconds {args.seconds:g}"
        f" --out bench/RESULTS.md`; model `{model}`; one row per request; closed loop: latency "
        f"with one client thread, throughput with {args.concurrency}; the same tritonclient gRPC "
        "client (bench/peers/oip_load.py) for the agent and MLServer.",
        "",
        "| measure | in-process onnxruntime (floor) | mle agent (OIP v2 gRPC) | MLServer | target |",
        "|---|---|---|---|---|",
        row("p50 latency, 1 client thread (ms)", "p50_ms") + " agent − floor ≤ 1 ms |",
        row("p99 latency, 1 client thread (ms)", "p99_ms") + " |",
        row(f"requests/s, {args.concurrency} client threads", "rps", "{:.0f}")
        + " agent ≥ 1.5× MLServer |",
        row(f"p50 latency, {args.concurrency} client threads (ms)", "loaded_p50_ms") + " |",
        "",
        "Ratios in the same run: " + ", ".join(f"{k} = {v:.2f}" for k, v in s.items()) + ".",
        "",
        f"Agent resident memory: idle with no model {f.get('agent_idle_rss_mb', 0):.1f} MB "
        f"(target ≤ 60 MB); with the model deployed {f.get('agent_model_rss_mb', 0):.1f} MB; after the "
        f"load run {f.get('agent_loaded_rss_mb_after_load', 0):.1f} MB.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())) + ".",
    ]
    if r.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in r.skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURES / "digits_int8.onnx")
    parser.add_argument("--data", type=Path, default=FIXTURES / "digits_test.npz")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--peers-python", type=Path, default=default_peers_python())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.peers_python.exists():
        raise SystemExit(f"no peers venv at {args.peers_python}: run scripts/peers.sh first")
    data = np.load(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        # The load client reads rows from an npz with X only, float32.
        rows = Path(tmp) / "rows.npz"
        np.savez(rows, X=data["X"].astype(np.float32) if "X" in data else data["X_test"])
        r = Results()
        measure_floor(r, args.model, rows, args)
        measure_agent(r, args.model, rows, args.peers_python, args)
        measure_mlserver(r, args.model, rows, args.peers_python, args)
    s = summarize(r.figures)
    print(json.dumps({**r.figures, **s, "versions": r.versions, "skipped": r.skipped}))
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + markdown_section(args, r, s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

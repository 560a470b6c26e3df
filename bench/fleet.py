#!/usr/bin/env python3
"""Fleet: discovery time (agent start → listed by a browse) and artifact transfer between agents.

Discovery: a real `mle-agentd --announce` on 127.0.0.1 is started `--repeat` times; from its
process start, bounded browses (`mle_cli.targets.discovery.discover_agents`, `--browse-window` s
each) run back to back until one lists it: p50 and max of that time (issue target: ~2 s), and of
the time until it listens. With it up, `mle agents --cached` (answers from the ledger) vs a
browsing `mle agents` (waits its default browse window): walls and their ratio.

Transfer: two real `mle-agentd` on 127.0.0.1 with bearer tokens (as the local agent runs). A step on
agent A writes a random `--size-mb` MB file; it moves A -> B the way the scheduler moves outputs
to the next step's agent: `AgentConnection.fetch` into the operator's ArtifactStore, then
`AgentConnection.ship` to B (issue target: >= 300 MB/s end to end for 256 MB). Side by side, the
same file (read from A's store) to a real OpenSSH sshd on 127.0.0.1 (tests/ssh_server.py):
paramiko SFTP `put` with its defaults, paramiko SFTP tuned (large requests, large window,
AES-GCM), and OpenSSH `scp`. A second ship of the same digest to B (new connection) must send
nothing: its time is reported (tests/integration/test_artifact_transfer.py asserts the bytes).

Prints one JSON object of figures on stdout; with --out, appends a section to bench/RESULTS.md.
Usage: bench/fleet.py [--repeat 5] [--browse-window 0.2] [--size-mb 256]
                      [--section all|discovery|transfer] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.ssh_server: the same sshd the SSH tests use

from _fleet_report import markdown_section, summarize  # noqa: E402 - bench/ is this script's dir
from _measure import MB, Results, console  # noqa: E402
from _ssh_peers import measure_peers  # noqa: E402

from mle_cli.targets._endpoint import Endpoint  # noqa: E402
from mle_cli.targets.connection import AgentConnection, connect  # noqa: E402
from mle_proto.store import ArtifactStore  # noqa: E402

LOOPBACK = "127.0.0.1"
RPC_TIMEOUT = 120.0


# --- agents --------------------------------------------------------------------------------------


@dataclass
class Agentd:
    """A running `mle-agentd` and how to reach it."""

    process: subprocess.Popen[bytes]
    started: float  # perf_counter at spawn
    started_wall: float  # time.time() at spawn
    state_file: Path
    artifacts: Path
    endpoint: Endpoint

    def state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("pid") == self.process.pid else None


@contextmanager
def agentd(root: Path, name: str, *extra: str) -> Iterator[Agentd]:
    """`mle-agentd` on 127.0.0.1, a token file like the local agent's; stopped on exit."""
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    token_file = root / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    (root / "agent.toml").touch()
    argv = [
        *console("mle-agentd", "mle_agent"),
        "--name", name,
        "--listen", f"{LOOPBACK}:0",
        "--http-listen", "off",
        "--data-dir", str(root / "data"),
        "--artifacts-dir", str(root / "artifacts"),
        "--token-file", str(token_file),
        "--state-file", str(root / "state.json"),
        "--config", str(root / "agent.toml"),
        *extra,
    ]  # fmt: skip
    with (root / "agent.log").open("wb") as log:
        started_wall, started = time.time(), time.perf_counter()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    endpoint = Endpoint(name=name, address="", token=token)
    agent = Agentd(
        process, started, started_wall, root / "state.json", root / "artifacts", endpoint
    )
    try:
        yield agent
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def wait_listening(agent: Agentd, timeout: float = 60.0) -> Endpoint:
    """Poll the state file until the agent listens; its endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise SystemExit(f"mle-agentd exited with {agent.process.returncode}")
        state = agent.state()
        if state is not None:
            return Endpoint(agent.endpoint.name, str(state["address"]), agent.endpoint.token)
        time.sleep(0.02)
    raise SystemExit(f"mle-agentd not listening after {timeout:g} s")


# --- discovery -----------------------------------------------------------------------------------


def time_to_listed(root: Path, window: float, timeout: float = 60.0) -> tuple[float, float, int]:
    """Start an announcing agent; browse back to back until listed. (listed s, listening s,
    browses)."""
    from mle_cli.targets.discovery import discover_agents

    name = f"bench-{uuid.uuid4().hex[:8]}"
    with agentd(root, name, "--announce", "--announce-interfaces", LOOPBACK) as agent:
        browses = 0
        while (elapsed := time.perf_counter() - agent.started) < timeout:
            if agent.process.poll() is not None:
                raise SystemExit(f"mle-agentd exited with {agent.process.returncode}")
            browses += 1
            if any(a.name == name for a in discover_agents(window, LOOPBACK).agents):
                listed = time.perf_counter() - agent.started
                listening = agent.state_file.stat().st_mtime - agent.started_wall
                return listed, listening, browses
        raise SystemExit(f"{name} not listed by a browse within {elapsed:.0f} s")


def measure_discovery(r: Results, args: argparse.Namespace, tmp: Path) -> None:
    listed, listening, browses = [], [], []
    for i in range(args.repeat):
        one = time_to_listed(tmp / f"discovery-{i}", args.browse_window)
        listed.append(one[0])
        listening.append(one[1])
        browses.append(one[2])
    r.figures.update(
        discovery_listed_p50_s=statistics.median(listed),
        discovery_listed_max_s=max(listed),
        discovery_listening_p50_s=statistics.median(listening),
        discovery_listening_max_s=max(listening),
        discovery_browses_p50=statistics.median(browses),
        discovery_repeat=args.repeat,
        discovery_browse_window_s=args.browse_window,
    )
    measure_listing(r, args, tmp)


def measure_listing(r: Results, args: argparse.Namespace, tmp: Path) -> None:
    """`mle agents --cached` vs a browsing `mle agents`, with one announcing agent up."""
    project = tmp / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLE_")}
    env.update(MLE_PROJECT_DIR=str(project), MLE_MDNS_INTERFACES=LOOPBACK)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    with agentd(tmp / "listed", name, "--announce", "--announce-interfaces", LOOPBACK) as agent:
        wait_listening(agent)
        listing(project, env, name, browse=True, timeout=30)  # fills the ledger's cache
        browse = [listing(project, env, name, browse=True) for _ in range(args.repeat)]
        cached = [listing(project, env, name, browse=False) for _ in range(args.repeat)]
    r.figures.update(
        agents_browse_p50_s=statistics.median(browse),
        agents_cached_p50_s=statistics.median(cached),
    )


def listing(
    project: Path, env: dict[str, str], name: str, *, browse: bool, timeout: float = 0.0
) -> float:
    """Wall seconds of `mle agents --json` (`--cached` unless browse) that lists the agent;
    with a timeout, repeated until it does."""
    argv = [*console("mle", "mle_cli"), "agents", "--json", *([] if browse else ["--cached"])]
    deadline = time.monotonic() + timeout
    while True:
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"mle agents failed: {done.stderr.strip()[-500:]}")
        if any(row["name"] == name for row in json.loads(done.stdout)):
            return wall
        if time.monotonic() >= deadline:
            raise SystemExit(f"`{' '.join(argv[-2:])}` did not list {name}: {done.stdout[:500]}")


# --- transfer: mle -------------------------------------------------------------------------------


async def produce(a: AgentConnection, size: int) -> tuple[str, int]:
    """A step on agent A writes `size` random bytes as its output; (digest, size)."""
    from mle_cli.executor import TaskRequest

    task_id = f"bench-{uuid.uuid4().hex[:8]}"
    request = TaskRequest(
        task_id=task_id, run_id="bench", step="produce", attempt=1, argv=None, env={},
        shell=f"head -c {size} /dev/urandom > blob.bin", inputs={}, outputs=("blob.bin",),
        timeout=300,
    )  # fmt: skip
    await a.start(request)
    async for update in a.watch(task_id, 0):
        if update.kind == "result":
            if update.state != "succeeded" or not update.outputs:
                raise SystemExit(f"the producing step {update.state}: {update.text}")
            return update.outputs[0].digest, update.outputs[0].size
    raise SystemExit("the producing step's events ended without a result")


async def move_once(a: AgentConnection, b: Endpoint, digest: str, store: ArtifactStore) -> dict:
    """One move A -> operator store -> B, as the scheduler does; then a second ship (dedup)."""
    conn_b = await connect(b, RPC_TIMEOUT)
    again = await connect(b, RPC_TIMEOUT)  # a fresh connection: it must ask B, not remember
    try:
        start = time.perf_counter()
        await a.fetch([digest], store)
        fetched = time.perf_counter()
        await conn_b.ship([digest], store)
        shipped = time.perf_counter()
        await again.ship([digest], store)
        reshipped = time.perf_counter()
    finally:
        await conn_b.close()
        await again.close()
    return {
        "fetch_s": fetched - start,
        "ship_s": shipped - fetched,
        "move_s": shipped - start,
        "reship_s": reshipped - shipped,
    }


async def produce_on(a: Endpoint, size: int) -> tuple[str, int]:
    conn_a = await connect(a, RPC_TIMEOUT)
    try:
        return await produce(conn_a, size)
    finally:
        await conn_a.close()


async def mle_moves(a: Endpoint, b: Agentd, digest: str, repeat: int, tmp: Path) -> dict:
    """`repeat` moves A -> B, each into an empty operator store and to a B without it; the best."""
    conn_a = await connect(a, RPC_TIMEOUT)
    try:
        runs, b_store = [], ArtifactStore(b.artifacts)
        store = ArtifactStore(tmp / "operator-store")
        for i in range(repeat):
            if i:
                store.path_of(digest).unlink()
                b_store.path_of(digest).unlink()
            runs.append(await move_once(conn_a, b.endpoint, digest, store))
    finally:
        await conn_a.close()
    return min(runs, key=lambda run: run["move_s"])


def measure_transfer(r: Results, args: argparse.Namespace, tmp: Path) -> None:
    """Produce on A; the peers upload A's stored file, then mle moves it A -> B.

    The peers go first: mle's transfers tune this process's malloc (mle_proto.store
    .tune_allocator), which would speed up paramiko here too, unlike in a process of its own.
    """
    with agentd(tmp / "agent-a", "agent-a") as a, agentd(tmp / "agent-b", "agent-b") as b:
        a_endpoint = wait_listening(a)
        b.endpoint = wait_listening(b)
        digest, size = asyncio.run(produce_on(a_endpoint, args.size_mb * MB))
        measure_peers(r, args, ArtifactStore(a.artifacts).path_of(digest), tmp)
        out = asyncio.run(mle_moves(a_endpoint, b, digest, args.repeat, tmp))
    r.figures.update(
        mle_fetch_mbps=size / MB / out["fetch_s"],
        mle_ship_mbps=size / MB / out["ship_s"],
        mle_move_mbps=size / MB / out["move_s"],
        mle_move_s=out["move_s"],
        mle_reship_ms=1000 * out["reship_s"],
        transfer_bytes=size,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--browse-window", type=float, default=0.2, help="seconds per browse")
    parser.add_argument("--size-mb", type=int, default=256, help="artifact size (10^6 bytes)")
    parser.add_argument("--section", choices=("all", "discovery", "transfer"), default="all")
    parser.add_argument("--out", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()
    if args.repeat < 1 or args.size_mb < 1:
        parser.error("--repeat and --size-mb must be at least 1")
    r = Results()
    with tempfile.TemporaryDirectory(prefix="mle-bench-fleet-") as tmp:
        if args.section in ("all", "discovery"):
            measure_discovery(r, args, Path(tmp))
        if args.section in ("all", "transfer"):
            measure_transfer(r, args, Path(tmp))
    s = summarize(r.figures)
    print(json.dumps({**r.figures, **s, "versions": r.versions, "skipped": r.skipped}, indent=2))
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + markdown_section(args, r, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

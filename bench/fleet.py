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
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.ssh_server: the same sshd the SSH tests use

from _measure import Results  # noqa: E402 - bench/ is this script's directory

from mle_cli.targets._endpoint import Endpoint  # noqa: E402
from mle_cli.targets.connection import AgentConnection, connect  # noqa: E402
from mle_proto.store import ArtifactStore  # noqa: E402
from tests.ssh_server import SshServer, find_sshd, ssh_server  # noqa: E402

MB = 1_000_000  # throughput in MB/s (10^6 bytes), as scp and the target count them
LOOPBACK = "127.0.0.1"
RPC_TIMEOUT = 120.0


def console(name: str, module: str) -> list[str]:
    """The installed console script next to this Python, else `python -m module`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


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


# --- transfer: peers -----------------------------------------------------------------------------


def measure_peers(r: Results, args: argparse.Namespace, source: Path, tmp: Path) -> None:
    """paramiko SFTP (defaults, tuned) and OpenSSH scp of the same file to one sshd."""
    if find_sshd() is None:
        reason = "OpenSSH sshd is not installed (Debian: apt-get install openssh-server)"
        for peer in ("sftp", "scp"):
            r.skip(peer, reason)
        return
    try:
        import paramiko
    except ImportError as e:
        r.skip("sftp", f"{e} (pip install paramiko)")
        paramiko = None
    with ssh_server(tmp / "sshd") as sshd:
        remote = tmp / "sshd-received.bin"
        size = source.stat().st_size
        if paramiko is not None:
            r.versions["paramiko"] = paramiko.__version__
            for kind, put in (("sftp_default", sftp_default), ("sftp_tuned", sftp_tuned)):
                seconds = best_of(args.repeat, lambda put=put: put(sshd, source, remote), remote)
                r.figures[f"{kind}_mbps"] = size / MB / seconds
        if shutil.which("scp") is None:
            r.skip("scp", "the OpenSSH client is not installed (Debian: openssh-client)")
            return
        r.versions["openssh"] = openssh_version()
        tiny = tmp / "one-byte"
        tiny.write_bytes(b"x")
        setup = best_of(args.repeat, lambda: scp(sshd, tiny, remote), remote)
        wall = best_of(args.repeat, lambda: scp(sshd, source, remote), remote)
        r.figures.update(scp_setup_s=setup, scp_wall_s=wall)
        r.figures["scp_mbps"] = size / MB / max(wall - setup, 1e-9)
        r.figures["scp_wall_mbps"] = size / MB / wall


def best_of(repeat: int, put: Callable[[], float], remote: Path) -> float:
    """The fastest of `repeat` uploads (the received file is deleted after each)."""
    times = []
    for _ in range(repeat):
        times.append(put())
        remote.unlink(missing_ok=True)
    return min(times)


def ssh_client(sshd: SshServer) -> Any:
    """A paramiko client verifying the host key against the server's known_hosts."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(str(sshd.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        sshd.host, port=sshd.port, username=sshd.user, key_filename=str(sshd.client_key),
        allow_agent=False, look_for_keys=False, timeout=30,
    )  # fmt: skip
    return client


def sftp_default(sshd: SshServer, source: Path, remote: Path) -> float:
    """`SFTPClient.put` as paramiko ships it (pipelined 32 KiB writes, 2 MiB window)."""
    client = ssh_client(sshd)
    try:
        sftp = client.open_sftp()
        seconds = timed(lambda: sftp.put(str(source), str(remote)))
        sftp.close()
    finally:
        client.close()
    return seconds


# sftp-server accepts messages up to 256 KiB: 255 KiB of data per write request leaves room for
# the header. AES-GCM needs no separate MAC pass; paramiko prefers AES-CTR + HMAC by default.
SFTP_REQUEST = 255 * 1024
SFTP_WINDOW = 64 * 1024 * 1024
SFTP_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")


def sftp_tuned(sshd: SshServer, source: Path, remote: Path) -> float:
    """Pipelined SFTP writes of 255 KiB from 4 MiB reads, a 64 MiB window, AES-GCM."""
    import paramiko

    sock = socket_to(sshd)
    transport = paramiko.Transport(sock, default_window_size=SFTP_WINDOW)
    try:
        transport.get_security_options().ciphers = SFTP_CIPHERS
        host_keys = paramiko.HostKeys(str(sshd.known_hosts))
        transport.connect(username=sshd.user, pkey=paramiko.Ed25519Key(filename=sshd.client_key))
        expected = host_keys.lookup(f"[{sshd.host}]:{sshd.port}")
        key = transport.get_remote_server_key()
        if expected is None or expected.get(key.get_name()) != key:
            raise SystemExit("sshd presented a host key not in its known_hosts")
        sftp = paramiko.SFTPClient.from_transport(transport, window_size=SFTP_WINDOW)
        assert sftp is not None
        return timed(lambda: tuned_put(sftp, source, remote))
    finally:
        transport.close()


def tuned_put(sftp: Any, source: Path, remote: Path) -> None:
    with source.open("rb") as src, sftp.open(str(remote), "wb") as dst:
        dst.set_pipelined(True)
        dst.MAX_REQUEST_SIZE = SFTP_REQUEST
        while chunk := src.read(4 * 1024 * 1024):
            dst.write(chunk)
    if sftp.stat(str(remote)).st_size != source.stat().st_size:
        raise SystemExit("tuned SFTP put: size mismatch")


def socket_to(sshd: SshServer) -> Any:
    import socket

    return socket.create_connection((sshd.host, sshd.port), timeout=30)


def scp(sshd: SshServer, source: Path, remote: Path) -> float:
    """Wall seconds of one `scp` (process start, handshake, transfer)."""
    argv = sshd.scp_argv(source, str(remote))
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"scp failed: {done.stderr.strip()}")
    return wall


def openssh_version() -> str:
    done = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (done.stderr or done.stdout).split(",")[0].strip()


# --- report --------------------------------------------------------------------------------------


def summarize(f: dict[str, float]) -> dict[str, float]:
    """Ratios in the same run: mle's throughput over each peer's (above 1: mle is faster)."""
    out: dict[str, float] = {}
    if "agents_cached_p50_s" in f:
        out["agents_browse_vs_cached"] = f["agents_browse_p50_s"] / f["agents_cached_p50_s"]
    for peer in ("scp", "sftp_default", "sftp_tuned"):
        if f"{peer}_mbps" in f:
            out[f"move_vs_{peer}"] = f["mle_move_mbps"] / f[f"{peer}_mbps"]
            out[f"ship_vs_{peer}"] = f["mle_ship_mbps"] / f[f"{peer}_mbps"]
    return out


def markdown_section(args: argparse.Namespace, r: Results, s: dict[str, float]) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = (
        f"python bench/fleet.py --repeat {args.repeat} --browse-window {args.browse_window:g} "
        f"--size-mb {args.size_mb} --section {args.section} --out bench/RESULTS.md"
    )
    lines = [
        f"## fleet — {time.strftime('%Y-%m-%d %H:%M')} ({machine})",
        "",
        f"Command: `{command}`.",
    ]
    if "discovery_listed_p50_s" in r.figures:
        lines += discovery_rows(r.figures, s)
    if "mle_move_mbps" in r.figures:
        lines += transfer_rows(args, r.figures, s)
    if r.versions:
        lines += [
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())) + ".",
        ]
    if r.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in r.skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def discovery_rows(f: dict[str, float], s: dict[str, float]) -> list[str]:
    n, window = int(f["discovery_repeat"]), f["discovery_browse_window_s"]
    return [
        "",
        f"Discovery ({n} agent starts; browses of {window:g} s back to back from the spawn, so "
        f"a figure is at most {window:g} s late):",
        "",
        "| measure | p50 | max | target |",
        "|---|---|---|---|",
        f"| `mle-agentd --announce` spawned → listed by a browse (s) | {f['discovery_listed_p50_s']:.2f} "
        f"| {f['discovery_listed_max_s']:.2f} | ~2 |",
        f"| spawned → listening (state file written) (s) | {f['discovery_listening_p50_s']:.2f} "
        f"| {f['discovery_listening_max_s']:.2f} | |",
        "",
        f"`mle agents --json`, agent up (p50 of {n}): browsing {f['agents_browse_p50_s']:.2f} s, "
        f"`--cached` {f['agents_cached_p50_s']:.2f} s; browsing / cached = "
        f"{s['agents_browse_vs_cached']:.2f}×.",
    ]


def transfer_rows(args: argparse.Namespace, f: dict[str, float], s: dict[str, float]) -> list[str]:
    def mbps(key: str) -> str:
        return f"{f[key]:.0f}" if key in f else "n/a"

    def ratio(key: str) -> str:
        return f"{s[key]:.2f}×" if key in s else "n/a"

    size = f["transfer_bytes"] / MB
    return [
        "",
        f"Transfer of one {size:.0f} MB random artifact (best of {args.repeat}), MB/s = 10^6 bytes/s:",
        "",
        "| path | MB/s | mle move / it | mle ship / it | target |",
        "|---|---|---|---|---|",
        f"| mle A → B end to end (fetch to the operator's store, then ship) | {mbps('mle_move_mbps')} | | | ≥ 300 |",
        f"| mle fetch A → operator store | {mbps('mle_fetch_mbps')} | | | |",
        f"| mle ship operator store → B | {mbps('mle_ship_mbps')} | | | |",
        f"| OpenSSH scp → sshd (net of its {1000 * f.get('scp_setup_s', 0):.0f} ms setup) | {mbps('scp_mbps')} | {ratio('move_vs_scp')} | {ratio('ship_vs_scp')} | |",
        f"| paramiko SFTP put, defaults | {mbps('sftp_default_mbps')} | {ratio('move_vs_sftp_default')} | {ratio('ship_vs_sftp_default')} | |",
        f"| paramiko SFTP, tuned (255 KiB pipelined writes, 64 MiB window, AES-GCM) | {mbps('sftp_tuned_mbps')} | {ratio('move_vs_sftp_tuned')} | {ratio('ship_vs_sftp_tuned')} | |",
        "",
        f"Dedup: a second ship of the same digest to B, on a new connection, took "
        f"{f['mle_reship_ms']:.1f} ms (one Stat call; nothing sent). scp wall including its "
        f"setup: {f.get('scp_wall_mbps', 0):.0f} MB/s.",
    ]


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

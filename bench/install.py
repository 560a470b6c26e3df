#!/usr/bin/env python3
"""Install: `mle agent install` over SSH against a real OpenSSH sshd on 127.0.0.1 (the one the SSH
tests use, tests/ssh_server.py), logging in as the current user, installing from the wheelhouse
(scripts/wheelhouse.sh) with no index into a temporary directory.

Measured, each as a user runs it (`mle` as a subprocess): a fresh install (the operator's wheel
already built and cached, as on every run but the first), then `--repeat` no-op re-runs
("already installed": connect, facts, state, one GetInfo over mTLS), and the SFTP throughput the
install reported for its upload. Side by side, OpenSSH `scp` of the very same wheel files to the
same sshd, one command, timed with and without its fixed cost (a 1-byte copy).

Prints one JSON object of figures on stdout; with --out, appends a section to bench/RESULTS.md.
Usage: bench/install.py [--repeat 5] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.ssh_server: the same sshd the SSH tests use

from _measure import MB, console  # noqa: E402 - bench/ is this script's directory

from mle_cli.settings import load_settings  # noqa: E402
from mle_cli.targets._wheels import dependency_wheels, operator_wheel  # noqa: E402
from mle_proto import __version__  # noqa: E402
from tests.ssh_server import SshServer, find_sshd, ssh_server  # noqa: E402

WHEELHOUSE = REPO / ".wheelhouse"
NAME = "bench-01"
UPLOAD = re.compile(r"upload: (\d+) wheels?, ([\d.]+) MB at ([\d.]+) MB/s")


MLE = console("mle", "mle_cli")


def free_port() -> int:
    """A free port whose successor is free too (the agent serves REST on port + 1)."""
    while True:
        with socket.socket() as grpc_port, socket.socket() as rest_port:
            grpc_port.bind(("", 0))
            port = int(grpc_port.getsockname()[1])
            with contextlib.suppress(OSError):
                rest_port.bind(("", port + 1))
                return port


def project(root: Path, server: SshServer, install_dir: Path) -> dict[str, str]:
    """A project whose inventory holds the sshd as one target; the environment to run mle in."""
    (root / "targets").mkdir(parents=True)
    (root / "targets" / f"{NAME}.yaml").write_text(
        f"name: {NAME}\nhost: {server.host}\n"
        f"ssh: {{user: {server.user}, port: {server.port}, key: {server.client_key}}}\n"
        f"agent: {{port: {free_port()}, dir: {install_dir}}}\n"
    )
    (root / ".mle").mkdir()
    (root / ".mle" / "known_hosts").write_text(server.host_key_line + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLE_")}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / d) for d in ("cli", "agent", "protos"))
    return env


def mle(root: Path, env: dict[str, str], *args: str) -> tuple[float, str]:
    """Run `mle ARGS` in the project; its wall time and stderr (fails on a non-zero exit)."""
    start = time.perf_counter()
    done = subprocess.run(
        [*MLE, *args], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"mle {' '.join(args)} failed:\n{done.stderr}")
    return wall, done.stderr


def scp(server: SshServer, files: list[Path], remote: str) -> float:
    """Wall time of one `scp` of the files to the sshd."""
    argv = server.scp_argv(files[0], remote)
    argv[-2:-1] = [str(f) for f in files]  # scp SRC... DEST
    start = time.perf_counter()
    subprocess.run(argv, check=True, timeout=600)
    return time.perf_counter() - start


@contextlib.contextmanager
def sshd() -> Iterator[SshServer]:
    with (
        tempfile.TemporaryDirectory(prefix="mle-bench-sshd-") as tmp,
        ssh_server(Path(tmp)) as server,
    ):
        yield server


def measure(repeat: int) -> dict[str, Any]:
    with sshd() as server, tempfile.TemporaryDirectory(prefix="mle-bench-install-") as tmp:
        root, install_dir = Path(tmp) / "project", Path(tmp) / "device" / "mle-agent"
        env = project(root, server, install_dir)
        wheel = operator_wheel(load_settings(project_dir=root, env={}), __version__)  # cached
        files = [wheel, *dependency_wheels(WHEELHOUSE)]
        try:
            install = ["agent", "install", "--target", NAME, "--wheelhouse", str(WHEELHOUSE)]
            fresh, stderr = mle(root, env, *install)
            found = UPLOAD.search(stderr)
            if found is None:
                raise SystemExit(f"no upload line in:\n{stderr}")
            noop = [mle(root, env, *install)[0] for _ in range(repeat)]
        finally:
            subprocess.run([*MLE, "agent", "uninstall", "--target", NAME], cwd=root, env=env,
                           capture_output=True, timeout=300)  # fmt: skip
        remote = Path(tmp) / "scp"
        remote.mkdir()
        one_byte = remote / "one"
        one_byte.write_bytes(b"x")
        setup = min(scp(server, [one_byte], str(remote / "setup")) for _ in range(3))
        walls = [scp(server, files, str(remote)) for _ in range(3)]
        size = sum(f.stat().st_size for f in files)
        sftp = float(found.group(3))
        scp_net = size / MB / max(min(walls) - setup, 1e-6)
        return {
            "fresh_install_s": round(fresh, 2),
            "noop_p50_s": round(statistics.median(noop), 2),
            "noop_max_s": round(max(noop), 2),
            "files": len(files),
            "mb": round(size / MB, 1),
            "install_sftp_mb_s": sftp,
            "scp_mb_s": round(size / MB / min(walls), 1),
            "scp_net_mb_s": round(scp_net, 1),
            "scp_setup_s": round(setup, 3),
            "sftp_vs_scp_net": round(sftp / scp_net, 2),
            "repeat": repeat,
        }


def versions() -> dict[str, str]:
    import paramiko

    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {"openssh": ssh.split(",")[0], "paramiko": paramiko.__version__}


def section(figures: dict[str, Any], command: str) -> str:
    when = time.strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    v = versions()
    return f"""
## agent install over SSH — {when} ({machine})

`{command}`: `mle agent install` against tests/ssh_server.py's sshd on 127.0.0.1 (as the
current user), from the wheelhouse with no index, into a temporary directory; `mle` runs as a
subprocess.

| measure | value |
|---|---|
| fresh install, operator wheel cached (s) | {figures["fresh_install_s"]} |
| no-op re-run, "already installed" (s, p50 / max of {figures["repeat"]}) | {figures["noop_p50_s"]} / {figures["noop_max_s"]} |
| upload: {figures["files"]} wheels, {figures["mb"]} MB, SFTP as install reported (MB/s) | {figures["install_sftp_mb_s"]} |
| OpenSSH scp of the same files, one command (MB/s) | {figures["scp_mb_s"]} |
| scp net of its {figures["scp_setup_s"]} s setup (MB/s) | {figures["scp_net_mb_s"]} |
| install SFTP / scp net | {figures["sftp_vs_scp_net"]}× |

Versions: openssh {v["openssh"]}, paramiko {v["paramiko"]}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="no-op re-runs")
    parser.add_argument("--out", type=Path, help="append a section to this RESULTS.md")
    args = parser.parse_args()
    if find_sshd() is None:
        raise SystemExit("OpenSSH sshd is not installed (Debian: apt-get install openssh-server)")
    if shutil.which("scp") is None:
        raise SystemExit("scp is not installed (Debian: apt-get install openssh-client)")
    if not any(WHEELHOUSE.glob("*.whl")):
        raise SystemExit(f"no wheelhouse in {WHEELHOUSE}: run scripts/wheelhouse.sh")
    figures = measure(args.repeat)
    print(json.dumps(figures, indent=2))
    if args.out:
        command = f"bench/install.py --repeat {args.repeat}"
        with args.out.open("a") as f:
            f.write(section(figures, command))


if __name__ == "__main__":
    main()

"""`mle agent install | upgrade | uninstall | logs` against a real OpenSSH server on 127.0.0.1,
logging in as the current user: agents installed from the wheelhouse (scripts/wheelhouse.sh) with
no index, into an install directory under tmp, run as supervised processes, asked over mutual TLS.

Newer versions are the operator's own wheel rebuilt with another version (and, for the broken
one, an mle-agentd that exits at start), as a release would be.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import REPO, Project
from tests.ssh_server import SshServer, generate_key, require_sshd, ssh_server_fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

WHEELHOUSE = REPO / ".wheelhouse"
sshd = ssh_server_fixture(scope="module")
BROKEN = b"""

async def run_agent(settings):  # a broken build (test): mle-agentd exits at start
    import sys

    sys.stderr.write("broken on purpose\\n")
    raise SystemExit(3)
"""


@pytest.fixture(autouse=True)
def _wheelhouse() -> None:
    if not any(WHEELHOUSE.glob("*.whl")):
        pytest.skip(f"no wheelhouse in {WHEELHOUSE}: run scripts/wheelhouse.sh")


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[Path]:
    """Where install directories go; every process running from there is killed afterwards."""
    root = tmp_path / "devices"
    root.mkdir()
    yield root
    doomed = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(root) in part for part in process.info["cmdline"] or ()):
            doomed.append(process)
    for process in doomed:
        with _quiet():
            process.kill()
    psutil.wait_procs(doomed, timeout=10)


def _quiet() -> Any:
    import contextlib

    return contextlib.suppress(psutil.Error)


def _agent_port() -> int:
    """A free port whose successor is free too (the agent serves REST on port + 1)."""
    for _ in range(50):
        with socket.socket() as grpc_port, socket.socket() as rest_port:
            grpc_port.bind(("", 0))  # where the agent listens: every address
            port = int(grpc_port.getsockname()[1])
            try:
                rest_port.bind(("", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free pair of ports")


def _target(
    project: Project,
    server: SshServer,
    name: str,
    install_dir: Path,
    *,
    port: int | None = None,
    ssh_port: int | None = None,
    key: Path | None = None,
) -> int:
    """Write targets/<name>.yaml for the sshd; return the agent's port."""
    agent_port = port or _agent_port()
    (project.root / "targets").mkdir(exist_ok=True)
    (project.root / "targets" / f"{name}.yaml").write_text(
        f"name: {name}\n"
        f"host: {server.host}\n"
        "labels: {role: edge}\n"
        f"ssh: {{user: {server.user}, port: {ssh_port or server.port}, "
        f"key: {key or server.client_key}}}\n"
        f"agent: {{port: {agent_port}, dir: {install_dir}}}\n"
    )
    return agent_port


def _trust(project: Project, server: SshServer) -> None:
    """Record the sshd's host key in the project, as --trust-new-host-key would."""
    known = project.root / ".mle" / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(server.host_key_line + "\n")


def _install(project: Project, *args: str) -> Any:
    return project.mle("agent", "install", "--wheelhouse", str(WHEELHOUSE), *args, timeout=600)


def _agent_pid(install_dir: Path) -> int:
    return int(json.loads((install_dir / "agent.state.json").read_text())["pid"])


def _state(install_dir: Path) -> dict[str, Any]:
    return dict(json.loads((install_dir / "agent.state.json").read_text()))


def _running(install_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or ()
        alive = process.info["status"] != psutil.STATUS_ZOMBIE
        if alive and any(str(install_dir) in part for part in cmdline):
            found.append(process)
    return found


def _listed(project: Project, name: str) -> dict[str, Any]:
    done = project.mle("agents", "--json", check=True)
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    return dict(rows[name])


def _operator_wheel(project: Project) -> Path:
    # The newest: a source tree edited between two installs is built again.
    built = (project.root / ".mle" / "wheels").glob("build-*/mle_toolchain-*.whl")
    return max(built, key=lambda wheel: wheel.stat().st_mtime)


def bumped_wheel(source: Path, version: str, out: Path, *, broken: bool = False) -> Path:
    """The wheel rebuilt as `version` (dist-info renamed, METADATA, `__version__` and RECORD
    rewritten); with `broken`, its mle-agentd exits at start."""
    old = source.name.split("-")[1]
    old_info, new_info = f"mle_toolchain-{old}.dist-info/", f"mle_toolchain-{version}.dist-info/"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(source) as wheel:
        for info in wheel.infolist():
            name = info.filename.replace(old_info, new_info, 1)
            data = wheel.read(info)
            if name == f"{new_info}METADATA":
                data = re.sub(rb"(?m)^Version: .*$", b"Version: " + version.encode(), data, count=1)
            if name == "mle_proto/__init__.py":  # where the version is written (pyproject.toml)
                new = b'__version__ = "' + version.encode() + b'"'
                data = re.sub(rb'(?m)^__version__ = ".*"$', new, data, count=1)
            if broken and name == "mle_agent/daemon.py":
                data += BROKEN
            files[name] = data
    record = f"{new_info}RECORD"
    files.pop(record, None)
    lines = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[record] = "\n".join([*lines, f"{record},,", ""]).encode()
    target = out / source.name.replace(f"-{old}-", f"-{version}-")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return target


def _fingerprint(server: SshServer) -> str:
    """`SHA256:...` of the sshd's host key, as OpenSSH shows it."""
    blob = base64.b64decode(server.host_public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_install_rerun_upgrade_rollback_and_uninstall(
    project: Project, sshd: SshServer, devices: Path, tmp_path: Path
) -> None:
    install_dir = devices / "pi-01"
    port = _target(project, sshd, "pi-01", install_dir)

    # An unknown host key is refused, showing its fingerprint; nothing is installed.
    refused = _install(project, "--target", "pi-01")
    assert refused.returncode == 6, refused.stderr
    assert f"unknown host key ssh-ed25519 {_fingerprint(sshd)}" in refused.stderr
    assert "--trust-new-host-key" in refused.stderr
    assert not install_dir.exists()
    assert not (project.root / ".mle" / "known_hosts").exists()

    # Trust on first use: installed, the key recorded, every phase shown.
    fresh = _install(project, "--target", "pi-01", "--trust-new-host-key")
    assert fresh.returncode == 0, fresh.stderr
    recorded = (project.root / ".mle" / "known_hosts").read_text()
    assert sshd.host_public_key in recorded
    for phase in ("connect", "facts", "upload", "venv", "identity", "config", "service", "start"):
        assert f"pi-01: {phase}: " in fresh.stderr, (phase, fresh.stderr)
    assert re.search(
        r"pi-01: facts: \S+, .+, Python 3\.\d+\.\d+, none, [\d.]+ GB free", fresh.stderr
    )
    assert re.search(r"pi-01: upload: \d+ wheels, [\d.]+ MB at [\d.]+ MB/s", fresh.stderr)
    assert "pi-01: installed (mle 0.1.0)" in fresh.stdout
    pid = _agent_pid(install_dir)
    assert _state(install_dir)["version"] == "0.1.0"
    row = _listed(project, "pi-01")
    assert "inventory" in row["source"] and row["answered"] and row["version"] == "0.1.0"
    assert row["address"] == f"127.0.0.1:{port}"

    # The key was made on the device and stays there: nowhere in the project.
    key = (install_dir / "data" / "agent.key").read_bytes()
    assert (
        b"PRIVATE KEY" in key and (install_dir / "data" / "agent.key").stat().st_mode & 0o077 == 0
    )
    body = b"".join(key.splitlines()[1:-1])
    for path in project.root.rglob("*"):
        if path.is_file():
            assert body not in b"".join(path.read_bytes().splitlines()), path

    # Re-run: nothing restarted.
    again = _install(project, "--target", "pi-01")
    assert again.returncode == 0, again.stderr
    assert "pi-01: already installed (mle 0.1.0)" in again.stdout
    assert "pi-01: upload" not in again.stderr and "pi-01: start" not in again.stderr
    assert _agent_pid(install_dir) == pid

    # A newer version: a new release, a new agent process, the old release gone after.
    newer = bumped_wheel(_operator_wheel(project), "9.0.1", tmp_path / "wheels")
    upgraded = project.mle("agent", "upgrade", "--target", "pi-01", "--wheel", str(newer),
                           "--wheelhouse", str(WHEELHOUSE), timeout=600)  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr
    assert "pi-01: upgraded (mle 0.1.0 -> 9.0.1)" in upgraded.stdout
    assert "pi-01: identity" not in upgraded.stderr  # the certificate is kept
    assert "pi-01: upload: 1 wheel, " in upgraded.stderr  # the dependencies are there already
    assert _agent_pid(install_dir) != pid and _state(install_dir)["version"] == "9.0.1"
    assert sorted(p.name for p in (install_dir / "releases").iterdir()) == ["9.0.1"]
    assert os.readlink(install_dir / "current") == "releases/9.0.1"
    pid = _agent_pid(install_dir)

    # A broken newer version: rolled back, the old version answers, the command fails.
    broken = bumped_wheel(newer, "9.0.2", tmp_path / "wheels", broken=True)
    failed = project.mle("agent", "upgrade", "--target", "pi-01", "--wheel", str(broken),
                         "--wheelhouse", str(WHEELHOUSE), timeout=600)  # fmt: skip
    assert failed.returncode != 0
    assert "exited with status 3 at start" in failed.stderr
    assert "rolled back to 9.0.1" in failed.stderr, failed.stderr
    assert os.readlink(install_dir / "current") == "releases/9.0.1"
    assert sorted(p.name for p in (install_dir / "releases").iterdir()) == ["9.0.1"]
    assert _state(install_dir)["version"] == "9.0.1" and _agent_pid(install_dir) != pid
    assert _listed(project, "pi-01")["version"] == "9.0.1"
    logs = project.mle("agent", "logs", "--target", "pi-01", "-n", "200", check=True)
    assert "broken on purpose" in logs.stdout

    # Uninstall: the service stopped, the directory gone, no process left.
    removed = project.mle("agent", "uninstall", "--target", "pi-01", timeout=300)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {install_dir}" in removed.stdout and "mle 9.0.1" in removed.stdout
    assert not install_dir.exists()
    assert _running(install_dir) == []


def test_upgrade_refuses_a_device_without_an_agent(
    project: Project, sshd: SshServer, devices: Path
) -> None:
    _target(project, sshd, "pi-01", devices / "pi-01")
    _trust(project, sshd)
    done = project.mle("agent", "upgrade", "--target", "pi-01", "--wheelhouse", str(WHEELHOUSE))
    assert done.returncode == 8
    assert f"pi-01: no agent installed in {devices / 'pi-01'}; use mle agent install" in (
        done.stderr
    )
    assert not (devices / "pi-01" / "releases").exists()


def test_a_directory_holding_the_users_files_is_neither_installed_into_nor_removed(
    project: Project, sshd: SshServer, devices: Path
) -> None:
    """agent.dir: /home/pi. Uninstall would remove its data/, releases/...: both refuse."""
    home = devices / "pi"
    (home / "data").mkdir(parents=True)
    (home / "data" / "thesis.txt").write_text("four years of work\n")
    (home / "releases").mkdir()
    _target(project, sshd, "pi-01", home)
    _trust(project, sshd)
    removed = project.mle("agent", "uninstall", "--target", "pi-01", timeout=300)
    assert removed.returncode == 8, removed.stderr
    [line] = [ln for ln in removed.stderr.splitlines() if ln.startswith("error:")]
    assert line == (
        f"error: pi-01: {home} holds no install.json, not an install of pi-01; nothing removed"
    )
    installed = _install(project, "--target", "pi-01")
    assert installed.returncode == 8, installed.stderr
    [line] = [ln for ln in installed.stderr.splitlines() if ln.startswith("error:")]
    assert line == (
        f"error: pi-01: agent.dir {home} holds other files, no install of pi-01 (install.json); "
        "choose an empty or new directory"
    )
    assert "Traceback" not in removed.stderr + installed.stderr
    assert (home / "data" / "thesis.txt").read_text() == "four years of work\n"
    assert sorted(p.name for p in home.iterdir()) == ["data", "releases"]


def test_a_wrong_user_key_is_one_clear_line(
    project: Project, sshd: SshServer, devices: Path, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger_key"
    generate_key(stranger)
    _target(project, sshd, "pi-01", devices / "pi-01", key=stranger)
    _trust(project, sshd)
    done = _install(project, "--target", "pi-01")
    assert done.returncode == 6
    [line] = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert line == (
        f"error: pi-01: the SSH server refused user {sshd.user} with key {stranger} "
        "(check ssh.user and ssh.key in targets/pi-01.yaml:1)"
    )
    assert "Traceback" not in done.stderr and not (devices / "pi-01").exists()


def test_a_changed_host_key_is_refused_loudly(
    project: Project, sshd: SshServer, devices: Path, tmp_path: Path
) -> None:
    _target(project, sshd, "pi-01", devices / "pi-01")
    impostor = generate_key(tmp_path / "other_host_key").split()[:2]
    known = project.root / ".mle" / "known_hosts"
    known.parent.mkdir(parents=True)
    known.write_text(f"[{sshd.host}]:{sshd.port} {' '.join(impostor)}\n")
    done = _install(project, "--target", "pi-01", "--trust-new-host-key")
    assert done.returncode == 6 and "has CHANGED" in done.stderr
    assert not (devices / "pi-01").exists()


def test_many_targets_continue_past_a_failure_and_summarize(
    project: Project, sshd: SshServer, devices: Path
) -> None:
    _target(project, sshd, "pi-a", devices / "pi-a")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = int(closed.getsockname()[1])  # nothing listens there once this closes
    _target(project, sshd, "pi-b", devices / "pi-b", ssh_port=nobody)
    _target(project, sshd, "srv-c", devices / "srv-c")  # not selected
    _trust(project, sshd)
    done = _install(project, "--target", "pi-*", "--parallel", "2")
    assert done.returncode != 0
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    assert sorted(rows) == ["pi-a", "pi-b"], done.stdout
    assert "installed" in rows["pi-a"] and "failed" in rows["pi-b"]
    assert "cannot connect over SSH" in rows["pi-b"]
    assert f"error: pi-b (127.0.0.1:{nobody}): cannot connect over SSH" in done.stderr
    assert "pi-a: start: mle 0.1.0 answers GetInfo over mTLS" in done.stderr
    assert _listed(project, "pi-a")["answered"]
    assert not (devices / "srv-c").exists()
    removed = project.mle("agent", "uninstall", "--target", "pi-a", timeout=300)
    assert removed.returncode == 0, removed.stderr
    assert _running(devices / "pi-a") == []


def test_offline_downloads_the_devices_wheels_here_and_installs_with_no_index(
    project: Project, sshd: SshServer, devices: Path
) -> None:
    # pip's own settings point the operator's download at the wheelhouse instead of an index,
    # so the test needs no network: the device's platform is this machine's. The mle wheel is
    # given too: building it from source would need the build backend from an index.
    project.env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(WHEELHOUSE))
    [mle_wheel] = WHEELHOUSE.glob("mle_toolchain-*.whl")
    install_dir = devices / "pi-01"
    _target(project, sshd, "pi-01", install_dir)
    _trust(project, sshd)
    done = project.mle(
        "agent", "install", "--target", "pi-01", "--offline", "--wheel", str(mle_wheel),
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no index, uploaded wheels" in done.stderr
    downloaded = list((project.root / ".mle" / "wheels").glob("cp3*-*/grpcio-*.whl"))
    assert downloaded, list((project.root / ".mle" / "wheels").rglob("*"))
    removed = project.mle("agent", "uninstall", "--target", "pi-01", timeout=300)
    assert removed.returncode == 0, removed.stderr


def test_the_install_benchmark_runs() -> None:
    """bench/install.py end to end, one no-op re-run (its figures are not asserted, only made)."""
    import subprocess
    import sys

    require_sshd()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "install.py"), "--repeat", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["files"] >= 2 and figures["mb"] > 0
    for key in ("fresh_install_s", "noop_p50_s", "install_sftp_mb_s", "scp_mb_s", "scp_net_mb_s"):
        assert figures[key] > 0, (key, figures)

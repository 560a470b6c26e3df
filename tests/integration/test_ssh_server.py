"""The test sshd (tests/ssh_server.py): a real OpenSSH server clients log in to with host key
verification, by paramiko and by OpenSSH's own client; it refuses what it must and leaves nothing
running behind it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.agent_helpers import leak_check
from tests.ssh_server import SshServer, generate_key, ssh_server, ssh_server_fixture

pytestmark = pytest.mark.timeout(60)

sshd = ssh_server_fixture()


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _paramiko_run(server: SshServer, command: str, known_hosts: Path, key: Path) -> str:
    """Log in with paramiko, host keys from known_hosts only (unknown: rejected); run command."""
    import paramiko

    client = paramiko.SSHClient()
    try:
        client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(
            server.host,
            port=server.port,
            username=server.user,
            key_filename=str(key),
            allow_agent=False,
            look_for_keys=False,
            timeout=20,
        )
        _, stdout, _ = client.exec_command(command, timeout=20)
        output = stdout.read().decode()
        assert stdout.channel.recv_exit_status() == 0
        return output
    finally:
        client.close()


def test_paramiko_logs_in_with_the_host_key_verified_and_runs_a_command(sshd: SshServer) -> None:
    output = _paramiko_run(sshd, "echo hello; id -un", sshd.known_hosts, sshd.client_key)
    assert output.split() == ["hello", sshd.user]
    assert sshd.host_key_line.startswith(f"[{sshd.host}]:{sshd.port} ssh-ed25519 ")


def test_openssh_client_logs_in_with_strict_host_key_checking(sshd: SshServer) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client is not installed (Debian: apt-get install openssh-client)")
    done = subprocess.run(
        sshd.ssh_argv("echo", "over-openssh"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "over-openssh"


def test_an_unknown_host_key_is_rejected(sshd: SshServer, tmp_path: Path) -> None:
    import paramiko

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        _paramiko_run(sshd, "true", empty, sshd.client_key)


def test_a_key_that_is_not_authorized_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    import paramiko

    stranger = tmp_path / "stranger"
    generate_key(stranger)
    with pytest.raises(paramiko.AuthenticationException):
        _paramiko_run(sshd, "true", sshd.known_hosts, stranger)
    assert f"Failed publickey for {sshd.user}" in sshd.log_text()


def test_the_same_host_key_serves_again_and_another_is_refused(tmp_path: Path) -> None:
    import paramiko

    with ssh_server(tmp_path / "first") as first:
        pass
    with ssh_server(tmp_path / "again", host_key=first.host_key) as again:
        assert again.host_public_key == first.host_public_key
        assert _paramiko_run(again, "echo same", again.known_hosts, again.client_key) == "same\n"
    changed = tmp_path / "changed_host_key"
    generate_key(changed, "host")
    with ssh_server(tmp_path / "changed", host_key=changed) as server:
        stale = tmp_path / "stale_known_hosts"  # the first key, recorded for this host and port
        stale.write_text(f"[{server.host}]:{server.port} {first.host_public_key}\n")
        with pytest.raises(paramiko.BadHostKeyException):
            _paramiko_run(server, "true", stale, server.client_key)


def test_sshd_and_its_sessions_are_gone_after_the_block_even_when_it_fails(
    tmp_path: Path,
) -> None:
    seen: list[SshServer] = []
    sessions: list[int] = []
    clients: list[subprocess.Popen[bytes]] = []
    try:
        with pytest.raises(RuntimeError, match="the test failed"):
            _fail_with_a_session_open(tmp_path, seen, sessions, clients)
        assert clients[0].wait(30) != 0  # its server side was killed under it
    finally:
        for client in clients:
            client.kill()
            client.wait(10)
    server = seen[0]
    assert not psutil.pid_exists(server.pid) or _zombie(server.pid)
    assert all(not psutil.pid_exists(pid) or _zombie(pid) for pid in sessions)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=2).close()


def _fail_with_a_session_open(
    tmp_path: Path,
    seen: list[SshServer],
    sessions: list[int],
    clients: list[subprocess.Popen[bytes]],
) -> None:
    """A test body that fails while a session is still running (its sshd child outlives a
    SIGTERM to the listener)."""
    with ssh_server(tmp_path) as server:
        seen.append(server)
        argv = server.ssh_argv("sleep", "60")
        clients.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sessions += _wait_for_session(server.pid)
        raise RuntimeError("the test failed")


def _wait_for_session(pid: int, timeout: float = 20.0) -> list[int]:
    """The pids of sshd's session processes once one runs `sleep`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        if any(_name(c) == "sleep" for c in children):
            return [c.pid for c in children]
        time.sleep(0.05)
    raise AssertionError("no ssh session started")


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def test_without_sshd_the_fixture_skips_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tests.ssh_server as module

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(module, "SSHD_CANDIDATES", (str(tmp_path / "sshd"),))
    starting = ssh_server(tmp_path / "server")
    with pytest.raises(pytest.skip.Exception, match=r"sshd is not installed \(Debian: apt-get"):
        starting.__enter__()
    assert not (tmp_path / "server").exists()  # nothing was started or written

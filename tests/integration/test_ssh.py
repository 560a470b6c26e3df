"""mle's SSH layer (mle_cli.targets.ssh) against a real OpenSSH sshd (tests/ssh_server.py):
host keys verified from ~/.ssh/known_hosts and .mle/known_hosts, trust on first use, changed
keys refused, key logins (file, ssh-agent, defaults), commands, pipelined SFTP, device facts."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from mle_cli.settings import Settings
from mle_cli.targets._known_hosts import KnownKey, known_keys, preferred_algorithms
from mle_cli.targets.facts import gather_facts
from mle_cli.targets.ssh import (
    MAX_OUTPUT,
    HostKeyChanged,
    HostKeyUnknown,
    SshAuthFailed,
    SshSession,
    SshTarget,
    SshUnreachable,
    open_session,
)
from mle_proto import __version__
from mle_proto.errors import DeadlineExceeded, FailedPrecondition, NotFound, ResourceExhausted
from tests.agent_helpers import leak_check
from tests.ssh_server import SshServer, generate_key, ssh_server, ssh_server_fixture

pytestmark = pytest.mark.timeout(90)

sshd = ssh_server_fixture()
SOURCE = "targets/pi-01.yaml:1"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of the test's own (its ~/.ssh empty) and no ssh-agent."""
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return path


@pytest.fixture
def settings(tmp_path: Path, home: Path) -> Settings:
    (tmp_path / "project").mkdir()
    return Settings(project_dir=tmp_path / "project")


def _target(server: SshServer, key: Path | None = None) -> SshTarget:
    return SshTarget(
        "pi-01", server.host, server.port, server.user, key or server.client_key, source=SOURCE
    )


def _known(server: SshServer, home: Path) -> None:
    """The server's key in the user's own known_hosts, as `ssh` would have recorded it."""
    shutil.copy(server.known_hosts, home / ".ssh" / "known_hosts")


def _fingerprint(public_key_file: Path) -> str:
    """`ssh-ed25519 SHA256:...` as OpenSSH's ssh-keygen computes it (the oracle)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    done = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key_file)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    _bits, digest, *_, kind = done.stdout.split()
    assert kind == "(ED25519)"
    return f"ssh-ed25519 {digest}"


def _openssh_accepts(server: SshServer, known_hosts: Path) -> bool:
    """Whether OpenSSH's own client, strict, logs in trusting only this known_hosts file."""
    if shutil.which("ssh") is None:
        pytest.skip("the OpenSSH client is not installed (Debian: apt-get install openssh-client)")
    argv = server.ssh_argv("true")
    option = argv.index(f"UserKnownHostsFile={server.known_hosts}")
    argv[option] = f"UserKnownHostsFile={known_hosts}"
    return subprocess.run(argv, capture_output=True, timeout=60).returncode == 0


# -- host keys ----------------------------------------------------------------------------------


def test_a_host_key_known_to_the_user_lets_commands_run(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    _known(sshd, home)
    with open_session(_target(sshd), settings) as session:
        done = session.run("uname -m")
    assert (done.exit_code, done.stdout, done.stderr) == (0, platform.uname().machine + "\n", "")
    assert not (settings.mle_dir / "known_hosts").exists()  # nothing recorded: it was known


def test_a_hashed_entry_in_the_projects_known_hosts_is_honoured(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    project_file = settings.mle_dir / "known_hosts"
    project_file.parent.mkdir()
    other = " ".join(generate_key(home / "other_host_key").split()[:2])
    project_file.write_text(f"# other hosts\nother.example {other}\n{sshd.host_key_line}\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(project_file)], capture_output=True, check=True)
    assert "127.0.0.1" not in project_file.read_text()  # OpenSSH hashed the names
    with open_session(_target(sshd), settings) as session:
        assert session.run("echo hashed").stdout == "hashed\n"


def test_an_unknown_host_key_is_refused_with_its_fingerprint(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    fingerprint = _fingerprint(sshd.host_key.with_name(sshd.host_key.name + ".pub"))
    with pytest.raises(HostKeyUnknown) as refused:
        open_session(_target(sshd), settings)
    assert str(refused.value) == (
        f"pi-01 (127.0.0.1:{sshd.port}): unknown host key {fingerprint}; if that is the "
        "device's key, re-run with --trust-new-host-key (it will be recorded in "
        ".mle/known_hosts)"
    )
    assert refused.value.exit_code == 6
    assert not (settings.mle_dir / "known_hosts").exists()
    assert f"Accepted publickey for {sshd.user}" not in sshd.log_text()  # never logged in


def test_trusting_a_new_host_key_records_it_for_next_time(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    with open_session(_target(sshd), settings, trust_new_host_key=True) as session:
        assert session.run("echo first").stdout == "first\n"
    recorded = settings.mle_dir / "known_hosts"
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    assert recorded.read_text() == sshd.host_key_line + "\n"
    with open_session(_target(sshd), settings) as session:  # no flag needed any more
        assert session.run("echo again").stdout == "again\n"
    assert recorded.read_text() == sshd.host_key_line + "\n"  # recorded once
    assert _openssh_accepts(sshd, recorded)  # OpenSSH reads the line we wrote


@pytest.mark.parametrize("where", ["home", "project"])
def test_a_changed_host_key_is_refused_even_when_trusting_new_keys(
    tmp_path: Path, home: Path, settings: Settings, where: str
) -> None:
    with ssh_server(tmp_path / "before") as before:
        old_key = before.host_public_key
    reinstalled = tmp_path / "new_host_key"
    generate_key(reinstalled, "host")
    with ssh_server(tmp_path / "after", host_key=reinstalled) as after:
        # what was recorded for this address before the device was reinstalled
        file = (home / ".ssh" if where == "home" else settings.mle_dir) / "known_hosts"
        file.parent.mkdir(exist_ok=True)
        file.write_text(f"# mine\n[{after.host}]:{after.port} {old_key}\n")
        shown = "~/.ssh/known_hosts" if where == "home" else ".mle/known_hosts"
        old = _fingerprint(before.host_key.with_name(before.host_key.name + ".pub"))
        new = _fingerprint(reinstalled.with_name(reinstalled.name + ".pub"))
        for trust in (False, True):
            with pytest.raises(HostKeyChanged) as refused:
                open_session(_target(after), settings, trust_new_host_key=trust)
            assert str(refused.value) == (
                f"WARNING: the host key of pi-01 (127.0.0.1:{after.port}) has CHANGED: recorded "
                f"{old}, presented {new}: this may be an attack; if the device was reinstalled, "
                f"remove the old key from {shown}:2"
            )
        assert file.read_text() == f"# mine\n[{after.host}]:{after.port} {old_key}\n"
        assert not _openssh_accepts(after, file)  # OpenSSH refuses it too
        if where == "home":
            assert not (settings.mle_dir / "known_hosts").exists()


def test_known_hosts_lines_as_openssh_reads_them(tmp_path: Path) -> None:
    """Wildcards, negations, `[host]:port` taken literally, markers, garbage lines."""
    key = base64.b64encode(b"k1").decode()
    lines = [
        f"*.lan,!pi-09.lan ssh-ed25519 {key}",  # 1: pi-01.lan yes, pi-09.lan no
        f"[pi-0?.lan]:2222 ssh-ed25519 {key}",  # 2: a port: brackets are literal
        f"@revoked pi-01.lan ssh-rsa {key}",  # 3
        f"@cert-authority *.lan ssh-ed25519 {key}",  # 4: host certificates: skipped
        "pi-01.lan ssh-ed25519 not*base64",  # 5: garbage
        "# pi-01.lan ssh-ed25519 AAAA",  # 6: a comment
    ]
    file = tmp_path / "known_hosts"
    file.write_text("\n".join(lines) + "\n")
    assert [(k.line, k.revoked) for k in known_keys([file], "PI-01.lan", 22)] == [
        (1, False),
        (3, True),
    ]
    assert known_keys([file], "pi-09.lan", 22) == []
    assert [k.line for k in known_keys([file], "pi-05.lan", 2222)] == [2]
    assert known_keys([file, tmp_path / "missing"], "[pi-05.lan]", 22) == []


def test_the_recorded_key_type_is_negotiated_first() -> None:
    rsa = KnownKey(Path("f"), 1, "ssh-rsa", b"")
    offered = ["ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"]
    assert preferred_algorithms([rsa], offered) == [
        "rsa-sha2-512",
        "rsa-sha2-256",
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
    ]
    assert preferred_algorithms([], offered) == offered


# -- logging in -----------------------------------------------------------------------------


def test_a_key_the_server_refuses_is_one_line_and_no_secret_is_logged(
    sshd: SshServer, home: Path, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    _known(sshd, home)
    stranger = home / "stranger_key"
    generate_key(stranger)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SshAuthFailed) as refused:
        open_session(_target(sshd, stranger), settings)
    assert str(refused.value) == (
        f"pi-01: the SSH server refused user {sshd.user} with key ~/stranger_key (check ssh.user "
        f"and ssh.key in {SOURCE})"
    )
    assert refused.value.exit_code == 6
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret_file in (stranger, sshd.client_key):
        body = [line for line in secret_file.read_text().splitlines() if "PRIVATE" not in line]
        assert all(line not in logged for line in body)
    assert not [r for r in caplog.records if r.name.startswith("paramiko") and r.levelno < 30]


def test_the_wrong_user_is_refused_naming_the_user(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    _known(sshd, home)
    target = SshTarget("pi-01", sshd.host, sshd.port, "nobody", sshd.client_key, source=SOURCE)
    with pytest.raises(SshAuthFailed, match=r"^pi-01: the SSH server refused user nobody with key"):
        open_session(target, settings)


def test_a_passphrase_protected_key_asks_for_ssh_agent(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    _known(sshd, home)
    locked = home / ".ssh" / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-pass", "-f", str(locked)], check=True
    )
    with pytest.raises(SshAuthFailed) as refused:
        open_session(_target(sshd, locked), settings)
    assert str(refused.value) == (
        "pi-01: the SSH key ~/.ssh/locked is protected by a passphrase and ssh-agent offered no "
        f"key {sshd.user} may use: use ssh-agent (`ssh-add ~/.ssh/locked`)"
    )


def test_a_missing_key_file_is_named(sshd: SshServer, home: Path, settings: Settings) -> None:
    _known(sshd, home)
    with pytest.raises(Exception, match=r"^pi-01: the SSH key ~/nope does not exist \(check"):
        open_session(_target(sshd, home / "nope"), settings)


def test_without_a_key_file_the_default_key_logs_in(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    _known(sshd, home)
    shutil.copy(sshd.client_key, home / ".ssh" / "id_ed25519")
    target = SshTarget("pi-01", sshd.host, sshd.port, sshd.user, None, source=SOURCE)
    with open_session(target, settings) as session:
        assert session.run("echo default").stdout == "default\n"


def test_without_any_key_the_message_says_what_was_looked_for(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    _known(sshd, home)
    target = SshTarget("pi-01", sshd.host, sshd.port, sshd.user, None, source=SOURCE)
    with pytest.raises(SshAuthFailed) as refused:
        open_session(target, settings)
    assert str(refused.value) == (
        f"pi-01: no SSH key to log in as {sshd.user} with: ssh-agent has none and there is no "
        f"~/.ssh/id_ed25519, id_ecdsa or id_rsa (set ssh.key in {SOURCE})"
    )


def test_the_ssh_agents_key_logs_in(
    sshd: SshServer, home: Path, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("ssh-agent") is None or shutil.which("ssh-add") is None:
        pytest.skip("ssh-agent is not installed (Debian: apt-get install openssh-client)")
    _known(sshd, home)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        _wait_for(sock.exists, "ssh-agent's socket")
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", str(sshd.client_key)], env=env, capture_output=True, check=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        target = SshTarget("pi-01", sshd.host, sshd.port, sshd.user, None, source=SOURCE)
        with open_session(target, settings) as session:
            assert session.run("echo agent").stdout == "agent\n"
    finally:
        agent.terminate()
        agent.wait(10)


def test_a_closed_port_is_unreachable(home: Path, settings: Settings) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens
    target = SshTarget("pi-01", "127.0.0.1", port, "pi", None, source=SOURCE)
    with pytest.raises(SshUnreachable) as refused:
        open_session(target, settings, timeout=10)
    assert str(refused.value) == (
        f"pi-01 (127.0.0.1:{port}): cannot connect over SSH: connection refused (is the device "
        "on and sshd running?)"
    )
    assert refused.value.exit_code == 5


def test_a_port_that_speaks_no_ssh_is_unreachable(home: Path, settings: Settings) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = SshTarget("pi-01", "127.0.0.1", listener.getsockname()[1], "pi", None)
        with pytest.raises(SshUnreachable, match=r"^pi-01 \(127\.0\.0\.1:\d+\): the SSH handshake"):
            open_session(target, settings, timeout=2)


def test_a_known_hosts_path_that_is_a_directory_is_one_line(
    sshd: SshServer, home: Path, settings: Settings
) -> None:
    (home / ".ssh" / "known_hosts").mkdir()
    with pytest.raises(FailedPrecondition) as refused:
        open_session(_target(sshd), settings, trust_new_host_key=True)
    assert str(refused.value) == (
        f"cannot read the known_hosts file {home / '.ssh' / 'known_hosts'}: Is a directory"
    )
    assert not (settings.project_dir / ".mle" / "known_hosts").exists()  # nothing trusted


def test_a_stalled_sftp_server_is_one_line_not_a_hang(
    tmp_path: Path, home: Path, settings: Settings
) -> None:
    """The device's sftp subsystem starts and never answers: the SFTP channel's timeout ends it."""
    # cat reads the channel and never answers; it ends when the channel closes (no orphan).
    options = {"Subsystem": "sftp cat >/dev/null"}
    with ssh_server(tmp_path / "stalled", options=options) as server:
        _known(server, home)
        with open_session(_target(server), settings, io_timeout=1.0) as session:
            with pytest.raises(DeadlineExceeded) as stalled:
                session.put_bytes(b"config", str(tmp_path / "agent.toml"))
            assert str(stalled.value) == (
                f"pi-01 ({server.host}:{server.port}): the SSH server stopped answering"
            )
            assert session.run("echo still usable").stdout == "still usable\n"


# -- commands -------------------------------------------------------------------------------


@pytest.fixture
def session(sshd: SshServer, home: Path, settings: Settings) -> Iterator[SshSession]:
    _known(sshd, home)
    with open_session(_target(sshd), settings) as opened:
        yield opened


def test_exit_status_stdin_and_stderr(session: SshSession) -> None:
    done = session.run("cat; echo oops >&2; exit 3", stdin=b"fed on stdin\n")
    assert (done.exit_code, done.stdout, done.stderr) == (3, "fed on stdin\n", "oops\n")


def test_large_outputs_on_both_streams_do_not_hang(session: SshSession) -> None:
    """More than the channel's window on stderr first, then 5 MB on stdout: reading only stdout
    would stall once the window filled with unread stderr (a command's channel has paramiko's
    2 MiB window; the large ssh.WINDOW_SIZE is SFTP's)."""
    err_size = 2 * 2**20 + 2**20
    command = (
        f"head -c {err_size} /dev/zero | tr '\\0' e >&2; head -c 5000000 /dev/zero | tr '\\0' o"
    )
    done = session.run(command, timeout=60)
    assert done.exit_code == 0
    assert (len(done.stdout), set(done.stdout)) == (5_000_000, {"o"})
    assert (len(done.stderr), set(done.stderr)) == (err_size, {"e"})


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_past_the_cap_is_one_line(session: SshSession, stream: str) -> None:
    """A hostile device printing without end does not fill the operator's memory."""
    redirect = " >&2" if stream == "stderr" else ""
    command = f"head -c {MAX_OUTPUT + 1} /dev/zero{redirect}"
    with pytest.raises(ResourceExhausted) as flooded:
        session.run(command, timeout=60)
    assert str(flooded.value) == f"pi-01: `{command}` printed more than 16 MiB on {stream}"
    assert session.run("echo still usable").stdout == "still usable\n"


def test_a_command_past_its_timeout_is_one_line(session: SshSession) -> None:
    with pytest.raises(DeadlineExceeded, match=r"^pi-01: `sleep 30` did not finish within 1s$"):
        session.run("sleep 30", timeout=1)
    assert session.run("echo still usable").stdout == "still usable\n"


# -- files ----------------------------------------------------------------------------------


def test_put_sends_a_large_file_intact_and_atomically(session: SshSession, tmp_path: Path) -> None:
    local = tmp_path / "model.bin"
    local.write_bytes(os.urandom(20 * 2**20))
    remote = tmp_path / "remote" / "model.bin"
    remote.parent.mkdir()
    remote.write_bytes(b"the previous version")
    seen: list[tuple[int, int]] = []
    rate = session.put(local, str(remote), mode=0o640, progress=lambda n, t: seen.append((n, t)))
    assert rate > 0
    sha256 = [hashlib.sha256(path.read_bytes()).hexdigest() for path in (remote, local)]
    assert sha256[0] == sha256[1]
    assert stat.S_IMODE(remote.stat().st_mode) == 0o640
    assert sorted(p.name for p in remote.parent.iterdir()) == ["model.bin"]  # no .part left
    assert seen[-1] == (local.stat().st_size,) * 2
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


def test_put_bytes_sets_the_mode_and_get_bytes_reads_it_back(
    session: SshSession, tmp_path: Path
) -> None:
    remote = tmp_path / "agent.crt"
    session.put_bytes(b"-----BEGIN CERTIFICATE-----\n", str(remote), mode=0o600)
    assert stat.S_IMODE(remote.stat().st_mode) == 0o600
    session.put_bytes(b"replaced", str(remote), mode=0o644)
    assert (remote.read_bytes(), stat.S_IMODE(remote.stat().st_mode)) == (b"replaced", 0o644)
    assert session.get_bytes(str(remote)) == b"replaced"
    (tmp_path / "empty").write_bytes(b"")
    assert session.get_bytes(str(tmp_path / "empty")) == b""
    assert session.get_bytes("/proc/self/status").startswith(b"Name:")  # says 0 bytes, has more
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("agent")) == ["agent.crt"]


def test_file_errors_are_one_line_naming_the_path(session: SshSession, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "f"
    with pytest.raises(NotFound, match=rf"^pi-01: {missing}: no such file or directory$"):
        session.put_bytes(b"x", str(missing))
    with pytest.raises(NotFound, match=rf"^pi-01: {missing}: no such file or directory$"):
        session.get_bytes(str(missing))
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(ResourceExhausted, match=r"holds 2048 bytes, more than 1024$"):
        session.get_bytes(str(big), limit=1024)
    with pytest.raises(NotFound, match=r"^cannot read .*nothing-here"):
        session.put(tmp_path / "nothing-here", str(tmp_path / "x"))


# -- facts ----------------------------------------------------------------------------------


def test_facts_of_the_real_host_match_this_machine(session: SshSession, tmp_path: Path) -> None:
    agentd = Path(sys.executable).parent / "mle-agentd"
    install = tmp_path / "mle-agent"
    if agentd.exists():  # an installed agent as install lays it out: current -> releases/V
        bin_dir = install / "releases" / __version__ / "venv" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "mle-agentd").symlink_to(agentd)
        (install / "current").symlink_to(f"releases/{__version__}")
    facts = gather_facts(session, str(install))
    assert facts.arch == platform.machine()
    said = subprocess.run(
        [facts.python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()  # fmt: skip
    assert facts.python_version == said
    assert tuple(int(p) for p in said.split(".")[:2]) >= (3, 11)
    systemd = Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None
    assert facts.init_system == ("systemd" if systemd else "none")
    disk = os.statvfs(tmp_path)
    assert facts.disk_total_bytes == disk.f_blocks * disk.f_frsize
    assert facts.memory_total_bytes == psutil.virtual_memory().total
    assert facts.agent_version == (__version__ if agentd.exists() else "")
    assert facts.python_problem == ""
    assert facts.pip_platforms[-1] == f"linux_{platform.machine()}"


def _wait_for(ready: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not appear within {timeout:g}s")

"""A real OpenSSH server for tests and benchmarks: Debian's `sshd`, throwaway host and user keys.

`ssh_server(directory)` starts `sshd -D -e -f CONFIG` as a child process listening on a free port
(127.0.0.1 by default), lets in the current user with a fresh ed25519 key only (no password, no
PAM), and kills it (and any session it forked) on exit, also when the block fails. What a client
needs is in the `SshServer` it yields: host, port, user, the client key, the host key's
known_hosts line and a known_hosts file holding it. `ssh_server_fixture()` makes a pytest fixture of
it; both skip with the reason when sshd is not installed.

For other setups: `host_key` reuses a key (or `generate_key` makes another, for a changed host
key), `authorized` adds public keys, `listen` and `command_prefix` (e.g. `ip netns exec NS`) run it
elsewhere, `options` adds sshd_config lines.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import pytest

__all__ = [
    "SshServer",
    "find_sshd",
    "generate_key",
    "require_sshd",
    "ssh_server",
    "ssh_server_fixture",
]

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")  # what a stock Debian host runs for sftp
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; needed when it runs as root
INSTALL_HINT = "apt-get install openssh-server"
_PORT_ATTEMPTS = 3  # a free port can be taken between probing it and sshd binding it


@dataclass(frozen=True)
class SshServer:
    """A running sshd and what a client needs to log in to it with host key verification."""

    host: str
    port: int
    user: str
    client_key: Path  # private key (OpenSSH format, 0600) authorized for `user`
    host_key_line: str  # `[host]:port ssh-ed25519 AAAA...`, a known_hosts line
    known_hosts: Path  # a file holding host_key_line
    host_key: Path  # the server's private host key (reuse it to restart with the same key)
    config: Path
    log: Path
    pid: int

    @property
    def host_public_key(self) -> str:
        """`ssh-ed25519 AAAA...` without the host part."""
        return self.host_key_line.split(" ", 1)[1]

    def ssh_options(self) -> list[str]:
        """OpenSSH client options: this port, key and known_hosts only, strict, non-interactive."""
        return [
            "-F", "/dev/null",  # no user config on the machine changes the outcome
            "-p", str(self.port),
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=20",
        ]  # fmt: skip

    def ssh_argv(self, *command: str) -> list[str]:
        """`ssh ... user@host COMMAND` against this server."""
        return ["ssh", *self.ssh_options(), f"{self.user}@{self.host}", "--", *command]

    def scp_argv(self, source: Path, remote_path: str) -> list[str]:
        """`scp ... SOURCE user@host:REMOTE` (scp takes -P for the port, not -p)."""
        options = self.ssh_options()
        options[options.index("-p")] = "-P"
        return ["scp", "-q", *options, str(source), f"{self.user}@{self.host}:{remote_path}"]

    def log_text(self) -> str:
        """What sshd logged so far (-e: its log goes to stderr, kept in this file)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def find_sshd() -> str | None:
    """The sshd binary, or None (it lives in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("sshd")
    if found:
        return found
    return next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)


def require_sshd() -> str:
    """The sshd binary; skip the test with the reason when it is absent."""
    sshd = find_sshd()
    if sshd is None:
        pytest.skip(f"OpenSSH sshd is not installed (Debian: {INSTALL_HINT})")
    return sshd


def generate_key(path: Path, comment: str = "mle-test") -> str:
    """Write a fresh ed25519 private key (OpenSSH format, 0600) and `path.pub`; return the
    public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    line = f"{public.decode()} {comment}"
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


@contextlib.contextmanager
def ssh_server(
    directory: Path,
    *,
    listen: str = "127.0.0.1",
    host_key: Path | None = None,
    authorized: Sequence[str] = (),
    options: Mapping[str, str] | None = None,
    command_prefix: Sequence[str] = (),
    start_timeout: float = 30.0,
) -> Iterator[SshServer]:
    """Start sshd with its files in `directory`; yield it; kill it and its sessions on exit."""
    sshd = require_sshd()
    directory.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.getuid()).pw_name
    if host_key is None:
        host_key = directory / "ssh_host_ed25519_key"
        generate_key(host_key, "host")
    host_public = _public_line(host_key)
    client_key = directory / "id_ed25519"
    client_public = generate_key(client_key, f"{user}@mle-test")
    (directory / "authorized_keys").write_text("\n".join([client_public, *authorized]) + "\n")
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # Debian's unit creates it; we have none
    process, port = _start(sshd, directory, listen, host_key, user, options, command_prefix)
    try:
        _wait_ready(process, listen, port, directory / "sshd.log", start_timeout)
        server = _server(directory, listen, port, user, client_key, host_key, host_public, process)
        yield server
    finally:
        _stop(process)


def ssh_server_fixture(
    scope: Literal["function", "module", "session"] = "function", **settings: Any
) -> Callable[..., Iterator[SshServer]]:
    """A pytest fixture yielding a running `SshServer`: `sshd = ssh_server_fixture()` in a module;
    keyword arguments go to `ssh_server`."""

    @pytest.fixture(scope=scope)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
        with ssh_server(tmp_path_factory.mktemp("sshd"), **settings) as server:
            yield server

    return fixture


def _public_line(private_key: Path) -> str:
    """`ssh-ed25519 AAAA...` of a private key file (its .pub when present)."""
    pub = private_key.with_name(private_key.name + ".pub")
    if pub.exists():
        return " ".join(pub.read_text().split()[:2])
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


def _config(
    directory: Path,
    listen: str,
    port: int,
    host_key: Path,
    user: str,
    options: Mapping[str, str] | None,
) -> Path:
    sftp = str(SFTP_SERVER) if SFTP_SERVER.exists() else "internal-sftp"
    settings = {
        "Port": str(port),
        "ListenAddress": listen,
        "HostKey": str(host_key),
        "PidFile": str(directory / "sshd.pid"),
        "AuthorizedKeysFile": str(directory / "authorized_keys"),
        "AllowUsers": user,
        "PubkeyAuthentication": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "UsePAM": "no",
        "PermitRootLogin": "prohibit-password",  # root in CI: keys only
        # The key files live under /tmp (world-writable): StrictModes would refuse them.
        "StrictModes": "no",
        "UseDNS": "no",
        "PrintMotd": "no",
        "LogLevel": "VERBOSE",
        "Subsystem": f"sftp {sftp}",
        **(options or {}),
    }
    config = directory / "sshd_config"
    config.write_text("".join(f"{key} {value}\n" for key, value in settings.items()))
    return config


def _start(
    sshd: str,
    directory: Path,
    listen: str,
    host_key: Path,
    user: str,
    options: Mapping[str, str] | None,
    prefix: Sequence[str],
) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn sshd on a free port, trying another port when the probed one was taken meanwhile."""
    log = directory / "sshd.log"
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port(listen)
        config = _config(directory, listen, port, host_key, user, options)
        with log.open("ab") as err:
            process = subprocess.Popen(
                [*prefix, sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.2)  # a port taken in between makes sshd exit at once
        if process.poll() is None or attempt == _PORT_ATTEMPTS - 1:
            return process, port
    raise AssertionError("unreachable")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _wait_ready(
    process: subprocess.Popen[bytes], host: str, port: int, log: Path, timeout: float
) -> None:
    """Poll until sshd sends its SSH banner; fail with its log when it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip()[-2000:]
            raise AssertionError(f"sshd exited with {process.returncode}: {tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 2) as conn:
            if conn.recv(64).startswith(b"SSH-2.0-"):
                return
        time.sleep(0.05)
    raise AssertionError(f"sshd did not answer on {host}:{port} within {timeout:g}s")


def _server(
    directory: Path,
    host: str,
    port: int,
    user: str,
    client_key: Path,
    host_key: Path,
    host_public: str,
    process: subprocess.Popen[bytes],
) -> SshServer:
    shown = f"[{host}]:{port}" if port != 22 else host  # how known_hosts names a non-22 port
    line = f"{shown} {host_public}"
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(line + "\n")
    return SshServer(
        host=host,
        port=port,
        user=user,
        client_key=client_key,
        host_key_line=line,
        known_hosts=known_hosts,
        host_key=host_key,
        config=directory / "sshd_config",
        log=directory / "sshd.log",
        pid=process.pid,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill sshd and the sessions it forked (they start sessions of their own, so no process
    group reaches them: they are found as its descendants first)."""
    sessions: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        sessions = psutil.Process(process.pid).children(recursive=True)
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    for session in sessions:
        with contextlib.suppress(psutil.Error):
            session.kill()
    psutil.wait_procs(sessions, timeout=10)

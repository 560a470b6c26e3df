"""The transfer peers of bench/fleet.py: paramiko SFTP (defaults, tuned) and OpenSSH scp of one
file to a real sshd (tests/ssh_server.py, the same sshd the SSH tests use)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _measure import MB, Results, timed

from tests.ssh_server import SshServer, find_sshd, ssh_server


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

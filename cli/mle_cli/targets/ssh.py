"""SSH to a device (paramiko is imported here only, lazily): host keys verified, commands run,
files sent over pipelined SFTP. paramiko and socket errors become one-line mle errors here.

Host keys are checked against `~/.ssh/known_hosts` and the project's `.mle/known_hosts`. An
unknown key is refused showing its fingerprint unless `trust_new_host_key` (then it is recorded
in `.mle/known_hosts`: trust on first use); a changed key is always refused, loudly.

Logging in uses keys only (never passwords): the target's key file, else the SSH agent's keys and
`~/.ssh/id_{ed25519,ecdsa,rsa}`. Remote paths are absolute, or relative to the login's home
(`~/` allowed). paramiko's own logger is kept at WARNING so its debug output stays out of logs.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from mle_cli.settings import Settings
from mle_cli.targets import _known_hosts
from mle_proto.errors import (
    AgentUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)

if TYPE_CHECKING:
    import paramiko

__all__ = [
    "MAX_PACKET_SIZE",
    "WINDOW_SIZE",
    "CommandResult",
    "HostKeyChanged",
    "HostKeyUnknown",
    "SshAuthFailed",
    "SshSession",
    "SshTarget",
    "SshUnreachable",
    "open_session",
]

log = logging.getLogger(__name__)

# paramiko's channel defaults are a 2 MiB window and 32 KiB packets; a larger window keeps more
# SFTP writes in flight on a slow link (the transfer itself is pipelined: see `put`).
WINDOW_SIZE = 2**24
MAX_PACKET_SIZE = 2**16
CHUNK = 2**20  # bytes read from the local file per write
IO_TIMEOUT = 60.0  # seconds an SFTP read or write may wait on the device before it is stalled
KEEPALIVE = 15  # seconds between SSH keepalives: a dead link is noticed, a NAT keeps its entry
MAX_OUTPUT = 16 * 2**20  # bytes of stdout, and of stderr, kept from one command: the device
# is hostile until proven otherwise and must not fill the operator's memory
_READ = 2**16


class HostKeyUnknown(PermissionDenied):
    """The host's key is in no known_hosts file (shown with its fingerprint)."""


class HostKeyChanged(PermissionDenied):
    """The host presented another key than the one recorded for it."""


class SshAuthFailed(Unauthenticated):
    """The SSH server refused the user or key."""


class SshUnreachable(AgentUnavailable):
    """No SSH server answered at the host and port."""


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in (from the inventory's `host` and `ssh:`)."""

    name: str  # the target's name, for messages
    host: str
    port: int = 22
    user: str = ""  # "" = the operator's login name
    key: Path | None = None  # None = the SSH agent's and ~/.ssh's default keys
    source: str = ""  # where the target is defined (`targets/pi-01.yaml:1`), for messages

    @property
    def where(self) -> str:
        """`pi-01 (192.168.1.50:22)`, for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.name} ({host}:{self.port})"

    @property
    def login(self) -> str:
        """The user to log in as."""
        return self.user or getpass.getuser()


@dataclass(frozen=True)
class CommandResult:
    """A remote command's exit status and output (text, decoded leniently)."""

    exit_code: int
    stdout: str
    stderr: str


class SshSession:
    """One authenticated SSH connection to a device."""

    def __init__(
        self, target: SshTarget, transport: paramiko.Transport, *, io_timeout: float = IO_TIMEOUT
    ) -> None:
        self.target = target
        self.io_timeout = io_timeout
        self._transport = transport
        self._sftp: paramiko.SFTPClient | None = None

    def run(self, command: str, *, timeout: float = 120.0, stdin: bytes = b"") -> CommandResult:
        """Run a shell command (the caller quotes its words); never raises on a non-zero exit."""
        deadline = time.monotonic() + timeout
        with self._connection_errors():
            channel = self._transport.open_session(timeout=timeout)
            try:
                channel.settimeout(timeout)  # a peer that stops reading cannot block sendall
                channel.exec_command(command)
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
                out, err = _drain(channel, deadline, f"{self.target.name}: `{_short(command)}`")
                if out is None or not channel.status_event.wait(_left(deadline)):
                    raise DeadlineExceeded(
                        f"{self.target.name}: `{_short(command)}` did not finish within "
                        f"{timeout:g}s"
                    )
                if not self._transport.is_active():  # closed under the command, not by it
                    raise SshUnreachable(f"{self.target.where}: the SSH connection broke")
                return CommandResult(channel.recv_exit_status(), _text(out), _text(err))
            finally:
                channel.close()

    def put(
        self, local: Path, remote: str, *, mode: int = 0o644,
        progress: Callable[[int, int], None] | None = None,
    ) -> float:  # fmt: skip
        """Send a file over pipelined SFTP (atomically: a temporary name, then a rename);
        return the MB/s achieved."""
        try:
            source = local.open("rb")
        except OSError as exc:
            raise NotFound(f"cannot read {local}: {exc.strerror or exc}") from None
        with source:
            size = _size(source)
            self._sftp_client()  # opened before the clock starts: the rate is the transfer's
            started = time.monotonic()
            self._upload(remote, mode, lambda sink: _copy(source, sink, size, progress), size)
        return size / 1e6 / max(time.monotonic() - started, 1e-6)

    def put_bytes(self, data: bytes, remote: str, *, mode: int = 0o644) -> None:
        """Write small content (a certificate, a unit file) to a remote path atomically."""
        self._upload(remote, mode, lambda sink: sink.write(data), len(data))

    def get_bytes(self, remote: str, *, limit: int = 16 * 1024 * 1024) -> bytes:
        """Read a small remote file (a CSR, a log tail)."""
        path = _sftp_path(remote)
        with self._sftp_errors(remote), self._sftp_client().open(path, "rb") as source:
            size = source.stat().st_size or 0
            if size > limit:
                raise ResourceExhausted(
                    f"{self.target.name}: {remote} holds {size} bytes, more than {limit}"
                )
            if size:  # a /proc-like file says 0 and is read plainly
                source.prefetch(size)
            data = source.read(limit + 1)
        if len(data) > limit:  # it grew while being read
            raise ResourceExhausted(f"{self.target.name}: {remote} holds more than {limit} bytes")
        return data

    def close(self) -> None:
        """Close the connection."""
        self._drop_sftp()
        self._transport.close()

    def _drop_sftp(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None

    def __enter__(self) -> SshSession:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _upload(
        self, remote: str, mode: int, write: Callable[[paramiko.SFTPFile], object], size: int
    ) -> None:
        """Write to `remote.part`, check its size, set its mode, rename it over `remote`."""
        sftp = self._sftp_client()
        path = _sftp_path(remote)
        part = path + ".part"
        # A private file gets its mode before any content; others after the writes, which a
        # mode change made before them slowed by a fifth here (measured against sftp-server).
        private = not mode & 0o077
        try:
            with self._sftp_errors(remote):
                with sftp.open(part, "wb") as sink:
                    if private:
                        sink.chmod(mode)
                    sink.set_pipelined(True)
                    write(sink)
                    sink.flush()  # close() collects pipelined replies only of flushed writes
                written = sftp.stat(part).st_size
                if written != size:
                    raise FailedPrecondition(
                        f"{self.target.name}: {remote}: {written} of {size} bytes arrived"
                    )
                if not private:
                    sftp.chmod(part, mode)
                _rename(sftp, part, path)
        except BaseException:
            with contextlib.suppress(Exception):
                sftp.remove(part)
            raise

    def _sftp_client(self) -> paramiko.SFTPClient:
        """The session's SFTP channel, opened on first use with the large window and a timeout
        on every read and write (a device whose sftp server stalls must not hang install)."""
        if self._sftp is None:
            import paramiko

            with self._connection_errors():
                channel = self._transport.open_session(
                    window_size=WINDOW_SIZE,
                    max_packet_size=MAX_PACKET_SIZE,
                    timeout=self.io_timeout,
                )
                try:
                    channel.settimeout(self.io_timeout)
                    channel.invoke_subsystem("sftp")
                    self._sftp = paramiko.SFTPClient(channel)
                except BaseException:
                    channel.close()
                    raise
        return self._sftp

    @contextlib.contextmanager
    def _connection_errors(self) -> Iterator[None]:
        """A broken connection or a silent host becomes one line."""
        import paramiko

        try:
            yield
        except TimeoutError:
            self._drop_sftp()  # a request may still be in flight: the channel is unusable
            raise DeadlineExceeded(
                f"{self.target.where}: the SSH server stopped answering"
            ) from None
        except (paramiko.SSHException, EOFError, ConnectionError) as exc:
            raise SshUnreachable(
                f"{self.target.where}: the SSH connection broke: {_reason(exc)}"
            ) from None

    @contextlib.contextmanager
    def _sftp_errors(self, remote: str) -> Iterator[None]:
        """SFTP status errors become one line naming the remote path."""
        name = self.target.name
        with self._connection_errors():
            try:
                yield
            except FileNotFoundError:
                raise NotFound(f"{name}: {remote}: no such file or directory") from None
            except PermissionError:
                raise PermissionDenied(f"{name}: {remote}: permission denied") from None
            except (ConnectionError, TimeoutError):
                raise
            except OSError as exc:  # FX_FAILURE: a full disk, a directory in the way
                raise FailedPrecondition(f"{name}: {remote}: {_reason(exc)}") from None


def open_session(
    target: SshTarget, settings: Settings, *, trust_new_host_key: bool = False,
    timeout: float = 15.0, io_timeout: float = IO_TIMEOUT,
) -> SshSession:  # fmt: skip
    """Connect and authenticate, verifying the host key (see the module docstring)."""
    if not target.host:
        raise InvalidInput(f"{target.name}: no host to connect to over SSH (set host:)")
    logging.getLogger("paramiko").setLevel(logging.WARNING)  # its DEBUG lines name key files
    from mle_cli.targets import _ssh_login

    files = [Path.home() / ".ssh" / "known_hosts", _ssh_login.project_known_hosts(settings)]
    recorded = _known_hosts.known_keys(files, target.host, target.port)
    transport = _ssh_login.handshake(target, recorded, timeout)
    try:
        _ssh_login.verify_host_key(transport, target, recorded, settings, trust_new_host_key)
        _ssh_login.authenticate(transport, target)
    except BaseException:
        transport.close()
        raise
    transport.set_keepalive(KEEPALIVE)
    log.debug("%s: logged in as %s", target.where, target.login)
    return SshSession(target, transport, io_timeout=io_timeout)


def _drain(channel: paramiko.Channel, deadline: float, what: str) -> tuple[bytes | None, bytes]:
    """Read stdout and stderr together until the command's EOF (reading only one would stall
    the other once the window fills); stdout None when the deadline passed first.
    ResourceExhausted when either stream passes MAX_OUTPUT."""
    out: list[bytes] = []
    err: list[bytes] = []
    ready = channel.fileno()  # a pipe readable while either stream has data or at EOF
    sizes = {"stdout": 0, "stderr": 0}
    while True:
        while channel.recv_ready():
            out.append(channel.recv(_READ))
            _count(sizes, "stdout", len(out[-1]), what)
        while channel.recv_stderr_ready():
            err.append(channel.recv_stderr(_READ))
            _count(sizes, "stderr", len(err[-1]), what)
        if channel.eof_received or channel.closed:
            if not channel.recv_ready() and not channel.recv_stderr_ready():
                return b"".join(out), b"".join(err)
            continue
        if _left(deadline) <= 0:
            return None, b"".join(err)
        select.select([ready], [], [], min(_left(deadline), 1.0))


def _count(sizes: dict[str, int], stream: str, size: int, what: str) -> None:
    sizes[stream] += size
    if sizes[stream] > MAX_OUTPUT:
        raise ResourceExhausted(f"{what} printed more than {MAX_OUTPUT // 2**20} MiB on {stream}")


def _copy(
    source: IO[bytes],
    sink: paramiko.SFTPFile,
    size: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Stream the file in large writes (the pipelined file keeps its requests in flight)."""
    sent = 0
    while chunk := source.read(CHUNK):
        sink.write(chunk)
        sent += len(chunk)
        if progress is not None:
            progress(sent, size)


def _rename(sftp: paramiko.SFTPClient, part: str, path: str) -> None:
    """Replace `path` atomically (posix-rename@openssh.com), else remove it first."""
    try:
        sftp.posix_rename(part, path)
    except OSError:
        with contextlib.suppress(OSError):
            sftp.remove(path)
        sftp.rename(part, path)


def _sftp_path(remote: str) -> str:
    """SFTP resolves relative paths from the login's home and knows nothing of `~`."""
    if remote == "~":
        return "."
    return remote[2:] if remote.startswith("~/") else remote


def _size(source: IO[bytes]) -> int:
    return os.fstat(source.fileno()).st_size


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _short(command: str) -> str:
    line = " ".join(command.split())
    return line if len(line) <= 80 else line[:77] + "..."


def _reason(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__

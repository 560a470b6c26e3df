"""Logging in to a device over SSH (for ssh.py): the TCP connection, the key exchange, the host
key decision (recorded, unknown, changed; see _known_hosts) and key authentication."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from mle_cli.settings import Settings
from mle_cli.targets import _known_hosts
from mle_cli.targets.ssh import (
    MAX_PACKET_SIZE,
    WINDOW_SIZE,
    HostKeyChanged,
    HostKeyUnknown,
    SshAuthFailed,
    SshTarget,
    SshUnreachable,
)
from mle_proto.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    import paramiko

__all__ = ["authenticate", "handshake", "project_known_hosts", "reason", "verify_host_key"]

log = logging.getLogger("mle_cli.targets.ssh")
_DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


def project_known_hosts(settings: Settings) -> Path:
    """The project's known_hosts file (trust on first use records here)."""
    return settings.mle_dir / "known_hosts"


def handshake(
    target: SshTarget, recorded: list[_known_hosts.KnownKey], timeout: float
) -> paramiko.Transport:
    """Connect the socket and run the key exchange, preferring the already known key types."""
    import paramiko

    sock = _dial(target, timeout)
    transport = paramiko.Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
    )
    transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = timeout
    options = transport.get_security_options()
    options.key_types = _known_hosts.preferred_algorithms(recorded, options.key_types)
    try:
        transport.start_client(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        raise SshUnreachable(f"{target.where}: the SSH handshake failed: {reason(exc)}") from None
    if not transport.initial_kex_done:  # start_client returns quietly at its timeout
        transport.close()
        raise SshUnreachable(
            f"{target.where}: the SSH handshake failed: no answer within {timeout:g}s"
        )
    return transport


def _dial(target: SshTarget, timeout: float) -> socket.socket:
    """A TCP connection to the SSH port, or one line saying why there is none."""
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except socket.gaierror as exc:
        raise SshUnreachable(
            f"{target.where}: cannot resolve {target.host}: {exc.strerror or exc}"
        ) from None
    except TimeoutError:
        why = f"no answer within {timeout:g}s"
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
    else:
        # SFTP sends many small requests: without this, Nagle and delayed ACKs stall each file
        # about 40 ms (measured: 12 wheels at 60 MB/s, 164 MB/s with it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise SshUnreachable(
        f"{target.where}: cannot connect over SSH: {why} (is the device on and sshd running?)"
    )


def verify_host_key(
    transport: paramiko.Transport,
    target: SshTarget,
    recorded: list[_known_hosts.KnownKey],
    settings: Settings,
    trust_new: bool,
) -> None:
    """Accept a recorded key; refuse a changed or revoked one always, an unknown one unless
    trusting new keys (then record it)."""
    key = transport.get_remote_server_key()
    key_type, blob = key.get_name(), key.asbytes()
    shown = _known_hosts.fingerprint(key_type, blob)
    verdict = _known_hosts.decide(key_type, blob, recorded)
    old = verdict.recorded
    if verdict.outcome == "known":
        log.debug("%s: host key %s known from %s", target.where, shown, old and old.where)
        return
    if verdict.outcome == "revoked" and old is not None:
        raise HostKeyChanged(
            f"WARNING: the host key of {target.where} is REVOKED: {shown} is marked @revoked "
            f"in {_shown(old.file, settings)}:{old.line}: refusing to connect"
        )
    if verdict.outcome == "changed" and old is not None:
        raise HostKeyChanged(
            f"WARNING: the host key of {target.where} has CHANGED: recorded "
            f"{_known_hosts.fingerprint(old.key_type, old.blob)}, presented {shown}: this may be "
            "an attack; if the device was reinstalled, remove the old key from "
            f"{_shown(old.file, settings)}:{old.line}"
        )
    if not trust_new:
        raise HostKeyUnknown(
            f"{target.where}: unknown host key {shown}; if that is the device's key, re-run with "
            "--trust-new-host-key (it will be recorded in .mle/known_hosts)"
        )
    path = project_known_hosts(settings)
    try:
        _known_hosts.record_key(path, target.host, target.port, key_type, blob)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FailedPrecondition(f"cannot record the host key in {path}: {reason}") from None
    log.info("%s: host key %s recorded in .mle/known_hosts", target.where, shown)


def authenticate(transport: paramiko.Transport, target: SshTarget) -> None:
    """Log in with the first key the server accepts, or say which were refused."""
    agent = _agent()
    try:
        tried: list[str] = []
        for label, key in _candidate_keys(target, agent):
            tried.append(label)
            if _try_key(transport, target, key):
                return
    finally:
        if agent is not None:
            agent.close()
    raise SshAuthFailed(_refusal(target, tried))


def _agent() -> paramiko.Agent | None:
    """The SSH agent at SSH_AUTH_SOCK, or None (none set, a stale socket, an agent that fails)."""
    import paramiko

    try:
        return paramiko.Agent()
    except (paramiko.SSHException, OSError):
        log.debug("ssh-agent at SSH_AUTH_SOCK does not answer: not used")
        return None


def _candidate_keys(
    target: SshTarget, agent: paramiko.Agent | None
) -> Iterator[tuple[str, paramiko.PKey]]:
    """The target's key file (the agent's keys stand in when it is encrypted), else the
    agent's keys and the default key files."""
    agent_keys = [(f"ssh-agent key {_fingerprint(key)}", key) for key in _agent_keys(agent)]
    if target.key is not None:
        path = target.key.expanduser()
        key = _load_key(target, path, required=True)
        if key is not None:
            yield _tilde(path), key
            return
        yield from agent_keys
        raise SshAuthFailed(
            f"{target.name}: the SSH key {_tilde(path)} is protected by a passphrase and "
            f"ssh-agent offered no key {target.login} may use: use ssh-agent "
            f"(`ssh-add {_tilde(path)}`)"
        )
    yield from agent_keys
    for name in _DEFAULT_KEYS:
        path = Path.home() / ".ssh" / name
        default = _load_key(target, path, required=False) if path.exists() else None
        if default is not None:
            yield _tilde(path), default


def _agent_keys(agent: paramiko.Agent | None) -> tuple[paramiko.AgentKey, ...]:
    import paramiko

    if agent is None:
        return ()
    try:
        return agent.get_keys()
    except (paramiko.SSHException, OSError):
        return ()


def _load_key(target: SshTarget, path: Path, *, required: bool) -> paramiko.PKey | None:
    """A private key file, or None when it is encrypted (or, when not required, unusable)."""
    import paramiko

    where = target.source or "its targets/ file"
    try:
        return paramiko.PKey.from_path(path)
    except (TypeError, paramiko.PasswordRequiredException):  # cryptography: no password given
        return None
    except FileNotFoundError:
        if required:
            raise InvalidInput(
                f"{target.name}: the SSH key {_tilde(path)} does not exist (check ssh.key in "
                f"{where})"
            ) from None
    except (ValueError, OSError, paramiko.SSHException) as exc:
        if required:  # the exception's text is not shown: it could quote the file
            raise InvalidInput(
                f"{target.name}: {_tilde(path)} is not a private key paramiko can read "
                f"({type(exc).__name__}; ed25519, ecdsa and rsa keys are supported)"
            ) from None
    log.debug("%s: skipping the unusable key file %s", target.name, _tilde(path))
    return None


def _try_key(transport: paramiko.Transport, target: SshTarget, key: paramiko.PKey) -> bool:
    """Offer one key; True once logged in."""
    import paramiko

    try:
        transport.auth_publickey(target.login, key)
    except paramiko.BadAuthenticationType as exc:
        raise SshAuthFailed(
            f"{target.where}: the SSH server accepts no keys for {target.login} (only "
            f"{', '.join(exc.allowed_types) or 'nothing'}); mle logs in with keys only"
        ) from None
    except paramiko.AuthenticationException:
        log.debug("%s: key %s refused", target.where, _fingerprint(key))
        return False
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SshUnreachable(
            f"{target.where}: the SSH connection broke while logging in: {reason(exc)}"
        ) from None
    return transport.is_authenticated()


def _refusal(target: SshTarget, tried: list[str]) -> str:
    where = target.source or "its targets/ file"
    if not tried:
        return (
            f"{target.name}: no SSH key to log in as {target.login} with: ssh-agent has none and "
            f"there is no ~/.ssh/id_ed25519, id_ecdsa or id_rsa (set ssh.key in {where})"
        )
    keys = f"key {tried[0]}" if len(tried) == 1 else f"keys {', '.join(tried)}"
    return (
        f"{target.name}: the SSH server refused user {target.login} with {keys} (check "
        f"ssh.user and ssh.key in {where})"
    )


def reason(exc: BaseException) -> str:
    """A foreign exception's text, or its class name when it has none."""
    return str(exc).strip() or type(exc).__name__


def _fingerprint(key: paramiko.PKey) -> str:
    return _known_hosts.fingerprint(key.get_name(), key.asbytes())


def _tilde(path: Path) -> str:
    """A path under the home directory as `~/...`."""
    with contextlib.suppress(ValueError):
        return "~/" + str(path.relative_to(Path.home()))
    return str(path)


def _shown(path: Path, settings: Settings) -> str:
    """A known_hosts file as a user finds it: project-relative, or under `~`."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(settings.project_dir))
    return _tilde(path)

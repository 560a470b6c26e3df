"""What install learns of a device besides its facts: the login (home, uid), the install
directory made absolute, what an earlier install left there, and whether the agent certificate
found there is still good for this project.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mle_cli.targets import _service
from mle_cli.targets._service import SUPERVISE, SYSTEMD_SYSTEM, SYSTEMD_USER, Layout
from mle_proto.errors import FailedPrecondition

if TYPE_CHECKING:
    from mle_cli.targets.ssh import CommandResult, SshSession

__all__ = [
    "Installed",
    "Login",
    "certificate_usable",
    "find_installed",
    "install_dir",
    "last",
    "login",
]

RENEW_BEFORE = datetime.timedelta(days=30)  # a certificate closer to expiry is replaced


@dataclass(frozen=True)
class Login:
    """Who install runs as on the device."""

    home: str
    uid: int


@dataclass(frozen=True)
class Installed:
    """What an earlier install left: the directory, the services that run it, its version."""

    present: bool
    kinds: tuple[str, ...] = ()  # services found (the recorded one first)
    version: str = ""
    owner: str = ""  # the target install.json names; "" = no install.json (not ours to remove)


def login(session: SshSession, name: str) -> Login:
    """The login's home and uid."""
    done = session.run('printf "%s\\n" "$HOME" "$(id -u)"')
    lines = done.stdout.splitlines()
    if done.exit_code != 0 or len(lines) < 2 or not lines[0].startswith("/"):
        raise FailedPrecondition(f"{name}: cannot tell the login's home directory: {last(done)}")
    try:
        return Login(lines[0].rstrip("/") or "/", int(lines[1]))
    except ValueError:
        raise FailedPrecondition(f"{name}: cannot tell the login's user id") from None


def install_dir(configured: str, home: str) -> str:
    """The install directory as an absolute path (`~/` is the login's home)."""
    if configured.startswith("~/"):
        return f"{home.rstrip('/')}/{configured[2:].rstrip('/')}"
    return configured.rstrip("/")


def find_installed(session: SshSession, layout: Layout, user: Login) -> Installed:
    """What is installed at the layout: the directory, its recorded service and the target's
    unit when its ExecStart is exactly this install's (a whole line, not a substring: another
    directory's path may contain this one's), its version and the target it records."""
    root = shlex.quote(layout.root)
    exec_line = shlex.quote(_service.exec_start(layout))
    kind = SYSTEMD_SYSTEM if user.uid == 0 else SYSTEMD_USER
    unit = shlex.quote(_service.unit_path(kind, layout, user.home))
    probe = (
        f"test -d {root} && echo present; "
        f"test -f {shlex.quote(layout.supervisor)} && echo {SUPERVISE}; "
        f"grep -qFx -- {exec_line} {unit} 2>/dev/null && echo {kind}; "
        f"cat {shlex.quote(layout.record)} 2>/dev/null; true"
    )
    out = session.run(probe).stdout
    words = out.split("\n")
    found = [w for w in words if w in (SUPERVISE, SYSTEMD_SYSTEM, SYSTEMD_USER)]
    record = _record("\n".join(w for w in words if w not in found and w != "present"))
    recorded = str(record.get("service", ""))
    kinds = sorted(set(found), key=lambda k: (k != recorded, k))
    version, owner = str(record.get("version", "")), str(record.get("name", ""))
    return Installed("present" in words, tuple(kinds), version, owner)


def certificate_usable(cert_pem: bytes, ca_pem: bytes, name: str, host: str) -> bool:
    """Whether an agent certificate is from this CA, for `name` and `host`, and not expiring."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    dns = {n.lower() for n in names.get_values_for_type(x509.DNSName)}
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    try:
        host_ok = str(ipaddress.ip_address(host)) in ips
    except ValueError:
        host_ok = host.lower() in dns
    now = datetime.datetime.now(datetime.UTC)
    fresh = cert.not_valid_after_utc - now > RENEW_BEFORE and cert.not_valid_before_utc <= now
    return name.lower() in dns and host_ok and fresh


def last(done: CommandResult) -> str:
    """The last line a failed command said (stderr first), for a one-line error; control
    characters escaped (the device's text goes to the operator's terminal)."""
    from mle_cli.render import printable

    for text in (done.stderr, done.stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return printable(lines[-1][:300])
    return f"exit status {done.exit_code}"


def _record(text: str) -> dict[str, object]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}

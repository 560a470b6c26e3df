"""OpenSSH known_hosts files, read and appended without paramiko: the host key decision is pure.

A line is `[@marker] PATTERNS KEYTYPE BASE64 [comment]`. PATTERNS are comma-separated names with
`*`/`?` wildcards and `!` negations, or one hashed name `|1|SALT|HMAC-SHA1(name)`; a non-22 port
is written `[host]:port`. `@revoked` keys are refused; `@cert-authority` lines are skipped (host
certificates are not supported).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mle_proto.errors import FailedPrecondition

__all__ = [
    "KnownKey",
    "Verdict",
    "decide",
    "fingerprint",
    "host_pattern",
    "known_keys",
    "preferred_algorithms",
    "record_key",
]

_HASHED = "|1|"
# A host key type and the signature algorithms that prove it (an RSA key signs with SHA-2).
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}
_WILDCARDS = {"*": ".*", "?": "."}


@dataclass(frozen=True)
class KnownKey:
    """A key recorded for a host, and where (for the changed-key message)."""

    file: Path
    line: int
    key_type: str
    blob: bytes
    revoked: bool = False

    @property
    def where(self) -> str:
        """`FILE:LINE`."""
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Verdict:
    """What the recorded keys say of a presented one: known, unknown, changed or revoked."""

    outcome: Literal["known", "unknown", "changed", "revoked"]
    recorded: KnownKey | None = None  # the matching (known, revoked) or conflicting (changed) key


def host_pattern(host: str, port: int) -> str:
    """The name known_hosts files use: `host`, or `[host]:port` for another port than 22."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key_type: str, blob: bytes) -> str:
    """`ssh-ed25519 SHA256:...`, as `ssh-keygen -l` shows a key."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{key_type} SHA256:{digest}"


def known_keys(files: Iterable[Path], host: str, port: int) -> list[KnownKey]:
    """Every key recorded for the host in these files, in file and line order."""
    name = host_pattern(host.lower(), port)
    found: list[KnownKey] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # a directory, no permission: refuse rather than guess the key
            reason = exc.strerror or type(exc).__name__
            raise FailedPrecondition(f"cannot read the known_hosts file {path}: {reason}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            key = _parse_line(line, name, path, number)
            if key is not None:
                found.append(key)
    return found


def decide(key_type: str, blob: bytes, recorded: Sequence[KnownKey]) -> Verdict:
    """Judge a presented key: revoked beats known; any other recorded key means changed."""
    for key in recorded:
        if key.revoked and key.blob == blob:
            return Verdict("revoked", key)
    plain = [key for key in recorded if not key.revoked]
    for key in plain:
        if key.key_type == key_type and key.blob == blob:
            return Verdict("known", key)
    if not plain:
        return Verdict("unknown")
    same_type = [key for key in plain if key.key_type == key_type]
    return Verdict("changed", (same_type or plain)[0])


def preferred_algorithms(recorded: Sequence[KnownKey], offered: Sequence[str]) -> list[str]:
    """Host key algorithms with the recorded keys' types first (as OpenSSH orders them), so the
    host presents the key already known rather than another type of its keys."""
    first: list[str] = []
    for key in recorded:
        for algorithm in _ALGORITHMS.get(key.key_type, (key.key_type,)):
            if algorithm in offered and algorithm not in first and not key.revoked:
                first.append(algorithm)
    return first + [algorithm for algorithm in offered if algorithm not in first]


def record_key(path: Path, host: str, port: int, key_type: str, blob: bytes) -> None:
    """Append a key line to a known_hosts file (created 0600, its directory too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{host_pattern(host, port)} {key_type} {base64.b64encode(blob).decode()}\n"
    if path.exists() and path.read_bytes()[-1:] not in (b"", b"\n"):
        line = "\n" + line  # a file edited by hand may lack its last newline
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as out:
        os.fchmod(fd, 0o600)  # an existing file made by hand gets the same mode
        out.write(line)


def _parse_line(line: str, name: str, path: Path, number: int) -> KnownKey | None:
    """The key on this line when it applies to `name`, else None (comments, others, garbage)."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else ""
    if marker not in ("", "@revoked") or len(fields) < 3:
        return None
    patterns, key_type, data = fields[:3]
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not _matches(patterns, name):
        return None
    return KnownKey(path, number, key_type, blob, revoked=marker == "@revoked")


def _matches(patterns: str, name: str) -> bool:
    """Whether a line's host field names `name` (a negated match excludes the line)."""
    if patterns.startswith(_HASHED):
        return _hashed_matches(patterns, name)
    hit = False
    for pattern in patterns.lower().split(","):
        if pattern.startswith("!"):
            if _wildcard(pattern[1:]).fullmatch(name):
                return False
        elif _wildcard(pattern).fullmatch(name):
            hit = True
    return hit


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns know only `*` and `?` (brackets are literal: `[host]:port`)."""
    return re.compile("".join(_WILDCARDS.get(char, re.escape(char)) for char in pattern))


def _hashed_matches(field: str, name: str) -> bool:
    """`|1|SALT|HASH`: HASH is HMAC-SHA1 of the name keyed with SALT (both base64)."""
    parts = field[len(_HASHED) :].split("|")
    if len(parts) != 2:
        return False
    try:
        salt, expected = (base64.b64decode(part, validate=True) for part in parts)
    except (binascii.Error, ValueError):
        return False
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)

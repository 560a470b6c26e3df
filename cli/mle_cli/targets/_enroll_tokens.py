"""Enrollment tokens, the operator's record of them: `.mle/pki/tokens.json` (0600) holds each
token's id, name, expiry and use, and only the SHA-256 of its secret.

A token is `<id>.<secret>`: the id names it in messages and records, the secret (about 124 bits)
is shown once, in the command printed for the device. Changes happen under a lock file, so two
`mle` processes never redeem one token twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import string
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mle_cli.targets import pki
from mle_proto.errors import MleError, Unauthenticated

__all__ = ["TOKEN", "NewToken", "TokenStore", "WrongSecret", "check_token", "when"]

TOKEN = r"([a-z0-9]{6})\.([a-z0-9]{16,64})"  # noqa: S105 - the shape, not a token
_ALPHABET = string.ascii_lowercase + string.digits
_ID_LEN, _SECRET_LEN = 6, 24
_KEEP = 7 * 86400.0  # records of tokens that expired longer ago are dropped
_LOCK_TIMEOUT = 30.0

Record = dict[str, Any]


class WrongSecret(Unauthenticated):
    """A known token's id with the wrong secret: a guess, the only refusal a session counts."""


@dataclass(frozen=True)
class NewToken:
    """A token just made: its id, the whole token (shown once) and when it expires."""

    id: str
    token: str = field(repr=False)
    expires: float


class TokenStore:
    """The tokens of one project."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "tokens.json"
        self.lock = directory / "tokens.lock"

    def find(self, token_id: str) -> Record | None:
        """The record of a token, read without the lock."""
        return _find(self.read(), token_id)

    def add(self, name: str, ttl: float) -> NewToken:
        """Make a token for `name`, valid for `ttl` seconds from now."""
        secret = "".join(secrets.choice(_ALPHABET) for _ in range(_SECRET_LEN))
        with self._update() as records:
            taken = {r.get("id") for r in records}
            token_id = ""
            while not token_id or token_id in taken:
                token_id = "".join(secrets.choice(_ALPHABET) for _ in range(_ID_LEN))
            now = time.time()
            records.append({"id": token_id, "name": name, "created_at": now,
                            "expires_at": now + ttl, "secret_sha256": _digest(secret)})  # fmt: skip
        return NewToken(token_id, f"{token_id}.{secret}", now + ttl)

    def redeem(self, token_id: str, secret: str, name: str, peer: str, fingerprint: str) -> None:
        """Mark the token used by `peer` (Unauthenticated unless it may be, checked again here
        under the lock: another endpoint may have redeemed it meanwhile)."""
        with self._update() as records:
            record = _find(records, token_id)
            check_token(record, token_id, secret, name, time.time())
            assert record is not None  # check_token refuses a missing one
            record.update(used_at=time.time(), used_by=peer, fingerprint=fingerprint)

    def revoke(self, token_id: str) -> None:
        """Revoke a token that is still usable."""
        with self._update() as records:
            record = _find(records, token_id)
            if record and not record.get("used_at") and time.time() < record["expires_at"]:
                record["revoked_at"] = time.time()

    def read(self) -> list[Record]:
        """Every record; MleError when the file is damaged."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise MleError(
                f"cannot read {self.path}: {getattr(exc, 'strerror', None) or 'not JSON'}",
                hint="remove it: enrollment tokens not yet used stop working",
            ) from None
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, dict) for t in tokens):
            raise MleError(f"{self.path} is damaged", hint="remove it and make new tokens")
        return tokens

    @contextlib.contextmanager
    def _update(self) -> Iterator[list[Record]]:
        """The records to change in place, written back (0600, atomically) after the block."""
        with pki.lock_file(self.lock):
            records = self.read()
            yield records
            now = time.time()
            kept = [r for r in records if now - float(r.get("expires_at", 0)) < _KEEP]
            text = json.dumps({"version": 1, "tokens": kept}, indent=2) + "\n"
            pki.write_file(self.path, text.encode(), private=True)


def check_token(
    record: Mapping[str, Any] | None, token_id: str, secret: str, name: str, now: float
) -> None:
    """Raise Unauthenticated unless the record accepts this secret for `name` now. The secret
    is checked first: without it, nothing is learnt about the token."""
    if record is None:
        raise Unauthenticated(f"unknown token {token_id}")
    if not hmac.compare_digest(str(record.get("secret_sha256", "")), _digest(secret)):
        raise WrongSecret(f"token {token_id} does not match (wrong secret)")
    if record.get("used_at"):
        raise Unauthenticated(
            f"token {token_id} was already used at {when(record['used_at'])} by "
            f"{record.get('used_by', 'an agent')}"
        )
    if record.get("revoked_at"):
        raise Unauthenticated(
            f"token {token_id} was revoked at {when(record['revoked_at'])} (its "
            "mle agent enroll-token stopped)"
        )
    if now >= record["expires_at"]:
        raise Unauthenticated(f"token {token_id} expired at {when(record['expires_at'])}")
    if name != record["name"]:
        raise Unauthenticated(f"token {token_id} is for {record['name']}, not {name}")


def when(timestamp: float) -> str:
    """A time as messages show it (UTC: the device and the operator may differ)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _find(records: list[Record], token_id: str) -> Record | None:
    return next((r for r in records if r.get("id") == token_id), None)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()

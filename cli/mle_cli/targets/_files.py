"""Files of the operator's trust state (.mle/pki, tokens, known hosts): atomic writes and locks."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mle_proto.errors import MleError
from mle_proto.files import write_atomic

__all__ = ["lock_file", "write_file"]

_LOCK_TIMEOUT = 30.0


def write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically, 0600 (private) or 0644; one MleError line on failure."""
    try:
        write_atomic(path, data, 0o600 if private else 0o644)
    except OSError as exc:
        raise MleError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def lock_file(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (0600, its directory created 0700) while the block runs;
    give up with one line after a while."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise MleError(f"cannot use {path}: {exc.strerror or exc}") from None
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MleError(f"{path} stays locked by another mle process") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # releases the lock

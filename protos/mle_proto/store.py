"""A content-addressed artifact store on disk, shared by the agent and the operator.

Layout: `<root>/sha256/<first two hex>/<hex>`. A file becomes visible only once its digest is
verified (write to a temporary file in the same directory, then atomic rename), so readers never see
a partial artifact and two writers of the same content cannot corrupt each other.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mle_proto.errors import InvalidInput, NotFound

__all__ = [
    "ArtifactStore",
    "PendingArtifact",
    "check_relative_path",
    "file_digest",
    "parse_digest",
    "tune_allocator",
]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
CHUNK = 1024 * 1024
# glibc's malloc gives a freed block of a MiB or more back to the kernel at once, and the next
# chunk's buffer comes back page fault by page fault. Every chunk of a transfer passes through
# several such buffers (gRPC's, the message's, the bytes'): a 256 MB Get took 40-75 thousand page
# faults and a quarter of its CPU. Blocks under 4 MiB stay on the heap, and each malloc arena
# keeps up to 8 MiB of free heap mapped: an agent's resident memory after transfers is ~20 MB
# higher (bench/RESULTS.md, fleet); with less kept mapped most of the faults come back.
_MMAP_THRESHOLD = 4 * 1024 * 1024
_TRIM_THRESHOLD = 8 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def parse_digest(digest: str) -> str:
    """Return the hex part of a `sha256:<hex>` digest, or raise InvalidInput."""
    match = _DIGEST.fullmatch(digest)
    if not match:
        raise InvalidInput(f"not a sha256 digest: {digest[:80]!r}")
    return match.group(1)


@functools.cache
def tune_allocator() -> bool:
    """Keep transfer-sized buffers on the heap (see `_MMAP_THRESHOLD`) once per process; False
    where that is not glibc, or the environment already tunes malloc."""
    import ctypes

    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS; musl has a no-op stub)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def check_relative_path(path: str) -> PurePosixPath:
    """Validate a work-dir-relative path: not empty, not absolute, no `..`, no NUL."""
    if not path or "\x00" in path or "\\" in path:
        raise InvalidInput(f"invalid path {path[:80]!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or pure == PurePosixPath("."):
        raise InvalidInput(f"path {path[:80]!r} escapes the work dir")
    return pure


def file_digest(path: Path) -> tuple[str, int]:
    """Hash a file; return (digest, size)."""
    sha = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return f"sha256:{sha.hexdigest()}", size


class ArtifactStore:
    """Content-addressed files under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: str) -> Path:
        """Where the artifact with this digest lives (whether or not it exists)."""
        hexd = parse_digest(digest)
        return self.root / "sha256" / hexd[:2] / hexd

    def size(self, digest: str) -> int | None:
        """The artifact's size, or None when absent."""
        try:
            return self.path_of(digest).stat().st_size
        except FileNotFoundError:
            return None

    def has(self, digest: str) -> bool:
        """Whether the artifact is present."""
        return self.size(digest) is not None

    def open(self, digest: str) -> BinaryIO:
        """Open a present artifact for reading."""
        try:
            return self.path_of(digest).open("rb")
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in the store") from None

    def writer(self, digest: str | None = None) -> PendingArtifact:
        """A pending artifact; `commit()` verifies the digest (when given) and publishes it."""
        if digest is not None:
            parse_digest(digest)
        return PendingArtifact(self, digest)

    def put_file(self, src: Path) -> tuple[str, int]:
        """Copy a file into the store (hashing as it copies); return (digest, size)."""
        with src.open("rb") as f, self.writer() as pending:
            while chunk := f.read(CHUNK):
                pending.write(chunk)
            return pending.commit()

    def put_fileobj(self, src: BinaryIO) -> tuple[str, int]:
        """Copy an open binary file (from its position) into the store; return (digest, size)."""
        with self.writer() as pending:
            while chunk := src.read(CHUNK):
                pending.write(chunk)
            return pending.commit()

    def materialize(self, digest: str, dest: Path) -> None:
        """Copy an artifact to dest, never linking, so a step cannot alter the store."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self.path_of(digest), dest)
        except FileNotFoundError:
            raise NotFound(f"artifact {digest} is not in the store") from None

    def iter_chunks(self, digest: str, offset: int = 0) -> Iterator[bytes]:
        """Read an artifact in chunks from offset."""
        with self.open(digest) as f:
            f.seek(offset)
            while chunk := f.read(CHUNK):
                yield chunk


class PendingArtifact:
    """An artifact being written: a temp file hashed as it grows."""

    def __init__(self, store: ArtifactStore, expected: str | None) -> None:
        self._store = store
        self._expected = expected
        self._sha = hashlib.sha256()
        self.size = 0
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=store.root)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> PendingArtifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        """Append data."""
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def commit(self) -> tuple[str, int]:
        """Verify and publish; return (digest, size). Raises InvalidInput on a digest mismatch."""
        self._file.close()
        digest = f"sha256:{self._sha.hexdigest()}"
        if self._expected is not None and digest != self._expected:
            self.abort()
            raise InvalidInput(f"digest mismatch: expected {self._expected}, received {digest}")
        final = self._store.path_of(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, final)
        return digest, self.size

    def abort(self) -> None:
        """Discard the temp file (no-op after commit)."""
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

"""Work dirs: inputs copied in from the artifact store, declared outputs hashed back into it.

Both run in a worker thread (they copy and hash whole files). Outputs are hostile: a step may leave
a symlink to /etc/passwd or a FIFO where an output should be, so each is opened without following
links and must be a regular file inside the work dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from mle_proto.errors import MleError, NotFound
from mle_proto.store import ArtifactStore, check_relative_path
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["OutputError", "StagingError", "collect_outputs", "prepare_work_dir", "remove_work_dir"]


class StagingError(MleError):
    """The work dir could not be prepared; the task fails with this message."""


class OutputError(MleError):
    """A declared output is missing or unusable; the task fails with this message."""


def prepare_work_dir(work_dir: Path, inputs: Iterable[pb.InputFile], store: ArtifactStore) -> None:
    """Create a fresh work dir and copy each input into it (never linking)."""
    remove_work_dir(work_dir)
    work_dir.mkdir(parents=True, mode=0o700)
    for item in inputs:
        dest = work_dir / check_relative_path(item.path)
        try:
            store.materialize(item.digest, dest)
        except NotFound:
            raise StagingError(
                f"input {item.path}: artifact {item.digest} is not on this agent"
            ) from None
        except OSError as exc:
            raise StagingError(f"input {item.path}: cannot stage: {exc.strerror}") from None


def remove_work_dir(work_dir: Path) -> None:
    """Delete a work dir and everything in it (links are removed, never followed)."""
    if work_dir.is_symlink() or work_dir.is_file():
        work_dir.unlink()
    elif work_dir.exists():
        shutil.rmtree(work_dir)


def collect_outputs(
    work_dir: Path, outputs: Iterable[str], store: ArtifactStore
) -> list[pb.OutputFile]:
    """Hash each declared output into the store; raise OutputError for the first bad one."""
    return [_collect(work_dir, path, store) for path in outputs]


def _collect(work_dir: Path, path: str, store: ArtifactStore) -> pb.OutputFile:
    parts = check_relative_path(path).parts
    current = work_dir
    for part in parts[:-1]:
        current = current / part
        _check_directory(current, path)
    fd = _open_regular(current / parts[-1], path)
    try:
        with os.fdopen(fd, "rb") as f:
            digest, size = store.put_fileobj(f)
    except OSError as exc:
        raise OutputError(f"output '{path}' cannot be stored: {exc.strerror}") from None
    return pb.OutputFile(path=path, digest=digest, size=size)


def _check_directory(directory: Path, path: str) -> None:
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        raise OutputError(f"declared output '{path}' was not produced") from None
    if stat.S_ISLNK(mode):
        raise OutputError(f"output '{path}' goes through a symlink out of the work dir")
    if not stat.S_ISDIR(mode):
        raise OutputError(f"declared output '{path}' was not produced")


def _open_regular(file: Path, path: str) -> int:
    # O_NOFOLLOW: a symlink fails with ELOOP instead of being read; O_NONBLOCK: a FIFO cannot block.
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OutputError(f"declared output '{path}' was not produced") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"output '{path}' is a symlink, not a regular file") from None
        raise OutputError(f"output '{path}' cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"output '{path}' is not a regular file")
    os.set_blocking(fd, True)
    return fd

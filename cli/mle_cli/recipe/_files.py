"""The `files:` section: project files shipped to every step's work dir, content-addressed."""

from __future__ import annotations

import stat
from pathlib import Path, PurePosixPath

from mle_cli.recipe._fields import text_list
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.recipe.plan import ShippedFile
from mle_proto.errors import InvalidInput
from mle_proto.store import check_relative_path, file_digest

__all__ = ["ship_files"]


def ship_files(doc: Document, value: object) -> tuple[ShippedFile, ...]:
    """Every file the globs match under the recipe's directory, hashed, sorted by path."""
    root = doc.source.parent
    real_root = root.resolve()
    shipped: dict[str, ShippedFile] = {}
    for where, pattern in text_list(doc, ("files",), value, "a glob or a list of globs"):
        found = 0
        for match in _glob(doc, where, root, pattern):
            item = _ship(doc, where, root, real_root, match)
            if item is not None:
                shipped[item.path] = item
                found += 1
        if not found:
            raise doc.error(where, f"files pattern {pattern!r} matches no files")
    return tuple(shipped[path] for path in sorted(shipped))


def _glob(doc: Document, where: KeyPath, root: Path, pattern: str) -> list[Path]:
    pure = PurePosixPath(pattern)
    if not pattern.strip() or pure.is_absolute() or ".." in pure.parts:
        message = f"files pattern {pattern!r} must stay inside the recipe's directory"
        raise doc.error(where, message)
    try:
        return sorted(root.glob(pattern))
    except (ValueError, NotImplementedError) as exc:
        raise doc.error(where, f"invalid files pattern {pattern!r}: {exc}") from None
    except OSError as exc:
        raise doc.error(where, f"cannot list files for {pattern!r}: {exc.strerror}") from None


def _ship(
    doc: Document, where: KeyPath, root: Path, real_root: Path, match: Path
) -> ShippedFile | None:
    """One matched file as a ShippedFile; None for a directory."""
    relative = match.relative_to(root).as_posix()
    real = match.resolve()
    if not real.is_relative_to(real_root):
        # Checked on the resolved path, so a symlink (of the file or of a parent) cannot escape.
        raise doc.error(where, f"{relative!r} resolves outside the recipe's directory")
    try:
        mode = real.stat().st_mode
        if stat.S_ISDIR(mode):
            return None
        if stat.S_ISREG(mode):
            digest, size = file_digest(real)
    except OSError as exc:
        raise doc.error(where, f"cannot read {relative!r}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise doc.error(where, f"{relative!r} is not a regular file")
    try:
        check_relative_path(relative)
    except InvalidInput:
        message = f"{relative!r} cannot be shipped: its name is not a portable path"
        raise doc.error(where, message) from None
    return ShippedFile(path=relative, source=real, digest=digest, size=size)

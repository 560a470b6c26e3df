"""The `files:` section: project files shipped to every step's work dir, content-addressed.

Never shipped: .mle/, .git/; globs skip dot-names unless written (`.env`); `**` skips __pycache__
A recipe ships at most MAX_FILES files and MAX_FILES_BYTES in total.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from mle_cli.recipe._fields import text_list
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.recipe.plan import ShippedFile
from mle_proto.errors import InvalidInput
from mle_proto.store import check_relative_path, file_digest

__all__ = ["MAX_FILES", "MAX_FILES_BYTES", "NEVER_SHIPPED", "ship_files"]

MAX_FILES = 1000
MAX_FILES_BYTES = 100 * 1024 * 1024
NEVER_SHIPPED = frozenset({".mle", ".git"})

_WILDCARD = re.compile(r"[*?\[]")
_CACHE_DIR = "__pycache__"
# Why a pattern that matched something still ships nothing, in the order they are told.
_SKIPPED = {
    "internal": "files mle never ships (.mle/, .git/)",
    "hidden": "hidden files (write the leading '.' in the pattern to ship them, e.g. '.env')",
    "cache": "files in __pycache__/ (which '**' skips)",
}


@dataclass(frozen=True)
class _Match:
    where: KeyPath
    source: Path
    size: int


def ship_files(doc: Document, value: object) -> tuple[ShippedFile, ...]:
    """Every file the globs match under the recipe's directory, hashed, sorted by path."""
    root = doc.source.parent
    real_root = root.resolve()
    chosen: dict[str, _Match] = {}
    total = 0
    for where, pattern in text_list(doc, ("files",), value, "a glob or a list of globs"):
        parts = _pattern_parts(doc, where, pattern)
        found = 0
        for path in _glob(doc, where, root, parts, pattern):
            match = _match(doc, where, root, real_root, path)
            if match is None:
                continue
            found += 1
            relative = path.relative_to(root).as_posix()
            if relative not in chosen:
                chosen[relative] = match
                total += match.size
        if not found:
            raise doc.error(where, _no_files(doc, where, root, real_root, parts, pattern))
        _check_limits(doc, where, pattern, len(chosen), total)
    return tuple(_hash(doc, path, chosen[path]) for path in sorted(chosen))


def _pattern_parts(doc: Document, where: KeyPath, pattern: str) -> tuple[str, ...]:
    pure = PurePosixPath(pattern)
    if not pattern.strip() or pure.is_absolute() or ".." in pure.parts:
        message = f"files pattern {pattern!r} must stay inside the recipe's directory"
        raise doc.error(where, message)
    if not pure.parts:
        raise doc.error(where, f"invalid files pattern {pattern!r}: it names no file")
    if any("**" in part and part != "**" for part in pure.parts):
        message = f"invalid files pattern {pattern!r}: '**' can only be a whole path component"
        raise doc.error(where, message)
    return pure.parts


def _glob(
    doc: Document,
    where: KeyPath,
    root: Path,
    parts: tuple[str, ...],
    pattern: str,
    *,
    everything: bool = False,
) -> Iterator[Path]:
    """What the pattern matches, sorted; with everything, also what mle skips (as Path.glob)."""
    try:
        if everything:
            # Only to explain an empty match: lazy, and stopped by the caller.
            yield from _select(root, parts, everything=True)
        else:
            yield from sorted(set(_select(root, parts, everything=False)))
    except OSError as exc:
        raise doc.error(where, f"cannot list files for {pattern!r}: {exc.strerror}") from None


def _select(path: Path, parts: tuple[str, ...], *, everything: bool) -> Iterator[Path]:
    """Paths under the directory path that match parts, one pattern component at a time."""
    if not parts:
        yield path
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        for directory in _tree(path, everything=everything):
            yield from _select(directory, rest, everything=everything)
        return
    if _WILDCARD.search(part):
        names = [name for name in _names(path) if fnmatchcase(name, part)]
        if not everything:
            names = [n for n in names if not _internal(n) and _shown(n, part)]
    else:
        names = [part] if everything or not _internal(part) else []
    for name in names:
        child = path / name
        # Like Path.glob: inner components must be directories (symlinks to them included).
        if child.is_dir() if rest else child.exists():
            yield from _select(child, rest, everything=everything)


def _tree(path: Path, *, everything: bool) -> Iterator[Path]:
    """path and every directory below it, for `**`: symlinks are not followed (as Path.glob)."""
    yield path
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if everything or (not entry.name.startswith(".") and entry.name != _CACHE_DIR):
            yield from _tree(path / entry.name, everything=everything)


def _names(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return []


def _shown(name: str, part: str) -> bool:
    """A wildcard matches a leading '.' only when the pattern component starts with one."""
    return not name.startswith(".") or part.startswith(".")


def _internal(name: str) -> bool:
    return name.casefold() in NEVER_SHIPPED


def _match(doc: Document, where: KeyPath, root: Path, real_root: Path, path: Path) -> _Match | None:
    """One matched path as a file to ship; None for a directory or a file mle never ships."""
    relative = path.relative_to(root).as_posix()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        # Checked on the resolved path, so a symlink (of the file or of a parent) cannot escape.
        raise doc.error(where, f"{relative!r} resolves outside the recipe's directory")
    if any(_internal(part) for part in (*PurePosixPath(relative).parts, *_inside(real, real_root))):
        return None  # under .mle/ or .git/, or a symlink into them
    try:
        info = real.stat()
    except OSError as exc:
        raise doc.error(where, f"cannot read {relative!r}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        return None
    if not stat.S_ISREG(info.st_mode):
        raise doc.error(where, f"{relative!r} is not a regular file")
    try:
        check_relative_path(relative)
    except InvalidInput:
        message = f"{relative!r} cannot be shipped: its name is not a portable path"
        raise doc.error(where, message) from None
    return _Match(where, real, info.st_size)


def _no_files(
    doc: Document,
    where: KeyPath,
    root: Path,
    real_root: Path,
    parts: tuple[str, ...],
    pattern: str,
) -> str:
    """Why a pattern ships nothing: it matches no file, or only files mle skips."""
    reasons: set[str] = set()
    for path in _glob(doc, where, root, parts, pattern, everything=True):
        reason = _skip_reason(root, real_root, path)
        if reason is not None:
            reasons.add(reason)
            if len(reasons) == len(_SKIPPED):
                break
    if not reasons:
        return f"files pattern {pattern!r} matches no files"
    told = " and ".join(text for reason, text in _SKIPPED.items() if reason in reasons)
    return f"files pattern {pattern!r} matches only {told}"


def _skip_reason(root: Path, real_root: Path, path: Path) -> str | None:
    """Which rule keeps a matched file from being shipped (None: not a file, or not skipped)."""
    try:
        if not path.is_file():
            return None
        real = path.resolve()
    except OSError:
        return None
    parts = path.relative_to(root).parts
    if any(_internal(part) for part in (*parts, *_inside(real, real_root))):
        return "internal"
    if any(part.startswith(".") for part in parts):
        return "hidden"
    if _CACHE_DIR in parts:
        return "cache"
    return None


def _inside(real: Path, real_root: Path) -> tuple[str, ...]:
    """The parts of a resolved path below the recipe's directory (none if it is outside)."""
    return real.relative_to(real_root).parts if real.is_relative_to(real_root) else ()


def _check_limits(doc: Document, where: KeyPath, pattern: str, count: int, size: int) -> None:
    if count > MAX_FILES:
        message = (
            f"files pattern {pattern!r} brings the files to ship to {count}, over the limit of "
            f"{MAX_FILES}; use a narrower glob"
        )
        raise doc.error(where, message)
    if size > MAX_FILES_BYTES:
        # Rounded up, so a total just over the limit does not read as equal to it.
        mib = math.ceil(size * 10 / (1024 * 1024)) / 10
        message = (
            f"files pattern {pattern!r} brings the files to ship to {mib:.1f} MiB, over the "
            f"limit of {MAX_FILES_BYTES // (1024 * 1024)} MiB; use a narrower glob"
        )
        raise doc.error(where, message)


def _hash(doc: Document, relative: str, match: _Match) -> ShippedFile:
    try:
        digest, size = file_digest(match.source)
    except OSError as exc:
        raise doc.error(match.where, f"cannot read {relative!r}: {exc.strerror}") from None
    return ShippedFile(path=relative, source=match.source, digest=digest, size=size)

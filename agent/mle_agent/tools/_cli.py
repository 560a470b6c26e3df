"""What every model tool's command line shares: argparse without usage dumps, the one `error:`
line and its exit code, the metrics file, sizes as `mle` shows them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from mle_proto.errors import FailedPrecondition, InvalidInput, MleError, UsageError

__all__ = [
    "ToolParser",
    "exit_code",
    "first_line",
    "not_a_file",
    "run_tool",
    "size_text",
    "write_json",
]


class ToolParser(argparse.ArgumentParser):
    """argparse reporting a bad command line as one UsageError line instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def run_tool(body: Callable[[], int]) -> int:
    """Run a tool's body; an MleError becomes one `error:` line on stderr and its exit code:
    2 for bad input, 3 when something must be installed first, 1 otherwise."""
    try:
        return body()
    except MleError as exc:
        sys.stderr.write(f"error: {' '.join(exc.message.split())}\n")
        return exit_code(exc)


def exit_code(exc: MleError) -> int:
    """A tool's exit code for an error: 2 bad input, 3 something to install, 1 otherwise."""
    if isinstance(exc, FailedPrecondition):
        return 3
    return 2 if isinstance(exc, InvalidInput | UsageError) else 1


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write a tool's figures (its --metrics file); InvalidInput when the path is unusable."""
    try:
        path.write_text(json.dumps(document, indent=2) + "\n")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot write the metrics file ({exc.strerror})") from None


def size_text(size: int) -> str:
    """1.2 MB, 3.7 kB, 12 B (decimal units, as `mle` shows sizes)."""
    value = float(size)
    for unit in ("B", "kB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def first_line(exc: BaseException) -> str:
    """The first non-blank line of a foreign exception (runtimes raise pages of text)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def not_a_file(path: Path, what: str) -> InvalidInput:
    """The error for a path that is not a readable file: missing, a directory, or a device."""
    if not path.exists():
        return InvalidInput(f"{path}: no such {what} file")
    kind = "a directory" if path.is_dir() else "not a regular file"
    article = "an" if what[:1] in "aeiou" else "a"
    return InvalidInput(f"{path} is {kind}, not {article} {what} file")

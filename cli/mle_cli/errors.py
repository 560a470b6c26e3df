"""Operator-side errors, extending the shared tree in `mle_proto.errors`.

MleError (mle_proto.errors)
├── ... shared classes (UsageError, NotFound, AgentUnavailable, ...)
├── RecipeError        exit 3   a recipe that does not compile, located at file:line:col
└── RunFailed          exit 10  a run ended with a failed step
"""

from __future__ import annotations

import os
from pathlib import Path

from mle_proto.errors import InvalidInput, MleError

__all__ = ["RecipeError", "RunFailed", "debug_log_path"]


class RecipeError(InvalidInput):
    """A recipe that does not compile or render; the message points at file:line:col."""

    exit_code = 3

    def __init__(
        self,
        message: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        col: int | None = None,
        key: str = "",
        suggestion: str = "",
    ) -> None:
        where = str(file) if file is not None else ""
        if where and line is not None:
            where += f":{line}" + (f":{col}" if col is not None else "")
        parts = [p for p in (where, key) if p]
        text = ": ".join([*parts, message])
        if suggestion:
            text += f" (did you mean {suggestion!r}?)"
        super().__init__(text)
        self.file, self.line, self.col, self.key = file, line, col, key


class RunFailed(MleError):
    """A run ended with a failed or cancelled step."""

    exit_code = 10


def debug_log_path() -> Path:
    """Where tracebacks of unexpected errors are written."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mle" / "debug.log"

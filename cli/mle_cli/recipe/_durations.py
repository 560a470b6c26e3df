"""Durations as written in recipes: `90s`, `30m`, `2h`, `500ms`, `1h30m`, or bare seconds."""

from __future__ import annotations

import math
import re

from mle_cli.errors import RecipeError

__all__ = ["duration_problem", "parse_duration", "to_seconds"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"\d+(?:\.\d+)?"
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
_COMPOUND = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_BARE = re.compile(_NUMBER)


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration (`90s`, `30m`, `2h`, `500ms`, `1h30m`, `1.5h`, or bare seconds)."""
    seconds = to_seconds(text)
    if seconds is None:
        raise RecipeError(duration_problem(text))
    return seconds


def duration_problem(text: str | int | float) -> str:
    """The message for a value that is not a duration."""
    return f"invalid duration '{text}' (use e.g. 90s, 30m, 2h)"


def to_seconds(text: object) -> float | None:
    """Seconds in a duration, or None when it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        try:
            value = float(text)
        except OverflowError:
            return None
        return value if math.isfinite(value) and value >= 0 else None
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    if _BARE.fullmatch(stripped):
        return float(stripped)
    if not _COMPOUND.fullmatch(stripped):
        return None
    total = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(stripped))
    return total if math.isfinite(total) else None

"""Typed, located accessors for recipe values: each bad value becomes a RecipeError at its line."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from mle_cli.recipe._durations import duration_problem, to_seconds
from mle_cli.recipe._loader import Document, KeyPath, describe
from mle_proto.errors import InvalidInput
from mle_proto.store import check_relative_path

__all__ = [
    "NOT_YET",
    "TemplateSource",
    "check_keys",
    "closest",
    "duration_value",
    "expect_mapping",
    "expect_str",
    "scalar_text",
    "text_list",
    "work_path",
]

NOT_YET = "is not supported yet by this version of mle"


@dataclass(frozen=True)
class TemplateSource:
    """A template written in the recipe: where, its text, and whether values are shell-quoted."""

    path: KeyPath
    text: str
    quote: bool


def closest(word: str, choices: Collection[str]) -> str:
    """The choice that `word` most likely misspells, or ''."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else ""


def check_keys(
    doc: Document,
    path: KeyPath,
    mapping: dict[str, object],
    allowed: Sequence[str],
    later: Collection[str] = (),
) -> None:
    """Refuse keys outside `allowed`, naming keys that a later version of mle will know."""
    for key in mapping:
        if key in allowed:
            continue
        where = (*path, key)
        if key in later:
            raise doc.error(where, f"{key!r} {NOT_YET}", at_key=True, label=path)
        hint = closest(key, allowed)
        raise doc.error(where, f"unknown key {key!r}", at_key=True, label=path, suggestion=hint)


def expect_str(doc: Document, path: KeyPath, value: object, what: str = "a string") -> str:
    """value as a non-empty string, or an error saying what was expected."""
    if not isinstance(value, str):
        raise doc.error(path, f"expected {what}, got {describe(value)}")
    if not value.strip():
        raise doc.error(path, f"expected {what}, got an empty string")
    return value


def expect_mapping(doc: Document, path: KeyPath, value: object, what: str) -> dict[str, object]:
    """value as a mapping (null reads as an empty one), or an error saying what was expected."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise doc.error(path, f"expected {what}, got {describe(value)}")
    return value


def scalar_text(doc: Document, path: KeyPath, value: object, what: str = "a string") -> str:
    """A scalar as text; numbers and true/false are taken exactly as written (`010`, `yes`)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = doc.text(path)
    else:
        raise doc.error(path, f"expected {what}, got {describe(value)}")
    if "\x00" in text:
        raise doc.error(path, "must not contain a NUL character")
    return text


def text_list(doc: Document, path: KeyPath, value: object, what: str) -> list[tuple[KeyPath, str]]:
    """A string or a list of strings, each with its own path (null reads as an empty list)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [(item, scalar_text(doc, item, v)) for item, v in _indexed(path, value)]
    if isinstance(value, dict):
        raise doc.error(path, f"expected {what}, got {describe(value)}")
    return [(path, scalar_text(doc, path, value, what))]


def duration_value(doc: Document, path: KeyPath, value: object) -> float:
    """A duration in seconds, or an error naming the accepted forms."""
    seconds = to_seconds(value)
    if seconds is not None:
        return seconds
    if isinstance(value, list | dict) or value is None:
        raise doc.error(path, f"expected a duration (e.g. 90s, 30m, 2h), got {describe(value)}")
    raise doc.error(path, duration_problem(doc.texts.get(path, str(value))))


def work_path(doc: Document, path: KeyPath, text: str, what: str) -> str:
    """A path inside the work dir, normalized, or an error saying how it fails."""
    try:
        return str(check_relative_path(text))
    except InvalidInput:
        pure = PurePosixPath(text)
        escapes = text and (pure.is_absolute() or ".." in pure.parts)
        problem = "escapes the work dir" if escapes else "is not a valid path in the work dir"
        raise doc.error(path, f"{what} {text!r} {problem}") from None


def _indexed(path: KeyPath, items: list[object]) -> list[tuple[KeyPath, object]]:
    return [((*path, i), item) for i, item in enumerate(items)]

"""Placement selectors: which targets a step's `on:` stands for.

A selector is names (exact or glob, any of them may match) and labels (all must match). Plans keep
it as text, one token per name or `key=value` label, so `on: {names: [pi-*], labels: {role: edge}}`
is stored and shown as `pi-* role=edge`, and a plain `on: pi-01` stays `pi-01`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["LABEL_KEY", "LABEL_VALUE", "NAME", "Selector", "SelectorError"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a target (agent) name
_NAME_GLOB = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,63}")
LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9._/:@+-]{0,63}")
_GLOB_CHARS = frozenset("*?[")


class SelectorError(ValueError):
    """A selector that cannot be understood; the message says why."""


@dataclass(frozen=True)
class Selector:
    """Names or globs (any may match; none = any name) and labels (all must match)."""

    names: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        """The selector a plan stores as text (see `text`)."""
        names: list[str] = []
        labels: dict[str, str] = {}
        for token in text.split():
            key, sep, value = token.partition("=")
            if sep:
                labels[key] = value
            else:
                names.append(token)
        return cls.build(names, labels)

    @classmethod
    def build(cls, names: Iterable[str], labels: Mapping[str, str]) -> Selector:
        """A checked selector from names (or globs) and labels."""
        names = tuple(dict.fromkeys(names))
        for name in names:
            if not _NAME_GLOB.fullmatch(name):
                raise SelectorError(
                    f"{name!r} is not a target name or glob (letters, digits, . _ - and * ? [ ])"
                )
        for key, value in labels.items():
            if not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
                raise SelectorError(
                    f"label {key}={value!r} is not valid: use letters, digits and . _ / - "
                    "(values may also hold : @ +, up to 63 characters)"
                )
        if not names and not labels:
            raise SelectorError("selects nothing: give a target name, a glob or labels")
        return cls(names, tuple(sorted(labels.items())))

    @property
    def text(self) -> str:
        """The stored and shown form: `pi-01`, `pi-*`, `role=edge`, `pi-* role=edge`."""
        return " ".join([*self.names, *(f"{k}={v}" for k, v in self.labels)])

    @property
    def single_name(self) -> str | None:
        """The one target this selector names exactly (no glob, no labels), else None."""
        if len(self.names) == 1 and not self.labels and not _GLOB_CHARS & set(self.names[0]):
            return self.names[0]
        return None

    def matches(self, name: str, labels: Mapping[str, str]) -> bool:
        """Whether a target with this name and these labels is selected."""
        if self.names and not any(fnmatch.fnmatchcase(name, n) for n in self.names):
            return False
        return all(labels.get(key) == value for key, value in self.labels)

    def __str__(self) -> str:
        return self.text

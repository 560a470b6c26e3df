"""`matrix:` fans a step out into one child per combination of values, e.g. `train[hidden=32]`."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence

from mle_cli.recipe._fields import expect_mapping
from mle_cli.recipe._loader import Document, KeyPath, describe
from mle_cli.recipe.plan import ParamValue, Step

__all__ = ["MAX_CHILDREN", "Axis", "child_id", "expand_step", "parse_matrix", "value_text"]

MAX_CHILDREN = 256
MAX_VALUE_LENGTH = 64

Axis = tuple[str, tuple[ParamValue, ...]]

_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_VALUE = re.compile(rf"[A-Za-z0-9._:@+-]{{1,{MAX_VALUE_LENGTH}}}")


def parse_matrix(doc: Document, path: KeyPath, value: object) -> tuple[Axis, ...]:
    """The matrix's keys and values in written order; at most MAX_CHILDREN combinations."""
    what = "a mapping of names to lists of values, e.g. {hidden: [32, 64]}"
    body = expect_mapping(doc, path, value, what)
    if not body:
        raise doc.error(path, f"expected {what}, got an empty mapping")
    axes = tuple((key, _values(doc, path, key, values)) for key, values in body.items())
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_CHILDREN:
        message = f"the matrix makes {count} steps, over the limit of {MAX_CHILDREN}"
        raise doc.error(path, message, at_key=True)
    return axes


def expand_step(step: Step, axes: Sequence[Axis]) -> list[Step]:
    """One child per combination (the first key varies slowest); the step itself if no matrix."""
    if not axes:
        return [step]
    keys = [key for key, _ in axes]
    children = []
    for combination in itertools.product(*(values for _, values in axes)):
        matrix = dict(zip(keys, combination, strict=True))
        child = dataclasses.replace(
            step, id=child_id(step.id, matrix), matrix=matrix, group=step.id
        )
        children.append(child)
    return children


def child_id(step_id: str, matrix: dict[str, ParamValue]) -> str:
    """`train[hidden=32,lr=0.1]`: the step id and its values, keys in written order."""
    return f"{step_id}[{','.join(f'{k}={value_text(v)}' for k, v in matrix.items())}]"


def value_text(value: ParamValue) -> str:
    """A matrix value as it appears in task ids and templates (`true`, not `True`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _values(doc: Document, path: KeyPath, key: str, value: object) -> tuple[ParamValue, ...]:
    where = (*path, key)
    if not _KEY.fullmatch(key):
        message = (
            f"invalid matrix key {key!r}: use letters, digits and '_', starting with a letter "
            "(at most 63 characters)"
        )
        raise doc.error(where, message, at_key=True, label=path)
    if not isinstance(value, list) or not value:
        shown = "an empty list" if value == [] else describe(value)
        raise doc.error(where, f"expected a non-empty list of values, got {shown}")
    seen: set[str] = set()
    for i, item in enumerate(value):
        text = _value(doc, (*where, i), item)
        if text in seen:
            raise doc.error((*where, i), f"matrix value {text!r} is listed twice")
        seen.add(text)
    return tuple(value)


def _value(doc: Document, path: KeyPath, value: object) -> str:
    """The id text of one value, refusing values that cannot be part of a step id."""
    if not isinstance(value, str | int | float | bool):
        raise doc.error(path, f"expected a string, a number or true/false, got {describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise doc.error(path, f"expected a finite number, got {doc.texts.get(path, value)}")
    text = value_text(value)
    if not _VALUE.fullmatch(text):
        message = (
            f"matrix value {text!r} cannot be part of a step id: use letters, digits and "
            f"'._:@+-' (at most {MAX_VALUE_LENGTH} characters)"
        )
        raise doc.error(path, message)
    return text

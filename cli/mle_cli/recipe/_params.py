"""Recipe params: declared defaults, `-p name=value` overrides, and their types."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from mle_cli.errors import RecipeError
from mle_cli.recipe._fields import closest, expect_mapping
from mle_cli.recipe._loader import Document, describe
from mle_cli.recipe.plan import ParamValue

__all__ = ["parse_overrides", "resolve_params"]

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`['epochs=20', 'lr=0.1']` -> `{'epochs': '20', 'lr': '0.1'}`; a later item wins."""
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RecipeError(f"-p {item}: expected NAME=VALUE, e.g. -p epochs=20")
        overrides[name.strip()] = value
    return overrides


def resolve_params(
    doc: Document, value: object, overrides: Mapping[str, str]
) -> dict[str, ParamValue]:
    """Declared params with overrides applied and typed like their defaults."""
    declared = _declared(doc, value)
    params = dict(declared)
    for name, text in overrides.items():
        if name not in declared:
            raise _unknown(name, text, declared)
        params[name] = _convert(name, text, declared[name])
    for name, current in params.items():
        if current is None:
            message = f"param {name!r} is required; pass it with -p {name}=VALUE"
            raise doc.error(("params", name), message, at_key=True)
    return params


def _declared(doc: Document, value: object) -> dict[str, ParamValue]:
    what = "a mapping of param names to default values"
    declared: dict[str, ParamValue] = {}
    for name, default in expect_mapping(doc, ("params",), value, what).items():
        path = ("params", name)
        if not _NAME.fullmatch(name):
            message = (
                f"invalid param name {name!r}: use letters, digits and '_', starting with a letter "
                "(at most 63 characters)"
            )
            raise doc.error(path, message, at_key=True, label=("params",))
        if not isinstance(default, str | int | float | bool) and default is not None:
            message = (
                f"a param default must be a string, a number or true/false, not {describe(default)}"
            )
            raise doc.error(path, message)
        if isinstance(default, float) and not math.isfinite(default):
            raise doc.error(path, f"a param default must be a finite number, not {doc.text(path)}")
        declared[name] = default
    return declared


def _unknown(name: str, text: str, declared: Mapping[str, ParamValue]) -> RecipeError:
    key = f"-p {name}={_short(text)}"
    if not declared:
        return RecipeError(f"unknown param {name!r} (this recipe declares no params)", key=key)
    return RecipeError(f"unknown param {name!r}", key=key, suggestion=closest(name, declared))


def _convert(name: str, text: str, default: ParamValue) -> ParamValue:
    """text typed like the default: bool, int, float, or str (also for required params)."""
    key = f"-p {name}={_short(text)}"
    word = text.strip().lower()
    if isinstance(default, bool):
        if word in _TRUE | _FALSE:
            return word in _TRUE
        raise RecipeError("expected true or false (or yes/no, 1/0)", key=key)
    if isinstance(default, int):
        try:
            return int(word)
        except ValueError:
            raise RecipeError("expected an integer", key=key) from None
    if isinstance(default, float):
        try:
            number = float(word)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise RecipeError("expected a number", key=key)
        return number
    return text


def _short(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."

"""`on:`: where a step runs, as a selector text the plan keeps (see mle_cli.targets.selectors).

`on:` may be a template of params and matrix values (`on: "{{ params.edge }}"`, run with
`-p edge=role=edge`), rendered at compile time, so one recipe runs on `local` and on a fleet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mle_cli.recipe._fields import check_keys, expect_mapping, expect_str, scalar_text, text_list
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.recipe._namespaces import TemplateProblem
from mle_cli.recipe._templates import render_placement
from mle_cli.recipe.plan import ParamValue
from mle_cli.targets.selectors import Selector, SelectorError

if TYPE_CHECKING:
    from mle_cli.recipe._steps import ParsedStep  # which parses `on:` with this module

__all__ = ["parse_placement", "render_placements"]

_WHAT = "a target name, a glob (pi-*), or {names: [...], labels: {...}}"


def parse_placement(doc: Document, path: KeyPath, value: object) -> str:
    """`local`, a name, a glob, or names and labels, as the selector's text; a template is kept
    as written until `render_placements`."""
    if isinstance(value, dict):
        check_keys(doc, path, value, ("names", "labels"))
        names = [name for _, name in text_list(doc, (*path, "names"), value.get("names"), _WHAT)]
        labels = _labels(doc, (*path, "labels"), value.get("labels"))
        return _selector(doc, path, names, labels)
    text = expect_str(doc, path, value, _WHAT)
    if "{{" in text or "{%" in text:
        return text
    return _selector(doc, path, [text], {})


def render_placements(
    doc: Document, params: Mapping[str, ParamValue], parsed: list[ParsedStep]
) -> list[ParsedStep]:
    """The steps with templated `on:` rendered and checked, each at its own location."""
    return [_rendered(doc, params, p) if _templated(p.step.target) else p for p in parsed]


def _templated(text: str) -> bool:
    return "{{" in text or "{%" in text


def _rendered(doc: Document, params: Mapping[str, ParamValue], p: ParsedStep) -> ParsedStep:
    path = ("steps", p.step.group or p.step.id, "on")
    try:
        text = render_placement(p.step.target, params, p.step.matrix)
    except TemplateProblem as e:
        raise doc.error(path, str(e)) from None
    try:
        selector = Selector.parse(text)
    except SelectorError as e:
        raise doc.error(path, f"renders to {text!r}: {e}") from None
    return dataclasses.replace(p, step=dataclasses.replace(p.step, target=selector.text))


def _labels(doc: Document, path: KeyPath, value: object) -> dict[str, str]:
    mapping = expect_mapping(doc, path, value, "labels as a mapping, e.g. {role: edge}")
    return {key: scalar_text(doc, (*path, key), v, "a label value") for key, v in mapping.items()}


def _selector(doc: Document, path: KeyPath, names: list[str], labels: dict[str, str]) -> str:
    try:
        return Selector.build(names, labels).text
    except SelectorError as e:
        raise doc.error(path, str(e)) from None

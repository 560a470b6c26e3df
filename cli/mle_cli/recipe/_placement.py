"""`on:`: where a step runs, as a selector text the plan keeps (see mle_cli.targets.selectors)."""

from __future__ import annotations

from mle_cli.recipe._fields import check_keys, expect_mapping, expect_str, scalar_text, text_list
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.targets.selectors import Selector, SelectorError

__all__ = ["parse_placement"]

_WHAT = "a target name, a glob (pi-*), or {names: [...], labels: {...}}"


def parse_placement(doc: Document, path: KeyPath, value: object) -> str:
    """`local`, a name, a glob, or names and labels; returned as the selector's text."""
    if isinstance(value, dict):
        check_keys(doc, path, value, ("names", "labels"))
        names = [name for _, name in text_list(doc, (*path, "names"), value.get("names"), _WHAT)]
        labels = _labels(doc, (*path, "labels"), value.get("labels"))
        return _selector(doc, path, names, labels)
    name = expect_str(doc, path, value, _WHAT)
    return _selector(doc, path, [name], {})


def _labels(doc: Document, path: KeyPath, value: object) -> dict[str, str]:
    mapping = expect_mapping(doc, path, value, "labels as a mapping, e.g. {role: edge}")
    return {key: scalar_text(doc, (*path, key), v, "a label value") for key, v in mapping.items()}


def _selector(doc: Document, path: KeyPath, names: list[str], labels: dict[str, str]) -> str:
    try:
        return Selector.build(names, labels).text
    except SelectorError as e:
        raise doc.error(path, str(e)) from None

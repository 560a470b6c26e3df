"""compile_recipe: a recipe file in, a validated Plan out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from mle_cli.recipe._builtins import check_builtins
from mle_cli.recipe._expressions import check_when
from mle_cli.recipe._fields import check_keys, expect_str
from mle_cli.recipe._files import ship_files
from mle_cli.recipe._graph import check_outputs, expand_steps, order_steps
from mle_cli.recipe._loader import Document, load_document
from mle_cli.recipe._params import resolve_params
from mle_cli.recipe._placement import render_placements
from mle_cli.recipe._references import step_scopes
from mle_cli.recipe._steps import Defaults, ParsedStep, parse_defaults, parse_steps
from mle_cli.recipe._templates import check_templates
from mle_cli.recipe.plan import ParamValue, Plan

__all__ = ["compile_recipe"]

TOP_KEYS = ("name", "description", "params", "defaults", "files", "steps")
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def compile_recipe(path: Path, overrides: Mapping[str, str] | None = None) -> Plan:
    """Read, validate and compile a recipe; raise RecipeError, located, for any bad input."""
    doc = load_document(path)
    data = doc.data
    check_keys(doc, (), data, TOP_KEYS)
    name = _name(doc)
    description = _description(doc)
    params = resolve_params(doc, data.get("params"), overrides or {})
    defaults = parse_defaults(doc, data.get("defaults"))
    parsed = expand_steps(doc, parse_steps(doc, data.get("steps"), defaults))
    parsed = render_placements(doc, params, parsed)
    ordered = order_steps(doc, parsed)
    files = ship_files(doc, data.get("files"))
    need_paths = {p.step.id: p.need_paths for p in ordered}
    check_builtins(doc, [p.step for p in ordered], need_paths, files)
    _check_references(doc, params, defaults, ordered)
    check_outputs(doc, parsed, files)
    return Plan(
        name=name,
        description=description,
        source=path,
        digest=doc.digest,
        params=params,
        files=files,
        steps=tuple(p.step for p in ordered),
    )


def _check_references(
    doc: Document, params: Mapping[str, ParamValue], defaults: Defaults, ordered: list[ParsedStep]
) -> None:
    """Every template and `when:` names only what its step can see: params, matrix, upstream."""
    check_templates(doc, params, defaults.templates)
    scopes = step_scopes(params, [p.step for p in ordered])
    # Report the first problem in declaration order, as every other check does.
    for p in sorted(ordered, key=lambda p: p.step.location.line):
        scope = scopes[p.step.id]
        check_when(doc, ("steps", p.step.group or p.step.id, "when"), scope)
        check_templates(doc, params, p.templates, scope)


def _name(doc: Document) -> str:
    if "name" not in doc.data:
        raise doc.error((), "missing required key 'name'")
    name = expect_str(doc, ("name",), doc.data["name"], "a recipe name")
    if not _NAME.fullmatch(name):
        message = (
            f"invalid recipe name {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter or digit (at most 63 characters)"
        )
        raise doc.error(("name",), message)
    return name


def _description(doc: Document) -> str:
    value = doc.data.get("description")
    if value is None:
        return ""
    return expect_str(doc, ("description",), value, "a text")

"""Built-in steps (`uses: mle/...`) and their `with:` options."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mle_cli.recipe._fields import (
    NOT_YET,
    TemplateSource,
    check_keys,
    closest,
    expect_mapping,
    expect_str,
    scalar_text,
)
from mle_cli.recipe._loader import Document, KeyPath, describe
from mle_cli.recipe._references import APPROVE, SELECT, has_metrics
from mle_cli.recipe.plan import ParamValue, Step

__all__ = ["BUILTINS", "NOT_WITH_USES", "check_builtins", "parse_options", "parse_uses"]

BUILTINS = (APPROVE, SELECT)
LATER_BUILTINS = ("mle/quantize", "mle/deploy", "mle/benchmark")
# What a built-in step does not take: it runs no command, anywhere, and produces no files itself.
NOT_WITH_USES = ("run", "argv", "on", "outputs", "metrics")
SELECT_MODES = ("max", "min")
_OPTIONS = {SELECT: ("metric", "mode"), APPROVE: ("message", "auto")}


def parse_uses(doc: Document, path: KeyPath, body: Mapping[str, object]) -> str | None:
    """The built-in a step uses, if any; such a step takes no command, placement or outputs."""
    if "uses" not in body:
        return None
    where = (*path, "uses")
    name = expect_str(doc, where, body["uses"], "a built-in step, e.g. mle/select")
    if name in LATER_BUILTINS:
        raise doc.error(where, f"{name!r} {NOT_YET}")
    if name not in BUILTINS:
        hint = closest(name, [*BUILTINS, *LATER_BUILTINS])
        raise doc.error(where, f"unknown built-in step {name!r}", suggestion=hint)
    for key in NOT_WITH_USES:
        if key in body:
            message = f"a step that uses {name} takes no {key!r}"
            raise doc.error((*path, key), message, at_key=True, label=path)
    return name


def parse_options(
    doc: Document, path: KeyPath, body: Mapping[str, object], uses: str | None
) -> tuple[dict[str, ParamValue], tuple[TemplateSource, ...]]:
    """The `with:` options of a built-in step, checked for that built-in, and their templates."""
    where = (*path, "with")
    if uses is None:
        if "with" in body:
            message = "'with' gives options to a built-in step; add uses: mle/..."
            raise doc.error(where, message, at_key=True, label=path)
        return {}, ()
    options = expect_mapping(doc, where, body.get("with"), "a mapping of options")
    check_keys(doc, where, options, _OPTIONS[uses])
    values = {key: _option(doc, (*where, key), raw) for key, raw in options.items()}
    if uses == SELECT:
        _select_options(doc, path, values)
    elif "auto" in values:
        _auto_option(doc, (*where, "auto"), values["auto"])
    templates = tuple(
        TemplateSource((*where, key), value, quote=False)
        for key, value in values.items()
        if isinstance(value, str)
    )
    return values, templates


def check_builtins(
    doc: Document, steps: Sequence[Step], need_paths: Mapping[str, Sequence[KeyPath]]
) -> None:
    """mle/select needs a matrix among its candidates, and every candidate must report metrics."""
    by_id = {s.id: s for s in steps}
    for step in steps:
        if step.uses != SELECT:
            continue
        candidates = [by_id[need] for need in step.needs]
        if not any(c.group for c in candidates):
            message = "mle/select picks one step of a matrix: list a step with a matrix: in needs"
            raise doc.error(("steps", step.group or step.id, "uses"), message)
        for where, candidate in zip(need_paths[step.id], candidates, strict=True):
            if not has_metrics(candidate):
                message = (
                    f"mle/select compares metrics, but step {candidate.id!r} declares no "
                    "metrics file (add metrics: to it)"
                )
                raise doc.error(where, message)


def _option(doc: Document, path: KeyPath, value: object) -> ParamValue:
    """An option value: a bool stays a bool; numbers and strings are kept as written."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | str):
        return scalar_text(doc, path, value, "a string, a number or true/false")
    raise doc.error(path, f"expected a string, a number or true/false, got {describe(value)}")


def _select_options(doc: Document, path: KeyPath, values: dict[str, ParamValue]) -> None:
    where = (*path, "with")
    if "metric" not in values:
        raise doc.error(where, "mle/select needs the metric to compare: with: {metric: NAME}")
    if not isinstance(values["metric"], str) or not values["metric"].strip():
        raise doc.error((*where, "metric"), "expected a metric name")
    mode = values.setdefault("mode", "max")
    if isinstance(mode, str) and ("{{" in mode or mode in SELECT_MODES):
        return
    shown = repr(mode) if isinstance(mode, str) else describe(mode)
    hint = closest(mode, SELECT_MODES) if isinstance(mode, str) else ""
    raise doc.error((*where, "mode"), f"expected max or min, got {shown}", suggestion=hint)


def _auto_option(doc: Document, path: KeyPath, value: ParamValue) -> None:
    if isinstance(value, bool) or (isinstance(value, str) and "{{" in value):
        return
    message = "expected true/false or a template such as {{ params.auto_approve }}"
    raise doc.error(path, message)

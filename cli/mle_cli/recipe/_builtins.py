"""Built-in steps (`uses: mle/...`) and their `with:` options.

Operator-side built-ins (mle/approve, mle/select, mle/deploy) keep their options for the scheduler;
task built-ins (mle/quantize, mle/benchmark) compile to command steps in `_tasks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from mle_cli.recipe._deploy import DEPLOY, DEPLOY_OPTIONS, check_deploy_option
from mle_cli.recipe._fields import (
    TemplateSource,
    check_keys,
    closest,
    expect_mapping,
    expect_str,
    scalar_text,
)
from mle_cli.recipe._loader import Document, KeyPath, describe
from mle_cli.recipe._references import APPROVE, SELECT, has_metrics, produced
from mle_cli.recipe._tasks import TASK_BUILTINS, is_template
from mle_cli.recipe.plan import ParamValue, ShippedFile, Step

__all__ = ["BUILTINS", "NOT_WITH_USES", "check_builtins", "parse_options", "parse_uses"]

BUILTINS = (APPROVE, SELECT, DEPLOY, *TASK_BUILTINS)
# What a built-in step does not take: its command, outputs and metrics are its own; the gates run
# nowhere (on the operator's side), mle/deploy goes where `on:` says, the task built-ins run there.
NOT_WITH_USES = ("run", "argv", "outputs", "metrics")
_NOT_WITH_GATES = ("on", "each")
SELECT_MODES = ("max", "min")
_OPTIONS = {SELECT: ("metric", "mode"), APPROVE: ("message", "auto"), DEPLOY: DEPLOY_OPTIONS}


def parse_uses(doc: Document, path: KeyPath, body: Mapping[str, object]) -> str | None:
    """The built-in a step uses, if any; such a step takes no command, placement or outputs."""
    if "uses" not in body:
        return None
    where = (*path, "uses")
    name = expect_str(doc, where, body["uses"], "a built-in step, e.g. mle/select")
    if name not in BUILTINS:
        hint = closest(name, BUILTINS)
        raise doc.error(where, f"unknown built-in step {name!r}", suggestion=hint)
    refused = (*NOT_WITH_USES, *_NOT_WITH_GATES) if name in (APPROVE, SELECT) else NOT_WITH_USES
    for key in refused:
        if key in body:
            message = f"a step that uses {name} takes no {key!r}"
            raise doc.error((*path, key), message, at_key=True, label=path)
    return name


def parse_options(
    doc: Document, path: KeyPath, body: Mapping[str, object], uses: str | None
) -> tuple[dict[str, ParamValue], tuple[TemplateSource, ...]]:
    """The `with:` options of an operator-side built-in, checked for it, and their templates."""
    where = (*path, "with")
    if uses in TASK_BUILTINS:  # compiled into the step's command instead
        return {}, ()
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
    elif uses == DEPLOY:
        _deploy_options(doc, where, values)
    elif "auto" in values:
        _auto_option(doc, (*where, "auto"), values["auto"])
    templates = tuple(
        TemplateSource((*where, key), value, quote=False)
        for key, value in values.items()
        if isinstance(value, str)
    )
    return values, templates


def check_builtins(
    doc: Document,
    steps: Sequence[Step],
    need_paths: Mapping[str, Sequence[KeyPath]],
    files: Sequence[ShippedFile] = (),
) -> None:
    """mle/select needs a matrix among its candidates, and every candidate must report metrics;
    mle/deploy's files must be there: the model from a needed step, the smoke file shipped too."""
    by_id = {s.id: s for s in steps}
    for step in steps:
        if step.uses == DEPLOY:
            _check_deploy_files(doc, step, by_id, [f.path for f in files])
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


def _deploy_options(doc: Document, where: KeyPath, values: dict[str, ParamValue]) -> None:
    """Literal values are checked now; templates once rendered, at dispatch."""
    if "model" not in values:
        raise doc.error(where, "mle/deploy needs the model file: with: {model: PATH}")
    for key, value in values.items():
        if isinstance(value, str) and is_template(value):
            continue
        problem = check_deploy_option(key, value)
        if problem:
            raise doc.error((*where, key), problem)
    if "smoke_min_accuracy" in values and "smoke" not in values:
        message = "smoke_min_accuracy needs a smoke test file: add smoke: PATH (.npz with X, y)"
        raise doc.error((*where, "smoke_min_accuracy"), message)


def _check_deploy_files(
    doc: Document, step: Step, steps: Mapping[str, Step], shipped: Sequence[str]
) -> None:
    """A literal model path must be an output of a needed step; a smoke file may be shipped."""
    placed = [path for need in step.needs for path in produced(steps, steps[need], True)]
    where: KeyPath = ("steps", step.group or step.id, "with")
    for key, choices in (("model", placed), ("smoke", [*placed, *shipped])):
        value = step.options.get(key)
        if not isinstance(value, str) or is_template(value):
            continue
        normal = str(PurePosixPath(value))
        if normal in choices:
            continue
        what = "an output of a step it needs" + (" or a shipped file" if key == "smoke" else "")
        if choices:
            message = f"{value!r} is not {what}; those are: {', '.join(choices)}"
        else:
            message = f"{value!r} is not {what}: list the step that produces it in needs"
        raise doc.error((*where, key), message, suggestion=closest(normal, choices))

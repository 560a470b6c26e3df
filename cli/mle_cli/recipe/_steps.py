"""The `defaults:` and `steps:` sections: each step's command, needs, outputs, env and policies."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mle_cli.recipe._builtins import parse_options, parse_uses
from mle_cli.recipe._fields import (
    TemplateSource,
    check_keys,
    closest,
    duration_value,
    expect_mapping,
    expect_str,
    scalar_text,
    text_list,
    work_path,
)
from mle_cli.recipe._loader import Document, KeyPath, describe
from mle_cli.recipe._matrix import Axis, parse_matrix
from mle_cli.recipe._placement import parse_placement
from mle_cli.recipe._tasks import TASK_BUILTINS, TaskCommand, compile_task
from mle_cli.recipe.plan import RetryPolicy, Step

__all__ = ["Defaults", "ParsedStep", "TemplateSource", "parse_defaults", "parse_steps"]

STEP_KEYS = (
    "run",
    "argv",
    "uses",
    "with",
    "needs",
    "matrix",
    "when",
    "trigger",
    "outputs",
    "metrics",
    "env",
    "retries",
    "timeout",
    "cache",
    "on",
    "each",
)
TRIGGERS = ("all-succeeded", "none-failed", "all-done")
DEFAULT_KEYS = ("retries", "timeout", "env")
RETRY_KEYS = ("max", "backoff", "factor", "max_delay")
MAX_RETRIES = 100
MAX_ID_LENGTH = 63

_STEP_ID = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_ID_LENGTH - 1}}}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Defaults:
    """What `defaults:` gives every step that does not say otherwise."""

    retries: Mapping[str, float]
    timeout: float | None
    env: Mapping[str, str]
    templates: tuple[TemplateSource, ...] = ()


@dataclass(frozen=True)
class ParsedStep:
    """A step, plus where its needs and outputs were written, its templates and matrix."""

    step: Step
    need_paths: tuple[KeyPath, ...]
    output_paths: tuple[KeyPath, ...]
    templates: tuple[TemplateSource, ...]
    axes: tuple[Axis, ...] = ()


def parse_defaults(doc: Document, value: object) -> Defaults:
    """The `defaults:` section (all of it optional)."""
    path: KeyPath = ("defaults",)
    body = expect_mapping(doc, path, value, "a mapping with retries, timeout or env")
    check_keys(doc, path, body, DEFAULT_KEYS)
    env, templates = _env(doc, (*path, "env"), body.get("env"))
    return Defaults(
        retries=_retries(doc, (*path, "retries"), body.get("retries")),
        timeout=_timeout(doc, (*path, "timeout"), body.get("timeout")),
        env=env,
        templates=templates,
    )


def parse_steps(doc: Document, value: object, defaults: Defaults) -> list[ParsedStep]:
    """Every step in declaration order; needs are not resolved yet."""
    if "steps" not in doc.data:
        raise doc.error((), "missing required key 'steps'")
    body = expect_mapping(doc, ("steps",), value, "a mapping of step ids to steps")
    if not body:
        raise doc.error(("steps",), "a recipe needs at least one step")
    return [_parse_step(doc, step_id, spec, defaults) for step_id, spec in body.items()]


def _parse_step(doc: Document, step_id: str, value: object, defaults: Defaults) -> ParsedStep:
    path: KeyPath = ("steps", step_id)
    body = _step_body(doc, path, step_id, value)
    uses = parse_uses(doc, path, body)
    task = compile_task(doc, path, uses, body.get("with")) if uses in TASK_BUILTINS else None
    run, argv, command = _command(doc, path, body, task) if task or not uses else (None, None, ())
    options, option_templates = parse_options(doc, path, body, uses)
    needs = text_list(doc, (*path, "needs"), body.get("needs"), "a step id or a list of them")
    outputs = list(task.outputs) if task else _outputs(doc, (*path, "outputs"), body.get("outputs"))
    metrics = (
        task.metrics if task else _metrics(doc, (*path, "metrics"), body.get("metrics"), outputs)
    )
    env, env_templates = _env(doc, (*path, "env"), body.get("env"))
    retries = _retries(doc, (*path, "retries"), body.get("retries"))
    step = Step(
        id=step_id,
        run=run,
        argv=argv,
        env={**defaults.env, **env},
        needs=tuple(name for _, name in needs),
        outputs=tuple(name for _, name in outputs),
        target=parse_placement(doc, (*path, "on"), body.get("on", "local")),
        retries=_policy({**defaults.retries, **retries}),
        timeout=_step_timeout(doc, path, body, defaults),
        location=doc.location(path, at_key=True),
        when=_when(doc, (*path, "when"), body.get("when")),
        trigger=_trigger(doc, (*path, "trigger"), body.get("trigger")),
        metrics=metrics,
        uses=None if task else uses,  # a task built-in is an ordinary command step from here on
        options=options,
        cache=_cache(doc, (*path, "cache"), body.get("cache")),
        each=_each(doc, path, body, uses),
    )
    axes = parse_matrix(doc, (*path, "matrix"), body["matrix"]) if "matrix" in body else ()
    need_paths = tuple(p for p, _ in needs)
    output_paths = tuple(p for p, _ in outputs)
    templates = (*command, *env_templates, *option_templates)
    return ParsedStep(step, need_paths, output_paths, templates, axes)


def _step_body(doc: Document, path: KeyPath, step_id: str, value: object) -> dict[str, object]:
    """The step's mapping, once its id and keys are known to be valid."""
    if not _STEP_ID.fullmatch(step_id):
        message = (
            f"invalid step id {step_id!r}: use lowercase letters, digits, '-' and '_', "
            f"starting with a letter or digit (at most {MAX_ID_LENGTH} characters)"
        )
        raise doc.error(path, message, at_key=True, label=("steps",))
    if not isinstance(value, dict):
        message = f"expected a step (a mapping with 'run' or 'argv'), got {describe(value)}"
        raise doc.error(path, message)
    check_keys(doc, path, value, STEP_KEYS)
    return value


def _command(
    doc: Document, path: KeyPath, body: dict[str, object], task: TaskCommand | None = None
) -> tuple[str | None, tuple[str, ...] | None, tuple[TemplateSource, ...]]:
    """(run, argv, templates): exactly one of `run:` and `argv:`, or a task built-in's command."""
    if task is not None:
        return task.run, None, task.templates
    if "run" in body and "argv" in body:
        raise doc.error(
            (*path, "argv"), "use either 'run' or 'argv', not both", at_key=True, label=path
        )
    if "run" in body:
        run = expect_str(doc, (*path, "run"), body["run"], "a shell command (a string)")
        run = scalar_text(doc, (*path, "run"), run)
        return run, None, (TemplateSource((*path, "run"), run, quote=True),)
    if "argv" not in body:
        message = (
            "a step needs 'run' (a shell command), 'argv' (a program and its arguments) "
            "or 'uses' (a built-in step)"
        )
        raise doc.error(path, message, at_key=True)
    items = body["argv"]
    if not isinstance(items, list) or not items:
        shown = "an empty list" if items == [] else describe(items)
        raise doc.error(
            (*path, "argv"), f"expected a program and its arguments (a list), got {shown}"
        )
    argv = text_list(doc, (*path, "argv"), items, "a list")
    templates = tuple(TemplateSource(p, text, quote=False) for p, text in argv)
    return None, tuple(text for _, text in argv), templates


def _outputs(doc: Document, path: KeyPath, value: object) -> list[tuple[KeyPath, str]]:
    """Output paths, normalized (`./a//b` -> `a/b`), each inside the work dir and listed once."""
    outputs: list[tuple[KeyPath, str]] = []
    seen: set[str] = set()
    for item, text in text_list(doc, path, value, "a path or a list of paths"):
        normal = work_path(doc, item, text, "output path")
        if normal in seen:
            raise doc.error(item, f"output {normal!r} is listed twice")
        seen.add(normal)
        outputs.append((item, normal))
    return outputs


def _metrics(
    doc: Document, path: KeyPath, value: object, outputs: list[tuple[KeyPath, str]]
) -> str | None:
    """The metrics file's path; it is also an output (appended to `outputs` unless listed)."""
    if value is None:
        return None
    text = expect_str(doc, path, value, "a path to a JSON file, e.g. metrics.json")
    normal = work_path(doc, path, text, "metrics path")
    if normal not in {output for _, output in outputs}:
        outputs.append((path, normal))
    return normal


def _env(
    doc: Document, path: KeyPath, value: object
) -> tuple[dict[str, str], tuple[TemplateSource, ...]]:
    """Environment variables (values are templates) and the template sources they hold."""
    env: dict[str, str] = {}
    body = expect_mapping(doc, path, value, "a mapping of variable names to values")
    for name, raw in body.items():
        where = (*path, name)
        if not _ENV_NAME.fullmatch(name):
            message = f"invalid environment variable name {name!r}"
            raise doc.error(where, message, at_key=True, label=path)
        if name.startswith("MLE_"):
            message = f"{name!r} is reserved: mle sets the MLE_* variables itself"
            raise doc.error(where, message, at_key=True, label=path)
        env[name] = scalar_text(doc, where, raw, "a string or a number")
    templates = tuple(TemplateSource((*path, n), v, quote=False) for n, v in env.items())
    return env, templates


def _retries(doc: Document, path: KeyPath, value: object) -> dict[str, float]:
    """The retry fields given (a bare integer is `max`); unspecified fields come from defaults."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {"max": _retry_max(doc, path, value)}
    what = "a number of retries or a mapping with max, backoff, factor, max_delay"
    body = expect_mapping(doc, path, value, what)
    check_keys(doc, path, body, RETRY_KEYS)
    fields: dict[str, float] = {}
    for key, raw in body.items():
        where = (*path, key)
        if key == "max":
            fields[key] = _retry_max(doc, where, raw)
        elif key == "factor":
            fields[key] = _factor(doc, where, raw)
        else:
            fields[key] = duration_value(doc, where, raw)
    return fields


def _retry_max(doc: Document, path: KeyPath, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_RETRIES:
        return value
    shown = doc.texts.get(path, describe(value))
    raise doc.error(
        path, f"expected a whole number of retries from 0 to {MAX_RETRIES}, got {shown}"
    )


def _factor(doc: Document, path: KeyPath, value: object) -> float:
    # NaN and infinity fail the range test too.
    if isinstance(value, int | float) and not isinstance(value, bool) and 1 <= value <= 100:
        return float(value)
    shown = doc.texts.get(path, describe(value))
    raise doc.error(path, f"expected a backoff factor from 1 to 100, got {shown}")


def _policy(fields: Mapping[str, float]) -> RetryPolicy:
    base = RetryPolicy()
    return RetryPolicy(
        max=int(fields.get("max", base.max)),
        backoff=fields.get("backoff", base.backoff),
        factor=fields.get("factor", base.factor),
        max_delay=fields.get("max_delay", base.max_delay),
    )


def _timeout(doc: Document, path: KeyPath, value: object) -> float | None:
    """A per-attempt timeout in seconds; null or absent means none."""
    if value is None:
        return None
    seconds = duration_value(doc, path, value)
    if seconds <= 0:
        raise doc.error(path, "a timeout must be longer than 0s")
    return seconds


def _step_timeout(
    doc: Document, path: KeyPath, body: dict[str, object], defaults: Defaults
) -> float | None:
    # A step's `timeout: null` (like an absent one) leaves the default in force.
    own = _timeout(doc, (*path, "timeout"), body.get("timeout"))
    return own if own is not None else defaults.timeout


def _when(doc: Document, path: KeyPath, value: object) -> str | None:
    """The condition's source (checked once the graph is known); true/false are kept as text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    what = "an expression (e.g. params.quick == false) or true/false"
    return scalar_text(doc, path, expect_str(doc, path, value, what))


def _trigger(doc: Document, path: KeyPath, value: object) -> str:
    """When the step may run, given how its needs ended; default: all of them succeeded."""
    if value is None:
        return TRIGGERS[0]
    text = expect_str(doc, path, value, "all-succeeded, none-failed or all-done")
    if text not in TRIGGERS:
        message = f"expected all-succeeded, none-failed or all-done, got {text!r}"
        raise doc.error(path, message, suggestion=closest(text, TRIGGERS))
    return text


def _each(doc: Document, path: KeyPath, body: dict[str, object], uses: str | None) -> bool:
    """`each: true`: once per matching target (the gates refuse it earlier)."""
    if "each" not in body:
        return False
    where = (*path, "each")
    value = body["each"]
    if not isinstance(value, bool):
        raise doc.error(where, f"expected true or false, got {describe(value)}")
    return value


def _cache(doc: Document, path: KeyPath, value: object) -> bool:
    if value is None or isinstance(value, bool):
        return value is not False
    raise doc.error(path, f"expected true or false, got {describe(value)}")

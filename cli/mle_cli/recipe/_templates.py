"""Templates in `run`, `argv`, `env` and `with`: sandboxed Jinja, strict names, quoted values."""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing

from mle_cli.errors import RecipeError
from mle_cli.recipe._fields import TemplateSource, closest
from mle_cli.recipe._loader import Document
from mle_cli.recipe._namespaces import (
    CheckedSteps,
    Namespace,
    Paths,
    Results,
    TemplateProblem,
    wrap,
)
from mle_cli.recipe._references import StepScope
from mle_cli.recipe.plan import ParamValue, Plan, Step

__all__ = ["RenderedStep", "check_templates", "render_options", "render_placement", "render_step"]

_NAMES = ("params", "matrix", "steps", "run", "target")
# Stand-ins used to render every template once at compile time, to catch errors early.
_CHECK_RUN_ID, _CHECK_TARGET = "run-compile-check", "local"

StepResults = Mapping[str, Mapping[str, object]]


@dataclass(frozen=True)
class RenderedStep:
    """A step's command and env with every template rendered: shell or argv (neither: built-in)."""

    shell: str | None
    argv: tuple[str, ...] | None
    env: dict[str, str]


def render_step(
    plan: Plan, step: Step, *, run_id: str, target: str, steps: StepResults | None = None
) -> RenderedStep:
    """Render a step's command and env for one dispatch; undefined names raise RecipeError.

    `steps` holds the results of finished steps: `{id: {"status", "metrics", "outputs"}}`.
    """
    render = _renderer(plan, step, run_id, target, steps)
    label = f"steps.{step.id}"
    shell_text = None if step.run is None else render(step.run, f"{label}.run", quote=True)
    argv = None
    if step.argv is not None:
        argv = tuple(render(a, f"{label}.argv[{i}]") for i, a in enumerate(step.argv))
    env = {name: render(value, f"{label}.env.{name}") for name, value in step.env.items()}
    return RenderedStep(shell_text, argv, env)


def render_options(
    plan: Plan, step: Step, *, run_id: str, target: str, steps: StepResults | None = None
) -> dict[str, ParamValue]:
    """A built-in step's `with:` options, templates rendered (to text: the built-in converts)."""
    render = _renderer(plan, step, run_id, target, steps)
    return {
        key: render(value, f"steps.{step.id}.with.{key}") if isinstance(value, str) else value
        for key, value in step.options.items()
    }


def render_placement(
    text: str, params: Mapping[str, ParamValue], matrix: Mapping[str, ParamValue]
) -> str:
    """An `on:` template, rendered at compile time: it sees params and matrix values only."""
    context: dict[str, object] = {"params": Namespace(("params",), params)}
    if matrix:
        context["matrix"] = Namespace(("matrix",), matrix)
    return _render(text, context, quote=False)


def check_templates(
    doc: Document,
    params: Mapping[str, ParamValue],
    sources: Iterable[TemplateSource],
    scope: StepScope | None = None,
) -> None:
    """Render templates once with stand-ins for run, target and results, at their own location.

    Without a scope (templates in `defaults:`), neither `matrix` nor `steps` is defined.
    """
    matrix = scope.step.matrix if scope else {}
    checked = CheckedSteps(scope) if scope else None
    context = _context(params, _CHECK_RUN_ID, _CHECK_TARGET, matrix, checked)
    for source in sources:
        try:
            _render(source.text, context, quote=source.quote)
        except TemplateProblem as exc:
            raise doc.error(source.path, str(exc)) from None


def _renderer(
    plan: Plan, step: Step, run_id: str, target: str, steps: StepResults | None
) -> _Render:
    """A function rendering one of this step's templates, errors located at the step."""
    context = _context(plan.params, run_id, target, step.matrix, _results(steps or {}))

    def render(text: str, key: str, *, quote: bool = False) -> str:
        try:
            return _render(text, context, quote=quote)
        except TemplateProblem as exc:
            where = step.location
            raise RecipeError(
                str(exc), file=where.file, line=where.line, col=where.col, key=key
            ) from None

    return render


class _Render(Protocol):
    def __call__(self, text: str, key: str, *, quote: bool = False) -> str: ...


def _results(steps: StepResults) -> Results:
    """`steps` for dispatch, from each finished step's status, metrics and outputs."""
    return Results(("steps",), _Views(steps))


class _Views(Mapping[str, Namespace]):
    """Each step's result as a namespace, built when a template first reads it: a run of N
    steps renders N templates, so building all views every time would cost O(N²)."""

    def __init__(self, steps: StepResults) -> None:
        self._steps = steps
        self._views: dict[str, Namespace] = {}

    def __getitem__(self, step_id: str) -> Namespace:
        view = self._views.get(step_id)
        if view is None:
            result = self._steps[step_id]
            view = self._views[step_id] = Namespace(
                ("steps", step_id),
                {
                    "status": result.get("status"),
                    "metrics": wrap(("steps", step_id, "metrics"), result.get("metrics", {})),
                    "outputs": wrap(("steps", step_id, "outputs"), result.get("outputs", [])),
                },
            )
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


class _StrictUndefined(StrictUndefined):
    """StrictUndefined whose messages name the full dotted path and the likely intended name."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        name, obj = self._undefined_name, self._undefined_obj
        if self._undefined_hint:
            return super()._undefined_message
        if isinstance(obj, Paths) and isinstance(name, str | int):
            return obj.missing(name)
        if not isinstance(name, str):
            return super()._undefined_message
        if isinstance(obj, Namespace):
            return obj.missing(name)
        if obj is missing:
            if name == "matrix":
                return "'matrix' is only defined in a step with a matrix:"
            if name == "steps":
                return "'steps' is only defined in a step, not in defaults:"
            hint = closest(name, _NAMES)
            return f"undefined name {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        return super()._undefined_message


def _context(
    params: Mapping[str, ParamValue],
    run_id: str,
    target: str,
    matrix: Mapping[str, ParamValue],
    steps: object | None,
) -> dict[str, object]:
    context: dict[str, object] = {
        "params": Namespace(("params",), params),
        "run": Namespace(("run",), {"id": run_id}),
        "target": Namespace(("target",), {"name": target}),
    }
    if matrix:
        context["matrix"] = Namespace(("matrix",), matrix)
    if steps is not None:
        context["steps"] = steps
    return context


def _text(value: object) -> str:
    """A rendered value as text; booleans read as in YAML (`true`); lists as words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return " ".join(_text(item) for item in value)
    return str(value)


def _quoted(value: object) -> str:
    """A rendered value as shell words: one word, or one per item of a list (e.g. outputs)."""
    if isinstance(value, list | tuple):
        return " ".join(_quoted(item) for item in value)
    return shlex.quote(_text(value))


_MAX_EXPONENT = 64
_MAX_BITS = 4096
_MAX_REPEAT = 100_000


class _Sandbox(SandboxedEnvironment):
    """The Jinja sandbox, with messages that name the refused attribute and no internals.

    `**` and `*` are intercepted so that `{{ 9**9**9 }}` or `{{ 'x' * 10**9 }}` is refused
    instead of hanging or exhausting memory while a recipe compiles.
    """

    intercepted_binops = frozenset({"**", "*"})

    def call_binop(self, context: object, operator: str, left: object, right: object) -> object:
        """Refuse huge powers and repetitions; compute the rest."""
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > _MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is too large for a template")
            if isinstance(left, int) and left.bit_length() * abs(int(right)) > _MAX_BITS:  # type: ignore[call-overload]
                raise SecurityError("power is too large for a template")
            return left**right  # type: ignore[operator]
        repeats = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
        sequence = isinstance(left, str | list | tuple) or isinstance(right, str | list | tuple)
        if sequence and any(abs(r) > _MAX_REPEAT for r in repeats):
            raise SecurityError("repetition is too large for a template")
        return left * right  # type: ignore[operator]

    def unsafe_undefined(self, obj: object, attribute: str) -> Undefined:
        """Refuse an unsafe attribute; on an already undefined value keep the first problem."""
        if isinstance(obj, Undefined):
            return obj
        hint = f"access to attribute {attribute!r} is not allowed in templates"
        return self.undefined(hint, obj=obj, name=attribute, exc=SecurityError)


@functools.cache
def _environment(quote: bool) -> SandboxedEnvironment:
    return _Sandbox(
        undefined=_StrictUndefined,
        autoescape=False,
        finalize=_quoted if quote else _text,
        keep_trailing_newline=True,
    )


@functools.lru_cache(maxsize=1024)
def _template(text: str, quote: bool) -> Template:
    """Compiled once per text: a run dispatches the same step templates many times."""
    return _environment(quote).from_string(text)


def _render(text: str, context: Mapping[str, object], *, quote: bool) -> str:
    """Render one template; any failure becomes a TemplateProblem with a readable message."""
    try:
        rendered = _template(text, quote).render(context)
    except TemplateProblem:
        raise
    except TemplateSyntaxError as exc:
        line = f" (line {exc.lineno} of the template)" if "\n" in text.strip() else ""
        raise TemplateProblem(f"invalid template: {exc.message}{line}") from None
    except (SecurityError, UndefinedError) as exc:
        raise TemplateProblem(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - templates are user code: any failure is the recipe's
        raise TemplateProblem(f"template failed: {type(exc).__name__}: {exc}") from None
    if "\x00" in rendered:
        raise TemplateProblem("renders to text containing a NUL character")
    return rendered

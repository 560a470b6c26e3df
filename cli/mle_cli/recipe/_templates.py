"""Templates in `run:`, `argv:` and `env:`: sandboxed Jinja, strict names, shell-quoted values."""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing

from mle_cli.errors import RecipeError
from mle_cli.recipe._fields import NOT_YET, closest
from mle_cli.recipe._loader import Document
from mle_cli.recipe._steps import TemplateSource
from mle_cli.recipe.plan import ParamValue, Plan, Step

__all__ = ["RenderedStep", "check_templates", "render_step"]

_NAMES = ("params", "run", "target")
_LATER_NAMES = ("steps", "matrix")
# Stand-ins used to render every template once at compile time, to catch errors early.
_CHECK_RUN_ID, _CHECK_TARGET = "run-compile-check", "local"


@dataclass(frozen=True)
class RenderedStep:
    """A step's command and env with every template rendered: exactly one of shell and argv."""

    shell: str | None
    argv: tuple[str, ...] | None
    env: dict[str, str]


def render_step(plan: Plan, step: Step, *, run_id: str, target: str) -> RenderedStep:
    """Render a step's templates for one dispatch; undefined names raise RecipeError."""
    context = _context(plan.params, run_id, target)
    label = f"steps.{step.id}"

    def render(text: str, key: str, *, quote: bool = False) -> str:
        try:
            return _render(text, context, quote=quote)
        except _TemplateProblem as exc:
            where = step.location
            raise RecipeError(
                str(exc), file=where.file, line=where.line, col=where.col, key=key
            ) from None

    shell_text = None if step.run is None else render(step.run, f"{label}.run", quote=True)
    argv = None
    if step.argv is not None:
        argv = tuple(render(a, f"{label}.argv[{i}]") for i, a in enumerate(step.argv))
    env = {name: render(value, f"{label}.env.{name}") for name, value in step.env.items()}
    return RenderedStep(shell_text, argv, env)


def check_templates(
    doc: Document, params: Mapping[str, ParamValue], sources: Iterable[TemplateSource]
) -> None:
    """Render every template once with stand-in run and target values, at its own location."""
    context = _context(params, _CHECK_RUN_ID, _CHECK_TARGET)
    for source in sources:
        try:
            _render(source.text, context, quote=source.quote)
        except _TemplateProblem as exc:
            raise doc.error(source.path, str(exc)) from None


class _TemplateProblem(Exception):
    """A template that does not render; the message is for the user."""


class _Namespace:
    """A template namespace (`params`, `run`, `target`) that knows its own dotted name."""

    __slots__ = ("_name", "_values")

    def __init__(self, name: str, values: Mapping[str, object]) -> None:
        self._name = name
        self._values = values

    def __getitem__(self, key: str) -> object:
        return self._values[key]

    def __str__(self) -> str:
        raise _TemplateProblem(f"{self._name!r} is a namespace; use e.g. {self._example()}")

    def _example(self) -> str:
        return f"{self._name}.{next(iter(self._values), 'name')}"

    def _missing(self, name: str) -> str:
        """The message for an undefined `<namespace>.<name>`."""
        choices = [f"{self._name}.{key}" for key in self._values]
        full = f"{self._name}.{name}"
        hint = closest(full, choices)
        return f"undefined name {full!r}" + (f" (did you mean {hint!r}?)" if hint else "")


class _StrictUndefined(StrictUndefined):
    """StrictUndefined whose messages name the full dotted path and the likely intended name."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        name, obj = self._undefined_name, self._undefined_obj
        if self._undefined_hint or not isinstance(name, str):
            return super()._undefined_message
        if isinstance(obj, _Namespace):
            return obj._missing(name)
        if obj is missing:
            if name in _LATER_NAMES:
                return f"{name!r} {NOT_YET}"
            hint = closest(name, _NAMES)
            return f"undefined name {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        return super()._undefined_message


def _context(params: Mapping[str, ParamValue], run_id: str, target: str) -> dict[str, object]:
    return {
        "params": _Namespace("params", params),
        "run": _Namespace("run", {"id": run_id}),
        "target": _Namespace("target", {"name": target}),
    }


def _text(value: object) -> str:
    """A rendered value as text; booleans read as in YAML (`true`), not as in Python."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quoted(value: object) -> str:
    """A rendered value as exactly one shell word, whatever characters it holds."""
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
    """Render one template; any failure becomes a _TemplateProblem with a readable message."""
    try:
        rendered = _template(text, quote).render(context)
    except _TemplateProblem:
        raise
    except TemplateSyntaxError as exc:
        line = f" (line {exc.lineno} of the template)" if "\n" in text.strip() else ""
        raise _TemplateProblem(f"invalid template: {exc.message}{line}") from None
    except (SecurityError, UndefinedError) as exc:
        raise _TemplateProblem(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - templates are user code: any failure is the recipe's
        raise _TemplateProblem(f"template failed: {type(exc).__name__}: {exc}") from None
    if "\x00" in rendered:
        raise _TemplateProblem("renders to text containing a NUL character")
    return rendered

"""What templates see: strict namespaces that know their dotted names, and stand-ins for checks."""

from __future__ import annotations

from collections.abc import Mapping

from mle_cli.recipe._fields import closest
from mle_cli.recipe._references import StepScope, dotted, produced

__all__ = [
    "CheckedSteps",
    "Namespace",
    "Paths",
    "Pending",
    "Results",
    "TemplateProblem",
    "wrap",
]

Parts = tuple[str | int, ...]
_STATUS_STAND_IN = "succeeded"


class TemplateProblem(Exception):
    """A template that does not render; the message is for the user."""


class Namespace:
    """A namespace (`params`, `matrix`, `steps.train.metrics`) that knows its own dotted name."""

    __slots__ = ("_parts", "_values")

    def __init__(self, parts: Parts, values: Mapping[str, object]) -> None:
        self._parts = parts
        self._values = values

    def __getitem__(self, key: str) -> object:
        return self._values[key]

    def __str__(self) -> str:
        example = dotted((*self._parts, next(iter(self._values), "name")))
        raise TemplateProblem(f"{dotted(self._parts)!r} is a namespace; use e.g. {example}")

    def missing(self, name: str) -> str:
        """The message for an undefined `<namespace>.<name>`."""
        full = dotted((*self._parts, name))
        hint = closest(full, [dotted((*self._parts, key)) for key in self._values])
        return f"undefined name {full!r}" + (f" (did you mean {hint!r}?)" if hint else "")


class Results(Namespace):
    """`steps` at dispatch: the results of the steps that have finished."""

    __slots__ = ()

    def missing(self, name: str) -> str:
        """The message for a step without a result."""
        return f"{dotted(('steps', name))!r} has no result yet"


class Paths(tuple[str, ...]):
    """A step's output paths: `outputs[0]`, or all of them separated by spaces."""

    _parts: Parts

    def __new__(cls, parts: Parts, paths: tuple[str, ...] | list[str]) -> Paths:
        """Paths labelled with their dotted name, for messages."""
        self = super().__new__(cls, paths)
        self._parts = parts
        return self

    def missing(self, name: str | int) -> str:
        """The message for `outputs.<name>` or an index past the end."""
        label = dotted(self._parts)
        if isinstance(name, int):
            count = f"{len(self)} path" + ("" if len(self) == 1 else "s")
            return f"{label!r} has no item {name} (it lists {count})"
        return f"{label!r} is a list of paths; use e.g. {dotted((*self._parts, 0))}"


class Pending:
    """A metric known only once its step has finished: absorbs any use while a recipe compiles."""

    __slots__ = ("_parts",)

    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    def __getitem__(self, key: str | int) -> Pending:
        return Pending((*self._parts, key))

    def __str__(self) -> str:
        if self._parts[-1] == "metrics":
            example = dotted((*self._parts, "accuracy"))
            raise TemplateProblem(f"{dotted(self._parts)!r} is a namespace; use e.g. {example}")
        return f"<{dotted(self._parts)}>"

    def _absorb(self, *_: object) -> Pending:
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _absorb
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _absorb
    __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = __round__ = _absorb
    __lt__ = __le__ = __gt__ = __ge__ = _absorb

    def __int__(self) -> int:
        return 1

    def __float__(self) -> float:
        return 1.0

    def __len__(self) -> int:
        return 0


class CheckedSteps:
    """`steps` while a recipe compiles: only upstream steps, with stand-ins for their results."""

    __slots__ = ("_scope",)

    def __init__(self, scope: StepScope) -> None:
        self._scope = scope

    def __getitem__(self, ref: str) -> _CheckedStep:
        problem = self._scope.step_problem(ref)
        if problem:
            raise TemplateProblem(problem)
        return _CheckedStep(self._scope, ref)

    def __str__(self) -> str:
        raise TemplateProblem("'steps' is a namespace; use e.g. steps.prepare.outputs[0]")


class _CheckedStep:
    __slots__ = ("_ref", "_scope")

    def __init__(self, scope: StepScope, ref: str) -> None:
        self._scope = scope
        self._ref = ref

    def __getitem__(self, field: str | int) -> object:
        problem = self._scope.field_problem(self._ref, field)
        if problem:
            raise TemplateProblem(problem)
        parts = ("steps", self._ref, field)
        if field == "metrics":
            return Pending(parts)
        if field == "outputs":
            steps = self._scope.steps
            return Paths(parts, produced(steps, steps[self._ref]))
        return _STATUS_STAND_IN

    def __str__(self) -> str:
        label = dotted(("steps", self._ref))
        raise TemplateProblem(f"{label!r} is a step; use e.g. {label}.status")


def wrap(parts: Parts, value: object) -> object:
    """A result value for templates: mappings become namespaces and lists become Paths-like."""
    if isinstance(value, Mapping):
        return Namespace(parts, {str(k): wrap((*parts, str(k)), v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return Paths(parts, [str(v) for v in value]) if parts[-1] == "outputs" else tuple(value)
    return value

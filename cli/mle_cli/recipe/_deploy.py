"""`mle/deploy` options: literal values checked at compile time, rendered ones at dispatch."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from mle_cli.recipe.plan import ParamValue
from mle_proto.errors import InvalidInput
from mle_proto.store import check_relative_path

__all__ = [
    "DEPLOY",
    "DEPLOY_OPTIONS",
    "DeploySpec",
    "OptionProblem",
    "check_deploy_option",
    "deploy_spec",
]

DEPLOY = "mle/deploy"
DEPLOY_OPTIONS = (
    "model",
    "name",
    "canary",
    "version",
    "batch",
    "max_failures",
    "smoke",
    "smoke_min_accuracy",
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class OptionProblem(ValueError):
    """One option of a built-in step cannot be used; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class DeploySpec:
    """What an `mle/deploy` step does, its options rendered and converted."""

    model: str  # work-dir path of the model file: an output of a needed step
    name: str
    canary: float = 0.0  # percent of traffic for the new version; 0: all of it
    version: int = 0  # 0: the agent's next version number
    batch: int = 1  # targets deployed at once
    max_failures: int = 0  # failed targets tolerated before the rollout stops and rolls back
    smoke: str | None = None  # work-dir path of an .npz with X and y
    smoke_min_accuracy: float | None = None


def deploy_spec(options: Mapping[str, ParamValue]) -> DeploySpec:
    """The spec of rendered options; OptionProblem names the first option that is wrong."""
    if "model" not in options:
        raise OptionProblem("model", "mle/deploy needs the model file: with: {model: PATH}")
    values = {key: _CONVERTERS[key](value) for key, value in options.items()}
    model = str(values.pop("model"))
    name = str(values.pop("name", "") or default_name(model))
    if not _NAME.fullmatch(name):
        raise OptionProblem("name", _name_problem(name, given="name" in options))
    if "smoke_min_accuracy" in values and "smoke" not in values:
        message = "smoke_min_accuracy needs a smoke test file: add smoke: PATH (.npz with X, y)"
        raise OptionProblem("smoke_min_accuracy", message)
    return DeploySpec(model=model, name=name, **values)  # type: ignore[arg-type]


def check_deploy_option(key: str, value: ParamValue) -> str | None:
    """Why a literal option value cannot be used, or None."""
    try:
        converted = _CONVERTERS[key](value)
    except OptionProblem as problem:
        return problem.message
    if key == "name" and not _NAME.fullmatch(str(converted)):
        return _name_problem(str(converted), given=True)
    return None


def default_name(model: str) -> str:
    """A model's name from its file name, up to the first dot (`model.int8.onnx` -> `model`)."""
    return PurePosixPath(model).name.split(".", 1)[0].lower()


def _name_problem(name: str, *, given: bool) -> str:
    problem = f"invalid model name {name!r}: use lowercase letters, digits, '_', '.', '-'"
    return problem if given else f"{problem} (name it with name: NAME)"


def _path(key: str) -> Callable[[ParamValue], str]:
    def convert(value: ParamValue) -> str:
        text = _text(key, value, "a path")
        try:
            return str(check_relative_path(text))
        except InvalidInput:
            pure = PurePosixPath(text)
            escapes = pure.is_absolute() or ".." in pure.parts
            problem = "escapes the work dir" if escapes else "is not a valid path in the work dir"
            raise OptionProblem(key, f"path {text!r} {problem}") from None

    return convert


def _name(value: ParamValue) -> str:
    return _text("name", value, "a model name")


def _canary(value: ParamValue) -> float:
    text = _text("canary", value, "a percentage such as 10%").strip()
    number = _number(text.removesuffix("%"))
    if number is None or not 0 < number < 100:
        raise OptionProblem(
            "canary", f"expected a percentage from 0% to 100%, e.g. 10%, got {text!r}"
        )
    return number


def _count(key: str, lowest: int, what: str) -> Callable[[ParamValue], int]:
    def convert(value: ParamValue) -> int:
        text = _text(key, value, what).strip()
        if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < lowest:
            raise OptionProblem(key, f"expected {what}, got {text!r}")
        return int(text)

    return convert


def _accuracy(value: ParamValue) -> float:
    text = _text("smoke_min_accuracy", value, "an accuracy such as 0.9").strip()
    number = _number(text)
    # Above 1 is allowed: a threshold no model meets, to rehearse a rollback.
    if number is None or number < 0:
        message = f"expected an accuracy such as 0.9 (0 or more), got {text!r}"
        raise OptionProblem("smoke_min_accuracy", message)
    return number


def _text(key: str, value: ParamValue, what: str) -> str:
    if value is None or isinstance(value, bool):
        shown = "true/false" if isinstance(value, bool) else "null"
        raise OptionProblem(key, f"expected {what}, got {shown}")
    text = str(value)
    if not text.strip():
        raise OptionProblem(key, f"expected {what}, got an empty string")
    return text


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


_CONVERTERS: Mapping[str, Callable[[ParamValue], object]] = {
    "model": _path("model"),
    "name": _name,
    "canary": _canary,
    "version": _count("version", 1, "a version number (1 or more)"),
    "batch": _count("batch", 1, "a number of targets per batch (1 or more)"),
    "max_failures": _count("max_failures", 0, "a number of failed targets (0 or more)"),
    "smoke": _path("smoke"),
    "smoke_min_accuracy": _accuracy,
}

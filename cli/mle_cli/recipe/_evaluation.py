"""Evaluating a checked expression: strictly typed values, no Python coercions, clear errors."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping

from mle_cli.recipe._fields import closest
from mle_cli.recipe._references import dotted

__all__ = [
    "ARITHMETIC",
    "COMPARISONS",
    "LITERALS",
    "ROOTS",
    "ExpressionError",
    "Reference",
    "boolean",
    "chain",
    "check_name",
    "evaluate",
    "refused",
]

Reference = tuple[str | int, ...]

ROOTS = {"params": "params.NAME", "matrix": "matrix.NAME", "steps": "steps.ID.status"}
LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
ARITHMETIC = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Mod: "%"}
COMPARISONS = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.In: "in",
    ast.NotIn: "not in",
}
_REFUSED_NODES: dict[type[ast.AST], str] = {
    ast.Call: "a function call",
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.NamedExpr: "an assignment (:=)",
    ast.IfExp: "a conditional (x if c else y)",
    ast.Dict: "a mapping ({...})",
    ast.Set: "a set",
    ast.JoinedStr: "an f-string",
    ast.Starred: "unpacking (*)",
    ast.Slice: "a slice",
}


class ExpressionError(Exception):
    """An expression outside the language, or one that cannot be evaluated; for the user."""


def evaluate(node: ast.expr, values: Mapping[str, object]) -> object:
    """The value of a checked expression; ExpressionError for missing values or type errors."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return LITERALS[node.id]
    if isinstance(node, ast.Attribute | ast.Subscript):
        return _lookup(chain(node), values)
    if isinstance(node, ast.BoolOp):
        return _logic(node, values)
    if isinstance(node, ast.UnaryOp):
        operand = evaluate(node.operand, values)
        if isinstance(node.op, ast.Not):
            return not boolean(operand, "'not'")
        return -_number(operand, "'-'")
    if isinstance(node, ast.BinOp):
        return _arithmetic(node.op, evaluate(node.left, values), evaluate(node.right, values))
    if isinstance(node, ast.Compare):
        return _comparison(node, values)
    if isinstance(node, ast.List | ast.Tuple):
        return [evaluate(item, values) for item in node.elts]
    raise ExpressionError(f"{refused(node)} is not allowed in an expression")


def chain(node: ast.Attribute | ast.Subscript) -> Reference:
    """`steps["train[x=1]"].metrics.acc` -> ('steps', 'train[x=1]', 'metrics', 'acc')."""
    parts: list[str | int] = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute | ast.Subscript):
        if isinstance(current, ast.Attribute):
            parts.append(current.attr)
        else:
            parts.append(_subscript(current.slice))
        current = current.value
    if not (isinstance(current, ast.Name) and current.id in ROOTS):
        if isinstance(current, ast.Name):
            check_name(current.id)
        raise ExpressionError("only params, matrix and steps have fields (e.g. params.epochs)")
    return (current.id, *reversed(parts))


def check_name(name: str) -> None:
    """Refuse a bare name other than true/false/null (and True/False/None)."""
    if name in ROOTS:
        raise ExpressionError(f"{name!r} is a namespace; use e.g. {ROOTS[name]}")
    if name not in LITERALS:
        hint = closest(name, [*ROOTS, "true", "false", "null"])
        suffix = f" (did you mean {hint!r}?)" if hint else " (use params, matrix or steps)"
        raise ExpressionError(f"undefined name {name!r}{suffix}")


def _subscript(node: ast.expr) -> str | int:
    if isinstance(node, ast.Slice):
        raise ExpressionError("a slice is not allowed in an expression")
    value = node.value if isinstance(node, ast.Constant) else None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    raise ExpressionError('a subscript must be a string or a number, e.g. steps["train-big"]')


def _lookup(ref: Reference, values: Mapping[str, object]) -> object:
    """The value a name chain points at, or an error naming what is missing."""
    current: object = values
    for i, part in enumerate(ref):
        in_mapping = isinstance(current, Mapping) and isinstance(part, str) and part in current
        in_list = (
            isinstance(current, list | tuple) and isinstance(part, int) and part < len(current)
        )
        if in_mapping or in_list:
            current = current[part]  # type: ignore[index]
        else:
            raise ExpressionError(_missing(ref[: i + 1], current))
    return current


def _missing(ref: Reference, container: object) -> str:
    full = dotted(ref)
    if ref[0] == "steps" and len(ref) == 2:
        return f"{full!r} has no result yet"
    if isinstance(container, Mapping):
        hint = closest(full, [dotted((*ref[:-1], str(key))) for key in container])
        return f"undefined name {full!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    if isinstance(container, list | tuple):
        return f"{dotted(ref[:-1])!r} has no item {ref[-1]!r} (it has {len(container)})"
    return f"{dotted(ref[:-1])!r} is {_kind(container)}, it has no field {ref[-1]!r}"


def _logic(node: ast.BoolOp, values: Mapping[str, object]) -> bool:
    """`and` / `or` over true/false values, evaluated left to right and short-circuited."""
    stop = isinstance(node.op, ast.Or)  # `or` stops at the first true, `and` at the first false
    word = "'or'" if stop else "'and'"
    for item in node.values:
        if boolean(evaluate(item, values), word) == stop:
            return stop
    return not stop


def _arithmetic(op: ast.operator, left: object, right: object) -> object:
    symbol = ARITHMETIC[type(op)]
    if symbol == "+" and isinstance(left, str) and isinstance(right, str):
        return left + right
    if not (_is_number(left) and _is_number(right)):
        raise ExpressionError(f"cannot apply {symbol!r} to {_shown(left)} and {_shown(right)}")
    a, b = left, right
    assert isinstance(a, int | float) and isinstance(b, int | float)  # for mypy: numbers
    try:
        if symbol == "+":
            return a + b
        if symbol == "-":
            return a - b
        if symbol == "*":
            return a * b
        return a / b if symbol == "/" else a % b
    except ZeroDivisionError:
        raise ExpressionError(f"division by zero in {_show(a)} {symbol} {_show(b)}") from None
    except OverflowError:
        raise ExpressionError(f"number too large in {_show(a)} {symbol} {_show(b)}") from None


def _comparison(node: ast.Compare, values: Mapping[str, object]) -> bool:
    """`a < b <= c` as `a < b and b <= c`, strictly typed."""
    left = evaluate(node.left, values)
    for op, item in zip(node.ops, node.comparators, strict=True):
        right = evaluate(item, values)
        if not _compare(COMPARISONS[type(op)], left, right):
            return False
        left = right
    return True


def _compare(symbol: str, left: object, right: object) -> bool:
    if symbol in ("==", "!="):
        return _equal(left, right) == (symbol == "==")
    if symbol in ("in", "not in"):
        return _contains(right, left) == (symbol == "in")
    numbers = _is_number(left) and _is_number(right)
    if not numbers and not (isinstance(left, str) and isinstance(right, str)):
        raise ExpressionError(
            f"cannot compare {_shown(left)} with {_shown(right)} using {symbol!r}"
        )
    a, b = left, right
    assert isinstance(a, int | float | str) and isinstance(b, int | float | str)  # for mypy
    if symbol == "<":
        return a < b  # type: ignore[operator]
    if symbol == "<=":
        return a <= b  # type: ignore[operator]
    if symbol == ">":
        return a > b  # type: ignore[operator]
    return a >= b  # type: ignore[operator]


def _contains(container: object, item: object) -> bool:
    if isinstance(container, list | tuple):
        return any(_equal(item, element) for element in container)
    if isinstance(container, str | Mapping) and isinstance(item, str):
        return item in container
    raise ExpressionError(
        f"cannot test {_shown(item)} 'in' {_shown(container)}: use a list, a text or a mapping"
    )


def _equal(left: object, right: object) -> bool:
    """Equality without Python's coercions: `true == 1` is false, `1 == 1.0` is true."""
    if _kind(left) != _kind(right):
        return False
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(_equal, left, right))
    return left == right


def boolean(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ExpressionError(f"{where} needs true or false, got {_shown(value)}")


def _number(value: object, where: str) -> int | float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    raise ExpressionError(f"{where} needs a number, got {_shown(value)}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a text"
    if isinstance(value, list | tuple):
        return "a list"
    return "a mapping" if isinstance(value, Mapping) else type(value).__name__


def _shown(value: object) -> str:
    """`a text ("abc")`, `a number (3)`: the kind, then the value."""
    if value is None or isinstance(value, bool):
        return _show(value)
    return f"{_kind(value)} ({_show(value)})"


def _show(value: object) -> str:
    try:
        text = json.dumps(value, default=str)
    except ValueError:
        text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refused(node: ast.AST) -> str:
    return _REFUSED_NODES.get(type(node), f"'{type(node).__name__}'")

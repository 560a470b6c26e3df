"""`when:` expressions: comparisons, logic and arithmetic over params, matrix values and results.

An expression is parsed by Python's `ast` and accepted only if every node is on a short whitelist:
no calls, no attribute access except the name chains `params.X`, `matrix.X` and `steps.ID...`
(which read plain data, never Python attributes), nothing that runs code.
"""

from __future__ import annotations

import ast
import functools
import warnings
from collections.abc import Collection, Mapping

from mle_cli.errors import RecipeError
from mle_cli.recipe._evaluation import (
    ARITHMETIC,
    COMPARISONS,
    ExpressionError,
    Reference,
    boolean,
    chain,
    check_name,
    evaluate,
    refused,
)
from mle_cli.recipe._fields import closest
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.recipe._references import StepScope, dotted
from mle_cli.recipe.plan import Plan, Step

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "ExpressionError", "check_when", "evaluate_when", "parse"]

MAX_LENGTH = 500
MAX_DEPTH = 32

_REFUSED_OPERATORS = {
    ast.Pow: "**",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.Invert: "~",
    ast.UAdd: "unary +",
    ast.Is: "is",
    ast.IsNot: "is not",
}


def check_when(doc: Document, path: KeyPath, scope: StepScope) -> None:
    """Refuse a `when:` that cannot parse or names what this step cannot see, at its key."""
    source = scope.step.when
    if source is None:
        return
    try:
        node = parse(source)
        refs = _references(node)
        for ref in refs:
            _check_reference(ref, scope)
        if all(ref[0] != "steps" for ref in refs):
            # Known now: evaluate once, so type errors show at compile time.
            values = {"params": scope.params, "matrix": scope.step.matrix, "steps": {}}
            boolean(evaluate(node, values), "a condition")
    except ExpressionError as exc:
        raise doc.error(path, str(exc), at_key=True) from None


def evaluate_when(plan: Plan, step: Step, context: Mapping[str, object]) -> bool:
    """Whether the step's `when:` holds; context: {"params", "matrix", "steps": {id: result}}.

    A result is `{"status": str, "metrics": dict, "outputs": list[str]}`. Missing values and
    type errors raise RecipeError naming the step and the expression.
    """
    if step.when is None:
        return True
    values = {
        "params": context.get("params", plan.params),
        "matrix": context.get("matrix", step.matrix),
        "steps": context.get("steps", {}),
    }
    try:
        return boolean(evaluate(parse(step.when), values), "a condition")
    except ExpressionError as exc:
        where = step.location
        message = f"cannot evaluate {step.when!r}: {exc}"
        key = f"steps.{step.id}.when"
        raise RecipeError(
            message, file=where.file, line=where.line, col=where.col, key=key
        ) from None


@functools.lru_cache(maxsize=1024)
def parse(source: str) -> ast.expr:
    """The syntax tree of an expression, every node checked against the whitelist."""
    if len(source) > MAX_LENGTH:
        raise ExpressionError(f"an expression is limited to {MAX_LENGTH} characters")
    try:
        with warnings.catch_warnings():
            # Turn warnings (e.g. an invalid escape in a string) into SyntaxError, never print.
            warnings.simplefilter("error")
            tree = ast.parse(source.replace("\n", " ").strip(), mode="eval")
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise ExpressionError(f"invalid expression: {exc.msg}{where}") from None
    except (ValueError, RecursionError, MemoryError):
        raise ExpressionError("invalid expression") from None
    _check(tree.body, 1)
    return tree.body


def _check(node: ast.expr, depth: int) -> None:
    """Refuse any node outside the language, and nesting deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ExpressionError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    children: list[ast.expr] = []
    if isinstance(node, ast.Constant):
        _check_constant(node.value)
    elif isinstance(node, ast.Name):
        check_name(node.id)
    elif isinstance(node, ast.Attribute | ast.Subscript):
        chain(node)
    elif isinstance(node, ast.BoolOp):
        children = node.values
    elif isinstance(node, ast.UnaryOp):
        _check_operator(node.op, (ast.Not, ast.USub))
        children = [node.operand]
    elif isinstance(node, ast.BinOp):
        _check_operator(node.op, tuple(ARITHMETIC))
        children = [node.left, node.right]
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            _check_operator(op, tuple(COMPARISONS))
        children = [node.left, *node.comparators]
    elif isinstance(node, ast.List | ast.Tuple):
        children = node.elts
    else:
        raise ExpressionError(f"{refused(node)} is not allowed in an expression")
    for child in children:
        _check(child, depth + 1)


def _check_constant(value: object) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    kind = {bytes: "a bytes literal", complex: "a complex number"}.get(type(value), "'...'")
    raise ExpressionError(f"{kind} is not allowed in an expression")


def _check_operator(op: ast.AST, allowed: tuple[type[ast.AST], ...]) -> None:
    if isinstance(op, allowed):
        return
    symbol = _REFUSED_OPERATORS.get(type(op), type(op).__name__)
    hint = " (use ==)" if isinstance(op, ast.Is | ast.IsNot) else ""
    raise ExpressionError(f"the {symbol!r} operator is not allowed in an expression{hint}")


def _references(node: ast.expr) -> list[Reference]:
    """Every name chain in the expression (`steps.a.status`, not also `steps.a`), in order."""
    if isinstance(node, ast.Attribute | ast.Subscript):
        return [chain(node)]
    children = [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.expr)]
    return [ref for child in children for ref in _references(child)]


def _check_reference(ref: Reference, scope: StepScope) -> None:
    root = ref[0]
    if root == "params":
        _check_value(ref, scope.params)
    elif root == "matrix":
        if not scope.step.matrix:
            raise ExpressionError("'matrix' is only defined in a step with a matrix:")
        _check_value(ref, scope.step.matrix)
    else:
        _check_result(ref, scope)


def _check_value(ref: Reference, known: Collection[str]) -> None:
    name = ref[1]
    if not isinstance(name, str) or name not in known:
        full = dotted(ref[:2])
        hint = closest(full, [dotted((ref[0], key)) for key in known])
        raise ExpressionError(
            f"undefined name {full!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    if len(ref) > 2:
        raise ExpressionError(f"{dotted(ref[:2])!r} is a value, it has no field {ref[2]!r}")


def _check_result(ref: Reference, scope: StepScope) -> None:
    """`steps.ID.status`, `steps.ID.outputs[N]`, `steps.ID.metrics.NAME...` of an upstream step."""
    step_id = ref[1]
    if not isinstance(step_id, str):
        raise ExpressionError('steps are named by id, e.g. steps.prepare or steps["train-big"]')
    problem = scope.step_problem(step_id)
    if problem is None and len(ref) == 2:
        problem = f"{dotted(ref)!r} is a step; use e.g. {dotted((*ref, 'status'))}"
    if problem is None:
        problem = scope.field_problem(step_id, ref[2]) or _field_shape(ref)
    if problem:
        raise ExpressionError(problem)


def _field_shape(ref: Reference) -> str | None:
    """Status is one value, outputs a list of paths; metrics may nest."""
    if ref[2] == "status" and len(ref) > 3:
        return f"{dotted(ref[:3])!r} is a value, it has no field {ref[3]!r}"
    if ref[2] == "outputs" and (len(ref) > 4 or (len(ref) == 4 and not isinstance(ref[3], int))):
        return f"{dotted(ref[:3])!r} is a list of paths; use e.g. {dotted((*ref[:3], 0))}"
    return None

"""`when:` expressions at dispatch: semantics, errors, and input that tries to run code."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import Plan, RetryPolicy, SourceLocation, Step, evaluate_when

PARAMS = {"epochs": 10, "rate": 0.5, "name": "digits", "quick": False}
RESULTS = {
    "train": {
        "status": "succeeded",
        "metrics": {"accuracy": 0.93, "loss": 0.2, "eval": {"f1": 0.8}, "labels": ["a", "b"]},
        "outputs": ["model.onnx", "metrics.json"],
    },
    "train[hidden=32]": {"status": "failed", "metrics": {}, "outputs": []},
}


def _when(expression: str, steps: Mapping[str, object] | None = None) -> bool:
    step = Step(
        id="gate",
        run="true",
        argv=None,
        env={},
        needs=(),
        outputs=(),
        target="local",
        retries=RetryPolicy(),
        timeout=None,
        location=SourceLocation(Path("recipe.yaml"), 9, 3),
        matrix={"hidden": 32},
        group="gate",
        when=expression,
    )
    plan = Plan("p", "", Path("recipe.yaml"), "sha256:0", PARAMS, (), (step,))
    return evaluate_when(plan, step, {"steps": RESULTS if steps is None else steps})


def _refused(expression: str) -> str:
    with pytest.raises(RecipeError) as caught:
        _when(expression)
    prefix = f"recipe.yaml:9:3: steps.gate.when: cannot evaluate {expression!r}: "
    message = str(caught.value)
    assert message.startswith(prefix)
    return message.removeprefix(prefix)


@pytest.mark.parametrize(
    "expression",
    [
        "true",
        "True",
        "not false",
        "params.epochs == 10",
        "params.epochs >= 10 and params.rate < 1",
        "params.quick or params.name == 'digits'",
        "params.quick == false",
        "0 < params.rate < 1",
        "params.epochs * 2 - 1 == 19",
        "params.epochs / 4 == 2.5",
        "params.epochs % 3 == 1",
        "-params.rate == -0.5",
        "params.name + '-v2' == 'digits-v2'",
        "'dig' in params.name",
        "params.name not in ['mnist', 'cifar']",
        "matrix.hidden in (32, 64)",
        "steps.train.status == 'succeeded'",
        'steps["train[hidden=32]"].status != "succeeded"',
        "steps.train.metrics.accuracy > 0.9",
        "steps.train.metrics.eval.f1 >= 0.8",
        "steps.train.metrics['loss'] < 0.5",
        "'b' in steps.train.metrics.labels",
        "'loss' in steps.train.metrics",
        "steps.train.outputs[0] == 'model.onnx'",
        "'metrics.json' in steps.train.outputs",
        "steps.train.outputs == ['model.onnx', 'metrics.json']",
        "1 == 1.0",
        "null == None",
        "'a' < 'b'",
        "[1, [2]] == [1, [2]]",
    ],
)
def test_true_expressions(expression: str) -> None:
    assert _when(expression) is True


@pytest.mark.parametrize(
    "expression",
    [
        "false",
        "true and false",
        "true == 1",  # no coercion between true/false and numbers
        "1 == '1'",
        "params.epochs != 10",
        "1 < 2 < 2",
        "steps.train.metrics.accuracy < 0.5 or params.quick",
        "[1] == [True]",
    ],
)
def test_false_expressions(expression: str) -> None:
    assert _when(expression) is False


def test_and_or_stop_at_the_first_deciding_value() -> None:
    # The right side would fail: it is never evaluated.
    assert _when("false and steps.missing.status == 'x'") is False
    assert _when("true or steps.missing.status == 'x'") is True


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "steps.train.metrics.acc > 0.9",
            (
                "undefined name 'steps.train.metrics.acc' "
                "(did you mean 'steps.train.metrics.accuracy'?)"
            ),
        ),
        ("steps.evaluate.status == 'succeeded'", "'steps.evaluate' has no result yet"),
        ("steps.train.outputs[5] == 'x'", "'steps.train.outputs' has no item 5 (it has 2)"),
        (
            "steps.train.metrics.loss.value > 1",
            "'steps.train.metrics.loss' is a number, it has no field 'value'",
        ),
        ("params.name < 1", "cannot compare a text (\"digits\") with a number (1) using '<'"),
        ("params.quick < 1", "cannot compare false with a number (1) using '<'"),
        ("params.epochs + 'x' == 1", "cannot apply '+' to a number (10) and a text (\"x\")"),
        ("params.name * 3 == 'x'", "cannot apply '*' to a text (\"digits\") and a number (3)"),
        ("params.epochs / 0 > 1", "division by zero in 10 / 0"),
        ("params.epochs % 0 > 1", "division by zero in 10 % 0"),
        ("params.epochs and true", "'and' needs true or false, got a number (10)"),
        ("params.name or true", "'or' needs true or false, got a text (\"digits\")"),
        ("not params.name", "'not' needs true or false, got a text (\"digits\")"),
        ("-params.name == 1", "'-' needs a number, got a text (\"digits\")"),
        (
            "1 in params.epochs",
            "cannot test a number (1) 'in' a number (10): use a list, a text or a mapping",
        ),
        ("params.epochs", "a condition needs true or false, got a number (10)"),
        (
            "steps.train.metrics",
            "a condition needs true or false, "
            'got a mapping ({"accuracy": 0.93, "loss": 0.2, "eval...)',
        ),
        ("null", "a condition needs true or false, got null"),
    ],
)
def test_values_that_do_not_fit_are_refused_with_what_was_found(
    expression: str, message: str
) -> None:
    assert _refused(expression) == message


HOSTILE = [
    ("__import__('os').system('touch pwned')", "a function call is not allowed in an expression"),
    (
        "().__class__.__bases__[0].__subclasses__()",
        "a function call is not allowed in an expression",
    ),
    ("().__class__", "only params, matrix and steps have fields (e.g. params.epochs)"),
    ("''.join", "only params, matrix and steps have fields (e.g. params.epochs)"),
    ("__builtins__", "undefined name '__builtins__' (use params, matrix or steps)"),
    ("open", "undefined name 'open' (use params, matrix or steps)"),
    ("params.__class__ == 1", "undefined name 'params.__class__'"),
    ("steps.train.metrics.__class__ == 1", "undefined name 'steps.train.metrics.__class__'"),
    ("(lambda: 1) == 1", "a lambda is not allowed in an expression"),
    ("[x for x in [1]] == [1]", "a comprehension is not allowed in an expression"),
    ("(x := 1) == 1", "an assignment (:=) is not allowed in an expression"),
    ("1 if true else 2", "a conditional (x if c else y) is not allowed in an expression"),
    ("{} == {}", "a mapping ({...}) is not allowed in an expression"),
    ("{1} == {1}", "a set is not allowed in an expression"),
    ("f'{params.name}' == 'x'", "an f-string is not allowed in an expression"),
    ("[*params.name] == []", "unpacking (*) is not allowed in an expression"),
    ("steps.train.outputs[0:1] == []", "a slice is not allowed in an expression"),
    (
        "steps.train.outputs[params.epochs] == 'x'",
        'a subscript must be a string or a number, e.g. steps["train-big"]',
    ),
    ("9 ** 9 ** 9 > 1", "the '**' operator is not allowed in an expression"),
    ("7 // 2 == 3", "the '//' operator is not allowed in an expression"),
    ("1 << 100000 > 1", "the '<<' operator is not allowed in an expression"),
    ("~1 == -2", "the '~' operator is not allowed in an expression"),
    ("+1 == 1", "the 'unary +' operator is not allowed in an expression"),
    ("params.quick is false", "the 'is' operator is not allowed in an expression (use ==)"),
    ("b'x' == 1", "a bytes literal is not allowed in an expression"),
    ("1j == 1", "a complex number is not allowed in an expression"),
    ("... == 1", "'...' is not allowed in an expression"),
    ("true; import os", "invalid expression: invalid syntax at column 5"),
    ("import os", "invalid expression: invalid syntax at column 1"),
    ("a\x00b", "invalid expression: source code string cannot contain null bytes"),
    ("-" * 40 + "1 == 1", "the expression is nested more than 32 levels deep"),
    ("[" * 40 + "]" * 40, "the expression is nested more than 32 levels deep"),
    ("(" * 240 + "1" + ")" * 240, "invalid expression: too many nested parentheses at column 201"),
    ("1 == " + "1 + " * 124 + "1", "an expression is limited to 500 characters"),
]


@pytest.mark.parametrize(("expression", "message"), HOSTILE, ids=[h[0][:30] for h in HOSTILE])
def test_hostile_expressions_are_refused_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expression: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _refused(expression).startswith(message)
    assert os.listdir(tmp_path) == []

"""Durations, `-p` overrides and dispatch-time rendering, as a user sees them."""

from __future__ import annotations

from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import (
    Plan,
    RetryPolicy,
    SourceLocation,
    Step,
    compile_recipe,
    parse_duration,
    parse_overrides,
    render_step,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("30m", 1800.0),
        ("2h", 7200.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1h30m15s", 5415.0),
        ("1.5h", 5400.0),
        ("2d", 172800.0),
        ("0s", 0.0),
        (" 45s ", 45.0),
        ("45", 45.0),
        ("2.5", 2.5),
        (90, 90.0),
        (0.25, 0.25),
    ],
)
def test_durations_in_every_accepted_form(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["soon", "", "-5s", "-5", -1, "1h30", "5 s", "h", "1.s", "10x", "1e3s", float("inf"), True],
)
def test_anything_else_is_not_a_duration(text: str | int | float) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_duration(text)
    assert str(caught.value) == f"invalid duration '{text}' (use e.g. 90s, 30m, 2h)"


def test_overrides_split_on_the_first_equals_sign_and_the_last_one_wins() -> None:
    items = ["epochs=3", "expr=a=b", "empty=", "epochs=5"]
    assert parse_overrides(items) == {"epochs": "5", "expr": "a=b", "empty": ""}


@pytest.mark.parametrize("item", ["epochs", "=3", " =3"])
def test_an_override_needs_a_name_and_an_equals_sign(item: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_overrides([item])
    assert str(caught.value) == f"-p {item}: expected NAME=VALUE, e.g. -p epochs=20"


def _write(tmp_path: Path, params: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: p\nparams: {params}\nsteps: {{a: {{run: echo}}}}\n")
    return path


@pytest.mark.parametrize(
    ("default", "given", "expected"),
    [
        ("10", "20", 20),
        ("10", " -3 ", -3),
        ("0.5", "1e-3", 0.001),
        ("0.5", "2", 2.0),
        ("false", "YES", True),
        ("true", "0", False),
        ("true", "False", False),
        ("hello", "42", "42"),
        ("''", "  kept as typed ", "  kept as typed "),
        ("null", "3", "3"),
    ],
)
def test_overrides_take_the_type_of_the_default(
    tmp_path: Path, default: str, given: str, expected: object
) -> None:
    plan = compile_recipe(_write(tmp_path, f"{{x: {default}}}"), {"x": given})
    assert plan.params["x"] == expected
    assert type(plan.params["x"]) is type(expected)


@pytest.mark.parametrize(
    ("default", "given", "message"),
    [
        ("10", "1.5", "-p x=1.5: expected an integer"),
        ("0.5", "nan", "-p x=nan: expected a number"),
        ("0.5", "inf", "-p x=inf: expected a number"),
        ("true", "y", "-p x=y: expected true or false (or yes/no, 1/0)"),
        ("10", "a" * 100, f"-p x={'a' * 37}...: expected an integer"),
    ],
)
def test_overrides_that_do_not_fit_the_default(
    tmp_path: Path, default: str, given: str, message: str
) -> None:
    path = _write(tmp_path, f"{{x: {default}}}")
    with pytest.raises(RecipeError) as caught:
        compile_recipe(path, {"x": given})
    assert str(caught.value) == message


def _plan(step: Step, **params: str | int | float | bool) -> Plan:
    return Plan(
        name="p",
        description="",
        source=Path("recipe.yaml"),
        digest="sha256:" + "0" * 64,
        params=params,
        files=(),
        steps=(step,),
    )


def _step(
    run: str | None = None, argv: tuple[str, ...] | None = None, env: dict[str, str] | None = None
) -> Step:
    return Step(
        id="train",
        run=run,
        argv=argv,
        env=env or {},
        needs=(),
        outputs=(),
        target="local",
        retries=RetryPolicy(),
        timeout=None,
        location=SourceLocation(Path("recipe.yaml"), 7, 3),
    )


def test_an_undefined_name_at_dispatch_names_the_step() -> None:
    step = _step(run="python train.py --epochs {{ params.epoch }}")
    with pytest.raises(RecipeError) as caught:
        render_step(_plan(step, epochs=3), step, run_id="r1", target="local")
    assert str(caught.value) == (
        "recipe.yaml:7:3: steps.train.run: "
        "undefined name 'params.epoch' (did you mean 'params.epochs'?)"
    )


def test_render_errors_name_the_argv_item_or_env_variable() -> None:
    step = _step(argv=("python", "{{ target.host }}"))
    with pytest.raises(RecipeError) as caught:
        render_step(_plan(step), step, run_id="r1", target="pi-01")
    assert str(caught.value) == (
        "recipe.yaml:7:3: steps.train.argv[1]: "
        "undefined name 'target.host' (did you mean 'target.name'?)"
    )
    step = _step(argv=("true",), env={"RUN": "{{ run.ID }}"})
    with pytest.raises(RecipeError) as caught:
        render_step(_plan(step), step, run_id="r1", target="pi-01")
    assert str(caught.value) == (
        "recipe.yaml:7:3: steps.train.env.RUN: undefined name 'run.ID' (did you mean 'run.id'?)"
    )


def test_values_render_as_yaml_would_write_them() -> None:
    step = _step(
        run="train {{ params.on }} {{ params.off }} {{ params.n }} {{ params.rate }} {{ run.id }}",
        env={"TARGET": "{{ target.name }}", "ON": "{{ params.on }}"},
    )
    plan = _plan(step, on=True, off=False, n=3, rate=0.25)
    rendered = render_step(plan, step, run_id="run-42", target="pi-01")
    assert rendered.shell == "train true false 3 0.25 run-42"
    assert rendered.env == {"TARGET": "pi-01", "ON": "true"}
    assert rendered.argv is None


def test_jinja_statements_quote_each_value_not_the_literal_text() -> None:
    step = _step(run="{% for i in range(2) %}echo {{ params.msg }} {{ i }}; {% endfor %}")
    rendered = render_step(_plan(step, msg="a b"), step, run_id="r", target="local")
    assert rendered.shell == "echo 'a b' 0; echo 'a b' 1; "


def test_a_value_rendering_to_a_nul_character_is_refused() -> None:
    step = _step(argv=("echo", "{{ params.x }}"))
    with pytest.raises(RecipeError) as caught:
        render_step(_plan(step, x="a\0b"), step, run_id="r", target="local")
    assert str(caught.value) == (
        "recipe.yaml:7:3: steps.train.argv[1]: renders to text containing a NUL character"
    )

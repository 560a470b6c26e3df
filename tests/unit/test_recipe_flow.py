"""Matrix, built-ins, metrics, `when:` and results at dispatch, on recipes in recipes/good/."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import (
    Plan,
    compile_recipe,
    evaluate_when,
    plan_from_json,
    plan_to_json,
    render_options,
    render_step,
)

GOOD = Path(__file__).parent / "recipes" / "good"
README = Path(__file__).parents[2] / "README.md"
ORDERED = sorted(
    c for c in GOOD.glob("*.yaml") if c.read_text(encoding="utf-8").startswith("# expect: ")
)
CHILDREN = [f"train[hidden={h},lr={lr}]" for h in (32, 64) for lr in (0.1, 0.01)]


def _result(status: str = "succeeded", **metrics: object) -> dict[str, object]:
    return {"status": status, "metrics": metrics, "outputs": ["model.onnx", "metrics.json"]}


@pytest.fixture
def flow() -> Plan:
    return compile_recipe(GOOD / "flow.yaml")


def test_there_are_ordered_good_cases() -> None:
    assert len(ORDERED) >= 2


@pytest.mark.parametrize("case", ORDERED, ids=lambda p: p.stem)
def test_good_case_compiles_to_the_step_order_in_its_first_line(case: Path) -> None:
    expected = case.read_text(encoding="utf-8").splitlines()[0].removeprefix("# expect: ")
    assert [s.id for s in compile_recipe(case).steps] == expected.split()


def test_matrix_children_carry_their_values_group_and_the_step_fields(flow: Plan) -> None:
    children = [s for s in flow.steps if s.group == "train"]
    assert [s.id for s in children] == CHILDREN
    assert [dict(s.matrix) for s in children] == [
        {"hidden": 32, "lr": 0.1},
        {"hidden": 32, "lr": 0.01},
        {"hidden": 64, "lr": 0.1},
        {"hidden": 64, "lr": 0.01},
    ]
    first = children[0]
    assert first.run is not None and "{{ matrix.hidden }}" in first.run
    assert (first.needs, first.env, first.metrics) == (
        ("prepare",),
        {"HIDDEN": "{{ matrix.hidden }}"},
        "metrics.json",
    )
    assert all(dataclasses.replace(s, id=first.id, matrix=first.matrix) == first for s in children)
    assert flow.step("prepare").group == ""
    assert dict(flow.step("prepare").matrix) == {}


def test_needing_a_matrix_needs_every_child_in_order(flow: Plan) -> None:
    assert flow.step("pick").needs == tuple(CHILDREN)
    plan = compile_recipe(GOOD / "matrix-order.yaml")
    assert plan.step("solo").needs == ("sweep[opt=sgd,fast=false,scale=0.5]",)
    assert dict(plan.step("sweep[opt=sgd,fast=true,scale=0.5]").matrix) == {
        "opt": "sgd",
        "fast": True,
        "scale": 0.5,
    }


def test_metrics_file_is_an_output_once(flow: Plan) -> None:
    assert flow.step(CHILDREN[0]).outputs == ("model.onnx", "metrics.json")
    assert flow.step("evaluate").outputs == ("eval/metrics.json", "report.txt")
    assert flow.step("evaluate").metrics == "eval/metrics.json"


def test_builtin_steps_have_options_and_no_command(flow: Plan) -> None:
    pick, approve = flow.step("pick"), flow.step("approve")
    assert (pick.uses, dict(pick.options)) == ("mle/select", {"metric": "accuracy", "mode": "max"})
    assert (pick.run, pick.argv, pick.outputs, pick.metrics) == (None, None, (), None)
    assert approve.uses == "mle/approve"
    assert dict(approve.options) == {
        "message": "accuracy {{ steps.evaluate.metrics.accuracy }}: ship it?",
        "auto": "{{ params.auto_approve }}",
    }
    assert approve.when == "steps.evaluate.metrics.accuracy >= params.min_accuracy"


def test_trigger_cache_and_when_defaults(flow: Plan) -> None:
    prepare, evaluate, report = flow.step("prepare"), flow.step("evaluate"), flow.step("report")
    assert (prepare.trigger, prepare.cache, prepare.when) == ("all-succeeded", True, None)
    assert evaluate.cache is False
    assert report.trigger == "all-done"
    plan = compile_recipe(GOOD / "matrix-order.yaml")
    assert (plan.step("final").when, plan.step("solo").when) == ("true", "false")
    assert plan.step("sweep[opt=adam,fast=true,scale=0.5]").trigger == "none-failed"


def test_a_matrix_child_renders_its_own_values(flow: Plan) -> None:
    rendered = render_step(flow, flow.step(CHILDREN[3]), run_id="r1", target="local")
    assert rendered.shell == "python steps/train.py --hidden 64 --lr 0.01 --epochs 10"
    assert rendered.env == {"HIDDEN": "64"}


def test_results_of_upstream_steps_render_at_dispatch(flow: Plan) -> None:
    steps = {
        "pick": _result(accuracy=0.93),
        "evaluate": {"status": "succeeded", "metrics": {"accuracy": 0.91}, "outputs": ["a b", "r"]},
        "approve": _result(status="skipped"),
        CHILDREN[3]: _result(loss=0.25),
    }
    evaluate = render_step(flow, flow.step("evaluate"), run_id="r", target="local", steps=steps)
    assert evaluate.argv == ("python", "steps/evaluate.py", "model.onnx", "--picked", "0.93")
    report = render_step(flow, flow.step("report"), run_id="r", target="local", steps=steps)
    # In `run:` a list renders as one quoted word per item.
    assert report.shell == "echo skipped 0.25 'a b' r"


def test_options_render_with_results_and_stay_text(flow: Plan) -> None:
    steps = {"evaluate": _result(accuracy=0.91)}
    options = render_options(flow, flow.step("approve"), run_id="r", target="local", steps=steps)
    assert options == {"message": "accuracy 0.91: ship it?", "auto": "false"}
    pick = render_options(flow, flow.step("pick"), run_id="r", target="local")
    assert pick == {"metric": "accuracy", "mode": "max"}


def test_a_missing_result_or_metric_at_dispatch_names_the_step(flow: Plan) -> None:
    with pytest.raises(RecipeError) as caught:
        render_step(flow, flow.step("evaluate"), run_id="r", target="local")
    assert str(caught.value) == (
        f"{GOOD / 'flow.yaml'}:28:3: steps.evaluate.argv[2]: 'steps.pick' has no result yet"
    )
    steps = {"evaluate": _result(acc=0.91)}
    with pytest.raises(RecipeError) as caught:
        render_options(flow, flow.step("approve"), run_id="r", target="local", steps=steps)
    assert str(caught.value) == (
        f"{GOOD / 'flow.yaml'}:35:3: steps.approve.with.message: undefined name "
        "'steps.evaluate.metrics.accuracy' (did you mean 'steps.evaluate.metrics.acc'?)"
    )


@pytest.mark.parametrize(("accuracy", "expected"), [(0.95, True), (0.9, True), (0.89, False)])
def test_when_compares_an_upstream_metric_with_a_param(
    flow: Plan, accuracy: float, expected: bool
) -> None:
    context = {
        "params": flow.params,
        "matrix": {},
        "steps": {"evaluate": _result(accuracy=accuracy)},
    }
    assert evaluate_when(flow, flow.step("approve"), context) is expected


def test_when_that_cannot_be_evaluated_names_the_step_and_expression(flow: Plan) -> None:
    approve = flow.step("approve")
    context = {"params": flow.params, "matrix": {}, "steps": {"evaluate": _result(accuracy="high")}}
    with pytest.raises(RecipeError) as caught:
        evaluate_when(flow, approve, context)
    assert str(caught.value) == (
        f"{GOOD / 'flow.yaml'}:35:3: steps.approve.when: cannot evaluate "
        "'steps.evaluate.metrics.accuracy >= params.min_accuracy': "
        "cannot compare a text (\"high\") with a number (0.9) using '>='"
    )
    with pytest.raises(RecipeError) as caught:
        evaluate_when(flow, approve, {"steps": {"evaluate": _result(loss=1)}})
    assert str(caught.value).endswith(
        ": undefined name 'steps.evaluate.metrics.accuracy' "
        "(did you mean 'steps.evaluate.metrics.loss'?)"
    )


def test_when_defaults_to_the_plan_params_and_the_child_matrix() -> None:
    plan = compile_recipe(GOOD / "matrix-order.yaml")
    verdicts = {
        s.id: evaluate_when(plan, s, {"steps": {}}) for s in plan.steps if s.group == "sweep"
    }
    assert list(verdicts.values()) == [True, True, False, True]
    assert evaluate_when(plan, plan.step("report-1"), {}) is True  # no when: always runs
    assert evaluate_when(plan, plan.step("solo"), {}) is False


def test_a_plan_survives_json_exactly(flow: Plan) -> None:
    text = plan_to_json(flow)
    again = plan_from_json(text)
    assert again == flow
    assert isinstance(again.source, Path) and isinstance(again.step("pick").location.file, Path)
    assert list(again.step(CHILDREN[0]).matrix) == ["hidden", "lr"]  # order kept, not sorted
    assert plan_to_json(again) == text
    assert json.loads(text)["steps"][0]["id"] == "prepare"
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_plan_hash_is_the_sha256_of_its_json(flow: Plan) -> None:
    assert flow.hash == hashlib.sha256(plan_to_json(flow).encode()).hexdigest()
    assert compile_recipe(GOOD / "flow.yaml").hash == flow.hash
    assert compile_recipe(GOOD / "flow.yaml", {"epochs": "11"}).hash != flow.hash


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("not json", "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"),
        ('{"format": 2}', "ValueError: format 2, expected 1"),
        ('{"format": 1}', "KeyError: 'name'"),
        ("[]", "TypeError: list indices must be integers or slices, not str"),
    ],
)
def test_a_stored_plan_that_is_not_one_is_refused(text: str, problem: str) -> None:
    with pytest.raises(RecipeError) as caught:
        plan_from_json(text)
    assert str(caught.value) == f"the stored plan cannot be read: {problem}"


def test_the_readme_example_of_matrix_select_and_approve_compiles(tmp_path: Path) -> None:
    [fragment] = re.findall(r"```yaml\n(  train:.*?)```", README.read_text(), flags=re.S)
    header = "name: readme\nparams: {min_accuracy: 0.9}\nsteps:\n  prepare: {run: echo}\n"
    (tmp_path / "recipe.yaml").write_text(header + fragment)
    plan = compile_recipe(tmp_path / "recipe.yaml")
    assert [s.id for s in plan.steps] == [
        "prepare",
        "train[hidden=32]",
        "train[hidden=64]",
        "pick",
        "ship",
    ]
    assert plan.step("ship").when == "steps.pick.metrics.accuracy >= params.min_accuracy"

"""Recipes in recipes/good/ compile to the Plan their text describes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mle_cli.recipe import Plan, RetryPolicy, SourceLocation, compile_recipe, render_step

GOOD = Path(__file__).parent / "recipes" / "good"


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Plan:
    monkeypatch.chdir(GOOD)
    return compile_recipe(Path("pipeline.yaml"), {"epochs": "3", "quick": "yes"})


@pytest.mark.parametrize("case", sorted(GOOD.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_good_recipe_compiles(case: Path) -> None:
    plan = compile_recipe(case)
    assert plan.source == case
    assert plan.digest == _sha256(case)
    assert plan.steps


def test_steps_come_in_topological_order_with_ties_in_declaration_order(pipeline: Plan) -> None:
    # Declared: evaluate, train, prepare, report. report and train both wait only for prepare;
    # train is declared first, and evaluate (declared first of all) runs as soon as train is done.
    assert [s.id for s in pipeline.steps] == ["prepare", "train", "evaluate", "report"]
    assert pipeline.step("train").needs == ("prepare",)
    assert pipeline.step("evaluate").needs == ("train",)


def test_header_and_params_are_typed_like_their_defaults(pipeline: Plan) -> None:
    assert pipeline.name == "digits-edge"
    assert pipeline.description == "Train and evaluate a digits classifier."
    assert pipeline.source == Path("pipeline.yaml")
    assert dict(pipeline.params) == {
        "epochs": 3,
        "min_accuracy": 0.9,
        "dataset": "digits",
        "quick": True,
    }


def test_retries_merge_field_by_field_over_defaults(pipeline: Plan) -> None:
    base = RetryPolicy(max=2, backoff=2.0, factor=2.0, max_delay=60.0)
    assert pipeline.step("prepare").retries == base
    assert pipeline.step("train").retries == RetryPolicy(2, 2.0, 3.0, 60.0)
    assert pipeline.step("evaluate").retries == RetryPolicy(0, 2.0, 2.0, 60.0)
    assert pipeline.step("train").retries.delay(3) == 18.0


def test_timeouts_default_and_override(pipeline: Plan) -> None:
    timeouts = {s.id: s.timeout for s in pipeline.steps}
    assert timeouts == {"prepare": 5400.0, "train": 1800.0, "evaluate": 90.0, "report": 1800.0}


def test_env_merges_step_values_over_defaults(pipeline: Plan) -> None:
    assert pipeline.step("prepare").env == {
        "PYTHONUNBUFFERED": "1",
        "DATASET": "{{ params.dataset }}",
        "SEED": "42",
    }
    assert pipeline.step("evaluate").env == {"PYTHONUNBUFFERED": "1", "DATASET": "test"}


def test_commands_outputs_and_placement(pipeline: Plan) -> None:
    prepare, train = pipeline.step("prepare"), pipeline.step("train")
    assert prepare.run == "python steps/prepare.py --out data.npz\n"
    assert prepare.argv is None
    assert prepare.outputs == ("data.npz",)
    assert train.outputs == ("model.onnx", "logs/train.txt")
    assert train.target == "pi-*"
    assert prepare.target == "local"
    assert pipeline.step("evaluate").argv == (
        "python",
        "steps/evaluate.py",
        "--min-accuracy",
        "{{ params.min_accuracy }}",
    )
    assert train.location == SourceLocation(Path("pipeline.yaml"), 25, 3)


def test_files_are_matched_hashed_and_sorted(pipeline: Plan) -> None:
    expected = ["config/model.json", "steps/prepare.py", "steps/train.py"]
    assert [f.path for f in pipeline.files] == expected  # notes.txt unmatched, config/extra a dir
    for shipped in pipeline.files:
        assert shipped.source == (GOOD / shipped.path).resolve()
        assert shipped.digest == _sha256(GOOD / shipped.path)
        assert shipped.size == (GOOD / shipped.path).stat().st_size


def test_rendering_a_step_uses_params_run_and_target(pipeline: Plan) -> None:
    train = render_step(pipeline, pipeline.step("train"), run_id="r-7", target="pi-01")
    assert train.shell == "python steps/train.py --epochs 3 --quick true --run r-7"
    assert train.argv is None
    assert train.env == {"PYTHONUNBUFFERED": "1", "DATASET": "digits"}
    report = render_step(pipeline, pipeline.step("report"), run_id="r-7", target="pi-01")
    assert report.shell is None
    assert report.argv == ("echo", "pi-01")


def test_minimal_recipe_gets_the_documented_defaults() -> None:
    plan = compile_recipe(GOOD / "minimal.yaml")
    (step,) = plan.steps
    assert (plan.name, plan.description, dict(plan.params), plan.files) == ("hello", "", {}, ())
    assert step.argv == ("echo", "hello")
    assert (step.run, step.needs, step.outputs, step.env) == (None, (), (), {})
    assert (step.target, step.retries, step.timeout) == ("local", RetryPolicy(), None)


def test_yaml_scalars_that_are_really_text_stay_as_written() -> None:
    plan = compile_recipe(GOOD / "yaml-strings.yaml")
    assert plan.description == "2024-01-01"
    assert dict(plan.params) == {"country": "no", "flag": True}
    first = plan.step("1")
    assert first.target == "local"
    assert first.argv == ("echo", "yes", "off", "010", "1.50", "=", "2024-01-01")
    assert first.env == {"DEBUG": "yes", "LEVEL": "010", "RATIO": "1.50", "FLAG": "true"}
    assert plan.step("reused").env == plan.step("aliased").env == {"MODE": "fast"}


def test_compiling_twice_gives_equal_plans(pipeline: Plan) -> None:
    assert compile_recipe(Path("pipeline.yaml"), {"epochs": "3", "quick": "yes"}) == pipeline

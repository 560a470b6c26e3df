"""Built-in steps compiled: mle/quantize and mle/benchmark become commands, mle/deploy keeps its
options. Each case in recipes/good/builtin-*.yaml says, in its header, what one step compiles to."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from mle_cli.deploying import matching_targets
from mle_cli.recipe import (
    DeploySpec,
    OptionProblem,
    Plan,
    Step,
    compile_recipe,
    deploy_spec,
    plan_from_json,
    plan_to_json,
    render_options,
    render_step,
)
from mle_cli.targets.fleet import Target
from mle_proto.errors import MleError

GOOD = Path(__file__).parent / "recipes" / "good"
CASES = sorted(GOOD.glob("builtin-*.yaml"))


def _header(case: Path) -> dict[str, str]:
    """The `# key: value` lines at the top of a case."""
    header: dict[str, str] = {}
    for line in case.read_text(encoding="utf-8").splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        header[key] = value
    return header


def _results(plan: Plan, step: Step) -> dict[str, dict[str, Any]]:
    """What templates see of every step upstream, as if each succeeded (mle/select: its first
    candidate's outputs)."""
    results: dict[str, dict[str, Any]] = {}
    for s in plan.steps:
        outputs = plan.step(s.needs[0]).outputs if s.uses == "mle/select" else s.outputs
        results[s.id] = {"status": "succeeded", "metrics": {}, "outputs": list(outputs)}
    return {k: v for k, v in results.items() if k != step.id}


def test_there_are_cases_for_each_built_in() -> None:
    uses = {line for case in CASES for line in case.read_text().split() if line.startswith("mle/")}
    assert {"mle/quantize", "mle/benchmark", "mle/deploy"} <= uses


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_built_in_step_compiles_to_its_header(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOOD)
    header = _header(case)
    plan = compile_recipe(Path(case.name))
    step = plan.step(header["step"])
    if "run" in header:  # a task built-in: an ordinary command step from here on
        assert (step.run, step.argv, step.uses, dict(step.options)) == (
            header["run"],
            None,
            None,
            {},
        )
        assert step.outputs == tuple(shlex.split(header["outputs"]))
        assert step.metrics == header["metrics"]
    else:
        assert (step.run, step.argv, step.outputs, step.metrics) == (None, None, (), None)
        assert step.uses == header["uses"]
        assert step.each == json.loads(header["each"])
        assert dict(step.options) == json.loads(header["options"])
    if "target" in header:
        assert step.target == header["target"]
    if "rendered" in header:
        rendered = render_step(plan, step, run_id="r", target="local", steps=_results(plan, step))
        assert rendered.shell == header["rendered"]
    if "spec" in header:
        options = render_options(plan, step, run_id="r", target="local", steps=_results(plan, step))
        assert deploy_spec(options) == DeploySpec(**json.loads(header["spec"]))


def test_each_value_is_one_shell_word_whatever_it_renders_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(GOOD)
    plan = compile_recipe(Path("builtin-quantize-templates.yaml"))
    step = plan.step("quantize")
    shell = render_step(plan, step, run_id="r", target="local", steps=_results(plan, step)).shell
    assert shell is not None
    assert shlex.split(shell)[2:] == [
        "mle_agent.tools.quantize",
        "model.onnx",
        "--mode",
        "int8-static",
        "--calibration",
        "data dir/cal.npy",
        "--eval",
        "eval set/test; rm -rf x.npz",
        "--out",
        "small.onnx",
        "--metrics",
        "quantize.json",
    ]


def test_a_metric_of_a_task_built_in_can_be_read_downstream(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\n"
        "steps:\n"
        "  q:\n"
        "    uses: mle/quantize\n"
        "    with: {model: m.onnx}\n"
        "  report:\n"
        "    needs: [q]\n"
        "    when: steps.q.metrics.accuracy_after >= 0.9\n"
        "    run: echo {{ steps.q.metrics.accuracy_after }} {{ steps.q.outputs[0] }}\n"
    )
    plan = compile_recipe(recipe)
    results = {"q": {"status": "succeeded", "metrics": {"accuracy_after": 0.95}, "outputs": []}}
    results["q"]["outputs"] = list(plan.step("q").outputs)
    shell = render_step(plan, plan.step("report"), run_id="r", target="local", steps=results)
    assert shell.shell == "echo 0.95 m.int8.onnx"


def test_plans_with_built_ins_survive_json_and_hash_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(GOOD)
    for case in CASES:
        plan = compile_recipe(Path(case.name))
        again = plan_from_json(plan_to_json(plan))
        assert again == plan
        assert compile_recipe(Path(case.name)).hash == plan.hash == again.hash


def test_a_plan_stored_before_each_existed_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOOD)
    plan = compile_recipe(Path("builtin-quantize.yaml"))
    data = json.loads(plan_to_json(plan))
    for step in data["steps"]:
        del step["each"]
    assert plan_from_json(json.dumps(data)) == plan


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"name": "x"}, "model", "mle/deploy needs the model file: with: {model: PATH}"),
        ({"model": "../m.onnx"}, "model", "path '../m.onnx' escapes the work dir"),
        ({"model": ""}, "model", "expected a path, got an empty string"),
        (
            {"model": "-x.onnx"},
            "name",
            "invalid model name '-x': use lowercase letters, digits, '_', '.', '-' "
            "(name it with name: NAME)",
        ),
        (
            {"model": "m.onnx", "name": "My Model"},
            "name",
            "invalid model name 'My Model': use lowercase letters, digits, '_', '.', '-'",
        ),
        (
            {"model": "m.onnx", "canary": "0%"},
            "canary",
            "expected a percentage from 0% to 100%, e.g. 10%, got '0%'",
        ),
        (
            {"model": "m.onnx", "canary": "nan"},
            "canary",
            "expected a percentage from 0% to 100%, e.g. 10%, got 'nan'",
        ),
        (
            {"model": "m.onnx", "version": "1.5"},
            "version",
            "expected a version number (1 or more), got '1.5'",
        ),
        (
            {"model": "m.onnx", "batch": True},
            "batch",
            "expected a number of targets per batch (1 or more), got true/false",
        ),
        (
            {"model": "m.onnx", "smoke_min_accuracy": "0.9"},
            "smoke_min_accuracy",
            "smoke_min_accuracy needs a smoke test file: add smoke: PATH (.npz with X, y)",
        ),
    ],
)
def test_rendered_deploy_options_are_checked_at_dispatch(
    options: dict[str, Any], key: str, message: str
) -> None:
    with pytest.raises(OptionProblem) as caught:
        deploy_spec(options)
    assert (caught.value.key, caught.value.message) == (key, message)


def test_the_default_model_name_is_the_file_name_up_to_its_first_dot() -> None:
    assert deploy_spec({"model": "out/Digits.int8.onnx"}).name == "digits"


def test_deploy_options_convert_to_numbers() -> None:
    spec = deploy_spec(
        {
            "model": "./out//model.int8.onnx",
            "canary": " 12.5% ",
            "version": "7",
            "batch": 3,
            "max_failures": "0",
            "smoke": "smoke.npz",
            "smoke_min_accuracy": "1.01",
        }
    )
    assert spec == DeploySpec(
        model="out/model.int8.onnx",
        name="model",
        canary=12.5,
        version=7,
        batch=3,
        max_failures=0,
        smoke="smoke.npz",
        smoke_min_accuracy=1.01,
    )


FLEET = [
    Target("local", ""),
    Target("pi-02", "10.0.0.12:7443", {"role": "edge"}, "mdns"),
    Target("pi-03", "10.0.0.13:7443", {"role": "edge"}, "mdns", "gone"),
    Target("pi-01", "10.0.0.11:7443", {"role": "edge", "site": "lab"}, "mdns"),
    Target("srv-01", "10.0.0.2:7443", {"role": "server"}, "inventory"),
]


@pytest.mark.parametrize(
    ("placement", "each", "expected"),
    [
        ("local", True, ["local"]),
        ("pi-01", False, ["pi-01"]),  # a name: resolving it says whether it exists
        ("pi-*", True, ["pi-01", "pi-02"]),
        ("pi-0[2]", False, ["pi-02"]),
        ("role=edge", True, ["pi-01", "pi-02"]),
        ("pi-* site=lab", False, ["pi-01"]),
    ],
)
def test_deploy_placement_matches_known_targets(
    placement: str, each: bool, expected: list[str]
) -> None:
    assert matching_targets(placement, FLEET, each) == expected


@pytest.mark.parametrize(
    ("placement", "each", "message"),
    [
        (
            "gpu-*",
            True,
            "no target matches 'gpu-*'; targets seen: local, pi-02 (role=edge), "
            "pi-03 (role=edge, gone), pi-01 (role=edge, site=lab), srv-01 (role=server)",
        ),
        (
            "pi-03",
            False,
            "no target matches 'pi-03'; targets seen: local, pi-02 (role=edge), "
            "pi-03 (role=edge, gone), pi-01 (role=edge, site=lab), srv-01 (role=server)",
        ),
        (
            "pi-*",
            False,
            "on: 'pi-*' matches 2 targets (pi-01, pi-02): add each: true to deploy to every one",
        ),
    ],
)
def test_deploy_placement_that_matches_no_or_too_many_targets_is_refused(
    placement: str, each: bool, message: str
) -> None:
    with pytest.raises(MleError) as caught:
        matching_targets(placement, FLEET, each)
    assert str(caught.value) == message

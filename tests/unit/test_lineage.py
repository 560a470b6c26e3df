"""Lineage of deployed versions from a real SQLite ledger: `mle models --lineage`, `mle show`.

The run is recorded the way the scheduler records one of recipes/digits-edge.yaml (its real
compiled plan, steps rows with cache_parts, outputs, metrics, mle/select's choice), then models
are deployed, re-routed, rolled back and undeployed as deployments rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mle_cli.ledger import ArtifactRecord, DeploymentRecord, Ledger, deployments
from mle_cli.models.lineage import (
    ModelRef,
    model_lineage,
    parse_model_ref,
    placements,
    route_role,
    run_models,
)
from mle_cli.models.routes import RouteSpec
from mle_cli.models.views import lineage_lines
from mle_cli.recipe import Plan, compile_recipe, plan_to_json
from mle_proto.errors import NotFound, UsageError
from tests.conftest import REPO

RUN = "20261122-101500-abcd"
ACCURACY = {"train[hidden=16]": 0.9704, "train[hidden=32]": 0.963, "train[hidden=64]": 0.9778}
PICKED = "train[hidden=64]"


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def route(*split: tuple[int, float], **extra: Any) -> dict[str, Any]:
    return RouteSpec(split=tuple(split), **extra).to_dict()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    try:
        yield led
    finally:
        led.close()


def record_run(ledger: Ledger, run_id: str = RUN) -> Plan:
    """A succeeded run of digits-edge, as the scheduler records it."""
    plan = compile_recipe(REPO / "recipes" / "digits-edge.yaml", {"auto_approve": "true"})
    ledger.create_run(
        run_id,
        recipe=plan.name,
        source="recipes/digits-edge.yaml",
        recipe_digest=plan.digest,
        params=dict(plan.params),
        steps=[(s.id, s.target, s.needs) for s in plan.steps],
        plan=plan_to_json(plan),
    )
    ledger.update_run(run_id, status="succeeded", started=1000.0, finished=1012.5)
    outputs: dict[str, dict[str, str]] = {
        "prepare": {p: digest(p) for p in ("data.npz", "test.npz", "calibration.npy")},
        "quantize": {"model.int8.onnx": digest("int8"), "quantize.json": digest("q")},
        "evaluate": {"evaluation.json": digest("e")},
    }
    for child in ACCURACY:
        outputs[child] = {"model.onnx": digest(child), "metrics.json": digest(child + "m")}
    outputs["pick"] = outputs[PICKED]
    inputs = {
        "quantize": {**outputs["pick"], **outputs["prepare"]},
        **{child: outputs["prepare"] for child in ACCURACY},
    }
    for step in plan.steps:
        parts = {"inputs": inputs.get(step.id, {}), "files": {}, "version": 1}
        ledger.update_step(
            run_id,
            step.id,
            status="succeeded",
            cache_parts=json.dumps(parts) if not step.uses else None,
        )
        ledger.record_artifacts(
            ArtifactRecord(run_id, step.id, p, d, 100) for p, d in outputs.get(step.id, {}).items()
        )
    for child, accuracy in ACCURACY.items():
        ledger.record_metrics(run_id, child, {"accuracy": accuracy, "hidden": int(child[-3:-1])})
    ledger.record_metrics(run_id, "pick", {"accuracy": ACCURACY[PICKED], "selected": PICKED})
    ledger.record_metrics(run_id, "quantize", {"accuracy_after": 0.98, "ratio": 3.15})
    return plan


def deploy(ledger: Ledger, version: int, file: str, **fields: Any) -> None:
    fields.setdefault("route", route((version, 100.0)))
    fields.setdefault("created", True)
    record = DeploymentRecord(
        target=fields.pop("target", "local"),
        agent="local",
        model=fields.pop("model", "digits"),
        action="deploy",
        operator="me@host",
        version=version,
        digest=digest(file),
        runtime="onnxruntime",
        filename=file,
        size=6220,
        **fields,
    )
    deployments.record_deployment(ledger, record)


def change(ledger: Ledger, action: str, version: int | None, new_route: Any = None) -> None:
    deployments.record_deployment(
        ledger,
        DeploymentRecord(
            "local", "local", "digits", action, "me@host", version=version, route=new_route
        ),
    )


# -- naming a version -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits@3", ModelRef("digits", 3)),
        ("digits", ModelRef("digits", None)),
        ("digits@latest", ModelRef("digits", None)),
        (" my-model.v2@12 ", ModelRef("my-model.v2", 12)),
    ],
)
def test_a_version_is_named_name_at_version(text: str, expected: ModelRef) -> None:
    assert parse_model_ref(text) == expected


@pytest.mark.parametrize("text", ["Digits@3", "digits@", "digits@x", "@3", "", "digits@-1"])
def test_a_bad_version_name_is_one_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_model_ref(text)
    assert str(caught.value) == (
        f"invalid model version {text!r}: write NAME@VERSION, e.g. digits@3"
    )


# -- lineage of a version a run made ----------------------------------------------------------


def test_lineage_walks_from_the_deployed_file_back_to_the_data(ledger: Ledger) -> None:
    record_run(ledger)
    deploy(ledger, 1, "int8", source_run=RUN, source_step="quantize")
    found = model_lineage(ledger, ModelRef("digits", 1))
    assert (found["model"], found["version"], found["digest"]) == ("digits", 1, digest("int8"))
    assert found["source"] == {"run": RUN, "step": "quantize"}
    assert found["run"]["id"] == RUN
    assert found["run"]["params"]["auto_approve"] is True
    assert found["run"]["status"] == "succeeded"
    assert set(found["files"]) >= {"steps/digits_train.py", "steps/digits_mlp.py"}
    chain = [s["step"] for s in found["steps"]]
    # through mle/select, only the child it picked; the other candidates are named on pick
    assert chain == ["prepare", PICKED, "pick", "quantize"]
    train, pick, quantize = found["steps"][1:]
    assert train["inputs"]["data.npz"] == digest("data.npz")
    assert train["metrics"] == {"accuracy": 0.9778, "hidden": 64}
    assert train["matrix"] == {"hidden": 64}
    assert "--hidden 64 --max-iter 200 --seed 0" in train["command"]
    assert pick["uses"] == "mle/select"
    assert pick["selected_by"] == "accuracy"
    assert pick["candidates"] == ACCURACY
    assert quantize["made"] == "model.int8.onnx"
    assert quantize["inputs"]["model.onnx"] == digest(PICKED)
    assert quantize["metrics"]["ratio"] == 3.15
    assert found["placements"] == [
        {
            "target": "local",
            "model": "digits",
            "version": 1,
            "state": "serving 100%",
            "route": "v1 100%",
        }
    ]


def test_lineage_lines_name_the_run_the_picked_child_and_where_it_serves(ledger: Ledger) -> None:
    record_run(ledger)
    deploy(ledger, 1, "int8", source_run=RUN, source_step="quantize")
    lines = lineage_lines(model_lineage(ledger, ModelRef("digits", 1)))
    text = "\n".join(lines)
    assert lines[0].startswith("digits v1: int8 (sha256:")
    assert "  now on local: digits v1 serving 100% (route: v1 100%)" in lines
    assert f"made by run {RUN}, step quantize" in lines
    assert "  quantize: succeeded on local, made model.int8.onnx" in lines
    assert (
        f"    picked {PICKED} among train[hidden=16] (accuracy=0.9704), "
        "train[hidden=32] (accuracy=0.963), train[hidden=64] (accuracy=0.9778)"
    ) in lines
    assert f"    inputs: calibration.npy {digest('calibration.npy')[:19]}" in text
    assert "    metrics: accuracy=0.9778, hidden=64" in lines


def test_a_version_deployed_by_hand_says_no_run_made_it(ledger: Ledger) -> None:
    deploy(ledger, 1, "mine.onnx")
    found = model_lineage(ledger, ModelRef("digits", 1))
    assert found["source"] is None
    assert found["steps"] == []
    lines = lineage_lines(found)
    assert lines[-1] == (
        f"deployed by hand from mine.onnx ({digest('mine.onnx')}): "
        "no run in this ledger produced that file"
    )


def test_a_run_gone_from_the_ledger_is_said_so(ledger: Ledger) -> None:
    deploy(ledger, 1, "int8", source_run="20200101-000000-gone", source_step="quantize")
    found = model_lineage(ledger, ModelRef("digits", 1))
    assert found["missing"] == "run 20200101-000000-gone is no longer in this ledger"
    assert lineage_lines(found)[-1] == "  run 20200101-000000-gone is no longer in this ledger"


# -- which version -----------------------------------------------------------------------------


def test_without_a_version_the_latest_deployed_is_shown(ledger: Ledger) -> None:
    deploy(ledger, 1, "a.onnx")
    deploy(ledger, 2, "b.onnx")
    assert model_lineage(ledger, ModelRef("digits"))["digest"] == digest("b.onnx")
    assert model_lineage(ledger, ModelRef("digits", 1))["digest"] == digest("a.onnx")


def test_an_unknown_version_or_model_names_what_exists(ledger: Ledger) -> None:
    deploy(ledger, 1, "a.onnx")
    deploy(ledger, 2, "b.onnx")
    with pytest.raises(NotFound) as caught:
        model_lineage(ledger, ModelRef("digits", 7))
    assert str(caught.value) == "digits@7 was never deployed (deployed versions: 1, 2)"
    with pytest.raises(NotFound) as caught:
        model_lineage(ledger, ModelRef("faces", 1), target="pi-01")
    assert str(caught.value) == (
        "faces was never deployed on pi-01 (the ledger has no deployment of it)"
    )


def test_the_same_version_number_of_different_files_needs_a_target(ledger: Ledger) -> None:
    deploy(ledger, 1, "a.onnx", target="pi-01")
    deploy(ledger, 1, "b.onnx", target="pi-02")
    with pytest.raises(UsageError) as caught:
        model_lineage(ledger, ModelRef("digits", 1))
    assert str(caught.value) == "digits@1 is a different file on pi-01, pi-02"
    assert caught.value.hint == "choose one with --target"
    found = model_lineage(ledger, ModelRef("digits", 1), target="pi-02")
    assert found["digest"] == digest("b.onnx")
    assert [d["target"] for d in found["deployments"]] == ["pi-02"]


def test_one_file_on_several_targets_is_one_lineage(ledger: Ledger) -> None:
    deploy(ledger, 1, "a.onnx", target="pi-01")
    deploy(ledger, 1, "a.onnx", target="pi-02")
    found = model_lineage(ledger, ModelRef("digits", 1))
    assert [d["target"] for d in found["deployments"]] == ["pi-01", "pi-02"]
    assert [p["target"] for p in found["placements"]] == ["pi-01", "pi-02"]


# -- where it is deployed now -------------------------------------------------------------------


def test_placements_follow_route_changes_rollbacks_and_undeploys(ledger: Ledger) -> None:
    deploy(ledger, 1, "a.onnx")
    deploy(ledger, 2, "b.onnx", route=route((1, 90.0), (2, 10.0)))
    assert [p["state"] for p in placements(ledger, digest("a.onnx"))] == ["serving 90%"]
    assert placements(ledger, digest("b.onnx"))[0]["route"] == "v1 90%, v2 10%"
    change(ledger, "route", 1, route((1, 100.0), shadow=2))
    assert placements(ledger, digest("b.onnx"))[0]["state"] == "shadow"
    change(ledger, "rollback", 1, route((1, 90.0), (2, 10.0)))
    assert placements(ledger, digest("b.onnx"))[0]["state"] == "serving 10%"
    change(ledger, "undeploy", 2)
    assert placements(ledger, digest("b.onnx"))[0]["state"] == "undeployed"
    assert placements(ledger, digest("a.onnx"))[0]["state"] == "serving 90%"
    change(ledger, "undeploy", None)  # the whole model
    assert placements(ledger, digest("a.onnx"))[0]["state"] == "undeployed"


@pytest.mark.parametrize(
    ("spec", "version", "role"),
    [
        (RouteSpec(split=((3, 100.0),)), 3, "serving 100%"),
        (RouteSpec(split=((3, 100.0),)), 2, "loaded, not routed"),
        (RouteSpec(split=((3, 100.0),), shadow=2), 2, "shadow"),
        (
            RouteSpec(policy="fallback", split=((3, 100.0),), secondary=2, deadline=0.02),
            2,
            "fallback for late calls",
        ),
        (RouteSpec(policy="consensus", members=(1, 2, 3)), 2, "consensus member"),
    ],
)
def test_route_roles(spec: RouteSpec, version: int, role: str) -> None:
    assert route_role(spec, version) == role


# -- mle show: the models a run produced ------------------------------------------------------


def test_run_models_lists_the_runs_deployments_and_what_they_do_now(ledger: Ledger) -> None:
    record_run(ledger)
    deploy(ledger, 1, "int8", source_run=RUN, source_step="quantize")
    deploy(ledger, 1, "int8", target="pi-01", source_run=RUN, source_step="quantize")
    deploy(ledger, 2, "other.onnx")  # by hand: not this run's
    models = run_models(ledger, RUN)
    assert [(m["model"], m["version"], m["target"], m["action"]) for m in models] == [
        ("digits", 1, "local", "deploy"),
        ("digits", 1, "pi-01", "deploy"),
    ]
    assert [m["now"] for m in models] == ["loaded, not routed", "serving 100%"]
    assert models[0]["step"] == "quantize"
    assert run_models(ledger, "20200101-000000-none") == []


def test_a_later_run_redeploying_the_same_file_keeps_the_first_runs_lineage(
    ledger: Ledger,
) -> None:
    record_run(ledger)
    record_run(ledger, "20261122-111500-efgh")  # everything cached: the same file again
    deploy(ledger, 1, "int8", source_run=RUN, source_step="quantize")
    deploy(
        ledger, 1, "int8", created=False, source_run="20261122-111500-efgh", source_step="quantize"
    )
    found = model_lineage(ledger, ModelRef("digits", 1))
    assert found["source"] == {"run": RUN, "step": "quantize"}
    assert [d["created"] for d in found["deployments"]] == [True]
    (again,) = run_models(ledger, "20261122-111500-efgh")
    assert (again["action"], again["now"]) == ("already deployed", "serving 100%")

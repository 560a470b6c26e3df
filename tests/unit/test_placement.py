"""Placement: selectors against a fleet, `each:` expanded, and the choice among matching agents."""

from __future__ import annotations

from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.placement import Load, choose, explain, place_plan
from mle_cli.recipe import Plan, compile_recipe
from mle_cli.targets.fleet import Target

FLEET = [
    Target("local", ""),
    Target("srv-01", "10.0.0.2:7443", {"role": "server"}, "inventory", "unknown"),
    Target("pi-01", "10.0.0.11:7443", {"role": "edge"}, "mdns"),
    Target("pi-02", "10.0.0.12:7443", {"role": "edge"}, "inventory+mdns"),
    Target("pi-03", "10.0.0.13:7443", {"role": "edge"}, "mdns", "gone"),
    Target("pi-04", "", {"role": "edge"}, "inventory", "unknown"),  # no host, never seen
]

RECIPE = """\
name: fleet
steps:
  prepare:
    run: echo prepare > data.txt
    on: {labels: {role: server}}
    outputs: [data.txt]
  probe:
    needs: [prepare]
    run: echo "{{ target.name }}"
    on: {names: ["pi-*"], labels: {role: edge}}
    each: true
  report:
    needs: [probe]
    run: echo done
"""


def _plan(tmp_path: Path, text: str = RECIPE) -> Plan:
    recipe = tmp_path / "fleet.yaml"
    recipe.write_text(text)
    return compile_recipe(recipe)


def test_each_runs_once_per_matching_target_and_dependants_need_them_all(tmp_path: Path) -> None:
    placed = place_plan(_plan(tmp_path), FLEET)
    ids = [s.id for s in placed.steps]
    assert ids == ["prepare", "probe[target=pi-01]", "probe[target=pi-02]", "report"]
    probe = placed.step("probe[target=pi-02]")
    assert (probe.target, probe.each, probe.group, probe.needs) == (
        "pi-02",
        False,
        "probe",
        ("prepare",),
    )
    assert placed.step("report").needs == ("probe[target=pi-01]", "probe[target=pi-02]")
    assert placed.step("prepare").target == "role=server"
    assert place_plan(placed, FLEET) == placed  # placing a stored (placed) plan changes nothing


def test_each_on_a_matrix_child_adds_the_target_to_its_name(tmp_path: Path) -> None:
    text = """\
name: m
steps:
  train:
    run: echo {{ matrix.h }}
    matrix: {h: [1, 2]}
    on: pi-0[12]
    each: true
"""
    ids = [s.id for s in place_plan(_plan(tmp_path, text), FLEET).steps]
    assert ids == ["train[h=1,target=pi-01]", "train[h=1,target=pi-02]",
                   "train[h=2,target=pi-01]", "train[h=2,target=pi-02]"]  # fmt: skip


@pytest.mark.parametrize(
    ("on", "message"),
    [
        (
            "{labels: {role: gpu}}",
            "fleet.yaml:3:3: steps.a.on: no target matches 'role=gpu'; targets seen: local, "
            "srv-01 (role=server), pi-01 (role=edge), pi-02 (role=edge), pi-03 (role=edge, gone), "
            "pi-04 (role=edge, no address)",
        ),
        (
            "pi-03",
            "fleet.yaml:3:3: steps.a.on: no target 'pi-03'; targets seen: local, "
            "srv-01 (role=server), pi-01 (role=edge), pi-02 (role=edge), pi-03 (role=edge, gone), "
            "pi-04 (role=edge, no address)",
        ),
    ],
)
def test_a_selector_that_matches_no_usable_target_is_a_located_error(
    tmp_path: Path, on: str, message: str
) -> None:
    plan = _plan(tmp_path, f"name: fleet\nsteps:\n  a:\n    run: echo\n    on: {on}\n")
    with pytest.raises(RecipeError) as caught:
        place_plan(plan, FLEET)
    assert str(caught.value).removeprefix(str(tmp_path) + "/") == message


def test_plan_explains_where_each_step_goes(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    assert explain(plan.step("prepare"), FLEET) == "srv-01"
    assert explain(plan.step("probe"), FLEET) == "pi-01, pi-02 (2 match pi-* role=edge: on each)"
    glob = _plan(tmp_path, "name: g\nsteps:\n  a:\n    run: echo\n    on: pi-*\n")
    assert explain(glob.step("a"), FLEET) == (
        "pi-01, pi-02 (2 match pi-*: one of them, with a free slot, then the lowest load)"
    )


def test_choose_prefers_a_free_slot_then_the_lowest_load_then_the_name() -> None:
    assert choose([Load("a", 0, 0.0), Load("b", 1, 3.0)]) == "b"
    assert choose([Load("a", 2, 0.9), Load("b", 1, 0.1)]) == "b"
    assert choose([Load("b", 1, 0.5), Load("a", 1, 0.5)]) == "a"
    assert (
        choose([Load("a", 0, 0.2), Load("b", 0, 0.1)]) == "b"
    )  # all busy: wait on the least loaded
    assert choose([]) is None


def test_on_may_be_a_template_of_params_rendered_when_the_recipe_compiles(tmp_path: Path) -> None:
    text = (
        'name: t\nparams: {edge: local}\nsteps:\n  a:\n    run: echo\n    on: "{{ params.edge }}"\n'
    )
    assert _plan(tmp_path, text).step("a").target == "local"
    recipe = tmp_path / "fleet.yaml"
    assert compile_recipe(recipe, {"edge": "role=edge"}).step("a").target == "role=edge"
    assert compile_recipe(recipe, {"edge": "pi-* role=edge"}).step("a").target == "pi-* role=edge"
    with pytest.raises(RecipeError) as caught:
        compile_recipe(recipe, {"edge": "pi 01;rm"})
    assert str(caught.value) == (
        f"{recipe}:6:9: steps.a.on: renders to 'pi 01;rm': '01;rm' is not a target name or "
        "glob (letters, digits, . _ - and * ? [ ])"
    )


def test_a_step_needing_every_targets_copy_of_one_output_is_refused(tmp_path: Path) -> None:
    text = RECIPE.replace('echo "{{ target.name }}"', "hostname > where.txt").replace(
        "    each: true\n", "    each: true\n    outputs: [where.txt]\n"
    )
    with pytest.raises(RecipeError) as caught:
        place_plan(_plan(tmp_path, text), FLEET)
    assert str(caught.value).endswith(
        "steps.report.needs: needs probe, which runs on each of 2 targets and each writes "
        "where.txt at the same path: drop its outputs"
    )


def test_every_expanded_need_is_checked_and_results_of_each_steps_cannot_be_read(
    tmp_path: Path,
) -> None:
    two = (
        RECIPE.replace("    each: true\n", "    each: true\n    outputs: [b.txt]\n")
        .replace(
            "needs: [probe]\n    run: echo done", "needs: [prepare, probe]\n    run: echo done"
        )
        .replace("role: server}}\n", "role: server}}\n    each: true\n")  # one target: one child
    )
    with pytest.raises(RecipeError) as caught:
        place_plan(_plan(tmp_path, two), FLEET)
    assert "needs probe, which runs on each of 2 targets" in str(caught.value)
    reads = RECIPE.replace(
        "    run: echo done", '    when: steps.probe.status == "succeeded"\n    run: echo done'
    )
    with pytest.raises(RecipeError) as caught:
        place_plan(_plan(tmp_path, reads), FLEET)
    assert str(caught.value).endswith(
        "steps.report.needs: reads steps.probe, which runs on each of 2 targets (each: true) "
        "and so has no single result: need it without reading it"
    )

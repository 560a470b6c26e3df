"""Properties of the compiler over generated recipes: order, cycles, JSON, no stray exceptions."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mle_cli.errors import RecipeError
from mle_cli.recipe import (
    Plan,
    RetryPolicy,
    SourceLocation,
    Step,
    compile_recipe,
    evaluate_when,
    parse_duration,
    plan_from_json,
    plan_to_json,
)

Graph = dict[str, list[str]]
STEP_IDS = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,8}", fullmatch=True)
SETTINGS = settings(max_examples=100, deadline=None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generated")


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[str], Graph]:
    """(declaration order, needs) for a random DAG; `needs` only point to earlier-ranked steps."""
    ranked = draw(st.lists(STEP_IDS, min_size=1, max_size=12, unique=True))
    needs: Graph = {}
    for i, step in enumerate(ranked):
        earlier = st.lists(st.sampled_from(ranked[:i]), unique=True) if i else st.just([])
        needs[step] = draw(earlier)
    return draw(st.permutations(ranked)), needs


def _write(workdir: Path, declared: list[str], needs: Graph) -> Path:
    steps = {step: {"run": "true", "needs": needs[step]} for step in declared}
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "dag", "steps": steps}, sort_keys=False))
    return path


def _outcome(path: Path) -> str:
    """'compiled', or the RecipeError's message; any other exception fails the test."""
    try:
        compile_recipe(path)
    except RecipeError as exc:
        return str(exc)
    return "compiled"


def _reaches(needs: Graph, start: str) -> set[str]:
    """Every step that `start` needs, directly or not."""
    seen: set[str] = set()
    todo = list(needs[start])
    while todo:
        step = todo.pop()
        if step not in seen:
            seen.add(step)
            todo += needs[step]
    return seen


@SETTINGS
@given(dags())
def test_a_dag_compiles_in_the_first_ready_declared_order(
    workdir: Path, dag: tuple[list[str], Graph]
) -> None:
    declared, needs = dag
    plan = compile_recipe(_write(workdir, declared, needs))
    order = [s.id for s in plan.steps]
    assert sorted(order) == sorted(declared)
    done: set[str] = set()
    for step in order:
        ready = [s for s in declared if s not in done and set(needs[s]) <= done]
        # Each place goes to the earliest-declared step whose needs are all done.
        assert step == ready[0]
        assert plan.step(step).needs == tuple(needs[step])
        done.add(step)


@SETTINGS
@given(dags())
def test_a_recipe_declared_in_dependency_order_keeps_its_order(
    workdir: Path, dag: tuple[list[str], Graph]
) -> None:
    _, needs = dag
    ranked = list(needs)  # dags() ranks steps so that needs come first
    plan = compile_recipe(_write(workdir, ranked, needs))
    assert [s.id for s in plan.steps] == ranked


@st.composite
def cyclic(draw: st.DrawFn) -> tuple[list[str], Graph]:
    """A random DAG plus one back edge: a step now needs a step that (transitively) needs it."""
    declared, needs = draw(dags().filter(lambda d: any(d[1].values())))
    pairs = [(low, high) for high in needs for low in _reaches(needs, high)]
    low, high = draw(st.sampled_from(sorted(pairs)))
    needs[low] = [*needs[low], high]
    return declared, needs


@SETTINGS
@given(cyclic())
def test_any_back_edge_is_refused_naming_a_real_cycle(
    workdir: Path, graph: tuple[list[str], Graph]
) -> None:
    declared, needs = graph
    path = _write(workdir, declared, needs)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(path)
    message = str(caught.value).removeprefix(f"{path}:")
    found = re.fullmatch(r"\d+:\d+: steps\.(.+)\.needs\[(\d+)\]: cycle: (.+)", message)
    assert found, message
    chain = found.group(3).split(" -> ")
    assert chain[0] == chain[-1] == found.group(1)
    assert len(set(chain)) == len(chain) - 1 >= 2
    for step, needed in itertools.pairwise(chain):
        assert needed in needs[step]
    assert needs[chain[0]][int(found.group(2))] == chain[1]


@st.composite
def featured(draw: st.DrawFn) -> tuple[dict[str, object], Graph]:
    """A random DAG whose steps have matrices, conditions, metrics, triggers and cache flags."""
    declared, needs = draw(dags())
    steps: dict[str, dict[str, object]] = {}
    for step in declared:
        spec: dict[str, object] = {"run": "echo {{ params.n }}", "needs": needs[step]}
        if draw(st.booleans()):
            keys = draw(
                st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=2, unique=True)
            )
            values = st.lists(MATRIX_VALUES, min_size=1, max_size=3, unique_by=str)
            spec["matrix"] = {key: draw(values) for key in keys}
        else:
            spec["metrics"] = f"metrics/{step}.json"  # matrix children would all produce it
        spec["when"] = draw(st.sampled_from([None, True, "params.n > 1", "not params.quick"]))
        spec["trigger"] = draw(st.sampled_from(["all-succeeded", "none-failed", "all-done"]))
        spec["cache"] = draw(st.booleans())
        steps[step] = {k: v for k, v in spec.items() if v is not None}
    recipe = {"name": "dag", "params": {"n": 2, "quick": False}, "steps": steps}
    return recipe, needs


MATRIX_VALUES = (
    st.integers(-3, 300) | st.booleans() | st.from_regex(r"[a-z0-9.]{1,6}", fullmatch=True)
)


def _compile(workdir: Path, recipe: dict[str, object]) -> Plan:
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return compile_recipe(path)


@SETTINGS
@given(featured())
def test_recipes_compile_deterministically_in_topological_order(
    workdir: Path, case: tuple[dict[str, object], Graph]
) -> None:
    recipe, needs = case
    plan = _compile(workdir, recipe)
    assert _compile(workdir, recipe).hash == plan.hash
    position = {s.id: i for i, s in enumerate(plan.steps)}
    children: dict[str, list[str]] = {}
    for step in plan.steps:
        children.setdefault(step.group or step.id, []).append(step.id)
        assert all(position[need] < position[step.id] for need in step.needs)
    for step in plan.steps:
        expanded = [child for need in needs[step.group or step.id] for child in children[need]]
        assert list(step.needs) == expanded


@SETTINGS
@given(featured())
def test_every_compiled_plan_survives_json_exactly(
    workdir: Path, case: tuple[dict[str, object], Graph]
) -> None:
    plan = _compile(workdir, case[0])
    again = plan_from_json(plan_to_json(plan))
    assert again == plan
    assert again.hash == plan.hash
    assert [s.id for s in again.steps] == [s.id for s in plan.steps]


# Pieces of conditions, so that many generated ones parse and reach evaluation.
TOKEN_TEXT = (
    "params.n steps.b.metrics.x steps.b.status steps.b.outputs [0] 1 0 2.5 'a' true null and or "
    "not == != < >= + - * / % in ( ) [ ] , . ** __class__ x"
)
TOKENS = st.sampled_from(TOKEN_TEXT.split())
CONDITIONS = st.text(max_size=80) | st.lists(TOKENS, max_size=12).map(" ".join)


def _condition(plan: Plan, step: Step) -> str:
    """'true'/'false', or the message of the RecipeError; any other exception fails the test."""
    context = {"steps": {"b": {"status": "succeeded", "metrics": {"x": 1}, "outputs": []}}}
    try:
        return str(evaluate_when(plan, step, context)).lower()
    except RecipeError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(CONDITIONS)
def test_any_condition_text_evaluates_to_a_bool_or_a_recipe_error(text: str) -> None:
    step = Step(
        id="a",
        run="true",
        argv=None,
        env={},
        needs=(),
        outputs=(),
        target="local",
        retries=RetryPolicy(),
        timeout=None,
        location=SourceLocation(Path("r.yaml"), 1, 1),
        when=text,
    )
    plan = Plan("p", "", Path("r.yaml"), "sha256:0", {"n": 1}, (), (step,))
    outcome = _condition(plan, step)
    assert outcome in ("true", "false") or outcome.startswith(
        f"r.yaml:1:1: steps.a.when: cannot evaluate {text!r}: "
    )


RECIPE_WORDS = st.sampled_from(
    [
        "name",
        "steps",
        "run",
        "argv",
        "needs",
        "outputs",
        "env",
        "retries",
        "timeout",
        "on",
        "params",
        "defaults",
        "files",
        "max",
        "backoff",
        "a",
        "b",
        "x",
        "matrix",
        "description",
        "when",
        "uses",
        "with",
        "metrics",
        "cache",
        "trigger",
        "mle/select",
        "mle/approve",
        "metric",
        "hidden",
        "params.a > 1",
        "steps.a.status",
    ]
)
SCALARS = (
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=8)
)
VALUES = st.recursive(
    SCALARS | RECIPE_WORDS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(RECIPE_WORDS, inner, max_size=5),
    max_leaves=25,
)


@SETTINGS
@given(st.dictionaries(RECIPE_WORDS, VALUES, max_size=6))
def test_recipe_shaped_nonsense_only_ever_raises_recipe_error(workdir: Path, data: object) -> None:
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert _outcome(path)


@SETTINGS
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_only_ever_raise_recipe_error(workdir: Path, raw: bytes) -> None:
    path = workdir / "recipe.yaml"
    path.write_bytes(raw)
    assert _outcome(path)


@given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_compound_durations_add_up(hours: int, minutes: int, seconds: int, millis: int) -> None:
    text = f"{hours}h{minutes}m{seconds}s{millis}ms"
    assert parse_duration(text) == pytest.approx(
        hours * 3600 + minutes * 60 + seconds + millis / 1000
    )

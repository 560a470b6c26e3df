"""Properties of the compiler over generated recipes: DAG order, cycles, and no stray exceptions."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mle_cli.errors import RecipeError
from mle_cli.recipe import compile_recipe, parse_duration

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

"""Every recipe shipped in recipes/ runs to success on the local agent."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, Project

pytestmark = pytest.mark.e2e

RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
# A recipe with an approval gate would wait for `mle approve` (no terminal here to ask on).
PARAMS = {"digits-edge.yaml": ["-p", "auto_approve=true"]}


def test_there_are_recipes() -> None:
    assert "hello.yaml" in RECIPES


@pytest.mark.timeout(400)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_runs(project: Project, recipe: str) -> None:
    plan = project.mle("plan", f"recipes/{recipe}")
    assert plan.returncode == 0, plan.stderr
    proc = project.mle("run", f"recipes/{recipe}", *PARAMS.get(recipe, []), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout

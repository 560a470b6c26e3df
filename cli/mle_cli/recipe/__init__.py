"""Recipes: compile a recipe file into a Plan, and render a step's templates at dispatch.

Every problem with a recipe, its files or its `-p` overrides is a `RecipeError` whose message
points at `file:line:col: key.path:`.
"""

from __future__ import annotations

from mle_cli.recipe._compiler import compile_recipe
from mle_cli.recipe._deploy import DEPLOY, DeploySpec, OptionProblem, deploy_spec
from mle_cli.recipe._durations import parse_duration
from mle_cli.recipe._expressions import evaluate_when
from mle_cli.recipe._params import parse_overrides
from mle_cli.recipe._references import APPROVE, SELECT
from mle_cli.recipe._templates import RenderedStep, render_options, render_step
from mle_cli.recipe.plan import (
    ParamValue,
    Plan,
    RetryPolicy,
    ShippedFile,
    SourceLocation,
    Step,
    plan_from_json,
    plan_to_json,
)

__all__ = [
    "APPROVE",
    "DEPLOY",
    "SELECT",
    "DeploySpec",
    "OptionProblem",
    "ParamValue",
    "Plan",
    "RenderedStep",
    "RetryPolicy",
    "ShippedFile",
    "SourceLocation",
    "Step",
    "compile_recipe",
    "deploy_spec",
    "evaluate_when",
    "parse_duration",
    "parse_overrides",
    "plan_from_json",
    "plan_to_json",
    "render_options",
    "render_step",
]

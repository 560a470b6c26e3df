"""`mle run` and `mle plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mle_cli.commands._common import settings_from

__all__ = ["register"]

RecipeArg = Annotated[Path, typer.Argument(help="The recipe file (YAML).", show_default=False)]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Override a recipe param: -p epochs=20 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def run(
    ctx: typer.Context,
    recipe: RecipeArg,
    param: ParamOpt = None,
    json_out: JsonOpt = False,
    live: Annotated[
        bool | None,
        typer.Option("--live/--no-live", help="Live progress table (default: on a terminal)."),
    ] = None,
) -> None:
    """Run a recipe: compile it, dispatch its steps to agents, record everything in the ledger.

    Example: mle run recipes/hello.yaml -p greeting=hi
    """
    from mle_cli.commands._drive import drive_run, report_outcome
    from mle_cli.recipe import compile_recipe, parse_overrides

    settings = settings_from(ctx)
    plan = compile_recipe(recipe, parse_overrides(param or []))
    outcome = drive_run(plan, settings, live=live)
    report_outcome(outcome, settings, json_out=json_out)


def plan(
    ctx: typer.Context, recipe: RecipeArg, param: ParamOpt = None, json_out: JsonOpt = False
) -> None:
    """Show what a recipe would run, where, and in which order; runs nothing.

    Example: mle plan recipes/hello.yaml
    """
    from mle_cli import render
    from mle_cli.planning import describe_plan
    from mle_cli.recipe import compile_recipe, parse_overrides

    settings = settings_from(ctx)
    described = describe_plan(compile_recipe(recipe, parse_overrides(param or [])), settings)
    if json_out:
        render.print_json(described)
    else:
        render.print_plan(described)


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command()(run)
    app.command()(plan)

"""`mle run` and `mle plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mle_cli.commands._common import settings_from
from mle_proto.errors import UsageError

__all__ = ["register"]

RecipeArg = Annotated[Path, typer.Argument(help="The recipe file (YAML).", show_default=False)]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="Override a recipe param: -p epochs=20 (repeatable).",
        metavar="KEY=VALUE",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]
LiveOpt = Annotated[
    bool | None,
    typer.Option("--live/--no-live", help="Live progress table (default: on a terminal)."),
]
NoCacheOpt = Annotated[
    bool, typer.Option("--no-cache", help="Run every step, even those with a cached result.")
]
RunArg = Annotated[
    str | None, typer.Argument(help="Run id or a unique prefix; default: the latest run.")
]


def run(
    ctx: typer.Context,
    recipe: RecipeArg,
    param: ParamOpt = None,
    json_out: JsonOpt = False,
    live: LiveOpt = None,
    no_cache: NoCacheOpt = False,
    resume_run: Annotated[
        str | None,
        typer.Option("--resume", help="Resume this run instead of starting a new one."),
    ] = None,
) -> None:
    """Run a recipe: compile it, dispatch its steps to agents, record everything in the ledger.

    Example: mle run recipes/hello.yaml -p greeting=hi
    """
    if resume_run is not None:
        if param:
            raise UsageError("-p does not apply with --resume: a run resumes with its own params")
        _resume(ctx, resume_run, recipe, json_out=json_out, live=live, no_cache=no_cache)
        return
    from mle_cli.commands._drive import drive_run, report_outcome
    from mle_cli.recipe import compile_recipe, parse_overrides

    settings = settings_from(ctx)
    plan = compile_recipe(recipe, parse_overrides(param or []))
    outcome = drive_run(plan, settings, live=live, use_cache=not no_cache)
    report_outcome(outcome, settings, json_out=json_out)


def resume(
    ctx: typer.Context,
    run_ref: RunArg = None,
    json_out: JsonOpt = False,
    live: LiveOpt = None,
    no_cache: NoCacheOpt = False,
) -> None:
    """Resume a run: re-attach to its running tasks, collect what finished, continue the DAG.

    Steps that succeeded never run again; failed or cancelled ones get new attempts.

    Example: mle resume 20261122-153012-a3f9
    """
    _resume(ctx, run_ref, None, json_out=json_out, live=live, no_cache=no_cache)


def _resume(
    ctx: typer.Context,
    run_ref: str | None,
    recipe: Path | None,
    *,
    json_out: bool,
    live: bool | None,
    no_cache: bool,
) -> None:
    from mle_cli.commands._drive import drive_run, report_outcome
    from mle_cli.runs import load_resumable

    settings = settings_from(ctx)
    plan, run_id = load_resumable(settings, run_ref, recipe)
    outcome = drive_run(plan, settings, live=live, resume=run_id, use_cache=not no_cache)
    report_outcome(outcome, settings, json_out=json_out)


def approve(
    ctx: typer.Context,
    run_ref: Annotated[str, typer.Argument(help="Run id or a unique prefix.")],
    step: Annotated[str, typer.Argument(help="The approval step (uses: mle/approve).")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the ledger.")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Approve (or reject) a run's approval gate; the waiting run goes on (or fails).

    Example: mle approve 20261122-153012-a3f9 approve --reason "accuracy ok"
    """
    from mle_cli import render
    from mle_cli.approvals import decide

    decided = decide(settings_from(ctx), run_ref, step, approved=not reject, reason=reason)
    if json_out:
        render.print_json(decided)
    else:
        typer.echo(f"step {step} of run {decided['run']} {decided['decision']} by {decided['who']}")


def plan(
    ctx: typer.Context,
    recipe: RecipeArg,
    param: ParamOpt = None,
    json_out: JsonOpt = False,
    no_cache: NoCacheOpt = False,
) -> None:
    """Show what a recipe would run, where, in which order, and what is cached; runs nothing.

    Example: mle plan recipes/hello.yaml
    """
    from mle_cli import render
    from mle_cli.planning import describe_plan
    from mle_cli.recipe import compile_recipe, parse_overrides

    settings = settings_from(ctx)
    compiled = compile_recipe(recipe, parse_overrides(param or []))
    described = describe_plan(compiled, settings, use_cache=not no_cache)
    if json_out:
        render.print_json(described)
    else:
        render.print_plan(described)


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command()(run)
    app.command()(resume)
    app.command()(approve)
    app.command()(plan)

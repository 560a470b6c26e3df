"""`mle runs`, `mle show`, `mle logs`, `mle trace`, `mle cancel`: what the ledger knows."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mle_cli.commands._common import settings_from

if TYPE_CHECKING:
    from mle_cli.ledger import Ledger

__all__ = ["register"]

RunArg = Annotated[
    str | None, typer.Argument(help="Run id or a unique prefix; default: the latest run.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


@contextmanager
def _ledger(ctx: typer.Context) -> Iterator[Ledger]:
    """The project's ledger for reading; reading never creates one."""
    from mle_cli.ledger import Ledger
    from mle_proto.errors import NotFound

    path = settings_from(ctx).ledger_path
    if not path.exists():
        raise NotFound("no runs yet; start one with `mle run RECIPE`")
    ledger = Ledger(path)
    try:
        yield ledger
    finally:
        ledger.close()


def runs(
    ctx: typer.Context,
    limit: Annotated[
        int, typer.Option("--limit", "-n", help="How many runs.", min=1, max=1_000_000)
    ] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List recent runs, newest first.

    Example: mle runs -n 5
    """
    from mle_cli import render
    from mle_cli.history import run_list

    if not settings_from(ctx).ledger_path.exists():
        rows = []
    else:
        with _ledger(ctx) as ledger:
            rows = run_list(ledger, limit)
    if json_out:
        render.print_json(rows)
        return
    shown = [
        {
            **r,
            "started": render.ago(r["started"] or r["created"]),
            "time": render.duration(r["duration"]),
            "steps": f"{r['succeeded'] or 0}/{r['steps']}",
        }
        for r in rows
    ]
    render.print_table(shown, ["id", "recipe", "status", "started", "time", "steps"])


def show(ctx: typer.Context, run: RunArg = None, json_out: JsonOpt = False) -> None:
    """Show a run: steps, attempts, failures with their last lines, where outputs are stored,
    and the models it deployed (with what each version does now).

    Example: mle show 20261122-1530
    """
    from mle_cli import render
    from mle_cli.history import run_detail

    with _ledger(ctx) as ledger:
        detail = run_detail(ledger, settings_from(ctx), run)
    if json_out:
        render.print_json(detail)
        return
    from mle_cli.models.views import print_run_models

    render.print_run(detail)
    print_run_models(detail["models"])


def logs(
    ctx: typer.Context,
    run: RunArg = None,
    step: Annotated[str | None, typer.Argument(help="Only this step.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Print the log lines of a run, or of one step.

    Example: mle logs 20261122-1530 train -f
    """
    from mle_cli.history import follow_logs
    from mle_cli.render import print_log_line

    with _ledger(ctx) as ledger:
        for row in follow_logs(ledger, ledger.resolve_run(run), step, follow):
            print_log_line(row, json_out=json_out, prefix=step is None)


def trace(
    ctx: typer.Context,
    run: RunArg = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html", help="Write a self-contained HTML Gantt chart to FILE.", metavar="FILE"
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a run's timeline: when each step and attempt queued, staged, ran, waited and ended.

    Example: mle trace 20261122-1530 --html trace.html
    """
    from mle_cli import render
    from mle_cli.trace import build_timeline, timeline_dict, write_html

    with _ledger(ctx) as ledger:
        timeline = build_timeline(ledger, run)
    if html is not None:
        written = write_html(timeline, html, settings_from(ctx).mle_dir)
        (sys.stderr if json_out else sys.stdout).write(f"wrote {written}\n")
    if json_out:
        render.print_json(timeline_dict(timeline))
    elif html is None:
        render.print_trace(timeline)


def cancel(
    ctx: typer.Context, run: Annotated[str, typer.Argument(help="Run id or prefix.")]
) -> None:
    """Cancel a run: its running tasks are killed, its pending steps never start.

    Example: mle cancel 20261122-1530
    """
    from mle_cli.render import stdout_console
    from mle_cli.runs import cancel_run

    result = cancel_run(settings_from(ctx), run)
    verb = "cancelled" if result["changed"] else f"already {result['status']}"
    stdout_console().print(f"run {result['run']} {verb}")


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    for command in (runs, show, logs, trace, cancel):
        app.command()(command)

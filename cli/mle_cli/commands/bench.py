"""`mle bench`: latency, memory and accuracy of model variants, measured on the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mle_cli.commands._common import settings_from

__all__ = ["register"]


def bench(
    ctx: typer.Context,
    models: Annotated[
        list[Path],
        typer.Argument(help="Model files to compare (.onnx, .tflite).", show_default=False),
    ],
    target: Annotated[
        str,
        typer.Option("--target", "-t", help="Where to measure: a target name (e.g. local)."),
    ],
    eval_file: Annotated[
        Path | None,
        typer.Option("--eval", help="Evaluation data (.npz with X and y) for each accuracy."),
    ] = None,
    seconds: Annotated[
        float | None,
        typer.Option(
            "--seconds",
            help="Seconds of timed single-row calls per variant (default 2).",
            min=0.001,
            max=3600,
        ),
    ] = None,
    pick: Annotated[
        str | None,
        typer.Option(
            "--pick",
            help="Name the most accurate variant within limits such as 'p95<=20ms,rss<=100MB' "
            "(p50/p95/p99/load in ms or s, rss in MB or MiB, size in kB or MB).",
        ),
    ] = None,
    live: Annotated[
        bool | None,
        typer.Option("--live/--no-live", help="Live progress table (default: on a terminal)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Measure model variants on a target's agent: load time, p50/p95 latency, rows/s, peak RSS,
    accuracy; each variant in a fresh process. The run is recorded in the ledger.

    Example: mle bench model.onnx model.int8.onnx --target local --eval test.npz --pick 'p95<=20ms'
    """
    from mle_cli.commands._drive import drive_run
    from mle_cli.models.bench import BenchOptions, bench_models, print_bench

    settings = settings_from(ctx)
    options = BenchOptions(tuple(models), target, eval_file, seconds, pick)
    result = bench_models(
        settings, options, lambda plan: drive_run(plan, settings, live=live, use_cache=False)
    )
    print_bench(result, json_out)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(bench)

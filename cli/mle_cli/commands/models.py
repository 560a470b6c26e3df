"""`mle deploy`, `mle models`, `mle predict`: serving models on agents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mle_cli.commands._common import settings_from
from mle_proto import MAX_UINT32

__all__ = ["register"]

TargetOpt = Annotated[
    str,
    typer.Option("--target", "-t", help="Where: a target name (e.g. local).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def deploy(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="A model file (.onnx, .tflite) to deploy, or the name of a deployed model "
            "whose route to change.",
            show_default=False,
        ),
    ],
    target: TargetOpt,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model name; default: the file name up to its first dot."),
    ] = None,
    version: Annotated[
        int,
        typer.Option(
            "--version",
            help="File: the version to deploy as (default: the next one). "
            "Name: the version to route to (with --canary: the canary).",
            min=0,
            max=MAX_UINT32,
        ),
    ] = 0,
    canary: Annotated[
        str | None, typer.Option("--canary", help="Send this share to the version, e.g. 10%.")
    ] = None,
    swap: Annotated[
        str,
        typer.Option(
            "--swap",
            help="keep-old: the old version serves until the new one is ready; "
            "unload-first: unload it first (little RAM).",
        ),
    ] = "keep-old",
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Dynamic batching: largest batch.", min=0, max=MAX_UINT32
        ),
    ] = 0,
    batch_delay: Annotated[
        str | None,
        typer.Option("--batch-delay", help="Dynamic batching: longest wait, e.g. 5ms."),
    ] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Return to the route before the current one.")
    ] = False,
    shadow: Annotated[
        str | None,
        typer.Option("--shadow", help="Mirror requests to this version (off: stop mirroring)."),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="split (reset to the primary), fallback or consensus."),
    ] = None,
    deadline: Annotated[
        str | None, typer.Option("--deadline", help="fallback: the primary's deadline, e.g. 20ms.")
    ] = None,
    secondary: Annotated[
        int | None, typer.Option("--secondary", help="fallback: the version answering late calls.")
    ] = None,
    members: Annotated[
        str | None, typer.Option("--members", help="consensus: the versions voting, e.g. 1,2,3.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Deploy a model file to an agent, or change how a deployed model routes its traffic.

    A file is shipped (not sent when the agent has it), validated, loaded and
    warmed up, then traffic switches to it (--canary 10%: only a share of it).

    A model name changes its route:
    --version V sends everything to V; --canary 10% --version V sends 10% to V;
    --shadow V mirrors requests to V (--shadow off stops);
    --policy fallback --deadline 20ms --secondary V answers late calls from V;
    --policy consensus --members 1,2,3 answers the majority class;
    --policy split goes back to the primary alone;
    --rollback undoes the last route change.

    Example: mle deploy model.int8.onnx --target local --name digits

    Example: mle deploy digits --target local --canary 10% --version 4
    """
    from mle_cli.models import DeployOptions, deploy_model
    from mle_cli.models.routes import parse_change, parse_delay
    from mle_cli.models.views import print_deployed

    change = parse_change(version, canary, shadow, policy, deadline, secondary, members)
    delay = parse_delay(batch_delay, "--batch-delay") if batch_delay is not None else None
    options = DeployOptions(
        model=model,
        target=target,
        name=name,
        version=version,
        swap=swap,
        batch_size=batch_size,
        batch_delay=delay,
        rollback=rollback,
        route=change,
    )
    print_deployed(deploy_model(settings_from(ctx), options), json_out)


def models(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Option("--target", "-t", help="Only this target; default: every running agent."),
    ] = None,
    lineage: Annotated[
        str | None,
        typer.Option(
            "--lineage",
            help="Show what made a deployed version instead: NAME@VERSION (e.g. digits@3; "
            "NAME alone: the latest). Read from the ledger; no agent is asked.",
            metavar="NAME@VERSION",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List deployed models: versions, state, runtime, traffic, requests, errors, latency.

    The stats read are also appended to the ledger's model_stats table.

    --lineage digits@3 shows the run, the step that made the file, the steps
    before it back to the data (their input digests, outputs and metrics), and
    where that file is deployed now.

    Example: mle models --target local

    Example: mle models --lineage digits@3
    """
    if lineage is not None:
        from mle_cli.models.lineage import lineage_of
        from mle_cli.models.views import print_lineage

        print_lineage(lineage_of(settings_from(ctx), lineage, target), json_out)
        return
    from mle_cli.models import list_models
    from mle_cli.models.views import print_models

    print_models(list_models(settings_from(ctx), target), json_out)


def predict(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The deployed model's name.", show_default=False)],
    target: TargetOpt,
    input_file: Annotated[
        Path,
        typer.Option(
            "--input",
            "-i",
            help=".npy (one array), .npz (input name -> array) or .json "
            '({"input": [[...]]} or a bare nested list).',
            show_default=False,
        ),
    ],
    version: Annotated[
        int,
        typer.Option(
            "--version",
            help="Ask this version (default: the route decides).",
            min=0,
            max=MAX_UINT32,
        ),
    ] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Ask a deployed model for a prediction (Open Inference Protocol v2 over gRPC).

    Prints each output (the class per row for a classifier) and the version that answered.

    Example: mle predict digits --target local --input x.npy
    """
    from mle_cli.models import predict as run_prediction
    from mle_cli.models.views import print_prediction

    answer = run_prediction(settings_from(ctx), name, target, input_file, version)
    print_prediction(answer, json_out)


def register(app: typer.Typer) -> None:
    """Add the commands to the app."""
    app.command()(deploy)
    app.command()(models)
    app.command()(predict)

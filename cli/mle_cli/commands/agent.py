"""`mle agent ...`: the embedded local agent (remote agents come with `mle agent install`)."""

from __future__ import annotations

from typing import Annotated

import typer

from mle_cli.commands._common import settings_from

__all__ = ["app"]

app = typer.Typer(help="Manage agents.", no_args_is_help=True)
# Remote agents arrive with `--target`; until then `--local` (the default) is the only choice.
LocalOpt = Annotated[bool, typer.Option("--local", help="The embedded local agent (default).")]


@app.command()
def start(
    ctx: typer.Context,
    local: LocalOpt = True,
) -> None:
    """Start the local agent (or find the running one) and print its address.

    Example: mle agent start --local
    """
    from mle_cli.render import stdout_console
    from mle_cli.targets import ensure_local_agent

    endpoint = ensure_local_agent(settings_from(ctx))
    stdout_console().print(f"local agent listening on {endpoint.address}")


@app.command()
def stop(
    ctx: typer.Context,
    local: LocalOpt = True,
) -> None:
    """Stop the local agent; it lets running tasks finish first (up to its drain timeout).

    Example: mle agent stop --local
    """
    from mle_cli.render import stdout_console
    from mle_cli.targets import stop_local_agent

    stopped = stop_local_agent(settings_from(ctx))
    stdout_console().print("local agent stopped" if stopped else "the local agent was not running")

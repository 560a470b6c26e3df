"""`mle agent ...`: the embedded local agent, and certificates for remote agents (`sign`)."""

from __future__ import annotations

from pathlib import Path
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


@app.command()
def sign(
    ctx: typer.Context,
    csr: Annotated[Path, typer.Argument(help="The request `mle-agentd --make-csr` wrote.")],
    name: Annotated[str, typer.Option("--name", help="The agent's target name.")],
    address: Annotated[
        list[str] | None,
        typer.Option(
            "--address",
            help="An IP or host name the agent answers on (repeatable).",
            metavar="ADDR",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory for the files (default: the CSR's).", metavar="DIR"),
    ] = None,
) -> None:
    """Sign an agent's certificate request with the project CA (created on first need).

    Writes NAME.crt and ca.crt, and prints the mle-agentd flags that use them.

    Example: mle agent sign pi-01.csr --name pi-01 --address 192.168.1.50
    """
    from mle_cli.render import stdout_console
    from mle_cli.targets.pki import sign_agent_request

    signed = sign_agent_request(settings_from(ctx), csr, name, address or (), out)
    lines = [
        f"signed {signed.name}: wrote {signed.cert} ({signed.fingerprint}) and {signed.ca}",
        f"copy both to {signed.name} and start it with:",
        " ".join(["mle-agentd", *signed.agentd_flags()]),
    ]
    stdout_console().print("\n".join(lines), markup=False)

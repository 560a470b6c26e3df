"""`mle agent ...`: the embedded local agent, and certificates for remote agents (`sign`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mle_cli.commands._common import settings_from

__all__ = ["app"]

app = typer.Typer(help="Manage agents.", no_args_is_help=True, rich_markup_mode=None)
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


@app.command("enroll-token")
def enroll_token(
    ctx: typer.Context,
    name: Annotated[
        str, typer.Option("--name", help="The agent's target name: the token is for it only.")
    ],
    ttl: Annotated[
        str,
        typer.Option(
            "--ttl", help="How long the token is valid (at most 24h).", metavar="DURATION"
        ),
    ] = "15m",
    listen: Annotated[
        str | None,
        typer.Option(
            "--listen",
            help="Where to serve enrollment (default: the enroll_listen setting, 0.0.0.0:7444).",
            metavar="HOST:PORT",
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="The address the device reaches this machine at (default: the listen host, or "
            "this machine's primary IP).",
            metavar="HOST",
        ),
    ] = None,
) -> None:
    """Make a single-use enrollment token for an agent, and serve it until the agent uses it.

    Prints the mle-agentd command to run on the device (its key never leaves it; it checks this
    machine by the project CA's fingerprint before sending the token). Exits 0 once the agent has
    its certificate, non-zero when the token expires first; Ctrl-C stops and revokes it.

    Example: mle agent enroll-token --name srv-01 --ttl 15m
    """
    import time

    from mle_cli.recipe._durations import duration_problem, to_seconds
    from mle_cli.render import stderr_console, stdout_console
    from mle_cli.targets.enroll import Offer, enroll_agent
    from mle_proto.errors import UsageError

    seconds = to_seconds(ttl)
    if seconds is None:
        raise UsageError(f"--ttl: {duration_problem(ttl)}")
    out, err = stdout_console(), stderr_console()

    def show(offer: Offer) -> None:
        until = time.strftime("%H:%M:%S", time.localtime(offer.expires))
        err.print(f"token {offer.token_id} for {offer.name}, single use, valid until {until}; "
                  f"on {offer.name} run:", markup=False)  # fmt: skip
        out.print(offer.device_command(), markup=False)
        err.print(f"serving enrollment on {offer.listen} (the device connects to "
                  f"{offer.operator}); Ctrl-C stops", markup=False)  # fmt: skip

    enrolled = enroll_agent(
        settings_from(ctx), name, seconds, listen=listen, address=address, on_offer=show,
        on_refusal=lambda line: err.print(line, markup=False),
    )  # fmt: skip
    out.print(f"enrolled {enrolled.name} from {enrolled.peer}: certificate {enrolled.fingerprint}")


# -- remote agents over SSH: install, upgrade, uninstall, logs ------------------------------------

TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        "-t",
        help="Inventory targets (targets/*.yaml): a name, a glob like 'pi-*', or labels like "
        "role=edge.",
        metavar="SELECTOR",
    ),
]
ParallelOpt = Annotated[
    int, typer.Option("--parallel", help="Devices worked on at once.", metavar="N")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-new-host-key",
        help="Accept a host key seen for the first time and record it in .mle/known_hosts.",
    ),
]
WheelhouseOpt = Annotated[
    Path | None,
    typer.Option(
        "--wheelhouse",
        help="Upload the wheels of DIR and install with no index (devices without internet).",
        metavar="DIR",
    ),
]
OfflineOpt = Annotated[
    bool,
    typer.Option(
        "--offline",
        help="Download the dependencies here for each device's platform, upload them and "
        "install with no index.",
    ),
]
WheelOpt = Annotated[
    Path | None,
    typer.Option(
        "--wheel",
        help="Install this mle-toolchain wheel instead of this operator's version.",
        metavar="FILE",
    ),
]
StartTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--start-timeout",
        help="Seconds the new agent gets to answer over mutual TLS.",
        metavar="SECONDS",
    ),
]


@app.command()
def install(
    ctx: typer.Context,
    target: TargetOpt,
    parallel: ParallelOpt = 4,
    trust_new_host_key: TrustOpt = False,
    wheelhouse: WheelhouseOpt = None,
    offline: OfflineOpt = False,
    wheel: WheelOpt = None,
    start_timeout: StartTimeoutOpt = 60.0,
) -> None:
    """Install the agent on devices over SSH: a venv, a certificate from the project CA (the
    key is made on the device), a service, started and checked over mutual TLS.

    Re-running changes nothing when all is in place; a newer version is upgraded in place and
    rolled back when it does not start.

    Example: mle agent install --target pi-01
    """
    _install(ctx, target, parallel, trust_new_host_key, wheelhouse, offline, wheel, start_timeout)


@app.command()
def upgrade(
    ctx: typer.Context,
    target: TargetOpt,
    parallel: ParallelOpt = 4,
    trust_new_host_key: TrustOpt = False,
    wheelhouse: WheelhouseOpt = None,
    offline: OfflineOpt = False,
    wheel: WheelOpt = None,
    start_timeout: StartTimeoutOpt = 60.0,
) -> None:
    """Upgrade installed agents to this operator's version (install, refusing a device that
    has no agent yet); the old version is put back when the new one does not start.

    Example: mle agent upgrade --target 'pi-*'
    """
    _install(ctx, target, parallel, trust_new_host_key, wheelhouse, offline, wheel, start_timeout,
             upgrade=True)  # fmt: skip


@app.command()
def uninstall(
    ctx: typer.Context,
    target: TargetOpt,
    parallel: ParallelOpt = 4,
    trust_new_host_key: TrustOpt = False,
) -> None:
    """Stop the agent on devices, remove its service and its install directory.

    Example: mle agent uninstall --target pi-01
    """
    from mle_cli.targets.install import InstallOptions, uninstall_agents

    options = InstallOptions(trust_new_host_key=trust_new_host_key, parallel=parallel)
    _finish(uninstall_agents(settings_from(ctx), target, options, _progress))


@app.command()
def logs(
    ctx: typer.Context,
    target: TargetOpt,
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many lines.")] = 100,
    parallel: ParallelOpt = 4,
    trust_new_host_key: TrustOpt = False,
) -> None:
    """Show the last lines of the agent's log on devices (its journal, or agent.log).

    Example: mle agent logs --target pi-01 -n 50
    """
    import sys

    from mle_cli.render import printable
    from mle_cli.targets.install import InstallOptions, agent_logs, failure

    options = InstallOptions(trust_new_host_key=trust_new_host_key, parallel=parallel)
    results = agent_logs(settings_from(ctx), target, lines, options)
    for result in results:
        if result.ok:
            head = f"{result.target} | " if len(results) > 1 else ""
            for line in result.detail.splitlines():
                sys.stdout.write(f"{head}{printable(line)}\n")
    if len(results) > 1:
        for result in results:
            if not result.ok:
                sys.stderr.write(f"{result.target}: {printable(result.detail)}\n")
    if (error := failure(results)) is not None:
        raise error


def _install(
    ctx: typer.Context,
    target: str,
    parallel: int,
    trust_new_host_key: bool,
    wheelhouse: Path | None,
    offline: bool,
    wheel: Path | None,
    start_timeout: float,
    *,
    upgrade: bool = False,
) -> None:
    from mle_cli.targets.install import InstallOptions, install_agents

    options = InstallOptions(
        trust_new_host_key=trust_new_host_key,
        parallel=parallel,
        wheelhouse=wheelhouse,
        offline=offline,
        wheel=wheel,
        start_timeout=start_timeout,
        upgrade=upgrade,
    )
    _finish(install_agents(settings_from(ctx), target, options, _progress))


def _progress(name: str, text: str) -> None:
    """One progress line on stderr: `pi-01: facts: aarch64, Debian 12, ...`."""
    import sys

    from mle_cli.render import printable

    sys.stderr.write(f"{name}: {printable(text)}\n")
    sys.stderr.flush()


def _finish(results: list[Any]) -> None:
    """Each device's outcome on stdout (a table for many), then fail when any device failed."""
    from mle_cli.render import print_table, stdout_console
    from mle_cli.targets.install import failure

    if len(results) > 1:
        rows = [{"target": r.target, "result": r.outcome, "detail": r.detail} for r in results]
        print_table(rows, ["target", "result", "detail"])
    elif results and results[0].ok:
        result = results[0]
        stdout_console().print(f"{result.target}: {result.outcome} ({result.detail})", markup=False)
    if (error := failure(results)) is not None:
        raise error

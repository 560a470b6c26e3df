"""`mle top`: the fleet live, from the agents' heartbeats (recorded in the ledger as they come)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from mle_cli.commands._common import settings_from

if TYPE_CHECKING:
    from mle_cli.fleetwatch import AgentView, FleetSnapshot
    from mle_cli.settings import Settings

__all__ = ["COLUMNS", "register"]

COLUMNS = [
    "agent", "state", "cpu%", "load", "mem used/total", "disk free", "temp", "running/slots",
    "last beat",
]  # fmt: skip
Show = Callable[["FleetSnapshot"], None]


def top(
    ctx: typer.Context,
    interval: Annotated[
        float | None,
        typer.Option(
            "--interval",
            "-n",
            min=0.05,
            max=60.0,
            help="Seconds between refreshes and heartbeats. Default: the heartbeat_interval "
            "setting (2).",
        ),
    ] = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="Print one snapshot once each agent that is up has sent a heartbeat."
        ),
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="JSON on stdout: one document, or one line per refresh."),
    ] = False,
) -> None:
    """Show the fleet live: each agent's state, cpu, load, memory, disk, temperature, tasks.

    Every heartbeat seen is recorded in the ledger (table agent_metrics). Ctrl-C exits.

    Example: mle top --once --json
    """
    import asyncio

    from mle_cli.fleetwatch import snapshot_fleet

    settings = settings_from(ctx)
    try:
        if once:
            snapshot = asyncio.run(snapshot_fleet(settings, interval=interval))
            _print_once(snapshot, json_out=json_out)
        else:
            asyncio.run(_watch(settings, interval, json_out=json_out))
    except KeyboardInterrupt:  # before the signal handlers are in place, or during --once
        return


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(top)


async def _watch(settings: Settings, interval: float | None, *, json_out: bool) -> None:
    import asyncio

    from mle_cli.fleetwatch import watch_fleet

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: the last beats are committed
        loop.add_signal_handler(signum, stop.set)
    with _display(json_out=json_out) as show:
        await watch_fleet(settings, show, stop, interval=interval)


@contextlib.contextmanager
def _display(*, json_out: bool) -> Iterator[Show]:
    """How each snapshot is shown: a JSON line, a live table on a terminal, else a table each."""
    from mle_cli import render

    if json_out:
        yield lambda snapshot: _write(json.dumps(snapshot.as_list()) + "\n")
    elif render.stdout_console().is_terminal:
        with render.LiveTable(COLUMNS) as live:
            yield lambda snapshot: live.update(_rows(snapshot), _title(snapshot))
    else:
        yield _print_plain


def _print_once(snapshot: FleetSnapshot, *, json_out: bool) -> None:
    from mle_cli import render

    if json_out:
        render.print_json(snapshot.as_list())
    else:
        render.print_table(_rows(snapshot), COLUMNS)


def _print_plain(snapshot: FleetSnapshot) -> None:
    from mle_cli import render

    _write(f"{_title(snapshot)}\n")
    render.print_table(_rows(snapshot), COLUMNS)
    _write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _title(snapshot: FleetSnapshot) -> str:
    up = sum(1 for agent in snapshot.agents if agent.state == "up")
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot.time))
    count = len(snapshot.agents)
    return f"{clock}  {count} agent{'' if count == 1 else 's'}, {up} up"


def _rows(snapshot: FleetSnapshot) -> list[dict[str, str]]:
    return [_cells(agent) for agent in snapshot.agents]


def _cells(agent: AgentView) -> dict[str, str]:
    from mle_cli import render

    cells = dict.fromkeys(COLUMNS, "-")
    cells.update(agent=render.printable(agent.name), state=agent.state)
    if agent.silent_for is not None:
        cells["last beat"] = f"{render.duration(agent.silent_for)} ago"
    s = agent.sample
    if s is None:
        return cells
    cells.update(
        {
            "cpu%": f"{s.cpu_percent:.1f}",
            "load": f"{s.load1:.2f}",
            "mem used/total": f"{_size(s.memory_used)}/{_size(s.memory_total)}",
            "disk free": _size(s.disk_free),
            "temp": "-" if s.temperature is None else f"{s.temperature:.1f}°C",
            "running/slots": f"{s.running_tasks}/{s.slots}",
        }
    )
    return cells


def _size(size: int) -> str:
    """Bytes in binary units, as `free -h` and `df -h` show them: 512M, 7.6G."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit in "BKM" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")

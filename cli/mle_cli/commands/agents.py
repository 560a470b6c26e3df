"""`mle agents`: the fleet (the local agent, the inventory, mDNS) with each agent's live facts."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mle_cli.commands._common import settings_from

if TYPE_CHECKING:
    from mle_cli.targets.discovery import AgentListing

__all__ = ["register"]

WATCH_INTERVAL = 2.0  # seconds between refreshes of `--watch`
COLUMNS = [
    "name", "address", "source", "state", "last_seen", "arch", "os", "python", "runtimes",
    "labels", "cpus", "mem", "disk", "load", "running",
]  # fmt: skip


def agents(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh every couple of seconds until Ctrl-C.")
    ] = False,
    cached: Annotated[
        bool, typer.Option("--cached", help="Answer from the cache at once, without browsing.")
    ] = False,
) -> None:
    """List the fleet: the local agent, the inventory (targets/*.yaml) and agents found by mDNS
    (cached; unseen ones are marked gone), with live facts from those that answer.

    Example: mle agents --json
    """
    from mle_cli import render
    from mle_cli.targets.discovery import list_agents

    settings = settings_from(ctx)
    if not watch:
        on_terminal = not json_out and render.stdout_console().is_terminal
        if on_terminal and not cached:  # the cache at once, then what the browse finds
            _show(list_agents(settings, refresh=False, probe=False), json_out=False, clear=False)
        _show(list_agents(settings, refresh=not cached), json_out=json_out, clear=on_terminal)
        return
    refresh = False  # the cache first, at once; then browse each round
    try:
        while True:
            started = time.monotonic()
            _show(list_agents(settings, refresh=refresh), json_out=json_out, clear=True)
            refresh = not cached
            time.sleep(max(0.1, WATCH_INTERVAL - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(agents)


def _show(listing: AgentListing, *, json_out: bool, clear: bool) -> None:
    from mle_cli import render

    if listing.warning:
        sys.stderr.write(f"warning: {render.printable(listing.warning)}\n")
    if json_out:
        if clear:  # --watch: one JSON document per line
            sys.stdout.write(json.dumps(listing.rows, default=str) + "\n")
            sys.stdout.flush()
        else:
            render.print_json(listing.rows)
        return
    console = render.stdout_console()
    if clear and console.is_terminal:
        console.clear()
    render.print_table([_cells(row) for row in listing.rows], COLUMNS)
    if not listing.rows:
        console.print("no agents seen; start one with `mle-agentd --name NAME --announce`")
    for row in listing.rows:  # why an agent listed as up or unknown did not answer
        if row["note"]:
            sys.stderr.write(f"note: {row['name']}: {render.printable(row['note'])}\n")


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the table shows it: compact units, "-" for what is not known."""
    from mle_cli import render
    from mle_cli.models.views import human_size

    def size(value: int | None) -> str | None:
        return None if value is None else human_size(value)

    labels = ",".join(f"{k}={v}" for k, v in row["labels"].items())
    running = f"{row['running_tasks']}/{row['slots']}" if row["slots"] is not None else None
    texts = {key: row[key] or None for key in ("address", "arch", "os", "python")}
    return {
        **row,
        **texts,
        "runtimes": ",".join(row["runtimes"]) or None,
        "labels": labels or None,
        "last_seen": render.ago(row["last_seen"]),
        "mem": size(row["memory_bytes"]),
        "disk": size(row["disk_free_bytes"]),
        "load": None if row["load1"] is None else f"{row['load1']:.2f}",
        "running": running,
    }

"""The agents a run uses: one connection per agent, and the placement of steps among them.

A step placed by name goes to that agent. A step placed by glob or labels goes to a matching
agent that answers, with a free slot, then the lowest load (`mle_cli.placement.choose`); when
every match is busy it waits for a slot on any of them, not on one chosen in advance. Agents not
connected yet are dialled in the background, so one slow or dead match never holds placement up
while another answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from typing import TYPE_CHECKING

from mle_cli.executor import Executor
from mle_cli.ledger import LedgerWriter, agent_metrics
from mle_cli.placement import Load, choose, matching
from mle_cli.settings import Settings
from mle_cli.targets import resolve_target
from mle_cli.targets.fleet import Target, fleet_targets
from mle_cli.targets.selectors import Selector
from mle_proto.errors import AgentUnavailable

if TYPE_CHECKING:
    from mle_cli.targets.connection import AgentConnection

__all__ = ["Executors"]

_RECHECK = 1.0  # seconds between looks at the fleet while every matching agent is busy


class Executors:
    """Connections to the agents of one run, opened on first use and again once an agent has
    been silent past the grace period (a restarted local agent listens on a new port)."""

    def __init__(self, settings: Settings, writer: LedgerWriter) -> None:
        self._settings = settings
        self._writer = writer  # heartbeats of the agents a run uses go to the ledger
        self._open: dict[str, asyncio.Task[AgentConnection]] = {}
        self._all: list[asyncio.Task[AgentConnection]] = []
        self._failed: dict[str, float] = {}  # agent -> when connecting to it last failed
        self._freed = asyncio.Event()  # set when any attempt gives its slot back

    async def get(self, placement: str) -> Executor:
        """The executor for a step's placement (a name, a glob, labels)."""
        name = Selector.parse(placement).single_name
        if name is not None:
            return await self._task(name)
        return await self._place(placement)

    async def close(self) -> None:
        """Close every connection this run opened."""
        for task in self._all:
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().close()

    async def _place(self, placement: str) -> AgentConnection:
        while True:
            names = await self._matching(placement)
            live = {n: c for n in names if (c := self._healthy(n)) is not None}
            for name in names:  # dial the others in the background
                if name not in live and not self._failed_lately(name):
                    self._task(name)
            if not live:
                live = await self._first_answer(placement, names)
            loads = [Load(n, c.free_slots(), c.load()) for n, c in live.items()]
            chosen = live[choose(loads) or next(iter(live))]
            if chosen.free_slots() > 0:
                chosen.promise()
                return chosen
            self._freed.clear()  # every match is busy: wait for a slot anywhere, look again
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), _RECHECK)

    async def _matching(self, placement: str) -> list[str]:
        """Names of the targets the placement matches. The mDNS cache ages during a run
        (nothing browses): an agent heard this run is up whatever the cache says, and a cache
        that matches nothing is refreshed by a browse."""
        cached = await asyncio.to_thread(fleet_targets, self._settings)
        names = [t.name for t in matching(placement, [self._heard(t) for t in cached])]
        if names:
            return names
        browse = functools.partial(fleet_targets, self._settings, browse=True)
        return [t.name for t in matching(placement, await asyncio.to_thread(browse))]

    async def _first_answer(self, placement: str, names: list[str]) -> dict[str, AgentConnection]:
        """The first of these agents to answer; AgentUnavailable naming why none did."""
        pending = {self._task(n): n for n in names}
        why: list[str] = []
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                name = pending.pop(task)
                if task.exception() is None:
                    return {name: task.result()}
                why.append(f"{name}: {task.exception()}")
        raise AgentUnavailable(f"no agent matching {placement!r} answers ({'; '.join(why)})")

    def _task(self, name: str) -> asyncio.Task[AgentConnection]:
        """The connection (being opened) to an agent; a new one when the last failed or went
        silent past the grace period (the silent one stops recording heartbeats)."""
        task = self._open.get(name)
        if task is not None and task.done() and not task.cancelled():
            if task.exception() is None and self._healthy(name) is None:
                task.result().stop_heartbeats()
                task = None
            elif task.exception() is not None:
                task = None
        if task is None:
            task = asyncio.create_task(self._connect(name))
            task.add_done_callback(functools.partial(self._note_failure, name))
            self._open[name] = task
            self._all.append(task)
        return task

    def _note_failure(self, name: str, task: asyncio.Task[AgentConnection]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failed[name] = time.monotonic()

    def _healthy(self, name: str) -> AgentConnection | None:
        """The open connection to an agent, unless it has been silent past the grace period."""
        task = self._open.get(name)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        conn = task.result()
        return None if conn.silent_for() > self._settings.agent_grace else conn

    def _heard(self, target: Target) -> Target:
        """The target, up when its connection's heartbeats say so."""
        return dataclasses.replace(target, state="up") if self._healthy(target.name) else target

    def _failed_lately(self, name: str) -> bool:
        return time.monotonic() - self._failed.get(name, -1e9) < self._settings.agent_grace

    async def _connect(self, target: str) -> AgentConnection:
        from mle_cli.targets.connection import connect

        endpoint = await asyncio.to_thread(resolve_target, target, self._settings)
        conn = await connect(endpoint, self._settings.rpc_timeout)
        keep = self._settings.agent_metrics_keep
        conn.on_heartbeat = agent_metrics.heartbeat_recorder(self._writer, conn.name, keep)
        conn.on_slot_freed = self._freed.set
        if self._settings.heartbeat_interval > 0:
            conn.follow_heartbeats(self._settings.heartbeat_interval)
        return conn

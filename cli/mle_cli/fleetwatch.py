"""Following the fleet's heartbeats for `mle top`: every target that is up gets a connection, each
heartbeat goes into the ledger (batched), and snapshots say how every agent is doing.

The fleet is re-read every few seconds, so new agents join; an agent that stops beating stays
in the snapshots as `silent` with its last figures. One agent's failure (refused, unreachable,
another protocol, silent) only changes its own row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mle_cli.ledger import Ledger, LedgerWriter, agent_metrics
from mle_cli.ledger._agent_metrics import MetricSample, heartbeat_row, record_heartbeats
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint, resolve_target
from mle_cli.targets.connection import AgentConnection, connect
from mle_cli.targets.fleet import Target, fleet_targets
from mle_proto.errors import MleError
from mle_proto.v1.agent_pb2 import AgentHeartbeat

__all__ = [
    "FLEET_EVERY",
    "STATES",
    "AgentView",
    "FleetSnapshot",
    "FleetWatch",
    "snapshot_fleet",
    "watch_fleet",
]

log = logging.getLogger(__name__)

FLEET_EVERY = 5.0  # seconds between two reads of the fleet (with a bounded mDNS browse)
# up: beating; silent: beat this session, not lately; connecting; unreachable: the last attempt
# to connect failed (see `error`); gone and unknown: as the fleet says, never connected.
STATES = ("up", "silent", "connecting", "unreachable", "gone", "unknown")
METRICS = tuple(f.name for f in dataclasses.fields(MetricSample) if f.name not in ("agent", "time"))

Targets = Callable[[bool], Sequence[Target]]  # browse -> the fleet
Resolve = Callable[[str], Endpoint]


@dataclass(frozen=True)
class AgentView:
    """How one agent is doing: its state and its last heartbeat (this session or the ledger)."""

    name: str
    state: str  # one of STATES
    address: str = ""
    source: str = ""
    cpus: int = 0
    sample: MetricSample | None = None
    silent_for: float | None = None  # seconds since that heartbeat arrived
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The view as plain JSON-ready values."""
        sample = self.sample
        metrics = {name: getattr(sample, name) if sample else None for name in METRICS}
        return {
            "agent": self.name,
            "state": self.state,
            "address": self.address,
            "source": self.source,
            "cpus": self.cpus or None,
            **metrics,
            "last_beat": sample.time if sample else None,
            "silent_for": None if self.silent_for is None else round(self.silent_for, 3),
            "error": self.error,
        }


@dataclass(frozen=True)
class FleetSnapshot:
    """Every agent at one moment."""

    time: float
    agents: tuple[AgentView, ...]

    def as_list(self) -> list[dict[str, Any]]:
        """The agents as plain JSON-ready values."""
        return [agent.as_dict() for agent in self.agents]


async def watch_fleet(
    settings: Settings,
    on_snapshot: Callable[[FleetSnapshot], None],
    stop: asyncio.Event,
    *,
    interval: float | None = None,
    fleet_every: float = FLEET_EVERY,
    targets: Targets | None = None,
    resolve: Resolve | None = None,
) -> None:
    """Call `on_snapshot` every interval (default: the heartbeat interval) until `stop` is set."""
    watch = FleetWatch(settings, interval, targets=targets, resolve=resolve)
    await watch.start(browse=False)  # the cache at once; a browse follows in the background
    try:
        await watch.settle(watch.interval)  # a first picture with figures in it, if they come
        next_read = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_read:
                watch.refresh_in_background()
                next_read = time.monotonic() + fleet_every
            await watch.flush()
            on_snapshot(watch.snapshot())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), watch.interval)
    finally:
        await watch.close()


async def snapshot_fleet(
    settings: Settings,
    *,
    interval: float | None = None,
    wait: float | None = None,
    targets: Targets | None = None,
    resolve: Resolve | None = None,
) -> FleetSnapshot:
    """One snapshot, once every agent that is up has sent a heartbeat or failed to connect, or
    after `wait` seconds (default: the RPC timeout plus two intervals)."""
    watch = FleetWatch(settings, interval, targets=targets, resolve=resolve)
    await watch.start(browse=True)
    try:
        await watch.settle(wait if wait is not None else settings.rpc_timeout + 2 * watch.interval)
        await watch.flush()
        return watch.snapshot()
    finally:
        await watch.close()


@dataclass
class _Entry:
    """What is known of one agent during a watch."""

    target: Target
    wanted: bool = False  # the fleet says it is there: keep (re)connecting
    address: str = ""
    cpus: int = 0
    sample: MetricSample | None = None
    beat_at: float | None = None  # monotonic time of the last heartbeat this session
    connecting: bool = False
    error: str = ""
    worker: asyncio.Task[None] | None = None


class FleetWatch:
    """Connections to the fleet's agents, their heartbeats recorded in the ledger."""

    def __init__(
        self,
        settings: Settings,
        interval: float | None = None,
        *,
        targets: Targets | None = None,
        resolve: Resolve | None = None,
    ) -> None:
        self.interval = interval or settings.heartbeat_interval
        self._settings = settings
        self._targets = targets or functools.partial(_fleet, settings)
        self._resolve = resolve or functools.partial(_resolve, settings)
        # Settings.agent_metrics_keep once it exists; the default until then.
        self._keep = settings.agent_metrics_keep
        self._entries: dict[str, _Entry] = {}
        self._known: dict[str, MetricSample] = {}  # each agent's last row in the ledger
        self._pending: list[MetricSample] = []
        self._changed = asyncio.Event()
        self._writer: LedgerWriter | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self, *, browse: bool) -> None:
        """Open the ledger, read the fleet and start following every agent that is up."""
        self._writer = await asyncio.to_thread(LedgerWriter, self._settings.ledger_path)
        self._known = await asyncio.to_thread(_last_samples, self._settings)
        self._apply(await asyncio.to_thread(self._targets, browse))

    def refresh_in_background(self) -> None:
        """Read the fleet again (with a bounded browse), unless a read is still going on."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._refresh())

    async def settle(self, wait: float) -> None:
        """Wait until every agent that is up has beaten or failed, for at most `wait` seconds."""
        deadline = time.monotonic() + wait
        while not self._settled() and (left := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def flush(self) -> None:
        """Commit the heartbeats received so far (one batch)."""
        assert self._writer is not None
        rows, self._pending = self._pending, []
        if rows:
            self._writer.submit(functools.partial(_record, rows, self._keep))
        await self._writer.flush()

    def snapshot(self) -> FleetSnapshot:
        """Every agent seen during this watch, in the order they appeared."""
        now = time.monotonic()
        silent_after = max(3 * self.interval, self.interval + 1.0)
        views = (_view(entry, now, silent_after) for entry in self._entries.values())
        return FleetSnapshot(time.time(), tuple(views))

    async def close(self) -> None:
        """Stop following, commit what arrived, close the ledger."""
        tasks = [e.worker for e in self._entries.values() if e.worker is not None]
        tasks += [self._reading] if self._reading is not None else []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            try:
                await self.flush()
            finally:
                await asyncio.to_thread(self._writer.close)

    async def _refresh(self) -> None:
        try:
            targets = await asyncio.to_thread(self._targets, True)
        except Exception as e:  # keep showing the fleet as last read
            log.debug("reading the fleet failed: %s", e, exc_info=True)
            return
        self._apply(targets)

    def _apply(self, targets: Sequence[Target]) -> None:
        listed = {target.name for target in targets}
        for target in targets:
            entry = self._entries.get(target.name)
            if entry is None:
                entry = self._entries[target.name] = _Entry(target)
                entry.sample = self._known.get(target.name)
            entry.target, entry.wanted = target, _wanted(target)
            if entry.wanted and (entry.worker is None or entry.worker.done()):
                entry.worker = asyncio.create_task(self._follow(entry))
        for name, entry in self._entries.items():
            if name not in listed:
                entry.wanted = False

    def _settled(self) -> bool:
        return all(e.beat_at is not None or e.error for e in self._entries.values() if e.wanted)

    async def _follow(self, entry: _Entry) -> None:
        """Connect, follow heartbeats until silent past the grace period, reconnect (a restarted
        agent may listen elsewhere); give up once the fleet no longer lists the agent."""
        while True:
            conn = await self._open(entry)
            if conn is not None:
                try:
                    while conn.silent_for() <= self._settings.agent_grace:
                        await asyncio.sleep(self.interval)
                finally:
                    await conn.close()
            if not entry.wanted:
                return
            await asyncio.sleep(max(self.interval, 1.0))

    async def _open(self, entry: _Entry) -> AgentConnection | None:
        entry.connecting = True
        try:
            endpoint = await asyncio.to_thread(self._resolve, entry.target.name)
            conn = await connect(endpoint, self._settings.rpc_timeout)
            try:
                info = await conn.info()
            except BaseException:
                await conn.close()
                raise
        except Exception as e:  # one agent's failure never stops the others
            log.debug("cannot follow %s: %s", entry.target.name, e, exc_info=True)
            entry.error = str(e) if isinstance(e, MleError) else f"{type(e).__name__}: {e}"
            self._changed.set()
            return None
        finally:
            entry.connecting = False
        entry.error, entry.address, entry.cpus = "", endpoint.address, info.cpus
        conn.on_heartbeat = functools.partial(self._beat, entry)
        conn.follow_heartbeats(self.interval)
        return conn

    def _beat(self, entry: _Entry, beat: AgentHeartbeat) -> None:
        entry.sample = heartbeat_row(entry.target.name, beat)
        entry.beat_at = time.monotonic()
        self._pending.append(entry.sample)
        self._changed.set()


def _view(entry: _Entry, now: float, silent_after: float) -> AgentView:
    silent_for = None
    if entry.beat_at is not None:
        silent_for = now - entry.beat_at
    elif entry.sample is not None:  # from the ledger: an earlier session
        silent_for = max(0.0, time.time() - entry.sample.time)
    return AgentView(
        name=entry.target.name,
        state=_state(entry, silent_for, silent_after),
        address=entry.address or entry.target.address,
        source=entry.target.source,
        cpus=entry.cpus,
        sample=entry.sample,
        silent_for=silent_for,
        error=entry.error,
    )


def _state(entry: _Entry, silent_for: float | None, silent_after: float) -> str:
    if entry.beat_at is not None and silent_for is not None:
        return "up" if silent_for <= silent_after else "silent"
    if entry.wanted and entry.error:
        return "unreachable"
    if entry.wanted:
        return "connecting"
    return entry.target.state


def _wanted(target: Target) -> bool:
    """Whether to connect: up, or in the inventory with an address though never seen on mDNS."""
    return target.state == "up" or (target.state == "unknown" and bool(target.address))


def _fleet(settings: Settings, browse: bool) -> Sequence[Target]:
    return fleet_targets(settings, browse=browse)


def _resolve(settings: Settings, name: str) -> Endpoint:
    return resolve_target(name, settings, start=False)


def _record(rows: Sequence[MetricSample], keep: int, ledger: Ledger) -> None:
    record_heartbeats(ledger, rows, keep)


def _last_samples(settings: Settings) -> dict[str, MetricSample]:
    """Each agent's last row in the ledger, when there is a ledger."""
    ledger = Ledger(settings.ledger_path)
    try:
        rows = agent_metrics.latest_metrics(ledger)
    finally:
        ledger.close()
    names = [f.name for f in dataclasses.fields(MetricSample)]
    return {agent: MetricSample(**{n: row[n] for n in names}) for agent, row in rows.items()}

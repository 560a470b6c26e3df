"""Heartbeats: the machine's load, sampled off the event loop so that nothing delays a heartbeat.

Sampling runs in one dedicated thread (never the shared default executor, which staging and output
hashing can keep busy); CPU use is measured since the previous sample, without blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from mle_agent.settings import HEARTBEAT_RANGE
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["MachineSampler", "heartbeat_interval"]

# Sensors that describe the SoC or CPU package, best first; otherwise the hottest one reported.
_PREFERRED_SENSORS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp")
_CPU_WINDOW = 0.1  # seconds: a shorter window between two samples reuses the last figure


def heartbeat_interval(requested: float, default: float) -> float:
    """The interval a Heartbeat call gets: the request (0 = default) clamped to HEARTBEAT_RANGE."""
    value = requested if requested > 0 else default  # NaN and negatives fall back to the default
    low, high = HEARTBEAT_RANGE
    return min(high, max(low, value))


class MachineSampler:
    """Samples CPU, load, memory, disk and temperature in its own thread."""

    def __init__(self, data_dir: Path) -> None:
        self._data_dir = data_dir
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mle-heartbeat")
        self._cpu = 0.0
        self._cpu_at = time.monotonic()
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    async def sample(self) -> pb.AgentHeartbeat:
        """A heartbeat with the machine's fields filled in."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._sample)

    def close(self) -> None:
        """Stop the sampling thread."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _sample(self) -> pb.AgentHeartbeat:
        memory = psutil.virtual_memory()
        beat = pb.AgentHeartbeat(
            cpu_percent=self._cpu_percent(),
            load1=_load1(),
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            disk_free_bytes=_disk_free(self._data_dir),
        )
        temperature = _temperature()
        if temperature is not None:
            beat.temperature_celsius = temperature
        return beat

    def _cpu_percent(self) -> float:
        now = time.monotonic()
        if now - self._cpu_at >= _CPU_WINDOW:
            self._cpu = psutil.cpu_percent(interval=None)
            self._cpu_at = now
        return self._cpu


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def _disk_free(path: Path) -> int:
    try:
        return psutil.disk_usage(str(path)).free
    except OSError:
        return 0


def _temperature() -> float | None:
    """The CPU or SoC temperature in °C, or None when the board reports none."""
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is None:
        return None
    readings: dict[str, list[float]] = {}
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        for name, entries in sensors().items():
            values = [e.current for e in entries if e.current is not None]
            readings[name] = [v for v in values if math.isfinite(v)]
    for name in _PREFERRED_SENSORS:
        if readings.get(name):
            return readings[name][0]
    every = [value for values in readings.values() for value in values]
    return max(every) if every else None

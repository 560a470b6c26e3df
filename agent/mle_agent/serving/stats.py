"""Per-version serving counters and latency histograms, and their Prometheus exposition.

Counting is cheap (one lock per version, a few integer additions) because it sits on every
request's path; percentiles are estimated from fixed histogram buckets when someone asks.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "CountersSnapshot",
    "StatsSource",
    "VersionCounters",
    "VersionStatsRow",
    "render_metrics",
]

# Upper bounds in seconds: edge models answer in tens of microseconds to seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Requests per runtime call.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class CountersSnapshot:
    """A consistent copy of one version's counters."""

    requests: int
    errors: int
    batches: int
    shadow_requests: int
    shadow_dropped: int
    disagreements: int
    fallbacks: int
    since: float
    latency_counts: tuple[int, ...]  # per LATENCY_BUCKETS bound, then the overflow bucket
    latency_sum: float
    batch_counts: tuple[int, ...]  # per BATCH_BUCKETS bound, then the overflow bucket
    batch_sum: int

    def percentile(self, q: float) -> float:
        """Estimate the q-quantile (0..1) of latency by interpolating inside its bucket."""
        total = sum(self.latency_counts)
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        lower = 0.0
        for index, count in enumerate(self.latency_counts):
            upper = LATENCY_BUCKETS[index] if index < len(LATENCY_BUCKETS) else lower
            if count and seen + count >= rank:
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
            lower = upper
        return LATENCY_BUCKETS[-1]

    def to_proto(self) -> pb.VersionStats:
        """The counters as the Models service reports them."""
        return pb.VersionStats(
            requests=self.requests,
            errors=self.errors,
            p50_seconds=self.percentile(0.50),
            p95_seconds=self.percentile(0.95),
            p99_seconds=self.percentile(0.99),
            batches=self.batches,
            shadow_requests=self.shadow_requests,
            disagreements=self.disagreements,
            fallbacks=self.fallbacks,
            since=self.since,
        )


class VersionCounters:
    """Thread-safe counters of one model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since = time.time()
        self._requests = self._errors = self._batches = 0
        self._shadow = self._dropped = self._disagreements = self._fallbacks = 0
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._batch = [0] * (len(BATCH_BUCKETS) + 1)
        self._batch_sum = 0

    def record_request(self, seconds: float, *, ok: bool) -> None:
        """One request answered (ok) or failed, and how long it took."""
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            self._requests += 1
            self._errors += not ok
            self._latency[index] += 1
            self._latency_sum += seconds

    def record_rejected(self) -> None:
        """One request refused before it ran (bad input): an error without a latency."""
        with self._lock:
            self._requests += 1
            self._errors += 1

    def record_batch(self, requests: int) -> None:
        """One runtime call that served `requests` requests."""
        index = bisect.bisect_left(BATCH_BUCKETS, requests)
        with self._lock:
            self._batches += 1
            self._batch[index] += 1
            self._batch_sum += requests

    def record_shadow(self, *, disagreed: bool, ok: bool = True) -> None:
        """One mirrored request this version ran as the shadow."""
        with self._lock:
            self._shadow += 1
            self._disagreements += disagreed
            self._errors += not ok

    def record_shadow_dropped(self) -> None:
        """A mirrored request dropped because the shadow queue was full."""
        with self._lock:
            self._dropped += 1

    def record_fallback(self) -> None:
        """This version answered because the primary missed its deadline."""
        with self._lock:
            self._fallbacks += 1

    def snapshot(self) -> CountersSnapshot:
        """A consistent copy of every counter."""
        with self._lock:
            return CountersSnapshot(
                requests=self._requests,
                errors=self._errors,
                batches=self._batches,
                shadow_requests=self._shadow,
                shadow_dropped=self._dropped,
                disagreements=self._disagreements,
                fallbacks=self._fallbacks,
                since=self.since,
                latency_counts=tuple(self._latency),
                latency_sum=self._latency_sum,
                batch_counts=tuple(self._batch),
                batch_sum=self._batch_sum,
            )


@dataclass(frozen=True)
class VersionStatsRow:
    """One version's counters as `render_metrics` reads them."""

    model: str
    version: int
    ready: bool
    counters: CountersSnapshot


class StatsSource(Protocol):
    """What `render_metrics` needs of the registry."""

    def version_stats(self) -> list[VersionStatsRow]:
        """Every version's counters."""
        ...


def render_metrics(registry: StatsSource) -> tuple[bytes, str]:
    """The Prometheus text exposition of every version's counters and the agent's load."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(_ServingCollector(registry))
    return generate_latest(collectors), "text/plain; version=0.0.4; charset=utf-8"


class _ServingCollector(Collector):
    """Builds the metric families fresh from the registry on every scrape."""

    def __init__(self, registry: StatsSource) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """Every metric family."""
        rows = self._registry.version_stats()
        yield from _model_metrics(rows)
        yield from _agent_metrics()


_LABELS = ("model", "version")
_COUNTERS = (
    ("mle_model_requests", "Requests answered or failed, per model version.", "requests"),
    ("mle_model_errors", "Requests that failed, per model version.", "errors"),
    ("mle_model_batches", "Runtime calls, per model version.", "batches"),
    (
        "mle_model_shadow_requests",
        "Requests mirrored to this version as shadow.",
        "shadow_requests",
    ),
    ("mle_model_shadow_dropped", "Mirrored requests dropped: shadow queue full.", "shadow_dropped"),
    (
        "mle_model_shadow_disagreements",
        "Shadow answers that differed from the primary's.",
        "disagreements",
    ),
    (
        "mle_model_fallbacks",
        "Answers given as secondary because the primary was late.",
        "fallbacks",
    ),
)


def _model_metrics(rows: Sequence[VersionStatsRow]) -> Iterator[Metric]:
    for name, documentation, attribute in _COUNTERS:
        counter = CounterMetricFamily(name, documentation, labels=_LABELS)
        for row in rows:
            counter.add_metric(_labels(row), getattr(row.counters, attribute))
        yield counter
    latency = HistogramMetricFamily(
        "mle_model_request_duration_seconds", "Request latency, per model version.", labels=_LABELS
    )
    sizes = HistogramMetricFamily(
        "mle_model_batch_size", "Requests per runtime call, per model version.", labels=_LABELS
    )
    ready = GaugeMetricFamily("mle_model_ready", "1 when the version is loaded.", labels=_LABELS)
    for row in rows:
        c = row.counters
        latency.add_metric(
            _labels(row), _cumulative(LATENCY_BUCKETS, c.latency_counts), c.latency_sum
        )
        sizes.add_metric(_labels(row), _cumulative(BATCH_BUCKETS, c.batch_counts), c.batch_sum)
        ready.add_metric(_labels(row), 1.0 if row.ready else 0.0)
    yield from (latency, sizes, ready)


def _labels(row: VersionStatsRow) -> list[str]:
    return [row.model, str(row.version)]


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus' cumulative `le` buckets, +Inf last."""
    buckets = []
    total = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
    return buckets


def _agent_metrics() -> Iterator[Metric]:
    memory = psutil.virtual_memory()
    gauges = (
        (
            "mle_agent_cpu_percent",
            "Whole-machine CPU use since the previous measurement, 0-100.",
            None,
        ),
        ("mle_agent_memory_used_bytes", "Memory in use on the machine.", memory.used),
        ("mle_agent_memory_total_bytes", "Memory on the machine.", memory.total),
    )
    for name, documentation, value in gauges:
        # cpu_percent(None) compares with the previous call in this process (heartbeats call it
        # too); the very first call reads 0.
        number = psutil.cpu_percent(interval=None) if value is None else value
        yield GaugeMetricFamily(name, documentation, value=float(number))

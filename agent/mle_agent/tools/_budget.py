"""The budget of `--pick`: comma-separated upper limits such as `p95<=20ms,rss<=150MB`.

p50, p95, p99 and load take ms or s; rss MB or MiB; size kB or MB. Each limit names the variant
field it bounds, in that field's unit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from mle_proto.errors import InvalidInput

__all__ = ["Constraint", "parse_budget"]

_TIME = ({"ms": 1.0, "s": 1000.0}, "ms or s")
_RSS = ({"mb": 1.0, "mib": 1.048576}, "MB or MiB")
_SIZE = ({"kb": 1e3, "mb": 1e6}, "kB or MB")
# Budget name -> the variant field it limits; its units (factors to the field's unit), as told.
_MEASURES: Mapping[str, tuple[str, tuple[Mapping[str, float], str]]] = {
    "p50": ("p50_ms", _TIME),
    "p95": ("p95_ms", _TIME),
    "p99": ("p99_ms", _TIME),
    "load": ("load_ms", _TIME),
    "rss": ("peak_rss_mb", _RSS),
    "size": ("size_bytes", _SIZE),
}
_TERM = re.compile(
    r"\s*(?P<name>\w+)\s*(?P<op>[<>=!]+)\s*(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)"
    r"\s*(?P<unit>[a-z]*)\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Constraint:
    """One upper limit of a budget: a variant field and its largest allowed value."""

    name: str
    field: str
    limit: float


def parse_budget(expr: str) -> tuple[Constraint, ...]:
    """The constraints of a --pick expression; InvalidInput (one line) when malformed."""
    if not expr.strip():
        raise InvalidInput("--pick: empty budget; write limits such as p95<=20ms,rss<=100MB")
    constraints: list[Constraint] = []
    for term in expr.split(","):
        constraint = _constraint(expr, term)
        if any(c.name == constraint.name for c in constraints):
            raise InvalidInput(f"--pick {expr!r}: {constraint.name} is limited twice")
        constraints.append(constraint)
    return tuple(constraints)


def _constraint(expr: str, term: str) -> Constraint:
    where = f"--pick {expr!r}"
    match = _TERM.fullmatch(term)
    if not term.strip():
        raise InvalidInput(f"{where}: an empty limit between commas")
    if match is None:
        raise InvalidInput(f"{where}: {term.strip()!r} is not NAME<=NUMBER UNIT, e.g. p95<=20ms")
    name, unit = match["name"].lower(), match["unit"]
    if name not in _MEASURES:
        raise InvalidInput(f"{where}: unknown measure {name!r}; one of {', '.join(_MEASURES)}")
    if match["op"] != "<=":
        raise InvalidInput(f"{where}: {term.strip()!r}: a budget is an upper limit, write <=")
    field, (units, shown) = _MEASURES[name]
    if unit.lower() not in units:
        what = f"unit {unit!r}" if unit else "no unit"
        raise InvalidInput(f"{where}: {term.strip()!r} has {what}; {name} takes {shown}")
    number = float(match["number"])
    if not number > 0:
        raise InvalidInput(f"{where}: {term.strip()!r}: the limit must be above 0")
    return Constraint(name, field, number * units[unit.lower()])

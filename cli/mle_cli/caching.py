"""The step cache: a step whose key matches an earlier successful step, and whose outputs are
still in the project store, is not run again; it is CACHED with the earlier outputs and metrics.

The key covers what decides a step's outputs: the rendered command and environment, the digests
of its inputs and of the shipped files, its declared outputs, and the platform class of the
agent. Run-specific variables (run id, attempt, target name) are left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mle_cli.executor import OutputFile, TaskRequest
from mle_cli.ledger import Ledger, queries
from mle_proto.store import ArtifactStore

__all__ = ["CacheHit", "cache_key", "cache_parts", "explain_miss", "find_hit"]

_VERSION = 1
_RUN_SPECIFIC = ("MLE_RUN_ID", "MLE_ATTEMPT", "MLE_TARGET")


@dataclass(frozen=True)
class CacheHit:
    """An earlier step whose outputs can stand in for this one's."""

    run_id: str
    step_id: str
    outputs: Mapping[str, OutputFile]
    metrics: Mapping[str, Any]


def cache_parts(request: TaskRequest, files: Mapping[str, str], platform: str) -> dict[str, Any]:
    """What the key is made of, kept in the ledger to explain a later miss."""
    command = request.argv if request.argv is not None else request.shell
    env = {k: v for k, v in request.env.items() if k not in _RUN_SPECIFIC}
    return {
        "version": _VERSION,
        "command": _digest(command),
        "env": _digest(env),
        "inputs": {p: d for p, d in sorted(request.inputs.items()) if p not in files},
        "files": dict(sorted(files.items())),
        "outputs": list(request.outputs),
        "platform": platform,
    }


def cache_key(parts: Mapping[str, Any]) -> str:
    """The key itself."""
    return _digest(parts)


def find_hit(
    ledger: Ledger, key: str, store: ArtifactStore, outputs: tuple[str, ...]
) -> CacheHit | None:
    """The newest successful step with this key whose outputs are all still in the store."""
    for candidate in queries.cache_candidates(ledger, key):
        run_id, step_id = candidate["run_id"], candidate["step_id"]
        found = {
            row["path"]: OutputFile(row["path"], row["digest"], row["size"])
            for row in queries.step_outputs(ledger, run_id, step_id)
        }
        if set(found) == set(outputs) and all(store.has(o.digest) for o in found.values()):
            metrics = queries.metrics(ledger, run_id).get(step_id, {})
            return CacheHit(run_id, step_id, found, metrics)
    return None


def explain_miss(previous: Mapping[str, Any] | None, parts: Mapping[str, Any]) -> str:
    """Why a step is not cached, compared with its latest successful run."""
    if previous is None:
        return "no earlier successful run with these inputs"
    reasons = [
        f"{name} changed"
        for name in ("command", "env", "outputs", "platform", "version")
        if previous.get(name) != parts.get(name)
    ]
    for kind in ("inputs", "files"):
        old, new = previous.get(kind) or {}, parts.get(kind) or {}
        changed = sorted(p for p in {*old, *new} if old.get(p) != new.get(p))
        if changed:
            noun = "input" if kind == "inputs" else "file"
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            reasons.append(f"{noun} {changed[0]}{more} changed")
    if not reasons:
        return "the earlier outputs are no longer in the store"
    return ", ".join(reasons)


def _digest(value: object) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()

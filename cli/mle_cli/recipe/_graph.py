"""The step graph: needs resolved, cycles refused, a deterministic order, no colliding outputs."""

from __future__ import annotations

import graphlib
import heapq
from collections.abc import Sequence

from mle_cli.recipe._fields import closest
from mle_cli.recipe._loader import Document
from mle_cli.recipe._steps import ParsedStep
from mle_cli.recipe.plan import ShippedFile

__all__ = ["check_outputs", "order_steps"]


def order_steps(doc: Document, parsed: Sequence[ParsedStep]) -> list[ParsedStep]:
    """Steps in topological order, ties broken by declaration order; needs must be valid."""
    index = {p.step.id: i for i, p in enumerate(parsed)}
    for p in parsed:
        _check_needs(doc, p, index)
    sorter = graphlib.TopologicalSorter({p.step.id: p.step.needs for p in parsed})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise _cycle_error(doc, parsed, index, exc.args[1]) from None
    ready = [index[s] for s in sorter.get_ready()]
    heapq.heapify(ready)
    ordered: list[ParsedStep] = []
    while ready:
        step = parsed[heapq.heappop(ready)]
        ordered.append(step)
        sorter.done(step.step.id)
        for step_id in sorter.get_ready():
            heapq.heappush(ready, index[step_id])
    return ordered


def check_outputs(
    doc: Document, parsed: Sequence[ParsedStep], files: Sequence[ShippedFile]
) -> None:
    """Refuse outputs that would overwrite a shipped file or each other in one work dir."""
    by_id = {p.step.id: p for p in parsed}
    for p in parsed:
        for where, output in zip(p.output_paths, p.step.outputs, strict=True):
            for shipped in files:
                if _collide(output, shipped.path):
                    message = f"output {output!r} collides with the shipped file {shipped.path!r}"
                    raise doc.error(where, message)
    for p in parsed:
        needs = p.step.needs
        for j, later in enumerate(needs):
            for earlier in needs[:j]:
                problem = _clash(by_id[earlier].step.outputs, by_id[later].step.outputs)
                if problem:
                    message = _clash_message(earlier, later, problem, p.step.id)
                    raise doc.error(p.need_paths[j], message)


def _check_needs(doc: Document, p: ParsedStep, index: dict[str, int]) -> None:
    seen: set[str] = set()
    for where, name in zip(p.need_paths, p.step.needs, strict=True):
        if name == p.step.id:
            raise doc.error(where, f"step {name!r} needs itself")
        if name not in index:
            hint = closest(name, [s for s in index if s != p.step.id])
            raise doc.error(where, f"unknown step {name!r}", suggestion=hint)
        if name in seen:
            raise doc.error(where, f"step {name!r} is listed twice")
        seen.add(name)


def _cycle_error(
    doc: Document, parsed: Sequence[ParsedStep], index: dict[str, int], found: list[str]
) -> Exception:
    """Name the cycle as a chain of needs, starting from its first-declared step."""
    # graphlib lists each node before the nodes that need it; reverse to read "a needs b".
    chain = list(reversed(found))[:-1]
    start = min(range(len(chain)), key=lambda i: index[chain[i]])
    chain = chain[start:] + chain[:start]
    first = parsed[index[chain[0]]]
    where = first.need_paths[first.step.needs.index(chain[1])]
    return doc.error(where, "cycle: " + " -> ".join([*chain, chain[0]]))


def _collide(a: str, b: str) -> bool:
    """Whether two work-dir paths cannot both exist: equal, or one inside the other."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _clash(first: Sequence[str], second: Sequence[str]) -> tuple[str, str] | None:
    for a in first:
        for b in second:
            if _collide(a, b):
                return a, b
    return None


def _clash_message(earlier: str, later: str, paths: tuple[str, str], step_id: str) -> str:
    a, b = paths
    if a == b:
        what = f"steps {earlier!r} and {later!r} both produce {a!r}"
    else:
        what = f"step {earlier!r} produces {a!r} and step {later!r} produces {b!r}"
    return f"{what}; both are placed in the work dir of {step_id!r}"

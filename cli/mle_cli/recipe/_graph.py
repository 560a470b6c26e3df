"""The step graph: matrices expanded, needs resolved, cycles refused, a deterministic order."""

from __future__ import annotations

import dataclasses
import graphlib
import heapq
from collections.abc import Mapping, Sequence

from mle_cli.recipe._fields import closest
from mle_cli.recipe._loader import Document, KeyPath
from mle_cli.recipe._matrix import expand_step
from mle_cli.recipe._references import SELECT, produced
from mle_cli.recipe._steps import ParsedStep
from mle_cli.recipe.plan import ShippedFile, Step

__all__ = ["check_outputs", "expand_steps", "order_steps"]


def expand_steps(doc: Document, parsed: Sequence[ParsedStep]) -> list[ParsedStep]:
    """Matrix steps replaced by their children, in place; needs naming a matrix name them all."""
    expanded = [
        dataclasses.replace(p, step=child) for p in parsed for child in expand_step(p.step, p.axes)
    ]
    groups: dict[str, list[str]] = {}
    for p in expanded:
        if p.step.group:
            groups.setdefault(p.step.group, []).append(p.step.id)
    ids = {p.step.id: p.step for p in expanded}
    return [_resolve_needs(doc, p, ids, groups) for p in expanded]


def order_steps(doc: Document, parsed: Sequence[ParsedStep]) -> list[ParsedStep]:
    """Steps in topological order, ties broken by declaration order."""
    index = {p.step.id: i for i, p in enumerate(parsed)}
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
    for p in parsed:
        for where, output in zip(p.output_paths, p.step.outputs, strict=True):
            for shipped in files:
                if _collide(output, shipped.path):
                    message = f"output {output!r} collides with the shipped file {shipped.path!r}"
                    raise doc.error(where, message)
    steps = {p.step.id: p.step for p in parsed}
    for p in parsed:
        if p.step.uses != SELECT:  # mle/select passes on the outputs of the one it picks
            _check_inputs(doc, p, steps)


def _check_inputs(doc: Document, p: ParsedStep, steps: Mapping[str, Step]) -> None:
    """No two needed steps may place the same path in this step's work dir."""
    needs = p.step.needs
    for j, later in enumerate(needs):
        for earlier in needs[:j]:
            problem = _clash(produced(steps, steps[earlier]), produced(steps, steps[later]))
            if problem:
                message = _clash_message(steps[earlier], steps[later], problem, p.step.id)
                raise doc.error(p.need_paths[j], message)


def _resolve_needs(
    doc: Document, p: ParsedStep, ids: Mapping[str, Step], groups: Mapping[str, list[str]]
) -> ParsedStep:
    """The step with each need resolved to step ids: a matrix name stands for all its children."""
    own = p.step.group or p.step.id
    needs: list[str] = []
    paths: list[KeyPath] = []
    for where, name in zip(p.need_paths, p.step.needs, strict=True):
        if name == own or (name in ids and ids[name].group == own):
            raise doc.error(where, f"step {own!r} needs itself")
        if name not in ids and name not in groups:
            choices = [*groups, *(s for s in ids if not ids[s].group), *ids]
            hint = closest(name, [c for c in dict.fromkeys(choices) if c != own])
            raise doc.error(where, f"unknown step {name!r}", suggestion=hint)
        for step_id in groups.get(name, [name]):
            if step_id in needs:
                raise doc.error(where, f"step {step_id!r} is listed twice")
            needs.append(step_id)
            paths.append(where)
    step = dataclasses.replace(p.step, needs=tuple(needs))
    return dataclasses.replace(p, step=step, need_paths=tuple(paths))


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


def _clash_message(earlier: Step, later: Step, paths: tuple[str, str], step_id: str) -> str:
    a, b = paths
    if a == b:
        what = f"steps {earlier.id!r} and {later.id!r} both produce {a!r}"
    else:
        what = f"step {earlier.id!r} produces {a!r} and step {later.id!r} produces {b!r}"
    message = f"{what}; both are placed in the work dir of {step_id!r}"
    if earlier.group and earlier.group == later.group:
        message += f" (to use one of the {earlier.group!r} matrix, pick it with uses: mle/select)"
    return message

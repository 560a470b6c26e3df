"""`mle bench`: measure model variants on a target's agent, recorded in the ledger as a run.

The models (and the evaluation file) are staged in a generated recipe folder under `.mle/bench/`,
because a recipe ships only files inside its own directory. Its one step uses mle/benchmark on the
target and runs through `execute_plan` like any `mle run`, so `mle show RUN` has it; the figures
are then read back from the ledger. The staged copies are removed afterwards: the project's
artifact store keeps what was shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_cli import render
from mle_cli.errors import RecipeError, RunFailed
from mle_cli.states import Status
from mle_proto.errors import FailedPrecondition, InvalidInput, MleError, NotFound, UsageError

if TYPE_CHECKING:
    from mle_cli.recipe.plan import Plan
    from mle_cli.scheduler import RunOutcome
    from mle_cli.settings import Settings

__all__ = ["STEP", "BenchOptions", "BenchResult", "bench_models", "bench_rows", "print_bench"]

STEP = "bench"  # the generated recipe's one step
RECIPE = "bench.yaml"
_METRICS = "bench.json"  # what mle/benchmark writes: not a name for a staged file
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")  # shell, glob and template characters among them
# Row keys, shown upper-cased as the table's headers; the last column marks the pick.
_COLUMNS = ("file", "runtime", "size", "load ms", "p50 ms", "p95 ms", "rows/s", "peak rss mb",
            "accuracy", "")  # fmt: skip
# The tool's exit codes (see mle_agent.tools): 2 bad input, 3 something to install on the agent.
_TOOL_ERRORS: Mapping[int, type[MleError]] = {2: InvalidInput, 3: FailedPrecondition}

Driver = Callable[["Plan"], "RunOutcome"]


@dataclass(frozen=True)
class BenchOptions:
    """What `mle bench` was asked: model files, where to measure them, and how."""

    models: tuple[Path, ...]
    target: str
    eval_file: Path | None = None
    seconds: float | None = None
    pick: str | None = None


@dataclass(frozen=True)
class BenchResult:
    """The run that measured the variants, where it ran, and the tool's figures."""

    run_id: str
    status: Status
    target: str
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The figures, with the run and the target."""
        return {"run": self.run_id, "target": self.target, **self.figures}


def bench_models(settings: Settings, options: BenchOptions, drive: Driver) -> BenchResult:
    """Stage the files, run the generated recipe with `drive` (the CLI's run driver, around
    execute_plan), and read the step's figures from the ledger."""
    _check_options(options)
    with _staged(settings, options) as plan:
        outcome = drive(plan)
    if outcome.status == Status.DETACHED:
        return BenchResult(outcome.run_id, outcome.status, _target(outcome), {})
    _check_outcome(outcome)
    return BenchResult(
        outcome.run_id, outcome.status, _target(outcome), _figures(settings, outcome)
    )


def bench_rows(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One table row per variant, formatted for people (None shows as '-')."""
    rows = []
    for v in figures.get("variants", []):
        rows.append(
            {
                "file": v["file"],
                "runtime": v["runtime"],
                "size": _size(v["size_bytes"]),
                "load ms": _number(v["load_ms"], "{:.1f}"),
                "p50 ms": _ms(v["p50_ms"]),
                "p95 ms": _ms(v["p95_ms"]),
                "rows/s": _number(v["throughput_rps"], "{:,.0f}"),
                "peak rss mb": _number(v["peak_rss_mb"], "{:.1f}"),
                "accuracy": _number(v["accuracy"], "{:.4f}"),
                "": "*" if v["file"] == figures.get("picked") else "",
            }
        )
    return rows


def print_bench(result: BenchResult, json_out: bool) -> None:
    """The table, unmeasured variants' reasons, the pick and the run id; or JSON."""
    if json_out:
        render.print_json(result.to_dict())
        return
    if result.status == Status.DETACHED:
        run = result.run_id
        sys.stderr.write(f"run {run} detached: `mle resume {run}` collects its bench.json\n")
        return
    figures = result.figures
    render.print_table(bench_rows(figures), _COLUMNS)
    lines = [f"{v['file']}: {v['error']}" for v in figures["variants"] if v.get("error")]
    budget = figures.get("budget")
    if budget is not None and figures.get("picked"):
        lines.append(f"picked {figures['picked']}: the most accurate within {budget}")
    elif budget is not None:
        lines.append(f"no variant meets {budget}")
    lines.append(f"measured on {result.target} by run {result.run_id} (mle show {result.run_id})")
    sys.stdout.write("".join(render.printable(line) + "\n" for line in lines))


def _check_options(options: BenchOptions) -> None:
    """What can be told before a recipe is generated: the files, the target, the budget."""
    if not options.target.strip():
        raise UsageError("--target needs a target name (e.g. local)")
    # The budget goes into the generated recipe: template syntax there would be evaluated.
    if options.pick is not None and any(m in options.pick for m in ("{{", "{%", "{#")):
        raise UsageError(f"--pick {options.pick!r} is not a budget such as p95<=20ms")
    if not options.models:
        raise InvalidInput("give one or more model files (.onnx, .tflite)")
    for path in (*options.models, *([options.eval_file] if options.eval_file else [])):
        if not path.exists():
            raise NotFound(f"{path}: no such file")
        if not path.is_file():
            raise InvalidInput(f"{path} is not a file")


@contextmanager
def _staged(settings: Settings, options: BenchOptions) -> Iterator[Plan]:
    """The generated recipe, compiled; its folder keeps only the recipe once the run is over,
    and goes entirely when it does not compile (nothing ran)."""
    from mle_cli.recipe import compile_recipe
    from mle_cli.runs import new_run_id

    folder = settings.mle_dir / "bench" / new_run_id()
    folder.mkdir(parents=True)
    names = _staged_names([*options.models, *([options.eval_file] if options.eval_file else [])])
    try:
        for source, name in names.items():
            _link_or_copy(source, folder / name)
        recipe = folder / RECIPE
        recipe.write_text(_recipe_text(options, names))
        plan = compile_recipe(recipe)
        _check_target(plan, settings, options.target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield plan
    finally:
        for name in names.values():
            (folder / name).unlink(missing_ok=True)


def _staged_names(paths: Sequence[Path]) -> dict[Path, str]:
    """A distinct, portable file name per path: its own name when it can be, else numbered."""
    names: dict[Path, str] = {}
    taken = {RECIPE, _METRICS}
    for path in paths:
        if path in names:
            continue
        name = _UNSAFE.sub("_", path.name).lstrip(".-") or "model"
        candidate, n = name, 1
        while candidate.casefold() in {t.casefold() for t in taken}:
            n += 1
            candidate = f"{n}-{name}"
        names[path] = candidate
        taken.add(candidate)
    return names


def _link_or_copy(source: Path, dest: Path) -> None:
    """A hard link costs nothing; across file systems, a copy."""
    try:
        os.link(source.resolve(), dest)
    except OSError:
        shutil.copyfile(source, dest)


def _recipe_text(options: BenchOptions, names: Mapping[Path, str]) -> str:
    import yaml

    with_: dict[str, Any] = {"models": [names[m] for m in options.models]}
    if options.eval_file is not None:
        with_["eval"] = names[options.eval_file]
    if options.seconds is not None:
        with_["seconds"] = options.seconds
    if options.pick is not None:
        with_["pick"] = options.pick
    recipe = {
        "name": "bench",
        "description": f"mle bench of {len(options.models)} model file(s) on {options.target}",
        "files": sorted(names.values()),
        "steps": {STEP: {"uses": "mle/benchmark", "on": options.target, "with": with_}},
    }
    header = "# Generated by `mle bench`; its run is in the ledger (mle show RUN).\n"
    return header + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def _check_outcome(outcome: RunOutcome) -> None:
    """Raise the tool's own error line (it says what is wrong) when the step did not succeed."""
    if outcome.status == Status.SUCCEEDED:
        return
    step = outcome.steps.get(STEP)
    hint = f"mle show {outcome.run_id}"
    if outcome.status == Status.CANCELLED or step is None:
        raise RunFailed(f"run {outcome.run_id} {outcome.status.value}", hint=hint)
    said = [line.removeprefix("error: ") for line in step.last_lines if line.startswith("error: ")]
    if said and step.exit_code is not None:
        raise _TOOL_ERRORS.get(step.exit_code, RunFailed)(
            f"on {step.target}: {said[-1]}", hint=hint
        )
    how = f"exited with {step.exit_code}" if step.exit_code else step.status.value
    detail = f": {step.message}" if step.message else ""
    raise RunFailed(f"run {outcome.run_id}: benchmark {how} on {step.target}{detail}", hint=hint)


def _check_target(plan: Plan, settings: Settings, target: str) -> None:
    """An unknown target, said of --target rather than of the generated recipe's line."""
    from mle_cli.planning import place
    from mle_cli.targets import known_targets

    try:
        place(plan, settings)
    except RecipeError:
        known = ", ".join(known_targets(settings))
        raise NotFound(f"unknown target {target!r}; known targets: {known}") from None


def _figures(settings: Settings, outcome: RunOutcome) -> dict[str, Any]:
    from mle_cli.ledger import Ledger, queries

    ledger = Ledger(settings.ledger_path)
    try:
        figures = queries.metrics(ledger, outcome.run_id).get(STEP)
    finally:
        ledger.close()
    if not figures or not isinstance(figures.get("variants"), list):
        raise MleError(f"run {outcome.run_id} recorded no benchmark figures")
    return figures


def _target(outcome: RunOutcome) -> str:
    step = outcome.steps.get(STEP)
    return step.target if step is not None else ""


def _number(value: float | None, text: str) -> str | None:
    return None if value is None else text.format(value)


def _ms(value: float | None) -> str | None:
    if value is None:
        return None
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 4
    return f"{value:.{digits}f}"


def _size(size: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"

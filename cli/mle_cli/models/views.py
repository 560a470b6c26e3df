"""What `mle deploy`, `mle models` and `mle predict` print: pure line builders, then printers.

Tables and JSON go through `mle_cli.render` (the one module that knows rich); plain lines are
written to stdout as data.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mle_cli import render
from mle_cli.models.routes import describe_route

if TYPE_CHECKING:
    from mle_cli.models.deploy import DeployOutcome
    from mle_cli.models.listing import Listing
    from mle_cli.models.predict import Prediction

__all__ = [
    "MODEL_COLUMNS",
    "deploy_line",
    "human_size",
    "lineage_lines",
    "model_rows",
    "prediction_lines",
    "print_deployed",
    "print_lineage",
    "print_models",
    "print_prediction",
    "print_run_models",
]

MODEL_COLUMNS = (
    "target", "model", "ver", "state", "runtime", "traffic",
    "requests", "errors", "p50_ms", "p95_ms", "source_run",
)  # fmt: skip
_MAX_ROWS = 20  # rows of a prediction printed for a human; --json has them all


def human_size(size: int) -> str:
    """1.2 MB, 340 kB, 12 B (decimal units, as file managers show them)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def deploy_line(outcome: DeployOutcome) -> str:
    """One line saying what a deploy or route change did."""
    name, where, route = outcome.model, f"on {outcome.target}", describe_route(outcome.route)
    if outcome.action == "rollback":
        return f"{name} {where} rolled back: {route}"
    if outcome.action == "route":
        return f"{name} {where}: {route}"
    head = f"{name} v{outcome.version}"
    if not outcome.created:
        # The agent routes an existing version as asked (e.g. a canary of it): say where it is now.
        return f"{head} already deployed {where} (same file); route: {route}"
    details = (
        f"({outcome.runtime or 'unknown runtime'}, {human_size(outcome.size)}, "
        f"loaded in {outcome.load_seconds:.2f} s)"
    )
    share = outcome.route.percent(outcome.version)
    if share >= 100:
        return f"{head} serving {where} {details}"
    if share > 0:
        return f"{head} serving {share:g}% {where} {details}; route: {route}"
    return f"{head} loaded {where}, not routed {details}; route: {route}"


def print_deployed(outcome: DeployOutcome, json_out: bool) -> None:
    """The deploy line, or the outcome as JSON."""
    if json_out:
        render.print_json(outcome.to_dict())
    else:
        sys.stdout.write(render.printable(deploy_line(outcome)) + "\n")


def model_rows(models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per model version."""
    return [
        {
            "target": model["target"],
            "model": model["name"],
            "ver": version["version"],
            "state": version["state"],
            "runtime": version["runtime"],
            "traffic": version["traffic"],
            "requests": version["stats"]["requests"],
            "errors": version["stats"]["errors"],
            "p50_ms": _ms(version["stats"]["p50_seconds"], version["stats"]["requests"]),
            "p95_ms": _ms(version["stats"]["p95_seconds"], version["stats"]["requests"]),
            "source_run": version["source_run"],
        }
        for model in models
        for version in model["versions"]
    ]


def print_models(listing: Listing, json_out: bool) -> None:
    """The models table (or JSON); targets without a running agent are noted on stderr."""
    for line in listing.skipped:
        sys.stderr.write(f"{render.printable(line)}\n")
    if json_out:
        render.print_json(listing.models)
    elif not listing.models:
        sys.stdout.write("no models deployed\n")
    else:
        rows = model_rows(listing.models)
        render.print_table(rows, _columns(rows))


def prediction_lines(prediction: Prediction) -> list[str]:
    """The answer for a human: who answered, then each output (classes for a classifier)."""
    from mle_cli.models.predict import classes

    extra = ", ".join(f"{k}: {v}" for k, v in sorted(prediction.parameters.items()))
    head = f"{prediction.model} v{prediction.version} answered on {prediction.target}"
    lines = [head + (f" ({extra})" if extra else "")]
    for name, array in prediction.outputs.items():
        datatype = prediction.datatypes.get(name, array.dtype.name)
        lines.append(f"{name}: {datatype} {list(array.shape)}")
        found = classes(array)
        if found is None:
            lines.extend("  " + line for line in _values(array).splitlines())
            continue
        for row, cls in enumerate(found[:_MAX_ROWS]):
            lines.append(f"  row {row}: class {cls} ({float(array[row, cls]):.3f})")
        if len(found) > _MAX_ROWS:
            lines.append(f"  ... {len(found) - _MAX_ROWS} more rows (--json prints every row)")
    return lines


def print_prediction(prediction: Prediction, json_out: bool) -> None:
    """The prediction for a human, or {"model", "version", "outputs"} as JSON."""
    if json_out:
        render.print_json(prediction.to_dict())
    else:
        sys.stdout.write("\n".join(prediction_lines(prediction)) + "\n")


def lineage_lines(lineage: Mapping[str, Any]) -> list[str]:
    """`mle models --lineage`: the version, where it serves, then the run and steps behind it."""
    head = f"{lineage['model']} v{lineage['version']}: {lineage['file'] or 'a model file'}"
    details = [_short(lineage["digest"]), human_size(lineage["size"] or 0), lineage["runtime"]]
    lines = [f"{head} ({', '.join(d for d in details if d)})"]
    for d in lineage["deployments"]:
        lines.append(f"  deployed on {d['target']} {render.ago(d['time'])} by {d['operator']}")
    for p in lineage["placements"]:
        route = f" (route: {p['route']})" if p["route"] else ""
        lines.append(f"  now on {p['target']}: {p['model']} v{p['version']} {p['state']}{route}")
    source = lineage["source"]
    if source is None:
        what = f"{lineage['file'] or 'a file'} ({lineage['digest']})"
        lines.append(f"deployed by hand from {what}: no run in this ledger produced that file")
        return lines
    lines.append(f"made by run {source['run']}, step {source['step']}")
    if lineage["missing"]:
        return [*lines, "  " + lineage["missing"]]
    return lines + _run_lines(lineage["run"], lineage["files"]) + _chain_lines(lineage["steps"])


def print_lineage(lineage: Mapping[str, Any], json_out: bool) -> None:
    """The lineage for a human, or as JSON."""
    if json_out:
        render.print_json(lineage)
    else:
        text = "\n".join(render.printable(line) for line in lineage_lines(lineage))
        sys.stdout.write(text + "\n")


def print_run_models(models: Sequence[Mapping[str, Any]]) -> None:
    """`mle show`'s Models section: the run's deployments and what each version does now."""
    if not models:
        return
    sys.stdout.write("models (deployments of files this run produced):\n")
    rows = [
        {
            "model": m["model"],
            "ver": m["version"],
            "target": m["target"],
            "action": m["action"],
            "step": m["step"],
            "file": m["file"],
            "now": m["now"],
        }
        for m in models
    ]
    render.print_table(rows, ["model", "ver", "target", "action", "step", "file", "now"])


def _run_lines(run: Mapping[str, Any], files: Mapping[str, str]) -> list[str]:
    took = render.duration(run["finished"] - run["started"]) if run["finished"] else "-"
    lines = [
        f"  run {run['id']}: {run['recipe']} ({run['source']}) {run['status']}, "
        f"started {render.ago(run['started'] or run['created'])}, took {took}"
    ]
    if run["params"]:
        lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in run["params"].items()))
    if files:
        lines.append("  shipped files: " + _digests(files))
    return lines


def _chain_lines(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each step from the data to the model: command, inputs, outputs, metrics."""
    lines = ["steps, from the data to the model:"] if steps else []
    for step in steps:
        how = f"(uses {step['uses']})" if step["uses"] else f"on {step['target']}"
        made = f", made {step['made']}" if step["made"] else ""
        cached = f" (cached from {step['cached_from']})" if step["cached_from"] else ""
        lines.append(f"  {step['step']}: {step['status']} {how}{cached}{made}")
        if step["command"]:
            lines.append(f"    $ {step['command']}")
        if step.get("candidates"):
            metric = step.get("selected_by") or "metric"
            shown = ", ".join(f"{c} ({metric}={v})" for c, v in step["candidates"].items())
            lines.append(f"    picked {step['metrics'].get('selected')} among {shown}")
        if step["inputs"]:
            lines.append("    inputs: " + _digests(step["inputs"]))
        if step["outputs"]:
            outputs = {o["path"]: o["digest"] for o in step["outputs"]}
            lines.append("    outputs: " + _digests(outputs))
        shown_metrics = {k: v for k, v in step["metrics"].items() if k != "selected"}
        if shown_metrics:
            lines.append("    metrics: " + ", ".join(f"{k}={v}" for k, v in shown_metrics.items()))
    return lines


def _digests(paths: Mapping[str, str]) -> str:
    return ", ".join(f"{path} {_short(digest)}" for path, digest in sorted(paths.items()))


def _short(digest: str | None) -> str:
    """`sha256:0b7c6c7d5160` (12 hex digits: enough to tell files apart on screen)."""
    if not digest:
        return ""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}" if hexdigest else digest[:12]


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """MODEL_COLUMNS without a target column for one target, nor a source column left empty."""
    columns = list(MODEL_COLUMNS)
    if len({row["target"] for row in rows}) == 1:
        columns.remove("target")
    if all(row["source_run"] is None for row in rows):
        columns.remove("source_run")
    return columns


def _ms(seconds: float, requests: int) -> str | None:
    return f"{seconds * 1000:.2f}" if requests else None


def _values(array: Any) -> str:
    import numpy as np

    return str(np.array2string(array, precision=4, threshold=60, suppress_small=True))

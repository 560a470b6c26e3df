"""Measure model variants on this machine and pick the most accurate one that meets a budget.

    python -m mle_agent.tools.benchmark MODEL... [--eval F.npz] [--seconds S] [--pick EXPR]
                                        [--json] [--metrics FILE]

Each variant is measured in a fresh child process (`--one MODEL`, one JSON line on stdout) so one
variant's memory and caches never leak into the next one's figures: load time (load + one warm-up
inference), latency of single-row calls over S seconds (p50/p95/p99), rows/s of those calls from
one thread, the child's peak RSS, and the accuracy on an evaluation file. Runtimes run with one
thread, so figures compare across runtimes and devices. A variant whose runtime is missing here
gets a row saying what to install; a file that is not a model ends the run (exit 2).

`--pick` takes comma-separated upper limits such as `p95<=20ms,rss<=150MB`: p50, p95, p99 and load
in ms or s, rss in MB or MiB, size in kB or MB. The most accurate variant within all of them is
picked; equal accuracy goes to the lower p95.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.tools._budget import Constraint, parse_budget
from mle_agent.tools._cli import (
    ToolParser,
    exit_code,
    not_a_file,
    run_tool,
    size_text,
    write_json,
)
from mle_proto.errors import FailedPrecondition, InvalidInput, MleError, UsageError

if TYPE_CHECKING:
    from mle_agent.serving.backend import Backend
    from mle_agent.tools._data import Array

__all__ = ["DEFAULT_SECONDS", "Constraint", "Variant", "main", "parse_budget", "pick", "report"]

DEFAULT_SECONDS = 2.0
_MODULE = "mle_agent.tools.benchmark"
_MAX_SECONDS = 3600.0
_WARMUP_SECONDS = 0.25  # at most; a quarter of the measuring time when that is shorter
_MIN_CALLS = 5  # timed calls, even for a model slower than the measuring time
_CHILD_GRACE = 900.0  # beyond --seconds, for loading and evaluation, before a child is given up


@dataclass(frozen=True)
class Variant:
    """One model file's figures; `error` says why it could not be measured."""

    file: str
    runtime: str
    size_bytes: int
    load_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    throughput_rps: float | None = None
    peak_rss_mb: float | None = None
    accuracy: float | None = None
    error: str | None = None


def pick(variants: Sequence[Variant], budget: Sequence[Constraint]) -> Variant | None:
    """The most accurate measured variant within every limit (ties: the lower p95), or None."""
    fitting = [v for v in variants if v.error is None and _meets(v, budget)]
    if not fitting:
        return None
    return min(fitting, key=lambda v: (-_or(v.accuracy, -1.0), _or(v.p95_ms, math.inf)))


def report(
    variants: Sequence[Variant], budget: str | None, picked: Variant | None
) -> dict[str, Any]:
    """The JSON document (and metrics file): every variant, the budget, the pick's figures."""
    return {
        "variants": [dataclasses.asdict(v) for v in variants],
        "budget": budget,
        "picked": picked.file if picked else None,
        "picked_p95_ms": picked.p95_ms if picked else None,
        "picked_accuracy": picked.accuracy if picked else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; return the exit status (2: bad input, 3: something to install)."""

    def body() -> int:
        args = _parser().parse_args(argv)
        if args.one is not None:
            return _child(args.one, args.eval_file, _seconds(args.seconds))
        return _bench(args)

    return run_tool(body)


def _meets(variant: Variant, budget: Sequence[Constraint]) -> bool:
    for constraint in budget:
        value = getattr(variant, constraint.field)
        if value is None or value > constraint.limit:
            return False
    return True


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def _parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="python -m mle_agent.tools.benchmark",
        description="Load time, latency, throughput, peak RSS and accuracy of model variants.",
    )
    parser.add_argument("models", nargs="*", type=Path, metavar="MODEL", help=".onnx or .tflite")
    parser.add_argument("--eval", type=Path, dest="eval_file", help="evaluation data (.npz)")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per variant")
    parser.add_argument("--pick", help="budget, e.g. 'p95<=20ms,rss<=100MB'")
    parser.add_argument("--json", action="store_true", dest="json_out", help="JSON on stdout")
    parser.add_argument("--metrics", type=Path, help="also write the JSON document here")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # the child's entry
    return parser


def _seconds(value: float) -> float:
    if not 0 < value <= _MAX_SECONDS:  # also false for nan
        raise UsageError(f"--seconds must be above 0 and at most {_MAX_SECONDS:g}, not {value:g}")
    return value


def _bench(args: argparse.Namespace) -> int:
    seconds = _seconds(args.seconds)
    budget = parse_budget(args.pick) if args.pick is not None else None
    if not args.models:
        raise UsageError("give one or more model files (.onnx, .tflite)")
    runtimes = [_runtime_of(path) for path in args.models]
    if args.eval_file is not None and not args.eval_file.is_file():
        raise not_a_file(args.eval_file, "evaluation")
    variants = [
        _run_variant(path, runtime, args.eval_file, seconds)
        for path, runtime in zip(args.models, runtimes, strict=True)
    ]
    picked = pick(variants, budget) if budget is not None else None
    document = report(variants, args.pick.strip() if args.pick else None, picked)
    if args.metrics is not None:
        write_json(args.metrics, document)
    if args.json_out:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(_table_lines(variants, picked, document["budget"])) + "\n")
    if all(v.error for v in variants):
        first = variants[0].error or ""
        unmet = FailedPrecondition if "not installed" in first else MleError
        raise unmet(f"no variant could be measured: {first}")
    return 0


def _runtime_of(path: Path) -> str:
    from mle_agent.serving.runtimes import detect_runtime

    if not path.is_file():
        raise not_a_file(path, "model")
    return detect_runtime(path)


def _run_variant(path: Path, runtime: str, eval_file: Path | None, seconds: float) -> Variant:
    """Measure one file in a child process; a missing runtime or a crash becomes its error."""
    from mle_agent.serving.runtimes import available_runtimes, not_installed

    size = path.stat().st_size
    if runtime not in available_runtimes():
        return Variant(str(path), runtime, size, error=not_installed(runtime))
    sys.stderr.write(f"measuring {path} ({runtime}) for {seconds:g} s\n")
    sys.stderr.flush()
    command = [sys.executable, "-m", _MODULE]
    # --opt=VALUE: a file name starting with '-' is not taken for an option.
    command += [f"--one={path}", f"--seconds={seconds!r}"]
    command += [f"--eval={eval_file}"] if eval_file is not None else []
    timeout = seconds + _CHILD_GRACE
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return Variant(str(path), runtime, size, error=f"not measured within {timeout:g} s")
    reply = _last_json(proc.stdout)
    if proc.returncode == 0 and reply is not None and "error" not in reply:
        return Variant(str(path), runtime, size, **reply)
    if reply is not None and "error" in reply:
        if proc.returncode == 2:  # the file or the evaluation data is unusable: stop here
            raise InvalidInput(str(reply["error"]))
        return Variant(str(path), runtime, size, error=str(reply["error"]))
    return Variant(str(path), runtime, size, error=_died(proc))


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The child's reply: its last stdout line that is a JSON object (runtimes may print too)."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _died(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    last = f": {lines[-1]}" if lines else ""
    if proc.returncode < 0:
        number = -proc.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else number
        return f"the measuring process died of signal {name}{last}"
    return f"the measuring process exited with {proc.returncode}{last}"


def _table_lines(
    variants: Sequence[Variant], picked: Variant | None, budget: str | None
) -> list[str]:
    """The human table, the errors of unmeasured variants, and what was picked."""
    header = ("FILE", "RUNTIME", "SIZE", "LOAD MS", "P50 MS", "P95 MS", "ROWS/S", "PEAK RSS MB")
    rows = [[*header, "ACCURACY", ""]]
    rows += [_cells(v, v is picked) for v in variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) + 2)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines += [f"{v.file}: {v.error}" for v in variants if v.error]
    if budget is not None:
        lines.append(
            f"picked {picked.file}: the most accurate within {budget}"
            if picked
            else f"no variant meets {budget}"
        )
    return lines


def _cells(v: Variant, picked: bool) -> list[str]:
    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    ms = [_ms_digits(x) for x in (v.p50_ms, v.p95_ms)]
    return [
        *(v.file, v.runtime, size_text(v.size_bytes), number(v.load_ms, 1)),
        *(number(v.p50_ms, ms[0]), number(v.p95_ms, ms[1]), number(v.throughput_rps, 0)),
        *(number(v.peak_rss_mb, 1), number(v.accuracy, 4)),
        "*" if picked else ("error" if v.error else ""),
    ]


def _ms_digits(value: float | None) -> int:
    value = value or 0.0
    return 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 4


def _child(path: Path, eval_file: Path | None, seconds: float) -> int:
    """The child's entry: measure one file, print one JSON line (figures, or the error)."""
    try:
        figures = _measure(path, eval_file, seconds)
    except MleError as exc:
        reply: dict[str, Any] = {"error": " ".join(exc.message.split())}
        code = exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - a runtime failure becomes this variant's error
        first = (str(exc).strip().splitlines() or [""])[0]
        reply, code = {"error": f"{path.name}: {type(exc).__name__} {first}".strip()}, 1
    else:
        reply, code = figures, 0
    sys.stdout.write(json.dumps(reply) + "\n")
    return code


def _measure(path: Path, eval_file: Path | None, seconds: float) -> dict[str, float | None]:
    from mle_agent.serving.runtimes import detect_runtime, load_backend, warm_up

    started = time.perf_counter()
    backend = load_backend(path, detect_runtime(path), threads=1)
    try:
        warm_up(backend)
        load_ms = (time.perf_counter() - started) * 1000
        feed, score = _evaluate(backend, eval_file)
        samples, elapsed = _time_calls(backend, _one_row(backend, feed), seconds)
    finally:
        backend.close()
    ordered = sorted(samples)
    return {
        "load_ms": round(load_ms, 3),
        "p50_ms": round(_percentile(ordered, 50) * 1000, 4),
        "p95_ms": round(_percentile(ordered, 95) * 1000, 4),
        "p99_ms": round(_percentile(ordered, 99) * 1000, 4),
        "throughput_rps": round(len(samples) / elapsed, 1),
        "peak_rss_mb": round(_peak_rss_bytes() / 1e6, 1),
        "accuracy": None if score is None else round(score, 6),
    }


def _evaluate(backend: Backend, eval_file: Path | None) -> tuple[dict[str, Array], float | None]:
    """The evaluation inputs and the accuracy on them (nothing without an evaluation file)."""
    if eval_file is None:
        return {}, None
    from mle_agent.tools._data import accuracy, load_evaluation

    feed, labels = load_evaluation(eval_file, backend.inputs)
    return feed, accuracy(backend, feed, labels)


def _one_row(backend: Backend, feed: Mapping[str, Array]) -> dict[str, Array]:
    """The input of every timed call: the first evaluation row, else zeros."""
    import numpy as np

    from mle_agent.serving.backend import DATATYPES

    if feed and all(len(x) for x in feed.values()):
        return {name: x[:1] for name, x in feed.items()}
    return {
        spec.name: np.zeros([1 if d < 0 else d for d in spec.shape], DATATYPES[spec.datatype])
        for spec in backend.inputs
    }


def _time_calls(
    backend: Backend, row: Mapping[str, Array], seconds: float
) -> tuple[list[float], float]:
    """Latency of each single-row call over `seconds` after a short warm-up, and the total."""
    clock = time.perf_counter
    warm_until, calls = clock() + min(_WARMUP_SECONDS, seconds / 4), 0
    while calls < 3 or clock() < warm_until:
        backend.infer(row)
        calls += 1
    samples: list[float] = []
    start = clock()
    end, done = start + seconds, start
    while len(samples) < _MIN_CALLS or done < end:
        before = clock()
        backend.infer(row)
        done = clock()
        samples.append(done - before)
    return samples, done - start


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB, macOS bytes


if __name__ == "__main__":
    sys.exit(main())

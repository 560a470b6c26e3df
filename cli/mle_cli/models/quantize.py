"""`mle quantize`: the agent's quantize tool run on this machine, in a subprocess.

The subprocess is the boundary between the operator and the agent package (the CLI never imports
`mle_agent`), and it keeps onnxruntime and TensorFlow out of the CLI's process. The tool reports
a user error as one `error: ...` line with exit 2, or 3 when something must be installed first;
they become InvalidInput and FailedPrecondition here, with the tool's own line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mle_cli import render
from mle_cli.models.views import human_size
from mle_proto.errors import FailedPrecondition, InvalidInput, MleError

__all__ = [
    "TOOL",
    "QuantizeRequest",
    "print_quantized",
    "quantize_model",
    "quantized_line",
    "tool_argv",
    "tool_error",
]

TOOL = "mle_agent.tools.quantize"
_ERRORS: Mapping[int, type[MleError]] = {2: InvalidInput, 3: FailedPrecondition}


@dataclass(frozen=True)
class QuantizeRequest:
    """The `mle quantize` options, passed on to the tool as they are."""

    model: Path
    mode: str = "int8-dynamic"
    calibration: Path | None = None
    evaluation: Path | None = None
    to: str = "onnx"
    out: Path | None = None


def quantize_model(request: QuantizeRequest) -> dict[str, Any]:
    """Run the tool; its JSON result, or the MleError its exit stands for."""
    proc = subprocess.run(
        tool_argv(request),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        raise tool_error(proc.returncode, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        raise MleError(f"the quantize tool printed no result: {proc.stdout.strip()[:200]!r}")
    return result


def tool_argv(request: QuantizeRequest) -> list[str]:
    """The tool's command line, with this interpreter (the one `mle` and its packages run in)."""
    argv = [sys.executable, "-m", TOOL, str(request.model), "--mode", request.mode]
    for flag, path in (
        ("--calibration", request.calibration),
        ("--eval", request.evaluation),
        ("--out", request.out),
    ):
        if path is not None:
            argv += [flag, str(path)]
    if request.to != "onnx":
        argv += ["--to", request.to]
    return [*argv, "--json"]


def tool_error(returncode: int, stderr: str) -> MleError:
    """The error a failed tool run stands for, with the tool's `error:` line as its message."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if said and returncode in _ERRORS:
        return _ERRORS[returncode](said[-1])
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
    last = said[-1] if said else (lines[-1] if lines else "no message")
    return MleError(f"the quantize tool {how}: {last}")


def quantized_line(result: Mapping[str, Any]) -> str:
    """`m.onnx 10.0 kB -> m.int8.onnx 3.7 kB (2.69x smaller); accuracy 97.33% -> 97.33% (...)`."""
    before, after = int(result["size_before"]), int(result["size_after"])
    change = (
        f"{before / after:.2f}x smaller" if after <= before else f"{after / before:.2f}x larger"
    )
    line = (
        f"{result['model']} {human_size(before)} -> {result['output']} {human_size(after)} "
        f"({change})"
    )
    if result.get("accuracy_before") is not None and result.get("accuracy_after") is not None:
        old, new = float(result["accuracy_before"]), float(result["accuracy_after"])
        line += f"; accuracy {old:.2%} -> {new:.2%} ({(new - old) * 100:+.2f} points)"
    return line


def print_quantized(result: Mapping[str, Any], json_out: bool) -> None:
    """The summary line, or the tool's JSON object."""
    if json_out:
        render.print_json(dict(result))
    else:
        sys.stdout.write(render.printable(quantized_line(result)) + "\n")

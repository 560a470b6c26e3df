"""Quantize an ONNX model to int8: int8 ONNX with onnxruntime, or int8 TFLite with TensorFlow.

    python -m mle_agent.tools.quantize MODEL [--mode int8-dynamic|int8-static]
        [--calibration FILE] [--eval FILE.npz] [--to onnx|tflite] [--out PATH]
        [--json] [--metrics FILE]

int8-dynamic stores the weights in int8 and quantizes activations at run time (no data needed);
int8-static also fixes the activations' ranges from the `--calibration` rows. Static ONNX uses the
QOperator format (QLinearMatMul etc.: uint8 activations, int8 weights), the nodes that produce
the model's outputs stay float (probabilities keep their precision), and Gemm is rewritten as
MatMul + Add for int8-dynamic because its quantizer only rewrites MatMul. Node names and
intermediate shape hints are dropped: they are optional in ONNX and, on a small model, a quarter
of the file. The result is written next to MODEL as `<stem>.int8.onnx` (`.int8.tflite`) unless
`--out` says otherwise, through a temporary file, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.serving.runtimes import detect_runtime, load_backend
from mle_agent.tools._cli import (
    ToolParser,
    first_line,
    not_a_file,
    run_tool,
    size_text,
    write_json,
)
from mle_agent.tools._data import accuracy, load_calibration, load_evaluation
from mle_agent.tools._onnx_graph import compact, output_nodes, prepared
from mle_proto.errors import FailedPrecondition, InvalidInput, UsageError

if TYPE_CHECKING:
    from mle_agent.serving.backend import TensorSpec
    from mle_agent.tools._data import Array

__all__ = [
    "FORMATS",
    "MODES",
    "ONNX_MISSING",
    "Calibration",
    "QuantizeOptions",
    "Quantized",
    "default_output",
    "main",
    "quantize",
    "summary_line",
]

MODES = ("int8-dynamic", "int8-static")
FORMATS = ("onnx", "tflite")
ONNX_MISSING = "quantizing needs onnx and onnxruntime, not installed here: " + (
    "pip install 'mle-toolchain[onnx]'"
)
_CALIBRATION_BATCH = 32  # rows per calibration call when the batch dimension is dynamic


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize, how, and where to write it."""

    model: Path
    mode: str = MODES[0]
    calibration: Path | None = None
    evaluation: Path | None = None
    to: str = FORMATS[0]
    out: Path | None = None


@dataclass(frozen=True)
class Calibration:
    """Calibration rows by input name, and the model's fixed batch size (0: dynamic)."""

    rows: Mapping[str, Array]
    fixed_batch: int

    def batches(self, dynamic: int) -> Iterator[dict[str, Array]]:
        """The rows in slices the model takes: `dynamic` rows at a time when it may."""
        size = self.fixed_batch or dynamic
        count = len(next(iter(self.rows.values())))
        end = count - size + 1 if self.fixed_batch else count  # a fixed batch takes whole ones
        for start in range(0, end, size):
            yield {name: array[start : start + size] for name, array in self.rows.items()}


@dataclass(frozen=True)
class Quantized:
    """What a quantization produced: paths, sizes, and accuracies when evaluated."""

    model: str
    output: str
    mode: str
    to: str
    size_before: int
    size_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def ratio(self) -> float:
        """How many times smaller the output is."""
        return self.size_before / self.size_after if self.size_after else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of --json and --metrics; accuracies only when evaluated."""
        data = asdict(self)
        data["ratio"] = round(self.ratio, 3)
        if self.accuracy_before is None:
            del data["accuracy_before"], data["accuracy_after"]
        return data


def default_output(model: Path, to: str = FORMATS[0]) -> Path:
    """`<stem>.int8.onnx` (or `.int8.tflite`) next to the model."""
    return model.with_name(f"{model.stem}.int8.{to}")


def quantize(options: QuantizeOptions) -> Quantized:
    """Quantize options.model; MleError (nothing written) when it cannot be done."""
    _check_onnx_model(options.model)  # first: the default output is named after the file
    out = _check_options(options)
    _require_onnx()
    calibration, evaluation, before = _inputs(options)
    if options.to == "tflite":
        import mle_agent.tools._tflite as _tflite

        _tflite.check_convertible(options.model)
        _tflite.require_tensorflow()
    with _staged(out) as staged:
        if options.to == "tflite":
            _tflite.convert(options.model, staged, calibration)
            after = _accuracy_of(staged, "litert", evaluation)
        else:
            _quantize_onnx(options.model, staged, calibration)
            after = _accuracy_of(staged, "onnxruntime", evaluation)
    return Quantized(
        model=str(options.model),
        output=str(out),
        mode=options.mode,
        to=options.to,
        size_before=options.model.stat().st_size,
        size_after=out.stat().st_size,
        accuracy_before=before,
        accuracy_after=after,
    )


def summary_line(result: Quantized) -> str:
    """e.g. `m.onnx 10.0 kB -> m.int8.onnx 3.7 kB (2.69x smaller); accuracy 97.33% -> ...`."""
    before, after = result.size_before, result.size_after
    change = f"{result.ratio:.2f}x smaller" if after <= before else f"{after / before:.2f}x larger"
    line = f"{result.model} {size_text(before)} -> {result.output} {size_text(after)} ({change})"
    if result.accuracy_before is not None and result.accuracy_after is not None:
        points = (result.accuracy_after - result.accuracy_before) * 100
        line += (
            f"; accuracy {result.accuracy_before:.2%} -> {result.accuracy_after:.2%}"
            f" ({points:+.2f} points)"
        )
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; return the exit status (2: bad input, 3: something to install)."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        args = _parser().parse_args(argv)
        with _stdout_to_stderr():
            result = quantize(_options(args))
        if args.metrics is not None:
            write_json(args.metrics, result.to_dict())
        if args.json_out:
            sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        else:
            sys.stdout.write(summary_line(result) + "\n")
        return 0

    return run_tool(body)


def _check_options(options: QuantizeOptions) -> Path:
    """The output path, once the options make sense together."""
    if options.mode not in MODES:
        raise UsageError(f"unknown mode {options.mode!r}: one of {', '.join(MODES)}")
    if options.to not in FORMATS:
        raise UsageError(f"unknown format {options.to!r}: one of {', '.join(FORMATS)}")
    if options.mode == "int8-static" and options.calibration is None:
        raise UsageError(
            "int8-static needs calibration data: add --calibration FILE (.npy or .npz of "
            "typical inputs, e.g. a few hundred rows)"
        )
    if options.mode == "int8-dynamic" and options.calibration is not None:
        raise UsageError("calibration data is used by --mode int8-static only")
    for path, what in ((options.calibration, "calibration"), (options.evaluation, "evaluation")):
        if path is not None and not path.is_file():
            raise not_a_file(path, what)
    out = options.out or default_output(options.model, options.to)
    if out.resolve() == options.model.resolve():
        raise UsageError(f"--out {out} is the model itself; it is never overwritten")
    return out


def _check_onnx_model(model: Path) -> None:
    if not model.is_file():
        raise not_a_file(model, "model")
    try:
        runtime = detect_runtime(model)
    except InvalidInput:
        raise InvalidInput(f"{model} is not an ONNX model; quantize takes an fp32 .onnx") from None
    if runtime != "onnxruntime":
        raise InvalidInput(
            f"{model} is not an ONNX model (it is TFLite); quantize the fp32 .onnx it came from"
        )


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401 - only checking that it imports
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise FailedPrecondition(ONNX_MISSING) from None


def _inputs(
    options: QuantizeOptions,
) -> tuple[Calibration | None, tuple[dict[str, Array], Array] | None, float | None]:
    """Calibration rows, evaluation data and the fp32 accuracy, all checked against the model."""
    fp32 = load_backend(options.model, "onnxruntime")
    try:
        calibration = None
        if options.calibration is not None:
            calibration = _calibration(options.calibration, fp32.inputs)
        evaluation = None
        if options.evaluation is not None:
            evaluation = load_evaluation(options.evaluation, fp32.inputs)
        before = accuracy(fp32, *evaluation) if evaluation is not None else None
    finally:
        fp32.close()
    return calibration, evaluation, before


def _calibration(path: Path, inputs: Sequence[TensorSpec]) -> Calibration:
    rows = load_calibration(path, inputs)
    counts = {len(array) for array in rows.values()}
    if len(counts) > 1:
        raise InvalidInput(f"{path}: the inputs have different numbers of rows: {sorted(counts)}")
    fixed = 0 if all(spec.batched for spec in inputs) else max(s.shape[0] for s in inputs)
    count = counts.pop() if counts else 0
    if count < max(fixed, 1):
        raise InvalidInput(f"{path}: {count} calibration rows; at least {max(fixed, 1)} needed")
    return Calibration(rows, fixed)


def _accuracy_of(
    path: Path, runtime: str, evaluation: tuple[dict[str, Array], Array] | None
) -> float | None:
    """Load the quantized model (proving it loads) and measure it when there is data."""
    backend = load_backend(path, runtime)
    try:
        return accuracy(backend, *evaluation) if evaluation is not None else None
    finally:
        backend.close()


def _quantize_onnx(source: Path, target: Path, calibration: Calibration | None) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = prepared(source, gemm_as_matmul=calibration is None)
    try:
        if calibration is None:
            quantize_dynamic(model, target, weight_type=QuantType.QInt8)
        else:
            quantize_static(
                model,
                target,
                _reader(calibration),
                quant_format=QuantFormat.QOperator,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=output_nodes(model),
            )
    except Exception as exc:  # noqa: BLE001 - the quantizer's errors share no base but Exception
        raise InvalidInput(f"onnxruntime could not quantize {source}: {first_line(exc)}") from None
    compact(target)


def _reader(calibration: Calibration) -> Any:
    """An onnxruntime CalibrationDataReader over the calibration rows."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Rows(CalibrationDataReader):  # type: ignore[misc]  # no stubs
        def __init__(self) -> None:
            self._batches = calibration.batches(_CALIBRATION_BATCH)

        def get_next(self) -> dict[str, Array] | None:
            return next(self._batches, None)

    return _Rows()


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A temporary path next to `out`, renamed to it when the block succeeds, else removed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror}") from None
    # Not mkstemp: its 0600 file would keep that mode; the writers create it with the umask's.
    staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        yield staged
        staged.replace(out)
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror}") from None
    finally:
        staged.unlink(missing_ok=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send whatever the runtimes print (from C++ too) to stderr: stdout carries the result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _parser() -> argparse.ArgumentParser:
    parser = ToolParser(
        prog="python -m mle_agent.tools.quantize",
        description="Quantize an ONNX model to int8 ONNX (onnxruntime) or int8 TFLite.",
        epilog="Example: python -m mle_agent.tools.quantize model.onnx --eval data.npz",
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="the fp32 .onnx model")
    parser.add_argument("--mode", choices=MODES, default=MODES[0], help="default: %(default)s")
    parser.add_argument("--calibration", type=Path, help="typical inputs (.npy/.npz); static")
    parser.add_argument("--eval", type=Path, dest="evaluation", help="accuracy data (.npz, X+y)")
    parser.add_argument("--to", choices=FORMATS, default=FORMATS[0], help="default: %(default)s")
    parser.add_argument("--out", type=Path, help="default: <stem>.int8.onnx next to MODEL")
    parser.add_argument("--json", action="store_true", dest="json_out", help="JSON on stdout")
    parser.add_argument("--metrics", type=Path, help="also write the JSON object here")
    return parser


def _options(args: argparse.Namespace) -> QuantizeOptions:
    return QuantizeOptions(
        **{field.name: getattr(args, field.name) for field in fields(QuantizeOptions)}
    )


if __name__ == "__main__":
    sys.exit(main())

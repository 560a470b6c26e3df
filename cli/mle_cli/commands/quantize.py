"""`mle quantize`: an ONNX model to int8 ONNX or int8 TFLite, on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def quantize(
    model: Annotated[
        Path, typer.Argument(help="The fp32 .onnx model to quantize.", show_default=False)
    ],
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="int8-dynamic: int8 weights, no data needed; "
            "int8-static: int8 activations too, their ranges taken from --calibration.",
        ),
    ] = "int8-dynamic",
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="int8-static: typical inputs, a few hundred rows (.npy, or .npz by input name).",
            show_default=False,
        ),
    ] = None,
    evaluation: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="Labelled data (.npz with X and y): accuracy before and after.",
            show_default=False,
        ),
    ] = None,
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="onnx, or tflite (converted with TensorFlow: the tflite extra).",
        ),
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write; default: <stem>.int8.onnx (or .int8.tflite) next to MODEL.",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Quantize an ONNX model to int8 with onnxruntime, or convert it to int8 TFLite.

    Prints the size before and after and, with --eval, the accuracy before and
    after. The model itself is never overwritten.

    Example: mle quantize model.onnx --eval data.npz

    Example: mle quantize model.onnx --mode int8-static --calibration rows.npy --to tflite
    """
    from mle_cli.models.quantize import QuantizeRequest, print_quantized, quantize_model

    request = QuantizeRequest(model, mode, calibration, evaluation, to, out)
    print_quantized(quantize_model(request), json_out)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(quantize)

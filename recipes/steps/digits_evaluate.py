"""Evaluate the fp32 model and its int8 quantization side by side on the test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from digits_mlp import load_xy, onnx_accuracy, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, default=Path("model.onnx"))
    parser.add_argument("--int8", type=Path, default=Path("model.int8.onnx"))
    parser.add_argument("--data", type=Path, default=Path("test.npz"))
    parser.add_argument("--metrics", type=Path, default=Path("evaluation.json"))
    args = parser.parse_args()

    x, y = load_xy(args.data)
    fp32, fp32_classes = onnx_accuracy(args.fp32, x, y)
    int8, int8_classes = onnx_accuracy(args.int8, x, y)
    size_fp32, size_int8 = args.fp32.stat().st_size, args.int8.stat().st_size
    metrics = {
        "accuracy_fp32": round(fp32, 4),
        "accuracy_int8": round(int8, 4),
        "accuracy_drop_points": round((fp32 - int8) * 100, 2),
        "agreement": round(float((fp32_classes == int8_classes).mean()), 4),
        "size_fp32": size_fp32,
        "size_int8": size_int8,
        "size_ratio": round(size_fp32 / size_int8, 2),
        "test_rows": len(y),
    }
    write_metrics(args.metrics, metrics)
    print(
        f"fp32 {fp32:.2%} ({size_fp32} bytes), int8 {int8:.2%} ({size_int8} bytes): "
        f"{metrics['size_ratio']}x smaller, {metrics['agreement']:.2%} of answers agree"
    )


if __name__ == "__main__":
    main()

"""Train the digits MLP with one hidden size, export it to ONNX, report its accuracy.

The accuracy is measured on a validation share of data.npz (never on the test split, which
evaluates the model that is finally picked), through onnxruntime on the exported file itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from digits_mlp import load_xy, mlp_onnx, onnx_accuracy, split, train_mlp, write_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validation-share", type=float, default=0.2)
    parser.add_argument("--data", type=Path, default=Path("data.npz"))
    parser.add_argument("--out", type=Path, default=Path("model.onnx"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics.json"))
    args = parser.parse_args()

    x, y = load_xy(args.data)
    x_fit, x_val, y_fit, y_val = split(x, y, args.validation_share, args.seed)
    weights = train_mlp(x_fit, y_fit, args.hidden, args.max_iter, args.seed)
    onnx.save(mlp_onnx(weights, f"digits_h{args.hidden}"), args.out)
    accuracy, _ = onnx_accuracy(args.out, x_val, y_val)
    write_metrics(
        args.metrics,
        {
            "accuracy": round(accuracy, 4),
            "hidden": args.hidden,
            "size_bytes": args.out.stat().st_size,
            "train_rows": len(y_fit),
            "validation_rows": len(y_val),
        },
    )
    print(f"hidden {args.hidden}: validation accuracy {accuracy:.2%}, {args.out}")


if __name__ == "__main__":
    main()

"""Prepare the digits data: a fixed stratified train/test split and calibration rows.

Writes data.npz (X, y of the training split), test.npz (X, y of the test split) and
calibration.npy (the first rows of the training split, for int8-static quantization).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from digits_mlp import load_digits_scaled, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-rows", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path())
    args = parser.parse_args()

    x, y = load_digits_scaled()
    x_train, x_test, y_train, y_test = split(x, y, args.test_share, args.seed)
    np.savez(args.out / "data.npz", X=x_train, y=y_train)
    np.savez(args.out / "test.npz", X=x_test, y=y_test)
    np.save(args.out / "calibration.npy", x_train[: args.calibration_rows])
    print(
        f"digits: {len(y_train)} training rows, {len(y_test)} test rows, "
        f"{min(args.calibration_rows, len(y_train))} calibration rows"
    )


if __name__ == "__main__":
    main()

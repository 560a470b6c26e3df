"""Evaluation and calibration data files, and the accuracy of a loaded model on them.

Formats (numpy only, nothing pickled):
- evaluation: `.npz` with the labels in `y` and the inputs either in `X` (a single-input model) or
  under each input's name;
- calibration: `.npy` (one array, a single-input model) or `.npz` (`X`, or arrays by input name).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mle_agent.serving.backend import DATATYPES, Backend, TensorSpec
from mle_proto.errors import InvalidInput

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.generic]

__all__ = ["accuracy", "load_calibration", "load_evaluation"]

_BATCH = 64  # rows per inference call when evaluating


def load_evaluation(path: Path, inputs: Sequence[TensorSpec]) -> tuple[dict[str, Array], Array]:
    """Inputs by name and labels from an evaluation `.npz`; InvalidInput when unusable."""
    arrays = _load_npz(path, "evaluation")
    if "y" not in arrays:
        raise InvalidInput(f"{path}: evaluation data needs the labels in 'y'")
    feed = _feed(path, arrays, inputs)
    labels = arrays["y"].reshape(-1)
    for name, x in feed.items():
        if len(x) != len(labels):
            raise InvalidInput(f"{path}: {len(x)} rows of {name!r} but {len(labels)} labels")
    return feed, labels


def load_calibration(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, Array]:
    """Calibration inputs by name from a `.npy` or `.npz`; InvalidInput when unusable."""
    import numpy as np

    if path.suffix == ".npy":
        if len(inputs) != 1:
            raise InvalidInput(f"{path}: the model has {len(inputs)} inputs; give an .npz by name")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise InvalidInput(f"{path}: not a numpy .npy file ({exc})") from None
        return _feed(path, {"X": array}, inputs)
    return _feed(path, _load_npz(path, "calibration"), inputs)


def accuracy(backend: Backend, feed: Mapping[str, Array], labels: Array) -> float:
    """Share of rows whose argmax of the model's first output equals the label."""
    import numpy as np

    output = backend.outputs[0].name
    correct = 0
    for start in range(0, len(labels), _BATCH):
        batch = {name: x[start : start + _BATCH] for name, x in feed.items()}
        scores = np.asarray(backend.infer(batch)[output])
        predicted = scores.reshape(len(scores), -1).argmax(axis=1)
        correct += int((predicted == labels[start : start + _BATCH]).sum())
    return correct / len(labels) if len(labels) else 0.0


def _load_npz(path: Path, what: str) -> dict[str, Array]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # empty, truncated
        raise InvalidInput(f"{path}: cannot read {what} data ({exc})") from None


def _feed(
    path: Path, arrays: Mapping[str, Array], inputs: Sequence[TensorSpec]
) -> dict[str, Array]:
    """Each model input's array, cast to its datatype, with its shape checked."""
    feed: dict[str, Array] = {}
    for spec in inputs:
        array = arrays.get(spec.name)
        if array is None and len(inputs) == 1:
            array = arrays.get("X")
        if array is None:
            raise InvalidInput(f"{path}: no array for the model's input {spec.name!r}")
        _check_shape(path, spec, array.shape)
        datatype = DATATYPES.get(spec.datatype, "float32")
        try:
            feed[spec.name] = array.astype(datatype, copy=False)
        except (TypeError, ValueError) as exc:  # strings, objects
            raise InvalidInput(
                f"{path}: the array for {spec.name!r} ({array.dtype}) cannot be {datatype}: {exc}"
            ) from None
    return feed


def _check_shape(path: Path, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    wanted = spec.shape[1:]
    got = shape[1:]
    if len(got) != len(wanted) or any(w not in (-1, g) for w, g in zip(wanted, got, strict=True)):
        shown = "x".join("N" if d == -1 else str(d) for d in spec.shape)
        raise InvalidInput(
            f"{path}: input {spec.name!r} has rows of shape {list(got)}; the model takes {shown}"
        )

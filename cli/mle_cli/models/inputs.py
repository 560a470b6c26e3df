"""Input files for `mle predict`: read .npy/.npz/.json, then fit them to a model's inputs.

Reading and fitting are separate so a bad file is reported before any agent is contacted, and so
both are testable without one. numpy is imported inside functions: it is an optional extra.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_proto.errors import FailedPrecondition, InvalidInput, NotFound

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.generic]

__all__ = ["DATATYPES", "UNNAMED", "TensorInfo", "fit_inputs", "read_inputs", "require_numpy"]

# Open Inference Protocol datatype name -> numpy dtype name (the agent's table, mirrored: the
# operator package does not import the agent's).
DATATYPES: Mapping[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
UNNAMED = ""  # the key of the one array of a .npy file or a bare JSON list
_SUFFIXES = (".npy", ".npz", ".json")


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as its metadata describes it (shape -1 = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def require_numpy() -> Any:
    """The numpy module, or a clear error when it is not installed."""
    try:
        import numpy as np
    except ImportError:
        raise FailedPrecondition(
            "mle predict needs numpy", hint="pip install 'mle-toolchain[onnx]'"
        ) from None
    return np


def read_inputs(path: Path) -> dict[str, Array]:
    """The arrays in an input file, by input name (UNNAMED for a single unnamed array)."""
    if path.suffix.lower() not in _SUFFIXES:
        raise InvalidInput(f"{path}: unsupported input file; use .npy, .npz or .json")
    if not path.is_file():
        raise NotFound(f"no input file {path}")
    reader = {".npy": _read_npy, ".npz": _read_npz, ".json": _read_json}[path.suffix.lower()]
    arrays = reader(path)
    if not arrays:
        raise InvalidInput(f"{path}: holds no arrays")
    for name, array in arrays.items():
        _check_numeric(path, name, array)
    return arrays


def fit_inputs(arrays: Mapping[str, Array], specs: Sequence[TensorInfo]) -> dict[str, Array]:
    """Name, cast and batch the arrays for a model's inputs; InvalidInput when they cannot fit."""
    named = _named(arrays, specs)
    by_name = {spec.name: spec for spec in specs}
    return {name: _fit(array, by_name[name]) for name, array in named.items()}


def _read_npy(path: Path) -> dict[str, Array]:
    np = require_numpy()
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidInput(f"{path}: not a .npy array ({_first_line(e)})") from None
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{path}: not a .npy array")
    return {UNNAMED: array}


def _read_npz(path: Path) -> dict[str, Array]:
    np = require_numpy()
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise InvalidInput(f"{path}: not a .npz archive ({_first_line(e)})") from None


def _read_json(path: Path) -> dict[str, Array]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"{path}: not valid JSON ({_first_line(e)})") from None
    except RecursionError:
        raise InvalidInput(f"{path}: JSON nested too deeply") from None
    if isinstance(data, list):
        return {UNNAMED: _array(path, UNNAMED, data)}
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: expected a list or an object of input name -> list")
    if _is_oip_body(data):
        return _oip_inputs(path, data["inputs"])
    return {str(name): _array(path, str(name), value) for name, value in data.items()}


def _is_oip_body(data: Mapping[str, Any]) -> bool:
    """An Open Inference Protocol REST body: {"inputs": [{"name", "shape", "data"}, ...]}."""
    inputs = data.get("inputs")
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(i, dict) for i in inputs)


def _oip_inputs(path: Path, inputs: list[dict[str, Any]]) -> dict[str, Array]:
    arrays = {}
    for item in inputs:
        name = str(item.get("name", ""))
        array = _array(path, name, item.get("data"))
        shape = item.get("shape")
        if isinstance(shape, list):
            try:
                array = array.reshape(shape)
            except (TypeError, ValueError):
                raise InvalidInput(
                    f"{path}: input {name!r}: {array.size} values do not fill shape {shape}"
                ) from None
        arrays[name] = array
    return arrays


def _array(path: Path, name: str, value: object) -> Array:
    np = require_numpy()
    where = f"{path}: input {name!r}" if name else str(path)
    if not isinstance(value, list | int | float | bool):
        raise InvalidInput(f"{where}: expected numbers in nested lists")
    try:
        return np.asarray(value)  # type: ignore[no-any-return]
    except ValueError:
        raise InvalidInput(f"{where}: rows of different lengths (a ragged list)") from None


def _check_numeric(path: Path, name: str, array: Array) -> None:
    where = f"{path}: input {name!r}" if name else str(path)
    if array.size == 0:
        raise InvalidInput(f"{where}: no values")
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"{where}: expected numbers, found {array.dtype.name} values")


def _named(arrays: Mapping[str, Array], specs: Sequence[TensorInfo]) -> dict[str, Array]:
    names = [spec.name for spec in specs]
    if UNNAMED in arrays:
        if len(specs) != 1:
            raise InvalidInput(
                f"the model has {len(specs)} inputs ({', '.join(names)}): "
                "name each one (a .npz file or a JSON object)"
            )
        return {names[0]: arrays[UNNAMED]}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise InvalidInput(f"unknown input {unknown[0]!r}; the model's inputs: {', '.join(names)}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}; the model's inputs: {', '.join(names)}")
    return dict(arrays)


def _fit(array: Array, spec: TensorInfo) -> Array:
    np = require_numpy()
    dtype_name = DATATYPES.get(spec.datatype)
    if dtype_name is None:
        raise InvalidInput(
            f"input {spec.name!r} is {spec.datatype}: mle predict sends numbers only"
        )
    dtype = np.dtype(dtype_name)
    if dtype.kind in "iub" and array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise InvalidInput(f"input {spec.name!r} is {spec.datatype} but the file holds fractions")
    if spec.shape and array.ndim == len(spec.shape) - 1 and spec.shape[0] in (-1, 1):
        array = array[np.newaxis, ...]  # one example given: make it a batch of one
    return np.ascontiguousarray(array.astype(dtype.newbyteorder("<")))  # type: ignore[no-any-return]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

"""Open Inference Protocol tensors <-> numpy arrays, for the gRPC and the REST front-ends.

gRPC inputs arrive in `contents` (one typed field per datatype) or in `raw_input_contents`
(little-endian bytes, one entry per input, in order; then no input may use `contents`). REST inputs
arrive as JSON `data` (flat or nested lists) or, with the binary tensor data extension, as bytes
after the JSON. Outputs always leave as raw little-endian bytes over gRPC (tritonclient reads
`raw_output_contents` first), and as JSON `data` or binary data over REST, as the request asks.
JSON has no NaN or Infinity: such output values are written as null (the OIP says JSON numbers;
null keeps the body valid JSON and the value's position). BYTES (string) tensors are not
supported: every model the agent serves takes numbers.
numpy is imported when a tensor is decoded, never when this module is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from mle_agent.serving.backend import DATATYPES, NUMPY_TO_OIP
from mle_proto.errors import FailedPrecondition, InvalidInput

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_proto.v1 import inference_pb2 as ipb

    Array: TypeAlias = npt.NDArray[np.generic]

__all__ = [
    "CONTENTS_FIELDS",
    "array_from_bytes",
    "array_from_json",
    "array_to_bytes",
    "datatype_of",
    "decode_grpc_inputs",
    "decode_json_inputs",
    "encode_grpc_outputs",
    "encode_json_outputs",
]

# The InferTensorContents field each datatype travels in; FP16 has none (raw bytes only).
CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_MAX_RANK = 32  # numpy's historical limit on dimensions
_MAX_BYTES = 2**62  # beyond any real tensor, below numpy's own limit
# JSON value kinds (numpy dtype.kind) each datatype accepts: no silent float -> int truncation.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def decode_grpc_inputs(request: ipb.ModelInferRequest) -> dict[str, Array]:
    """The request's inputs as arrays, checked against their datatype and shape."""
    _require_numpy()
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "one per input, in order"
        )
    arrays: dict[str, Array] = {}
    for index, tensor in enumerate(request.inputs):
        _check_new_name(tensor.name, arrays)
        if not raw:
            arrays[tensor.name] = _array_from_contents(tensor)
        elif tensor.contents.ListFields():
            raise InvalidInput(
                f"input {tensor.name}: contents given with raw_input_contents; "
                "when raw_input_contents is used, every input must use it"
            )
        else:
            arrays[tensor.name] = array_from_bytes(
                tensor.name, tensor.datatype, tensor.shape, raw[index]
            )
    if not arrays:
        raise InvalidInput("the request has no inputs")
    return arrays


def encode_grpc_outputs(outputs: Mapping[str, Array], response: ipb.ModelInferResponse) -> None:
    """Append the outputs to a response: tensor metadata plus raw little-endian bytes."""
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=datatype_of(name, array), shape=array.shape)
        response.raw_output_contents.append(array_to_bytes(array))


def decode_json_inputs(inputs: Any, binary: bytes | memoryview = b"") -> dict[str, Array]:
    """REST `inputs` as arrays: JSON `data`, or `binary_data_size` bytes of `binary` in order.

    Each entry's `data` is removed once converted, so its Python list can be freed at once.
    """
    _require_numpy()
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    view = memoryview(binary)
    arrays: dict[str, Array] = {}
    offset = 0
    for entry in inputs:
        name, datatype, shape, size = _json_tensor_header(entry)
        _check_new_name(name, arrays)
        if size is None:
            if "data" not in entry:
                raise InvalidInput(f"input {name}: no 'data' and no binary_data_size parameter")
            arrays[name] = array_from_json(name, datatype, shape, entry.pop("data"))
            continue
        if "data" in entry:
            raise InvalidInput(f"input {name}: both 'data' and binary_data_size given")
        if offset + size > len(view):
            raise InvalidInput(
                f"input {name}: binary_data_size is {size} bytes but only "
                f"{len(view) - offset} bytes of binary data are left"
            )
        arrays[name] = array_from_bytes(name, datatype, shape, view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise InvalidInput(
            f"{len(view) - offset} bytes of binary data follow the inputs' binary_data_size"
        )
    return arrays


def encode_json_outputs(
    outputs: Mapping[str, Array], binary: Callable[[str], bool]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """REST `outputs` entries, and the binary parts (in order) of those `binary(name)` selects."""
    entries: list[dict[str, Any]] = []
    parts: list[bytes] = []
    for name, array in outputs.items():
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(name, array),
            "shape": list(array.shape),
        }
        if binary(name):
            parts.append(array_to_bytes(array))
            entry["parameters"] = {"binary_data_size": len(parts[-1])}
        else:
            entry["data"] = _json_values(array)
        entries.append(entry)
    return entries, parts


def _json_values(array: Array) -> list[Any]:
    """An array's values for JSON, in C order; NaN and infinities become None (null)."""
    import numpy as np

    values: list[Any] = array.reshape(-1).tolist()
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        values = [v if math.isfinite(v) else None for v in values]
    return values


def array_from_bytes(
    name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview
) -> Array:
    """An array from little-endian bytes; InvalidInput unless the length fits the shape exactly."""
    import numpy as np

    dtype, dims, count = _spec(name, datatype, shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name}: {datatype} {list(dims)} is {expected} bytes, got {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(dims)
    if not array.dtype.isnative:  # a big-endian host: runtimes want native order
        array = array.astype(dtype)
    if datatype == "BOOL" and count and int(array.view(np.uint8).max()) > 1:
        raise InvalidInput(f"input {name}: BOOL bytes must be 0 or 1")
    return array


def array_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> Array:
    """An array from JSON `data` (flat or nested lists); values must fit the datatype."""
    import numpy as np

    dtype, dims, count = _spec(name, datatype, shape)
    try:
        values = np.array(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidInput(f"input {name}: 'data' is not a list of numbers") from None
    if values.size != count:
        raise InvalidInput(
            f"input {name}: shape {list(dims)} needs {count} values, got {values.size}"
        )
    if count and values.dtype.kind not in _JSON_KINDS.get(dtype.kind, ""):
        raise InvalidInput(f"input {name}: 'data' does not hold {datatype} values")
    with np.errstate(all="ignore"):  # float64 -> float32 may overflow to inf: that is the value
        array = values.astype(dtype).reshape(dims)
    if dtype.kind in "iu" and not np.array_equal(array.reshape(values.shape), values):
        raise InvalidInput(f"input {name}: a value is out of range for {datatype}")
    return array


def array_to_bytes(array: Array) -> bytes:
    """An array's elements as little-endian bytes, in C order."""
    import numpy as np

    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def datatype_of(name: str, array: Array) -> str:
    """The OIP datatype name of an output array."""
    datatype = NUMPY_TO_OIP.get(array.dtype.name)
    if datatype is None:
        raise FailedPrecondition(
            f"output {name} has numpy dtype {array.dtype.name}, which the protocol cannot carry"
        )
    return datatype


def _array_from_contents(tensor: ipb.ModelInferRequest.InferInputTensor) -> Array:
    import numpy as np

    name, datatype = tensor.name, tensor.datatype
    dtype, dims, count = _spec(name, datatype, tensor.shape)
    used = [field.name for field, _ in tensor.contents.ListFields()]
    expected = CONTENTS_FIELDS.get(datatype)
    if expected is None:
        raise InvalidInput(f"input {name}: {datatype} data must be sent in raw_input_contents")
    if used and used != [expected]:
        raise InvalidInput(
            f"input {name}: {datatype} values go in contents.{expected}, not {used[0]}"
        )
    values = getattr(tensor.contents, expected)
    if len(values) != count:
        raise InvalidInput(
            f"input {name}: shape {list(dims)} needs {count} values, got {len(values)}"
        )
    wide = np.array(values, dtype=_WIDE[expected])
    array = wide.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(array, wide):
        raise InvalidInput(f"input {name}: a value is out of range for {datatype}")
    return array.reshape(dims)


# The numpy dtype each contents field's values decode to before narrowing to the datatype.
_WIDE = {
    "bool_contents": "bool",
    "int_contents": "int32",
    "int64_contents": "int64",
    "uint_contents": "uint32",
    "uint64_contents": "uint64",
    "fp32_contents": "float32",
    "fp64_contents": "float64",
}


def _spec(
    name: str, datatype: str, shape: Sequence[int]
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """Check a tensor's datatype and shape; its numpy dtype, dims and element count."""
    import numpy as np

    if datatype == "BYTES":
        raise InvalidInput(f"input {name}: BYTES tensors are not supported")
    numpy_name = DATATYPES.get(datatype)
    if numpy_name is None:
        known = ", ".join(DATATYPES)
        raise InvalidInput(f"input {name}: unknown datatype {datatype!r} (known: {known})")
    dtype = np.dtype(numpy_name)
    dims = tuple(int(d) for d in shape)
    # Even an empty tensor ([0, 2**62]) must be a shape numpy can hold, or reshape fails later.
    extent = math.prod(d for d in dims if d) * dtype.itemsize
    if any(d < 0 for d in dims) or len(dims) > _MAX_RANK or extent >= _MAX_BYTES:
        raise InvalidInput(f"input {name}: shape {list(dims)} is not a valid tensor shape")
    return dtype, dims, math.prod(dims)


def _json_tensor_header(entry: Any) -> tuple[str, str, list[int], int | None]:
    """Name, datatype, shape and binary_data_size (None: JSON data) of a REST input."""
    if not isinstance(entry, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("an input has no name")
    datatype, shape = entry.get("datatype"), entry.get("shape")
    if not isinstance(datatype, str):
        raise InvalidInput(f"input {name}: 'datatype' must be a string such as \"FP32\"")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise InvalidInput(f"input {name}: 'shape' must be a list of integers")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"input {name}: 'parameters' must be an object")
    size = parameters.get("binary_data_size")
    if size is not None and (not _is_int(size) or size < 0):
        raise InvalidInput(f"input {name}: binary_data_size must be a non-negative integer")
    return name, datatype, shape, size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_new_name(name: str, seen: Mapping[str, object]) -> None:
    if not name:
        raise InvalidInput("an input has no name")
    if name in seen:
        raise InvalidInput(f"input {name} is given twice")


def _require_numpy() -> None:
    """FailedPrecondition naming the extra to install when numpy is missing."""
    try:
        import numpy  # noqa: F401 - numpy is imported lazily: the agent runs tasks without it
    except ImportError:
        raise FailedPrecondition(
            "numpy is not installed on the agent: pip install 'mle-toolchain[onnx]'"
        ) from None

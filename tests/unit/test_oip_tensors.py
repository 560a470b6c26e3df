"""The Open Inference Protocol tensor codec: gRPC contents and raw bytes, REST JSON, binary data."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mle_agent.serving.backend import DATATYPES
from mle_agent.serving.oip_grpc import parse_version, requested_outputs
from mle_agent.serving.tensors import (
    CONTENTS_FIELDS,
    array_to_bytes,
    decode_grpc_inputs,
    decode_json_inputs,
    encode_grpc_outputs,
    encode_json_outputs,
)
from mle_proto.errors import InvalidInput
from mle_proto.v1 import inference_pb2 as ipb

pytestmark = pytest.mark.timeout(60)
Tensor = ipb.ModelInferRequest.InferInputTensor


def _sample(datatype: str) -> np.ndarray[Any, Any]:
    """A 2x3 array of a datatype holding its extreme values."""
    dtype = np.dtype(DATATYPES[datatype])
    if dtype.kind == "b":
        flat = [True, False, True, True, False, False]
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = [info.min, info.max, 0, 1, info.max - 1, info.min + 1]
    else:
        info_f = np.finfo(dtype)
        flat = [info_f.min, info_f.max, 0.0, -1.5, info_f.tiny, np.inf]
    return np.array(flat, dtype=dtype).reshape(2, 3)


def _raw_request(arrays: dict[str, np.ndarray[Any, Any]]) -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        datatype = {v: k for k, v in DATATYPES.items()}[array.dtype.name]
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return request


def _contents_request(datatype: str, array: np.ndarray[Any, Any]) -> ipb.ModelInferRequest:
    request = ipb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, CONTENTS_FIELDS[datatype]).extend(array.reshape(-1).tolist())
    return request


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    array = _sample(datatype)
    decoded = decode_grpc_inputs(_raw_request({"x": array}))["x"]
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELDS))
def test_typed_contents_round_trip_every_datatype(datatype: str) -> None:
    array = _sample(datatype)
    decoded = decode_grpc_inputs(_contents_request(datatype, array))["x"]
    assert decoded.dtype == array.dtype
    assert decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_outputs_read_back_as_a_client_does(datatype: str) -> None:
    array = _sample(datatype)
    response = ipb.ModelInferResponse()
    encode_grpc_outputs({"y": array, "z": array[:1]}, response)
    assert [o.name for o in response.outputs] == ["y", "z"]
    assert response.outputs[0].datatype == datatype
    assert list(response.outputs[1].shape) == [1, 3]
    # What tritonclient's InferResult.as_numpy does: raw bytes by output index.
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    back = np.frombuffer(response.raw_output_contents[0], dtype=dtype).reshape(2, 3)
    np.testing.assert_array_equal(back, array)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(n) for n in DATATYPES.values()]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    )
)
def test_any_array_survives_raw_bytes(array: np.ndarray[Any, Any]) -> None:
    decoded = decode_grpc_inputs(_raw_request({"x": array}))["x"]
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()  # bit-exact, NaN payloads included


def test_inputs_keep_their_names_and_order() -> None:
    arrays = {"b": np.ones((1, 2), np.float32), "a": np.arange(3, dtype=np.int64)}
    decoded = decode_grpc_inputs(_raw_request(arrays))
    assert list(decoded) == ["b", "a"]
    np.testing.assert_array_equal(decoded["a"], [0, 1, 2])


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("FP32", [2, 2], b"\0" * 12, "input x: FP32 [2, 2] is 16 bytes, got 12"),
        ("FP32", [2, 2], b"\0" * 17, "input x: FP32 [2, 2] is 16 bytes, got 17"),
        ("INT64", [0, 4], b"\0", "input x: INT64 [0, 4] is 0 bytes, got 1"),
        ("BOOL", [2], b"\x01\x02", "input x: BOOL bytes must be 0 or 1"),
        ("BYTES", [1], b"abcd", "input x: BYTES tensors are not supported"),
        ("FP8", [1], b"\0", "input x: unknown datatype 'FP8'"),
        ("FP32", [-1, 64], b"", "input x: shape [-1, 64] is not a valid tensor shape"),
        ("FP32", [0, 2**62], b"", "input x: shape [0, 4611686018427387904] is not a valid"),
    ],
)
def test_bad_raw_inputs_are_refused(
    datatype: str, shape: list[int], data: bytes, message: str
) -> None:
    request = ipb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    with pytest.raises(InvalidInput) as info:
        decode_grpc_inputs(request)
    assert info.value.message.startswith(message)


def test_raw_and_contents_cannot_mix() -> None:
    request = _raw_request({"a": np.zeros(2, np.float32)})
    tensor = request.inputs.add(name="b", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match="input b: contents given with raw_input_contents"):
        decode_grpc_inputs(request)


def test_raw_entries_must_match_the_inputs() -> None:
    request = _raw_request({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    del request.raw_input_contents[1]
    with pytest.raises(InvalidInput) as info:
        decode_grpc_inputs(request)
    assert info.value.message == (
        "raw_input_contents has 1 entries for 2 inputs: one per input, in order"
    )


@pytest.mark.parametrize(
    ("datatype", "field", "values", "message"),
    [
        ("FP32", "fp32_contents", [1.0, 2.0], "input x: shape [3] needs 3 values, got 2"),
        ("FP32", "fp64_contents", [1.0, 2.0, 3.0], "input x: FP32 values go in contents.fp32_"),
        ("INT8", "int_contents", [1, 200, 3], "input x: a value is out of range for INT8"),
        ("UINT16", "uint_contents", [1, 70000, 3], "input x: a value is out of range for UINT16"),
        ("FP16", "fp32_contents", [1.0] * 3, "input x: FP16 data must be sent in raw_input_"),
    ],
)
def test_bad_contents_are_refused(
    datatype: str, field: str, values: list[Any], message: str
) -> None:
    request = ipb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[3])
    getattr(tensor.contents, field).extend(values)
    with pytest.raises(InvalidInput) as info:
        decode_grpc_inputs(request)
    assert info.value.message.startswith(message)


def test_a_request_needs_named_distinct_inputs() -> None:
    with pytest.raises(InvalidInput, match="the request has no inputs"):
        decode_grpc_inputs(ipb.ModelInferRequest(model_name="m"))
    twice = _raw_request({"a": np.zeros(1, np.float32)})
    twice.inputs.add(name="a", datatype="FP32", shape=[1])
    twice.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match="input a is given twice"):
        decode_grpc_inputs(twice)


def test_json_data_flat_or_nested() -> None:
    flat = {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2.5, 3, 4]}
    nested = {"name": "y", "shape": [2, 2], "datatype": "INT16", "data": [[1, -2], [3, 4]]}
    flags = {"name": "z", "shape": [3], "datatype": "BOOL", "data": [True, False, True]}
    decoded = decode_json_inputs(json.loads(json.dumps([flat, nested, flags])))
    np.testing.assert_array_equal(decoded["x"], np.array([[1, 2.5], [3, 4]], np.float32))
    assert decoded["x"].dtype == np.float32
    assert decoded["y"].dtype == np.int16
    np.testing.assert_array_equal(decoded["z"], [True, False, True])


def _t(shape: Any, datatype: Any, data: Any = None, name: str | None = "x") -> dict[str, Any]:
    tensor = {"name": name, "shape": shape, "datatype": datatype, "data": data}
    return {k: v for k, v in tensor.items() if v is not None}


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (_t([1], "FP32", [1], name=None), "an input has no name"),
        (_t([1], 5, [1]), "input x: 'datatype' must be a string"),
        (_t("1", "FP32", [1]), "input x: 'shape' must be a list of integers"),
        (_t([True], "FP32", [1]), "input x: 'shape' must be a list of integers"),
        (_t([3], "FP32", [1, 2]), "input x: shape [3] needs 3 values, got 2"),
        (_t([2], "INT32", [1, 2.5]), "input x: 'data' does not hold INT32 values"),
        (_t([2], "INT8", [1, 300]), "input x: a value is out of range for INT8"),
        (_t([2], "BOOL", [1, 0]), "input x: 'data' does not hold BOOL values"),
        (_t([2], "FP32", ["a", "b"]), "input x: 'data' does not hold FP32 values"),
        (_t([2, 2], "FP32", [[1], [2, 3]]), "input x: 'data' is not a list of numbers"),
        (_t([1], "FP32"), "input x: no 'data' and no binary_data_size parameter"),
        (_t([1], "BYTES", ["a"]), "input x: BYTES tensors are not supported"),
        ("x", "each input must be an object"),
    ],
)
def test_bad_json_inputs_are_refused(tensor: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_json_inputs([tensor])
    assert info.value.message.startswith(message)


def test_json_inputs_must_be_a_list() -> None:
    for inputs in (None, [], {"name": "x"}):
        with pytest.raises(InvalidInput, match="'inputs' must be a non-empty list"):
            decode_json_inputs(inputs)


def _binary_tensor(name: str, array: np.ndarray[Any, Any]) -> dict[str, Any]:
    datatype = {v: k for k, v in DATATYPES.items()}[array.dtype.name]
    size = array.nbytes
    return {"name": name, "shape": list(array.shape), "datatype": datatype,
            "parameters": {"binary_data_size": size}}  # fmt: skip


def test_binary_tensor_data_is_taken_in_order() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7, -8], dtype=np.int64)
    inline = {"name": "c", "shape": [1], "datatype": "FP64", "data": [0.5]}
    tensors = [_binary_tensor("a", a), inline, _binary_tensor("b", b)]
    decoded = decode_json_inputs(tensors, array_to_bytes(a) + array_to_bytes(b))
    np.testing.assert_array_equal(decoded["a"], a)
    np.testing.assert_array_equal(decoded["b"], b)
    assert decoded["c"].tolist() == [0.5]


def test_binary_tensor_data_must_add_up() -> None:
    a = np.zeros(4, np.float32)
    with pytest.raises(InvalidInput) as info:
        decode_json_inputs([_binary_tensor("a", a)], b"\0" * 15)
    assert info.value.message == (
        "input a: binary_data_size is 16 bytes but only 15 bytes of binary data are left"
    )
    with pytest.raises(InvalidInput) as info:
        decode_json_inputs([_binary_tensor("a", a)], b"\0" * 20)
    assert info.value.message == "4 bytes of binary data follow the inputs' binary_data_size"
    both = {**_binary_tensor("a", a), "data": [0, 0, 0, 0]}
    with pytest.raises(InvalidInput, match="both 'data' and binary_data_size given"):
        decode_json_inputs([both], b"\0" * 16)
    wrong = _binary_tensor("a", a)
    wrong["parameters"]["binary_data_size"] = 12
    with pytest.raises(InvalidInput, match=r"input a: FP32 \[4\] is 16 bytes, got 12"):
        decode_json_inputs([wrong], b"\0" * 12)


def test_json_outputs_binary_or_inline() -> None:
    y = np.array([[0.25, 0.75]], np.float32)
    z = np.array([3], np.int64)
    entries, parts = encode_json_outputs({"y": y, "z": z}, lambda name: name == "y")
    assert entries == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
        {"name": "z", "datatype": "INT64", "shape": [1], "data": [3]},
    ]
    assert parts == [y.tobytes()]


def test_json_outputs_write_nan_and_infinities_as_null() -> None:
    y = np.array([[np.nan, -np.inf, 0.5, np.inf]], np.float32)
    entries, _ = encode_json_outputs({"y": y}, lambda name: False)
    assert entries[0]["data"] == [None, None, 0.5, None]
    json.dumps(entries, allow_nan=False)  # valid JSON: no NaN or Infinity token


def test_json_inputs_give_up_their_data_lists_once_converted() -> None:
    tensor = {"name": "a", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    arrays = decode_json_inputs([tensor])
    assert arrays["a"].tolist() == [1.0, 2.0]
    assert "data" not in tensor  # the Python list can be freed before inference runs


def test_versions_and_requested_outputs() -> None:
    assert parse_version("") is None
    assert parse_version("12") == 12
    assert parse_version("4294967295") == 2**32 - 1
    for bad in ("0", "-1", "v1", "1.5", "٣", "9" * 11, "9" * 5000):
        with pytest.raises(InvalidInput, match="model version must be a positive integer"):
            parse_version(bad)
    assert requested_outputs([("b", {}), ("a", {"binary_data": True})]) == ("b", "a")
    with pytest.raises(InvalidInput, match="output a is requested twice"):
        requested_outputs([("a", {}), ("a", {})])
    with pytest.raises(InvalidInput, match="classification extension is not supported"):
        requested_outputs([("a", {"classification": 3})])


def _refusal(decode: Callable[[], object]) -> str | None:
    """None when decoding succeeds, else the InvalidInput message; any other error fails."""
    try:
        decode()
    except InvalidInput as exc:
        return exc.message
    return None


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=24,
)
JSON_TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "datatype": st.sampled_from([*DATATYPES, "BYTES", "fp32"]),
        "shape": st.lists(st.integers(-2, 2**64) | st.just(2), max_size=4) | JSON_VALUES,
    },
    optional={
        "data": JSON_VALUES,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 70)})
        | JSON_VALUES,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(JSON_TENSORS | JSON_VALUES, max_size=3) | JSON_VALUES, st.binary(max_size=64))
def test_any_json_is_decoded_or_refused_in_one_line(inputs: Any, binary: bytes) -> None:
    message = _refusal(lambda: decode_json_inputs(inputs, binary))
    assert message is None or "\n" not in message


GRPC_TENSORS = st.builds(
    dict,
    name=st.sampled_from(["x", "y", ""]),
    datatype=st.sampled_from([*DATATYPES, "BYTES", ""]),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 3), max_size=4),
    fp32=st.lists(st.floats(width=32), max_size=6),
    ints=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(GRPC_TENSORS, max_size=3), st.lists(st.binary(max_size=48), max_size=3))
def test_any_grpc_request_is_decoded_or_refused(
    tensors: list[dict[str, Any]], raw: list[bytes]
) -> None:
    request = ipb.ModelInferRequest(model_name="m", raw_input_contents=raw)
    for t in tensors:
        tensor = request.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        tensor.contents.fp32_contents.extend(t["fp32"])
        tensor.contents.int_contents.extend(t["ints"])
    message = _refusal(lambda: decode_grpc_inputs(request))
    assert message is None or "\n" not in message

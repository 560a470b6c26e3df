"""Input files for `mle predict`: .npy, .npz and .json read, named, cast and batched; bad files
are one clear error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mle_cli.models.inputs import UNNAMED, TensorInfo, fit_inputs, read_inputs
from mle_proto.errors import InvalidInput, NotFound

DIGITS = [TensorInfo("input", "FP32", (-1, 64))]
TWO = [TensorInfo("image", "FP32", (-1, 4)), TensorInfo("mask", "INT64", (-1, 4))]


def _write_json(tmp_path: Path, data: object, name: str = "x.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_npy_array_is_cast_to_the_declared_datatype(tmp_path: Path) -> None:
    x = np.arange(128, dtype=np.float64).reshape(2, 64)
    np.save(tmp_path / "x.npy", x)
    arrays = read_inputs(tmp_path / "x.npy")
    assert list(arrays) == [UNNAMED]
    fitted = fit_inputs(arrays, DIGITS)
    assert fitted["input"].dtype == np.float32
    assert fitted["input"].flags.c_contiguous
    np.testing.assert_array_equal(fitted["input"], x.astype(np.float32))


def test_a_bare_json_list_feeds_a_single_input_model(tmp_path: Path) -> None:
    rows = [[float(i) for i in range(64)], [1.0] * 64]
    fitted = fit_inputs(read_inputs(_write_json(tmp_path, rows)), DIGITS)
    assert fitted["input"].shape == (2, 64)
    assert fitted["input"].dtype == np.float32


def test_a_json_object_names_its_inputs(tmp_path: Path) -> None:
    data = {"image": [[0.5, 1, 2, 3]], "mask": [[1, 0, 1, 0]]}
    fitted = fit_inputs(read_inputs(_write_json(tmp_path, data)), TWO)
    assert fitted["image"].dtype == np.float32
    assert fitted["mask"].dtype == np.int64
    assert fitted["mask"].tolist() == [[1, 0, 1, 0]]


def test_an_open_inference_protocol_body_is_accepted(tmp_path: Path) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]}
    fitted = fit_inputs(read_inputs(_write_json(tmp_path, body)), DIGITS)
    assert fitted["input"].shape == (1, 64)


def test_a_npz_archive_maps_names_to_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", image=np.ones((3, 4)), mask=np.zeros((3, 4), dtype=np.int32))
    fitted = fit_inputs(read_inputs(tmp_path / "x.npz"), TWO)
    assert fitted["image"].shape == (3, 4)
    assert fitted["mask"].dtype == np.int64


def test_one_example_without_a_batch_axis_becomes_a_batch_of_one(tmp_path: Path) -> None:
    fitted = fit_inputs(read_inputs(_write_json(tmp_path, [0.0] * 64)), DIGITS)
    assert fitted["input"].shape == (1, 64)
    fixed = [TensorInfo("input", "FP32", (1, 64))]  # a TFLite model with a fixed batch of 1
    assert fit_inputs(read_inputs(_write_json(tmp_path, [0.0] * 64)), fixed)["input"].shape == (
        1,
        64,
    )


def test_the_shape_is_left_for_the_agent_to_judge(tmp_path: Path) -> None:
    fitted = fit_inputs(read_inputs(_write_json(tmp_path, [[1.0, 2.0, 3.0]])), DIGITS)
    assert fitted["input"].shape == (1, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.json", "{not json", r"x\.json: not valid JSON"),
        ("x.json", '"a string"', r"x\.json: expected a list or an object"),
        ("x.json", "[[1, 2], [3]]", r"x\.json: rows of different lengths"),
        ("x.json", '[["a", "b"]]', r"x\.json: expected numbers, found str"),
        ("x.json", '{"input": {"nested": 1}}', r"x\.json: input 'input': expected numbers"),
        ("x.json", "[]", r"x\.json: no values"),
        ("x.json", '{"input": [[]]}', r"x\.json: input 'input': no values"),
        ("x.npy", "this is text, not numpy", r"x\.npy: not a \.npy array"),
        ("x.npz", "this is text, not a zip", r"x\.npz: not a \.npz archive"),
        ("x.csv", "1,2,3", r"x\.csv: unsupported input file; use \.npy, \.npz or \.json"),
    ],
)
def test_a_bad_file_is_one_clear_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InvalidInput, match=message) as caught:
        fit_inputs(read_inputs(path), DIGITS)
    assert "\n" not in str(caught.value)


def test_a_pickled_npy_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInput, match=r"x\.npy: not a \.npy array"):
        read_inputs(tmp_path / "x.npy")


def test_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"no input file .*nope\.npy"):
        read_inputs(tmp_path / "nope.npy")


def test_an_empty_npz_holds_no_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz")
    with pytest.raises(InvalidInput, match=r"x\.npz: holds no arrays"):
        read_inputs(tmp_path / "x.npz")


def test_names_must_match_the_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown input 'pixels'; the model's inputs: input"):
        fit_inputs(read_inputs(_write_json(tmp_path, {"pixels": [[0.0] * 64]})), DIGITS)
    with pytest.raises(InvalidInput, match="missing input 'mask'; the model's inputs: image, mask"):
        fit_inputs(read_inputs(_write_json(tmp_path, {"image": [[0.0] * 4]})), TWO)
    with pytest.raises(InvalidInput, match=r"the model has 2 inputs \(image, mask\): name each"):
        fit_inputs(read_inputs(_write_json(tmp_path, [[0.0] * 4])), TWO)


def test_fractions_for_an_integer_input_are_refused(tmp_path: Path) -> None:
    data = {"image": [[0.0] * 4], "mask": [[0.5, 1, 0, 1]]}
    with pytest.raises(InvalidInput, match="input 'mask' is INT64 but the file holds fractions"):
        fit_inputs(read_inputs(_write_json(tmp_path, data)), TWO)
    whole = {"image": [[0.0] * 4], "mask": [[1.0, 0.0, 1.0, 0.0]]}
    assert fit_inputs(read_inputs(_write_json(tmp_path, whole)), TWO)["mask"].dtype == np.int64


def test_a_string_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="input 'text' is BYTES: mle predict sends numbers"):
        fit_inputs(
            read_inputs(_write_json(tmp_path, [[1.0]])), [TensorInfo("text", "BYTES", (-1, 1))]
        )

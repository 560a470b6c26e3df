"""Model file checks that need no runtime: signature compatibility, digests, magic bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mle_agent.serving.backend import TensorSpec
from mle_agent.serving.runtimes import detect_runtime
from mle_agent.serving.validation import check_digest, check_signature
from mle_proto.errors import InvalidInput

IN = TensorSpec("input", "FP32", (-1, 64))
OUT = TensorSpec("probabilities", "FP32", (-1, 10))
SERVING = ((IN,), (OUT,))
SUFFIX = "; a new version must keep the signature (deploy it under another model name)"


@pytest.mark.parametrize(
    "new",
    [
        pytest.param(SERVING, id="identical"),
        pytest.param(((IN,), (OUT,)), id="equal-copies"),
        pytest.param(
            ((TensorSpec("input", "FP32", (-1, -1)),), (OUT,)), id="input-dim-widened-to-any"
        ),
        pytest.param(
            ((IN,), (TensorSpec("probabilities", "FP32", (1, 10)),)), id="output-dim-narrowed"
        ),
    ],
)
def test_compatible_signatures_pass(
    new: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
) -> None:
    check_signature("digits", new, SERVING, 3)


@pytest.mark.parametrize(
    ("new", "difference"),
    [
        pytest.param(
            ((TensorSpec("x", "FP32", (-1, 64)),), (OUT,)),
            "version 3 has inputs ['input'], the new version has ['x']",
            id="input-renamed",
        ),
        pytest.param(
            ((IN, TensorSpec("mask", "BOOL", (-1, 64))), (OUT,)),
            "version 3 has inputs ['input'], the new version has ['input', 'mask']",
            id="input-added",
        ),
        pytest.param(
            ((IN,), ()),
            "version 3 has outputs ['probabilities'], the new version has []",
            id="output-removed",
        ),
        pytest.param(
            ((TensorSpec("input", "FP16", (-1, 64)),), (OUT,)),
            "input 'input' is FP32 [-1,64] in version 3 but FP16 [-1,64] in the new version",
            id="input-datatype",
        ),
        pytest.param(
            ((TensorSpec("input", "FP32", (-1, 32)),), (OUT,)),
            "input 'input' is FP32 [-1,64] in version 3 but FP32 [-1,32] in the new version",
            id="input-width",
        ),
        pytest.param(
            ((TensorSpec("input", "FP32", (1, 64)),), (OUT,)),
            "input 'input' is FP32 [-1,64] in version 3 but FP32 [1,64] in the new version",
            id="input-batch-narrowed",
        ),
        pytest.param(
            ((TensorSpec("input", "FP32", (-1, 8, 8)),), (OUT,)),
            "input 'input' is FP32 [-1,64] in version 3 but FP32 [-1,8,8] in the new version",
            id="input-rank",
        ),
        pytest.param(
            ((IN,), (TensorSpec("probabilities", "FP32", (-1, -1)),)),
            "output 'probabilities' is FP32 [-1,10] in version 3 "
            "but FP32 [-1,-1] in the new version",
            id="output-widened",
        ),
        pytest.param(
            ((IN,), (TensorSpec("probabilities", "INT64", (-1, 10)),)),
            "output 'probabilities' is FP32 [-1,10] in version 3 "
            "but INT64 [-1,10] in the new version",
            id="output-datatype",
        ),
    ],
)
def test_incompatible_signature_shows_first_difference(
    new: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]], difference: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_signature("digits", new, SERVING, 3)
    assert str(caught.value) == f"model digits: {difference}{SUFFIX}"


def test_signature_order_of_inputs_does_not_matter() -> None:
    a, b = TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))
    check_signature("two", ((b, a), (OUT,)), ((a, b), (OUT,)), 1)


@pytest.fixture
def model_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x08" + bytes(range(256)) * 40)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_digest_that_matches_passes(model_file: tuple[Path, str]) -> None:
    path, digest = model_file
    check_digest(path, digest)
    check_digest(path, f"sha256:{digest.upper()}")


def test_digest_mismatch_is_invalid_input_naming_both(model_file: tuple[Path, str]) -> None:
    path, digest = model_file
    path.write_bytes(path.read_bytes()[:-1])  # one byte lost in transit
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(InvalidInput) as caught:
        check_digest(path, digest)
    assert str(caught.value) == (
        f"model.onnx is corrupt: sha256 {actual[:12]}… is not the expected {digest[:12]}…"
    )


def test_digest_of_a_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"^cannot read model file gone\.onnx: No such file"):
        check_digest(tmp_path / "gone.onnx", "0" * 64)


@pytest.mark.parametrize(
    ("head", "runtime"),
    [
        pytest.param(b"\x1c\x00\x00\x00TFL3" + bytes(24), "litert", id="tflite"),
        pytest.param(b"\x08\x08\x12\x07pytorch", "onnxruntime", id="onnx-ir8"),
        pytest.param(b"\x08\x01" + bytes(10), "onnxruntime", id="onnx-ir1"),
        pytest.param(b"\x08\x14" + bytes(10), "onnxruntime", id="onnx-ir20"),
    ],
)
def test_magic_bytes_tell_the_runtime(head: bytes, runtime: str, tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(head)
    assert detect_runtime(path) == runtime


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x08\x08", id="onnx-header-only"),
        pytest.param(b"\x1c\x00\x00\x00TFL", id="tflite-magic-cut"),
        pytest.param(b"\x08\x00" + bytes(10), id="ir-version-0"),
        pytest.param(b"\x08\x15" + bytes(10), id="ir-version-21"),
        pytest.param(b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", id="runaway-varint"),
        pytest.param(b"\x08\x88\x01" + bytes(10), id="ir-version-136"),
        pytest.param(b"PK\x03\x04" + bytes(40), id="zip"),
        pytest.param(b"\x89HDF\r\n\x1a\n" + bytes(40), id="keras-h5"),
        pytest.param(b"version https://git-lfs.github.com/spec/v1\n", id="lfs-pointer"),
        pytest.param(b"\x00\x00\x00\x00TFL2" + bytes(24), id="other-flatbuffer"),
    ],
)
def test_anything_else_is_not_a_model(head: bytes, tmp_path: Path) -> None:
    path = tmp_path / "upload.onnx"
    path.write_bytes(head)
    with pytest.raises(InvalidInput, match=r"^upload\.onnx is not an ONNX or TFLite model$"):
        detect_runtime(path)


def test_unreadable_path_is_invalid_input(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(InvalidInput, match=r"^cannot read model file models: Is a directory$"):
        detect_runtime(tmp_path / "models")

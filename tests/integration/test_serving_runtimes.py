"""The runtime adapters and the child-process load check, on the committed model fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

np = pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")

from mle_agent.serving.backend import Backend, TensorSpec  # noqa: E402
from mle_agent.serving.runtimes import (  # noqa: E402
    available_runtimes,
    detect_runtime,
    load_backend,
    warm_up,
)
from mle_agent.serving.validation import check_load  # noqa: E402
from mle_proto.errors import DeadlineExceeded, FailedPrecondition, InvalidInput  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "fixtures" / "models"
ONNX_FILES = ["digits_fp32.onnx", "digits_int8.onnx", "digits_h64_fp32.onnx", "slow.onnx"]
TFLITE_FILES = ["digits_fp32.tflite", "digits_int8.tflite"]
DIGITS_IN = TensorSpec("input", "FP32", (-1, 64))
DIGITS_OUT = TensorSpec("probabilities", "FP32", (-1, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits rows and labels the fixtures were scored on."""
    data = np.load(MODELS / "digits_test.npz")
    return data["X"], data["y"]


@contextmanager
def loaded(name: str, threads: int = 0) -> Iterator[Backend]:
    """A fixture model (by file name) loaded in this process with its runtime."""
    path = MODELS / name
    backend = load_backend(path, detect_runtime(path), threads)
    try:
        yield backend
    finally:
        backend.close()


def predict(backend: Backend, x: np.ndarray) -> np.ndarray:
    return np.asarray(backend.infer({"input": x})["probabilities"])


def accuracy(backend: Backend, split: tuple[np.ndarray, np.ndarray]) -> float:
    x, y = split
    return float((predict(backend, x).argmax(axis=1) == y).mean() * 100)


def test_both_runtimes_are_available_here() -> None:
    assert available_runtimes() == ("onnxruntime", "litert")


# slow.onnx is left out: scoring 450 rows on it would take seconds; it has its own test below.
@pytest.mark.parametrize("name", [*ONNX_FILES[:-1], *TFLITE_FILES])
def test_fixture_loads_with_its_runtime_and_classifies_digits(
    name: str, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    path = MODELS / name
    assert path.stat().st_size < 2 * 1024 * 1024
    runtime = detect_runtime(path)
    assert runtime == ("litert" if name.endswith(".tflite") else "onnxruntime")
    with loaded(name, threads=1) as backend:
        warm_up(backend)
        assert backend.runtime == runtime
        # TFLite fixtures take one row ([1,64]); the adapter advertises and serves any batch.
        assert (backend.inputs, backend.outputs) == ((DIGITS_IN,), (DIGITS_OUT,))
        probabilities = predict(backend, digits[0])
        assert probabilities.shape == (len(digits[1]), 10)
        assert probabilities.dtype == np.float32
        # int8 TFLite quantizes the softmax output itself, in steps of 1/256.
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
        assert accuracy(backend, digits) > 95


def test_fp32_onnx_and_fp32_tflite_give_the_same_outputs(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    with loaded("digits_fp32.onnx") as onnx, loaded("digits_fp32.tflite") as tflite:
        np.testing.assert_allclose(predict(onnx, digits[0]), predict(tflite, digits[0]), atol=1e-5)


@pytest.mark.parametrize(
    ("fp32", "int8"),
    [("digits_fp32.onnx", "digits_int8.onnx"), ("digits_fp32.tflite", "digits_int8.tflite")],
)
def test_int8_model_keeps_accuracy_within_one_point(
    fp32: str, int8: str, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    scores = []
    for name in (fp32, int8):
        with loaded(name) as backend:
            scores.append(accuracy(backend, digits))
    assert abs(scores[0] - scores[1]) <= 1.0, scores


def test_int8_onnx_is_at_least_two_and_a_half_times_smaller() -> None:
    fp32 = (MODELS / "digits_fp32.onnx").stat().st_size
    int8 = (MODELS / "digits_int8.onnx").stat().st_size
    assert fp32 / int8 >= 2.5, (fp32, int8)


def test_slow_model_answers_exactly_like_digits_fp32(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x = digits[0][:20]
    assert detect_runtime(MODELS / "slow.onnx") == "onnxruntime"
    with loaded("slow.onnx") as slow, loaded("digits_fp32.onnx") as fast:
        assert (slow.inputs, slow.outputs) == ((DIGITS_IN,), (DIGITS_OUT,))
        np.testing.assert_array_equal(predict(slow, x), predict(fast, x))


@pytest.mark.parametrize("pool", [0, 3])
def test_litert_backend_is_safe_under_eight_concurrent_threads(
    pool: int, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    with loaded("digits_int8.tflite", threads=pool) as backend:
        _hammer(backend, digits[0][:160])


def _hammer(backend: Backend, x: np.ndarray) -> None:
    """8 threads calling infer at once get exactly what sequential calls got."""
    batches = [x[i : i + 1 + i % 3] for i in range(0, len(x), 4)]  # sizes 1..3
    expected = [predict(backend, batch) for batch in batches]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(offset: int) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(3):
                for i in range(offset, len(batches), 8):
                    results[i] = predict(backend, batches[i])
                    np.testing.assert_array_equal(results[i], expected[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[0]
    assert sorted(results) == list(range(len(batches)))


def test_litert_backend_runs_a_batch_row_by_row_on_a_batch_of_one_model(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x = digits[0][:7]
    with loaded("digits_fp32.tflite") as backend:
        rows = np.concatenate([predict(backend, x[i : i + 1]) for i in range(len(x))])
        np.testing.assert_array_equal(predict(backend, x), rows)
        assert predict(backend, x[:0]).shape == (0, 10)


@pytest.mark.parametrize("name", ["digits_int8.onnx", "digits_int8.tflite"])
def test_load_check_reports_signature_from_a_child_process(name: str) -> None:
    path = MODELS / name
    found = check_load(path, detect_runtime(path), timeout=120, threads=1)
    assert found.runtime == detect_runtime(path)
    assert (found.inputs, found.outputs) == ((DIGITS_IN,), (DIGITS_OUT,))
    assert found.seconds > 0


def _write_hostile(kind: str, directory: Path) -> Path:
    """A file that must never be served: each kind a way a real upload goes wrong."""
    onnx = (MODELS / "digits_fp32.onnx").read_bytes()
    tflite = (MODELS / "digits_fp32.tflite").read_bytes()
    contents = {
        "empty.onnx": b"",
        "truncated.onnx": onnx[: len(onnx) // 3],
        "random.onnx": np.random.default_rng(0).bytes(4096),
        "header_then_garbage.tflite": tflite[:8] + np.random.default_rng(1).bytes(4096),
        "truncated.tflite": tflite[: len(tflite) // 2],
        "notes.onnx": b"these are my notes, not a model\n" * 20,
        "archive.onnx": b"PK\x03\x04" + bytes(200),
        "onnx_header_then_garbage.onnx": b"\x08\x08" + np.random.default_rng(2).bytes(4096),
        "tiny.tflite": tflite[:6],
    }
    path = directory / kind
    path.write_bytes(contents[kind])
    return path


HOSTILE = [
    "empty.onnx",
    "truncated.onnx",
    "random.onnx",
    "header_then_garbage.tflite",
    "truncated.tflite",
    "notes.onnx",
    "archive.onnx",
    "onnx_header_then_garbage.onnx",
    "tiny.tflite",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_file_is_one_line_invalid_input(kind: str, tmp_path: Path) -> None:
    path = _write_hostile(kind, tmp_path)
    with pytest.raises(InvalidInput) as caught:
        check_load(path, detect_runtime(path), timeout=120)
    message = str(caught.value)
    assert message.startswith(f"{kind} ")
    assert "\n" not in message
    assert "Traceback" not in message
    assert "crashed" not in message or "(SIG" in message


@pytest.mark.parametrize(
    "kind", ["empty.onnx", "random.onnx", "notes.onnx", "archive.onnx", "tiny.tflite"]
)
def test_files_that_are_no_model_are_told_by_magic_bytes(kind: str, tmp_path: Path) -> None:
    path = _write_hostile(kind, tmp_path)
    with pytest.raises(InvalidInput, match=f"^{kind} is not an ONNX or TFLite model$"):
        detect_runtime(path)


def test_truncated_onnx_names_file_runtime_and_reason(tmp_path: Path) -> None:
    path = _write_hostile("truncated.onnx", tmp_path)
    with pytest.raises(InvalidInput) as caught:
        check_load(path, "onnxruntime", timeout=120)
    assert str(caught.value).startswith("truncated.onnx cannot be loaded by onnxruntime: ")
    assert "Protobuf parsing failed" in str(caught.value)


def test_runtime_crash_while_loading_leaves_the_parent_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = MODELS / "digits_fp32.onnx"
    monkeypatch.setenv("MLE_AGENT_FAULT", "loadcheck-crash")
    with pytest.raises(InvalidInput) as caught:
        check_load(path, "onnxruntime", timeout=120)
    assert str(caught.value) == (
        "digits_fp32.onnx crashed the onnxruntime runtime while loading (SIGABRT)"
    )
    monkeypatch.delenv("MLE_AGENT_FAULT")
    assert check_load(path, "onnxruntime", timeout=120).runtime == "onnxruntime"


def test_a_module_planted_in_the_working_directory_never_runs_in_the_load_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "planted-code-ran"
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "onnxruntime.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.chdir(planted)  # the agent's working directory, wherever it was started
    check = check_load(MODELS / "digits_fp32.onnx", "onnxruntime", timeout=120)
    assert (check.inputs, check.outputs) == ((DIGITS_IN,), (DIGITS_OUT,))
    assert not marker.exists()


def test_a_relative_model_path_loads_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(MODELS.parent)  # an agent started with a relative --data-dir
    check = check_load(Path("models/digits_fp32.onnx"), "onnxruntime", timeout=120, cwd=tmp_path)
    assert check.inputs == (DIGITS_IN,)


def test_load_check_past_its_timeout_is_deadline_exceeded() -> None:
    # No child Python starts and imports a runtime within a millisecond.
    with pytest.raises(DeadlineExceeded, match=r"^slow\.onnx: loading it with onnxruntime took"):
        check_load(MODELS / "slow.onnx", "onnxruntime", timeout=0.001)


def test_unknown_runtime_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="unknown runtime 'tensorrt'"):
        load_backend(MODELS / "digits_fp32.onnx", "tensorrt")


def test_missing_runtime_names_the_extra_to_install() -> None:
    # A real interpreter where onnxruntime cannot be imported (None in sys.modules hides it).
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from pathlib import Path\n"
        "from mle_agent.serving.runtimes import available_runtimes, load_backend\n"
        "from mle_proto.errors import FailedPrecondition\n"
        "print(available_runtimes())\n"
        "try:\n"
        f"    load_backend(Path({str(MODELS / 'digits_fp32.onnx')!r}), 'onnxruntime')\n"
        "except FailedPrecondition as exc:\n"
        "    print(exc)\n"
    )
    out = _python(code)
    assert out.splitlines() == [
        "('litert',)",
        "the onnxruntime runtime is not installed on this agent: pip install 'mle-toolchain[onnx]'",
    ]
    assert FailedPrecondition.status == "FAILED_PRECONDITION"


def test_serving_modules_import_no_runtime_or_numpy() -> None:
    code = (
        "import sys, json\n"
        "import mle_agent.serving.runtimes, mle_agent.serving.validation\n"
        "import mle_agent.serving.onnx, mle_agent.serving.litert, mle_agent.serving.loadcheck\n"
        "import mle_agent.serving.registry, mle_agent.serving.oip_http\n"
        "heavy = ('numpy', 'onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'tensorflow')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    assert json.loads(_python(code)) == []


def _python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLE_AGENT_FAULT"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout

"""Output rendering that scripts rely on."""

from __future__ import annotations

import pytest

from mle_cli import render


def test_a_piped_table_keeps_every_value_whole(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    name = "a-rather-long-model-file-name-that-would-not-fit.int8.onnx"
    rows = [{"file": name, "runtime": "onnxruntime", "size": "10.0 kB", "p50_ms": "0.0045"}]
    rows[0].update({f"extra{i}": "x" * 12 for i in range(5)})
    render.print_table(rows, list(rows[0]))
    out = capsys.readouterr().out
    assert name in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) > 80

"""Fixtures the serving integration tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Any]:
    """A started ModelRegistry in a throwaway data dir (numpy and onnxruntime needed)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from tests.integration._serving import open_registry, registry_settings

    with open_registry(registry_settings(tmp_path)) as opened:
        yield opened

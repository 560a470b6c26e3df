"""Checks a model file passes before it may serve: digest, signature, and a load in a child
process, so a file that crashes its runtime cannot take the agent down.

CONTRACT SKELETON (lead): signatures the registry is written against; bodies to fill in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mle_agent.serving.backend import TensorSpec

__all__ = ["LoadCheck", "check_digest", "check_load", "check_signature"]


@dataclass(frozen=True)
class LoadCheck:
    """What the child process found: the model's signature and how long load + warm-up took."""

    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    seconds: float


def check_digest(path: Path, digest: str) -> None:
    """InvalidInput when the file's sha256 is not `digest` (corrupt at rest or in transit)."""
    raise NotImplementedError


def check_load(path: Path, runtime: str, *, timeout: float, threads: int = 0) -> LoadCheck:
    """Load and warm up the model in a child process (`python -m mle_agent.serving.loadcheck`).
    InvalidInput when it fails or crashes (the message names the file, the runtime and the signal
    or the runtime's one-line reason); DeadlineExceeded past `timeout`."""
    raise NotImplementedError


def check_signature(
    name: str,
    new: tuple[Sequence[TensorSpec], Sequence[TensorSpec]],
    current: tuple[Sequence[TensorSpec], Sequence[TensorSpec]],
    current_version: int,
) -> None:
    """InvalidInput when a new version's inputs/outputs (names, datatypes, shapes) differ from
    the version now serving, so a swap can never break the model's clients; the message shows
    the first difference."""
    raise NotImplementedError

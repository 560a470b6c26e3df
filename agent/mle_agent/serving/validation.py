"""Checks a model file passes before it may serve: digest, signature, and a load in a child
process, so a file that crashes its runtime cannot take the agent down.

The child is `python -P -m mle_agent.serving.loadcheck PATH RUNTIME THREADS`: on success it prints
one JSON line on stdout (runtime, inputs, outputs, seconds) and exits 0; on failure it prints one
line prefixed `mle-loadcheck: ` on stderr (a runtime may log there too) and exits 1.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mle_agent.serving.backend import TensorSpec
from mle_agent.serving.runtimes import available_runtimes, not_installed
from mle_proto.errors import DeadlineExceeded, FailedPrecondition, InvalidInput

__all__ = [
    "ERROR_PREFIX",
    "LoadCheck",
    "check_digest",
    "check_load",
    "check_signature",
    "file_digest",
]

ERROR_PREFIX = "mle-loadcheck: "  # marks the child's own error line among a runtime's logs


@dataclass(frozen=True)
class LoadCheck:
    """What the child process found: the model's signature and how long load + warm-up took."""

    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    seconds: float


def file_digest(path: Path) -> str:
    """The file's sha256 as 64 hex digits."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_digest(path: Path, digest: str) -> None:
    """InvalidInput when the file's sha256 is not `digest` (corrupt at rest or in transit)."""
    expected = digest.lower().removeprefix("sha256:")
    try:
        actual = file_digest(path)
    except OSError as exc:
        raise InvalidInput(f"cannot read model file {path.name}: {exc.strerror}") from None
    if actual != expected:
        raise InvalidInput(
            f"{path.name} is corrupt: sha256 {actual[:12]}… is not the expected {expected[:12]}…"
        )


def check_load(
    path: Path, runtime: str, *, timeout: float, threads: int = 0, cwd: Path | None = None
) -> LoadCheck:
    """Load and warm up the model in a child process (`python -P -m mle_agent.serving.loadcheck`).
    InvalidInput when it fails or crashes (the message names the file, the runtime and the signal
    or the runtime's one-line reason); DeadlineExceeded past `timeout`; FailedPrecondition when
    the runtime is not installed here.

    The child runs in `cwd` (default: the file's directory), and `-P` keeps that directory off
    its sys.path: a file planted there (an `onnxruntime.py`) must never run as the agent.
    """
    if runtime not in available_runtimes():
        raise FailedPrecondition(not_installed(runtime))
    # Absolute: the child runs elsewhere, and the data dir may have been given relative.
    target = str(path.absolute())
    command = [sys.executable, "-P", "-m", "mle_agent.serving.loadcheck", target, runtime]
    try:
        child = subprocess.run(
            [*command, str(threads)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=cwd or path.parent,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise DeadlineExceeded(
            f"{path.name}: loading it with {runtime} took longer than {timeout:g}s"
        ) from None
    if child.returncode < 0:
        raise InvalidInput(
            f"{path.name} crashed the {runtime} runtime while loading "
            f"({_signal_name(-child.returncode)})"
        )
    if child.returncode != 0:
        raise InvalidInput(_failure(child.stderr, f"{path.name} cannot be loaded by {runtime}"))
    return _parse(child.stdout, path, runtime)


def check_signature(
    name: str,
    new: tuple[Sequence[TensorSpec], Sequence[TensorSpec]],
    current: tuple[Sequence[TensorSpec], Sequence[TensorSpec]],
    current_version: int,
) -> None:
    """InvalidInput when a new version's inputs/outputs (names, datatypes, shapes) differ from
    the version now serving, so a swap can never break the model's clients; the message shows
    the first difference.

    A dimension may widen to -1 on an input (the new version accepts all the old one did) and
    narrow from -1 on an output (the new version answers within what the old one promised).
    """
    for kind, index in (("input", 0), ("output", 1)):
        difference = _difference(kind, new[index], current[index], current_version)
        if difference:
            raise InvalidInput(
                f"model {name}: {difference}; a new version must keep the signature "
                "(deploy it under another model name)"
            )


def _difference(
    kind: str, new: Sequence[TensorSpec], old: Sequence[TensorSpec], version: int
) -> str:
    """The first way `new` breaks clients of `old`, or "" when it does not."""
    old_by_name = {spec.name: spec for spec in old}
    new_by_name = {spec.name: spec for spec in new}
    if set(old_by_name) != set(new_by_name):
        return (
            f"version {version} has {kind}s {sorted(old_by_name)}, "
            f"the new version has {sorted(new_by_name)}"
        )
    for tensor, was in old_by_name.items():
        now = new_by_name[tensor]
        if now.datatype != was.datatype or not _fits(kind, now.shape, was.shape):
            return (
                f"{kind} {tensor!r} is {_describe(was)} in version {version} "
                f"but {_describe(now)} in the new version"
            )
    return ""


def _fits(kind: str, new: tuple[int, ...], old: tuple[int, ...]) -> bool:
    if len(new) != len(old):
        return False
    if kind == "input":
        return all(n in (o, -1) for n, o in zip(new, old, strict=True))
    return all(o in (n, -1) for n, o in zip(new, old, strict=True))


def _describe(spec: TensorSpec) -> str:
    return f"{spec.datatype} [{','.join(map(str, spec.shape))}]"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _failure(stderr: str, what: str) -> str:
    """The child's own error line (it names the file and runtime), else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    marked = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
    if marked:
        return marked[-1]
    return f"{what}: {lines[-1][:300]}" if lines else f"{what}: the load check failed"


def _parse(stdout: str, path: Path, runtime: str) -> LoadCheck:
    """The child's JSON line (the last one: a runtime may print before it)."""
    try:
        found: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        return LoadCheck(
            runtime=str(found["runtime"]),
            inputs=tuple(TensorSpec.from_json(s) for s in found["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in found["outputs"]),
            seconds=float(found["seconds"]),
        )
    except (IndexError, KeyError, TypeError, ValueError):
        raise InvalidInput(
            f"{path.name} cannot be loaded by {runtime}: the load check said nothing usable"
        ) from None

"""Validation of a TaskSpec as it arrives: nothing hostile gets as far as a process."""

from __future__ import annotations

import math
import re

from mle_proto.errors import InvalidInput
from mle_proto.store import check_relative_path, parse_digest
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["TASK_ID", "validate_spec"]

TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=,\[\]-]{0,199}")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")


def validate_spec(spec: pb.TaskSpec) -> None:
    """Raise InvalidInput naming the first problem in a spec."""
    validate_task_id(spec.task_id)
    _check_command(spec)
    _check_env(spec)
    _check_paths(spec)
    if math.isnan(spec.timeout_seconds) or spec.timeout_seconds < 0:
        raise InvalidInput(f"task {spec.task_id}: timeout_seconds must be 0 (none) or positive")


def validate_task_id(task_id: str) -> None:
    """Raise InvalidInput unless task_id is a safe, non-empty identifier."""
    if not TASK_ID.fullmatch(task_id):
        raise InvalidInput(
            f"invalid task_id {task_id[:80]!r}: use letters, digits and ._:@+=,[]- "
            "(at most 200, starting with a letter or digit)"
        )


def _check_command(spec: pb.TaskSpec) -> None:
    kind = spec.WhichOneof("command")
    if kind is None:
        raise InvalidInput(f"task {spec.task_id}: give exactly one of shell or argv")
    if kind == "shell" and not spec.shell.strip():
        raise InvalidInput(f"task {spec.task_id}: shell command is empty")
    if kind == "argv" and not (spec.argv.args and spec.argv.args[0]):
        raise InvalidInput(f"task {spec.task_id}: argv is empty")
    command = [spec.shell] if kind == "shell" else list(spec.argv.args)
    if any("\x00" in part for part in command):
        raise InvalidInput(f"task {spec.task_id}: command contains a NUL byte")


def _check_env(spec: pb.TaskSpec) -> None:
    for key, value in spec.env.items():
        if not _ENV_KEY.fullmatch(key):
            raise InvalidInput(f"task {spec.task_id}: invalid environment variable {key[:80]!r}")
        if "\x00" in value:
            raise InvalidInput(f"task {spec.task_id}: environment variable {key} contains a NUL")


def _check_paths(spec: pb.TaskSpec) -> None:
    seen: set[str] = set()
    for item in spec.inputs:
        _check_path(spec.task_id, "input", item.path)
        try:
            parse_digest(item.digest)
        except InvalidInput as exc:
            raise InvalidInput(f"task {spec.task_id}: input {item.path}: {exc}") from None
        if item.path in seen:
            raise InvalidInput(f"task {spec.task_id}: input {item.path!r} is given twice")
        seen.add(item.path)
    outputs: set[str] = set()
    for path in spec.outputs:
        _check_path(spec.task_id, "output", path)
        if path in outputs:
            raise InvalidInput(f"task {spec.task_id}: output {path!r} is declared twice")
        outputs.add(path)


def _check_path(task_id: str, kind: str, path: str) -> None:
    try:
        check_relative_path(path)
    except InvalidInput as exc:
        raise InvalidInput(f"task {task_id}: {kind} {exc}") from None

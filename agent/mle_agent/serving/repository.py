"""The models an agent serves, on disk; what survives a restart.

    <models_root>/<name>/<version>/model.onnx|model.tflite   hard link to (or copy of) the artifact
    <models_root>/<name>/<version>/manifest.json             what was deployed, when, from where
    <models_root>/<name>/route.json                          the current route and its history

Every write is atomic: a version directory is assembled under a temporary name and renamed into
place; route.json is written to a temporary file and renamed. A crash leaves either the old state
or the new one, never a half-written version; leftovers of an interrupted write are removed by
`clean` when the agent starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mle_agent.serving.backend import TensorSpec
from mle_agent.serving.routing import Route
from mle_proto.errors import AlreadyExists, InvalidInput

__all__ = [
    "HISTORY_LIMIT",
    "KEEP_OLD",
    "MODEL_FILES",
    "UNLOAD_FIRST",
    "Manifest",
    "ModelRepository",
    "check_name",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MODEL_FILES = {"onnxruntime": "model.onnx", "litert": "model.tflite"}
KEEP_OLD, UNLOAD_FIRST = "keep_old", "unload_first"
HISTORY_LIMIT = 20  # routes kept for rollback
_TEMP = (".tmp-", ".trash-")


def check_name(name: str) -> str:
    """The name if it is a valid model name (it becomes a directory name), else InvalidInput."""
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid model name {name[:80]!r}: use 1-64 of a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Manifest:
    """One deployed version, as recorded in its manifest.json."""

    name: str
    version: int
    digest: str
    runtime: str
    filename: str  # the file's name on the operator's side
    size: int
    created: float
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source_run: str = ""
    source_step: str = ""
    max_batch_size: int = 0
    max_queue_delay: float = 0.0
    swap: str = KEEP_OLD

    @property
    def model_file(self) -> str:
        """The model file's name inside the version directory."""
        return MODEL_FILES.get(self.runtime, "model.bin")

    def to_json(self) -> dict[str, Any]:
        """The manifest as stored."""
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "runtime": self.runtime,
            "filename": self.filename,
            "size": self.size,
            "created": self.created,
            "source_run": self.source_run,
            "source_step": self.source_step,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "batching": {
                "max_batch_size": self.max_batch_size,
                "max_queue_delay_seconds": self.max_queue_delay,
            },
            "swap": self.swap,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest read back (KeyError/TypeError/ValueError when malformed)."""
        batching = data["batching"]
        return cls(
            name=str(data["name"]),
            version=int(data["version"]),
            digest=str(data["digest"]),
            runtime=str(data["runtime"]),
            filename=str(data["filename"]),
            size=int(data["size"]),
            created=float(data["created"]),
            inputs=tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in data["outputs"]),
            source_run=str(data["source_run"]),
            source_step=str(data["source_step"]),
            max_batch_size=int(batching["max_batch_size"]),
            max_queue_delay=float(batching["max_queue_delay_seconds"]),
            swap=str(data["swap"]),
        )


class ModelRepository:
    """Model versions and routes under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Models on disk."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))

    def manifests(self, name: str) -> dict[int, Manifest]:
        """Every readable version of a model; unreadable ones are logged and skipped."""
        model_dir = self.root / check_name(name)
        found: dict[int, Manifest] = {}
        if not model_dir.is_dir():
            return found
        for entry in model_dir.iterdir():
            if entry.is_dir() and entry.name.isdigit():
                manifest = self._read_manifest(entry)
                if manifest is not None:
                    found[manifest.version] = manifest
        return dict(sorted(found.items()))

    def model_path(self, manifest: Manifest) -> Path:
        """Where a version's model file is."""
        return self.root / manifest.name / str(manifest.version) / manifest.model_file

    def add_version(self, manifest: Manifest, source: Path) -> Path:
        """Store a new version (model file linked or copied from source); its model file path."""
        model_dir = self.root / check_name(manifest.name)
        final = model_dir / str(manifest.version)
        if final.exists():
            raise AlreadyExists(f"model {manifest.name} version {manifest.version} already exists")
        model_dir.mkdir(parents=True, exist_ok=True)
        temp = model_dir / f".tmp-{manifest.version}-{secrets.token_hex(4)}"
        temp.mkdir()
        try:
            _link_or_copy(source, temp / manifest.model_file)
            _write_json(temp / "manifest.json", manifest.to_json())
            os.rename(temp, final)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        _fsync_dir(model_dir)
        return final / manifest.model_file

    def remove_version(self, name: str, version: int) -> None:
        """Delete a version's directory (renamed away first, so it vanishes at once)."""
        self._remove(self.root / check_name(name) / str(version))

    def remove_model(self, name: str) -> None:
        """Delete a model with every version and its route."""
        self._remove(self.root / check_name(name))

    def read_route(self, name: str) -> tuple[Route | None, list[Route]]:
        """The model's current route and history (oldest first); (None, []) when none."""
        path = self.root / check_name(name) / "route.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            route = Route.from_json(data["route"]) if data["route"] else None
            return route, [Route.from_json(r) for r in data["history"]]
        except FileNotFoundError:
            return None, []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None, []

    def write_route(self, name: str, route: Route | None, history: list[Route]) -> None:
        """Replace the model's route.json atomically; keep the last HISTORY_LIMIT routes."""
        model_dir = self.root / check_name(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "route": route.to_json() if route else None,
            "history": [r.to_json() for r in history[-HISTORY_LIMIT:]],
        }
        _write_json(model_dir / "route.json", data)

    def _read_manifest(self, version_dir: Path) -> Manifest | None:
        path = version_dir / "manifest.json"
        try:
            manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None
        if str(manifest.version) != version_dir.name:
            log.warning("ignoring %s: it names version %d", path, manifest.version)
            return None
        return manifest

    def _remove(self, path: Path) -> None:
        if not path.exists():
            return
        trash = path.parent / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean(self, name: str) -> None:
        """Remove what an interrupted write or removal left behind (only while none runs)."""
        model_dir = self.root / check_name(name)
        for entry in model_dir.iterdir():
            if entry.name.startswith(_TEMP):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link (store files are immutable), or copy across file systems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    temp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    try:
        with temp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The wheels an install uploads, found or made on the operator machine: the mle-toolchain wheel
of this operator's version (built from the source tree of an editable install, cached in
`.mle/wheels/`; else taken from a wheelhouse), a wheelhouse's other wheels, and for `--offline`
the dependencies downloaded by pip for the device's platform into `.mle/wheels/<tag>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from mle_cli.settings import Settings
from mle_proto.errors import InvalidInput, MleError, NotFound

__all__ = [
    "DISTRIBUTION",
    "Wheels",
    "dependency_wheels",
    "offline_wheels",
    "operator_wheel",
    "pip_download_argv",
    "wheel_version",
]

DISTRIBUTION = "mle-toolchain"
_WHEEL_PREFIX = "mle_toolchain-"
_SOURCES = ("cli", "agent", "protos")  # what the wheel packages (pyproject's hatch targets)
_BUILD_TIMEOUT = 600.0
_DOWNLOAD_TIMEOUT = 1800.0


class Wheels:
    """The wheels every host of one command shares, made once (under a lock) and reused."""

    def __init__(self, settings: Settings, wheel: Path, wheelhouse: Path | None, offline: bool):
        self.settings = settings
        self.wheel = wheel
        self.wheelhouse = wheelhouse
        self.offline = offline
        self._lock = threading.Lock()
        self._offline: dict[tuple[str, tuple[str, ...]], list[Path]] = {}

    @property
    def version(self) -> str:
        return wheel_version(self.wheel)

    def dependencies(self, python_version: str, platforms: tuple[str, ...]) -> list[Path] | None:
        """The wheels to upload besides mle's, or None to install from the device's index."""
        if self.wheelhouse is not None:
            return dependency_wheels(self.wheelhouse)
        if not self.offline:
            return None
        key = (python_version, platforms)
        with self._lock:  # two devices of one platform: one download
            if key not in self._offline:
                found = offline_wheels(self.settings, self.wheel, python_version, platforms)
                self._offline[key] = found
            return self._offline[key]


def operator_wheel(settings: Settings, version: str, wheelhouse: Path | None = None) -> Path:
    """The mle-toolchain wheel of `version` (this operator's): built from the source tree when
    mle is installed editable, else found in the wheelhouse or the cache."""
    source = _editable_source()
    if source is not None:
        return _built_wheel(settings, source, version)
    places = [p for p in (wheelhouse, settings.mle_dir / "wheels") if p is not None]
    for place in places:
        found = sorted(place.glob(f"{_WHEEL_PREFIX}{version}-*.whl"))
        if found:
            return found[-1]
    raise NotFound(
        f"no mle-toolchain {version} wheel in {', '.join(map(str, places))}",
        hint="give --wheelhouse DIR holding it (scripts/wheelhouse.sh builds one), or --wheel FILE",
    )


def wheel_version(wheel: Path) -> str:
    """The version in an mle-toolchain wheel's file name; InvalidInput for another file or a
    version that is not PEP 440 (it names a directory on the device: `..` must not pass)."""
    from packaging.version import InvalidVersion, Version

    name = wheel.name
    if not name.startswith(_WHEEL_PREFIX) or not name.endswith(".whl") or not wheel.is_file():
        raise InvalidInput(f"{wheel} is not an mle-toolchain wheel (mle_toolchain-VERSION-*.whl)")
    version = name.removeprefix(_WHEEL_PREFIX).split("-", 1)[0]
    try:
        normal: str | None = str(Version(version))
    except InvalidVersion:
        normal = None
    if normal != version:  # a wheel's file name holds the normalized form, nothing else
        raise InvalidInput(f"{wheel}: {version!r} is not a PEP 440 version (as in 0.4.1)")
    return version


def dependency_wheels(wheelhouse: Path) -> list[Path]:
    """The wheels of a wheelhouse but mle-toolchain's own (the operator's version is sent)."""
    if not wheelhouse.is_dir():
        raise NotFound(f"wheelhouse {wheelhouse} is not a directory")
    wheels = sorted(p for p in wheelhouse.glob("*.whl") if not p.name.startswith(_WHEEL_PREFIX))
    if not wheels:
        raise NotFound(f"wheelhouse {wheelhouse} holds no dependency wheels (*.whl)")
    return wheels


def offline_wheels(
    settings: Settings, wheel: Path, python_version: str, platforms: Sequence[str]
) -> list[Path]:
    """The wheel's dependencies for the device's Python and platform, downloaded here by pip
    into `.mle/wheels/<tag>/` (its HTTP cache makes a second download cheap)."""
    major_minor = "".join(python_version.split(".")[:2])
    tag = f"cp{major_minor}-{platforms[0] if platforms else 'unknown'}"
    dest = settings.mle_dir / "wheels" / tag
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        argv = pip_download_argv(sys.executable, wheel, Path(tmp), python_version, platforms)
        _pip(argv, f"download the agent's dependencies for {tag}", _DOWNLOAD_TIMEOUT)
        names = sorted(p.name for p in Path(tmp).glob("*.whl"))
        for name in names:
            os.replace(Path(tmp) / name, dest / name)
    return [dest / name for name in names if not name.startswith(_WHEEL_PREFIX)]


def pip_download_argv(
    python: str, wheel: Path, dest: Path, python_version: str, platforms: Sequence[str]
) -> list[str]:
    """`pip download` of the wheel's dependencies for the device's platform (not this one's)."""
    if not platforms:
        raise InvalidInput("the device reported no pip platform tags; use --wheelhouse DIR")
    major, minor = [*python_version.split("."), "0"][:2]
    abi = f"cp{major}{minor}"
    argv = [python, "-m", "pip", "download", "--disable-pip-version-check", "--no-input"]
    argv += ["--dest", str(dest), "--only-binary=:all:"]
    argv += ["--python-version", f"{major}.{minor}", "--implementation", "cp"]
    argv += ["--abi", abi, "--abi", "abi3", "--abi", "none"]
    for platform in platforms:
        argv += ["--platform", platform]
    return [*argv, str(wheel)]


def _editable_source() -> Path | None:
    """The source tree of an editable mle install (PEP 610 direct_url.json), else None."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        text = distribution(DISTRIBUTION).read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    if not text:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        info = json.loads(text)
        url = urlparse(info["url"])
        if info.get("dir_info", {}).get("editable") and url.scheme == "file":
            source = Path(unquote(url.path))
            if (source / "pyproject.toml").is_file():
                return source
    return None


def _built_wheel(settings: Settings, source: Path, version: str) -> Path:
    """The wheel of the source tree as it is now: cached under a digest of its files."""
    cache = settings.mle_dir / "wheels" / f"build-{_source_digest(source)}"
    found = sorted(cache.glob(f"{_WHEEL_PREFIX}{version}-*.whl"))
    if found:
        return found[-1]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache.parent) as tmp:
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp]
        argv += ["--disable-pip-version-check"]
        if importlib.util.find_spec("hatchling") is not None:
            argv.append("--no-build-isolation")  # no index needed to build
        _pip([*argv, str(source)], f"build the mle-toolchain wheel from {source}", _BUILD_TIMEOUT)
        built = sorted(Path(tmp).glob(f"{_WHEEL_PREFIX}*.whl"))
        if not built:
            raise MleError(f"building the mle-toolchain wheel from {source} produced no wheel")
        staged = Path(tmp) / "out"
        staged.mkdir()
        shutil.move(built[-1], staged / built[-1].name)
        with contextlib.suppress(OSError):  # another mle built the same tree meanwhile: use it
            staged.rename(cache)
    found = sorted(cache.glob(f"{_WHEEL_PREFIX}{version}-*.whl"))
    if not found:
        raise MleError(f"the wheel built from {source} is not mle-toolchain {version}")
    return found[-1]


def _source_digest(source: Path) -> str:
    """A digest of the files the wheel is built from (a changed tree gets a new wheel)."""
    digest = hashlib.sha256()
    files = [source / "pyproject.toml", source / "README.md"]
    for folder in _SOURCES:
        files += sorted(p for p in (source / folder).rglob("*") if p.is_file())
    for path in files:
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _pip(argv: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise MleError(f"could not {what}: pip took longer than {timeout:g}s") from None
    except OSError as exc:
        raise MleError(f"could not {what}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines
        raise MleError(f"could not {what}: {errors[-1] if errors else 'pip failed'}")

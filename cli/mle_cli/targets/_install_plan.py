"""The install plan, pure (pyinfra style): what the device has and what the operator wants in,
a list of operations out, each with its phase; `install` runs them over SSH.

On the device, under the install directory: `releases/<version>/venv` (one per version),
`current` -> the release in service, `data/` (the agent's data dir and private key), `tls/`
(its certificate and the project CA), `wheels/` (uploaded wheels), `agent.toml`, `install.json`
(version and service kind), and the service's files (see `_service`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mle_cli.targets._service import (
    SUPERVISE,
    Layout,
    describe,
    remove_command,
    restart_command,
    service_file,
)
from mle_proto.errors import FailedPrecondition, InvalidInput

__all__ = [
    "DEFAULT_DIR",
    "MIN_FREE_BYTES",
    "DeviceState",
    "InstallSpec",
    "LocalWheel",
    "Operation",
    "Plan",
    "agent_config",
    "check_device",
    "check_directory",
    "outcome",
    "parse_state",
    "plan_install",
    "plan_rollback",
    "plan_uninstall",
    "record_text",
    "rolls_back",
    "state_command",
]

DEFAULT_DIR = "~/.mle-agent"
MIN_FREE_BYTES = 400 * 1024 * 1024  # a venv with grpcio and cryptography, wheels, some room
PIP_TIMEOUT = 1800.0  # a Raspberry Pi may build a wheel from source when its index has none
# What is removed by uninstall: only what install made, so a directory the user chose that holds
# other files is kept.
INSTALLED = (
    "releases", "current", "data", "tls", "wheels", "agent.toml", "install.json",
    "agent.state.json", "supervise.sh", "agent.pid", "agent.log", "agent.exit",
)  # fmt: skip


@dataclass(frozen=True)
class Operation:
    """One step of a plan: run a command, upload a file, write content, or a step the executor
    does itself (`sign` the CSR at `remote`, `wait` for the agent to answer as `version`)."""

    phase: str
    kind: str  # run | upload | write | sign | wait
    command: str = ""
    local: Path | None = None
    content: bytes = field(default=b"", repr=False)
    remote: str = ""
    mode: int = 0o644
    timeout: float = 120.0
    version: str = ""  # for `wait`
    note: str = ""  # the phase's progress line, shown once this operation is done


@dataclass(frozen=True)
class LocalWheel:
    """A wheel on the operator machine to upload."""

    path: Path
    size: int


@dataclass(frozen=True)
class InstallSpec:
    """What the operator wants on one device."""

    name: str
    host: str
    port: int
    labels: Mapping[str, str]
    layout: Layout
    home: str  # the login's home on the device
    python: str  # the device's python3 (from its facts)
    version: str  # of the mle-toolchain wheel
    wheel: LocalWheel  # the mle-toolchain wheel
    dependencies: tuple[LocalWheel, ...] = ()  # uploaded and installed with no index when given
    no_index: bool = False
    service: str = SUPERVISE
    start_timeout: float = 60.0


@dataclass(frozen=True)
class DeviceState:
    """What is installed on the device (read over SSH, certificate and agent checked)."""

    version: str = ""  # the release `current` points to; "" = none
    releases: tuple[str, ...] = ()
    venv_ok: bool = False  # the current release's mle-agentd exists
    config: str | None = None
    service: str = ""  # the kind install.json records
    service_file: str | None = None  # the unit or supervisor as it is on the device
    wheels: Mapping[str, int] = field(default_factory=dict)  # uploaded: name -> size
    cert_ok: bool = False  # from this project's CA, for this name and address, not expiring
    answering: bool = False  # the agent answered GetInfo over mutual TLS as `version`
    owner: str = ""  # the target install.json names; "" = none there
    entries: int = 0  # files and directories in the install directory (0 = empty or absent)


@dataclass(frozen=True)
class Plan:
    """The operations that bring a device to the spec, and the release to roll back to."""

    operations: tuple[Operation, ...]
    previous: str  # "" = nothing to roll back to

    @property
    def empty(self) -> bool:
        """Nothing to do: already installed."""
        return not self.operations


def check_device(name: str, python_problem: str, disk_free: int, disk_known: bool) -> None:
    """Refuse a device whose Python cannot run the agent or whose disk is too full, in one
    line (a disk the facts could not measure is not refused)."""
    if python_problem:
        raise FailedPrecondition(f"{name}: {python_problem}")
    if disk_known and disk_free < MIN_FREE_BYTES:
        raise FailedPrecondition(
            f"{name}: only {disk_free / 1e6:.0f} MB free for the agent; it needs "
            f"{MIN_FREE_BYTES / 1e6:.0f} MB"
        )


def check_directory(spec: InstallSpec, state: DeviceState) -> None:
    """Refuse an install directory that holds anything but this target's install: uninstall
    removes data/, releases/, ... there, which in a directory like /home/pi are the user's."""
    if state.owner == spec.name or not state.entries:
        return
    root = spec.layout.root
    held = f"the agent of target {state.owner!r}" if state.owner else "other files"
    raise FailedPrecondition(
        f"{spec.name}: agent.dir {root} holds {held}, no install of {spec.name} (install.json); "
        "choose an empty or new directory"
    )


def plan_install(spec: InstallSpec, state: DeviceState) -> Plan:
    """The operations from `state` to `spec`; empty when the agent is installed as wanted.
    FailedPrecondition for a directory that is not this target's (see `check_directory`)."""
    check_directory(spec, state)
    same_release = state.version == spec.version and state.venv_ok
    ops: list[Operation] = []
    if state.owner != spec.name:  # claimed first: a failed first install can be uninstalled
        root = shlex.quote(spec.layout.root)
        ops.append(Operation("prepare", "run", f"mkdir -p {root}"))
        ops.append(_write("prepare", spec.layout.record, record_text(spec), 0o644, ""))
    if not same_release:
        ops += _upload(spec, state)
        ops += _venv(spec)
    config = agent_config(spec)
    if state.config != config:
        ops.append(_write("config", spec.layout.config, config, 0o644, spec.layout.config))
    if not state.cert_ok:
        ops += _identity(spec)
    ops += _service(spec, state)
    if not same_release:
        target = f"releases/{spec.version}"
        switch = f"ln -sfn {shlex.quote(target)} {shlex.quote(spec.layout.current)}"
        ops.append(Operation("switch", "run", switch, note=f"current -> {target}"))
    if ops or not state.answering:
        ops += _start(spec, state)
    previous = state.version if state.version != spec.version else ""
    return Plan(tuple(ops), previous if previous in state.releases else "")


def rolls_back(operations: Sequence[Operation], failed: int) -> bool:
    """Whether a failure of operations[failed] is rolled back: it came after `current` was
    switched to the new release and before the new agent answered (any phase: a restart that
    fails leaves no agent as surely as one that never answers)."""
    switched = any(op.phase == "switch" for op in operations[:failed])
    answered = any(op.kind == "wait" for op in operations[:failed])
    return switched and not answered


def plan_rollback(spec: InstallSpec, previous: str) -> list[Operation]:
    """Back to `previous`: switch `current`, restart, wait; remove the release that failed."""
    layout = spec.layout
    target = f"releases/{previous}"
    return [
        Operation(
            "rollback", "run", f"ln -sfn {shlex.quote(target)} {shlex.quote(layout.current)}"
        ),
        Operation("rollback", "run", restart_command(spec.service, layout), timeout=90.0),
        Operation("rollback", "wait", version=previous, timeout=spec.start_timeout),
        Operation("rollback", "run", f"rm -rf {shlex.quote(layout.release(spec.version))}"),
    ]


def plan_uninstall(layout: Layout, remove_service: Sequence[str]) -> list[Operation]:
    """Stop and remove the services (their remove commands), then what install made, then the
    directory when nothing else is left in it."""
    ops = [Operation("stop", "run", command, timeout=90.0) for command in remove_service]
    paths = " ".join(shlex.quote(layout.path(name)) for name in INSTALLED)
    root = shlex.quote(layout.root)
    ops.append(Operation("remove", "run", f"rm -rf {paths} && (rmdir {root} 2>/dev/null; true)"))
    return ops


def agent_config(spec: InstallSpec) -> str:
    """`agent.toml` (mle_agent.settings keys); the key stays where --make-csr left it."""
    layout = spec.layout
    any_address = "[::]" if ":" in spec.host else "0.0.0.0"  # noqa: S104 - served over mTLS
    values: dict[str, Any] = {
        "name": spec.name,
        "listen": f"{any_address}:{spec.port}",
        "data_dir": layout.data,
        "tls_cert": layout.path("tls", "agent.crt"),
        "tls_ca": layout.path("tls", "ca.crt"),
        "state_file": layout.state_file,
        "announce": True,
    }
    lines = ["# Written by `mle agent install`; replaced by the next install or upgrade."]
    lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    lines += ["", "[labels]"]
    lines += [f"{_toml(key)} = {_toml(value)}" for key, value in sorted(spec.labels.items())]
    return "\n".join(lines) + "\n"


def record_text(spec: InstallSpec) -> str:
    """`install.json`: what uninstall, upgrade and logs need to know (no secret)."""
    record = {"name": spec.name, "version": spec.version, "service": spec.service}
    return json.dumps({**record, "port": spec.port}, indent=2) + "\n"


def state_command(python: str, layout: Layout, unit_file: str) -> tuple[str, bytes]:
    """A command and its stdin that print the install's state as JSON (see `parse_state`)."""
    words = [python, "-", layout.root, unit_file]
    return " ".join(shlex.quote(w) for w in words), _STATE_SCRIPT


def parse_state(stdout: str) -> dict[str, Any]:
    """The JSON `state_command` printed; InvalidInput when it is not that."""
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        raise InvalidInput("the device's install state could not be read") from None
    if not isinstance(data, dict):
        raise InvalidInput("the device's install state could not be read")
    return data


def outcome(before: str, after: str, phases: set[str]) -> tuple[str, str]:
    """What an install did, in a word, and the version(s)."""
    if before and before != after:
        word = "downgraded" if _release(after) < _release(before) else "upgraded"
        return word, f"mle {before} -> {after}"
    if not before:
        return "installed", f"mle {after}"
    if "venv" in phases:
        return "reinstalled", f"mle {after}"
    if phases & {"identity", "config", "service"}:
        return "reconfigured", f"mle {after}"
    return "restarted", f"mle {after}"


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version (`0.10.1rc1` -> (0, 10, 1)), to tell up from down."""
    numbers = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in numbers.group().split(".")) if numbers else ()


def _upload(spec: InstallSpec, state: DeviceState) -> list[Operation]:
    layout = spec.layout
    ops = [Operation("upload", "run", f"mkdir -p {shlex.quote(layout.wheels)}")]
    for wheel in (spec.wheel, *spec.dependencies):
        if state.wheels.get(wheel.path.name) != wheel.size:
            remote = layout.path("wheels", wheel.path.name)
            ops.append(Operation("upload", "upload", local=wheel.path, remote=remote))
    return ops


def _venv(spec: InstallSpec) -> list[Operation]:
    layout = spec.layout
    release, venv = layout.release(spec.version), layout.path("releases", spec.version, "venv")
    wheel = shlex.quote(layout.path("wheels", spec.wheel.path.name))
    pip = f"{shlex.quote(layout.venv_python(spec.version))} -m pip install -q"
    pip += " --disable-pip-version-check --no-input"
    if spec.no_index:
        pip += f" --no-index --find-links {shlex.quote(layout.wheels)}"
    source = "no index, uploaded wheels" if spec.no_index else "the device's index"
    make = (
        f"rm -rf {shlex.quote(release)} && mkdir -p {shlex.quote(release)} && "
        f"{shlex.quote(spec.python)} -m venv {shlex.quote(venv)}"
    )
    return [
        Operation("venv", "run", make, timeout=300.0),
        Operation(
            "venv",
            "run",
            f"{pip} {wheel}",
            timeout=PIP_TIMEOUT,
            note=f"{venv} (mle-toolchain {spec.version}; {source})",
        ),
    ]


def _identity(spec: InstallSpec) -> list[Operation]:
    """The key is made on the device; only its CSR comes back to be signed. The install's
    config is read (not /etc/mle/agent.toml, which may belong to another agent)."""
    layout = spec.layout
    csr = layout.path("tls", "agent.csr")
    make = (
        f"mkdir -p -m 700 {shlex.quote(layout.data)} && mkdir -p {shlex.quote(layout.tls)} && "
        f"rm -f {shlex.quote(csr)} && {shlex.quote(layout.agentd(spec.version))} "
        f"--config {shlex.quote(layout.config)} --name {shlex.quote(spec.name)} "
        f"--data-dir {shlex.quote(layout.data)} --make-csr {shlex.quote(csr)}"
    )
    return [
        Operation("identity", "run", make),
        Operation("identity", "sign", remote=csr),
    ]


def _service(spec: InstallSpec, state: DeviceState) -> list[Operation]:
    path, text, mode = service_file(spec.service, spec.layout, spec.name, spec.home)
    if state.service == spec.service and state.service_file == text:
        return []
    ops = []
    if state.service and state.service != spec.service:
        remove = remove_command(state.service, spec.layout, spec.home)
        ops.append(Operation("service", "run", remove, timeout=90.0))
    parent = path.rsplit("/", 1)[0]
    ops.append(Operation("service", "run", f"mkdir -p {shlex.quote(parent)}"))
    ops.append(_write("service", path, text, mode, describe(spec.service, spec.layout)))
    return ops


def _start(spec: InstallSpec, state: DeviceState) -> list[Operation]:
    layout = spec.layout
    old = [r for r in state.releases if r != spec.version]
    cleanup = " ".join(shlex.quote(layout.release(r)) for r in old)
    ops = [
        Operation("start", "run", restart_command(spec.service, layout), timeout=90.0),
        Operation("start", "wait", version=spec.version, timeout=spec.start_timeout),
        _write("start", layout.record, record_text(spec), 0o644, ""),
    ]
    if old:
        note = f"removed the old release{'s' * (len(old) > 1)} {', '.join(old)}"
        ops.append(Operation("cleanup", "run", f"rm -rf {cleanup}", note=note))
    return ops


def _write(phase: str, remote: str, text: str, mode: int, note: str) -> Operation:
    return Operation(phase, "write", content=text.encode(), remote=remote, mode=mode, note=note)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    # A JSON string is a valid TOML basic string: the same escapes, \\uXXXX for the rest.
    return json.dumps(str(value))


_STATE_SCRIPT = b"""\
import json, os, sys
root, unit = sys.argv[1], sys.argv[2]
def read(path):
    try:
        with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return None
def names(path):
    try:
        return sorted(os.listdir(os.path.join(root, path)))
    except OSError:
        return []
try:
    current = os.readlink(os.path.join(root, "current"))
except OSError:
    current = ""
releases = names("releases")
wheels = {}
for name in names("wheels"):
    try:
        wheels[name] = os.stat(os.path.join(root, "wheels", name)).st_size
    except OSError:
        pass
agentd = {r: os.access(os.path.join(root, "releases", r, "venv/bin/mle-agentd"), os.X_OK)
          for r in releases}
print(json.dumps({
    "current": os.path.basename(current.rstrip("/")), "releases": releases, "agentd": agentd,
    "wheels": wheels, "record": read("install.json"), "config": read("agent.toml"),
    "supervisor": read("supervise.sh"), "unit": read(unit), "cert": read("tls/agent.crt"),
    "ca": read("tls/ca.crt"), "entries": len(names("")),
}))
"""

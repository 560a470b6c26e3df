"""One device's install, upgrade, uninstall or logs over one SSH session: the small executor of
the plans `_install_plan` makes, with the I/O they leave out (facts, the device's state, the CSR
signed here, the agent asked over mutual TLS, the rollback).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mle_cli.settings import Settings
from mle_cli.targets import _service
from mle_cli.targets._device import (
    Login,
    certificate_usable,
    install_dir,
    last,
    login,
)
from mle_cli.targets._endpoint import Endpoint
from mle_cli.targets._install_plan import (
    DEFAULT_DIR,
    DeviceState,
    InstallSpec,
    LocalWheel,
    Operation,
    check_device,
    outcome,
    parse_state,
    plan_install,
    plan_rollback,
    rolls_back,
    state_command,
)
from mle_cli.targets._service import SUPERVISE, SYSTEMD_SYSTEM, SYSTEMD_USER, Layout
from mle_cli.targets.inventory import DEFAULT_AGENT_PORT, InventoryEntry, join_address
from mle_proto.errors import DeadlineExceeded, FailedPrecondition, InvalidInput, MleError

if TYPE_CHECKING:
    from mle_cli.targets._wheels import Wheels
    from mle_cli.targets.install import AsyncRunner
    from mle_cli.targets.ssh import SshSession
    from mle_proto.v1 import agent_pb2 as pb

__all__ = ["HostJob", "Progress"]

T = TypeVar("T")
Progress = Callable[[str, str], None]  # (target name, "phase: text")
PROBE_TIMEOUT = 5.0  # seconds for one GetInfo attempt
CRASH_CHECK_EVERY = 1.0  # seconds between looks at whether the agent died at start
_CSR_LIMIT = 64 * 1024


class HostJob:
    """One device: connect, then install, uninstall or show logs."""

    def __init__(
        self,
        settings: Settings,
        entry: InventoryEntry,
        progress: Progress,
        *,
        trust_new_host_key: bool = False,
    ) -> None:
        self.settings = settings
        self.entry = entry
        self.name = entry.name
        self._progress = progress
        self._trust = trust_new_host_key
        self.fingerprint = ""  # of the agent certificate on the device, once known

    def say(self, phase: str, text: str) -> None:
        """One progress line for this host."""
        self._progress(self.name, f"{phase}: {text}")

    @contextlib.contextmanager
    def session(self) -> Iterator[tuple[SshSession, Login, Layout]]:
        """An SSH session (host key verified), the login and the install's layout."""
        from mle_cli.targets.ssh import SshTarget, open_session

        ssh = self.entry.ssh
        key = Path(ssh.key).expanduser() if ssh.key else None
        if key is not None and not key.is_absolute():
            key = self.settings.project_dir / key
        target = SshTarget(
            self.name, self.entry.host, ssh.port, ssh.user, key, source=self.entry.where
        )
        with open_session(target, self.settings, trust_new_host_key=self._trust) as session:
            user = login(session, self.name)
            root = install_dir(self.entry.agent_dir or DEFAULT_DIR, user.home)
            layout = Layout(root, self.name)
            host = f"[{target.host}]" if ":" in target.host else target.host
            self.say("connect", f"{target.login}@{host}:{target.port}, host key verified")
            yield session, user, layout

    # -- install -------------------------------------------------------------------------------

    def install(
        self, wheels: Wheels, runner: AsyncRunner, *, upgrade: bool, start_timeout: float
    ) -> tuple[str, str]:
        """Install or upgrade the agent; (outcome, detail)."""
        with self.session() as (session, user, layout):
            spec = self._spec(session, user, layout, wheels, start_timeout)
            state = self._state(session, spec, runner)
            if upgrade and not state.version:
                raise FailedPrecondition(
                    f"{self.name}: no agent installed in {layout.root}; use mle agent install"
                )
            plan = plan_install(spec, state)
            if plan.empty:
                return "already installed", f"mle {spec.version}"
            self._execute(session, spec, plan.operations, runner, plan.previous)
        return outcome(state.version, spec.version, {op.phase for op in plan.operations})

    def _spec(
        self,
        session: SshSession,
        user: Login,
        layout: Layout,
        wheels: Wheels,
        start_timeout: float,
    ) -> InstallSpec:
        from mle_cli.targets.facts import gather_facts

        facts = gather_facts(session, layout.root)
        self.say("facts", facts.summary)
        known = facts.disk_total_bytes > 0
        check_device(self.name, facts.python_problem, facts.disk_free_bytes, known)
        kind = self._service_kind(session, user, facts.init_system)
        deps = wheels.dependencies(facts.python_version, tuple(facts.pip_platforms))
        return InstallSpec(
            name=self.name,
            host=self.entry.host,
            port=self.entry.port or DEFAULT_AGENT_PORT,
            labels=dict(self.entry.labels),
            layout=layout,
            home=user.home,
            python=facts.python,
            version=wheels.version,
            wheel=_local(wheels.wheel),
            dependencies=tuple(_local(p) for p in deps or ()),
            no_index=deps is not None,
            service=kind,
            start_timeout=start_timeout,
        )

    def _service_kind(self, session: SshSession, user: Login, init: str) -> str:
        if init != "systemd":
            return SUPERVISE
        if user.uid == 0:
            return SYSTEMD_SYSTEM
        if session.run("systemctl --user show-environment >/dev/null 2>&1").exit_code != 0:
            self.say("service", "the systemd user manager is not reachable: a supervised process")
            return SUPERVISE
        if session.run("loginctl enable-linger >/dev/null 2>&1").exit_code != 0:
            self.say("service", "lingering not allowed: the agent stops when the last login ends")
        return SYSTEMD_USER

    def _state(self, session: SshSession, spec: InstallSpec, runner: AsyncRunner) -> DeviceState:
        """What is on the device, with its certificate checked and its agent asked."""
        unit = _service.unit_path(spec.service, spec.layout, spec.home)
        command, script = state_command(spec.python, spec.layout, unit)
        done = session.run(command, stdin=script)
        if done.exit_code != 0:
            raise FailedPrecondition(f"{self.name}: cannot read {spec.layout.root}: {last(done)}")
        raw = parse_state(done.stdout)
        try:
            state = self._read_state(raw, spec)
        except (TypeError, ValueError, AttributeError):  # not what the state script prints
            damaged = f"{self.name}: the install state in {spec.layout.root} is damaged"
            raise InvalidInput(damaged) from None
        if state.version and state.cert_ok:
            state = replace(state, answering=self._answers(runner, spec, state.version))
        return state

    def _read_state(self, raw: dict[str, Any], spec: InstallSpec) -> DeviceState:
        import json

        record: dict[str, Any] = {}
        with contextlib.suppress(ValueError, TypeError):
            record = dict(json.loads(raw.get("record") or "{}"))
        version = str(raw.get("current") or "")
        releases = tuple(str(r) for r in raw.get("releases") or ())
        return DeviceState(
            version=version if version in releases else "",
            releases=releases,
            venv_ok=bool((raw.get("agentd") or {}).get(version)),
            config=raw.get("config"),
            service=str(record.get("service", "")),
            service_file=raw.get("supervisor" if spec.service == SUPERVISE else "unit"),
            wheels={str(k): int(v) for k, v in (raw.get("wheels") or {}).items()},
            cert_ok=self._certificate_ok(raw.get("cert"), raw.get("ca"), spec),
            owner=str(record.get("name", "")),
            entries=int(raw.get("entries") or 0),
        )

    def _certificate_ok(self, cert: object, ca: object, spec: InstallSpec) -> bool:
        from mle_cli.targets.pki import certificate_fingerprint, ensure_ca

        if not isinstance(cert, str) or not isinstance(ca, str):
            return False
        ours = (ensure_ca(self.settings) / "ca.crt").read_bytes()
        if ca.strip() != ours.decode().strip():
            return False
        if not certificate_usable(cert.encode(), ours, spec.name, spec.host):
            return False
        self.fingerprint = certificate_fingerprint(cert.encode())
        return True

    def _execute(
        self,
        session: SshSession,
        spec: InstallSpec,
        operations: tuple[Operation, ...],
        runner: AsyncRunner,
        previous: str,
    ) -> None:
        upload = _Upload()
        for index, op in enumerate(operations):
            try:
                self._do(session, spec, op, runner, upload)
            except MleError as exc:
                if not previous or not rolls_back(operations, index):
                    raise
                self._roll_back(session, spec, runner, previous, exc)
            if op.phase == "upload" and op is _last_of(operations, "upload"):
                self.say("upload", upload.summary(spec))
            elif op.note:
                self.say(op.phase, op.note)

    def _do(
        self,
        session: SshSession,
        spec: InstallSpec,
        op: Operation,
        runner: AsyncRunner,
        upload: _Upload,
    ) -> None:
        if op.kind == "run":
            self.run(session, op)
        elif op.kind == "upload" and op.local is not None:
            upload.add(op.local.stat().st_size, session.put(op.local, op.remote, mode=op.mode))
        elif op.kind == "write":
            session.put_bytes(op.content, op.remote, mode=op.mode)
        elif op.kind == "sign":
            self._sign(session, spec, op.remote)
        elif op.kind == "wait":
            seconds = self._wait(session, spec, runner, op.version, op.timeout)
            where = _address(spec)
            self.say(
                op.phase, f"mle {op.version} answers GetInfo over mTLS at {where} ({seconds:.1f}s)"
            )

    def _sign(self, session: SshSession, spec: InstallSpec, csr_path: str) -> None:
        """Sign the CSR the device made (its key stays there); send back certificate and CA."""
        from mle_cli.targets.pki import certificate_fingerprint, ensure_ca, sign_agent_csr

        csr = session.get_bytes(csr_path, limit=_CSR_LIMIT)
        cert = sign_agent_csr(self.settings, csr, spec.name, [spec.host])
        ca = (ensure_ca(self.settings) / "ca.crt").read_bytes()
        session.put_bytes(cert, spec.layout.path("tls", "agent.crt"))
        session.put_bytes(ca, spec.layout.path("tls", "ca.crt"))
        self.fingerprint = certificate_fingerprint(cert)
        self.say(
            "identity", f"key made on the device; certificate signed ({self.fingerprint[:23]}...)"
        )

    def _roll_back(
        self,
        session: SshSession,
        spec: InstallSpec,
        runner: AsyncRunner,
        previous: str,
        why: MleError,
    ) -> None:
        self.say("rollback", f"mle {spec.version} did not start; back to {previous}")
        try:
            for op in plan_rollback(spec, previous):
                self._do(session, spec, op, runner, _Upload())
        except MleError as exc:
            raise FailedPrecondition(
                f"{why}; rolling back to {previous} failed too: {exc}"
            ) from None
        raise FailedPrecondition(f"{why}; rolled back to {previous}, which answers") from None

    def _wait(
        self,
        session: SshSession,
        spec: InstallSpec,
        runner: AsyncRunner,
        version: str,
        timeout: float,
    ) -> float:
        """Seconds until the agent answers as `version`; fail early when it dies at start."""
        started = time.monotonic()
        deadline = started + timeout
        last, next_check = "no answer", started + CRASH_CHECK_EVERY
        while time.monotonic() < deadline:
            try:
                if self._ask(runner, spec, min(PROBE_TIMEOUT, timeout)).agent_version == version:
                    return time.monotonic() - started
                last = "another version answers"
            except MleError as exc:
                last = str(exc)
            except TimeoutError:
                last = "no answer"
            if time.monotonic() >= next_check:
                self._check_alive(session, spec, version)
                next_check = time.monotonic() + CRASH_CHECK_EVERY
            time.sleep(0.2)
        raise DeadlineExceeded(
            f"{self.name}: mle {version} did not answer GetInfo over mutual TLS within "
            f"{timeout:g}s ({last})"
        )

    def _check_alive(self, session: SshSession, spec: InstallSpec, version: str) -> None:
        crashed = session.run(_service.crash_command(spec.service, spec.layout)).stdout.split()
        if crashed[:1] == ["exited"]:
            status = crashed[1] if len(crashed) > 1 else "?"
            raise FailedPrecondition(
                f"{self.name}: mle-agentd {version} exited with status {status} at start "
                f"(mle agent logs --target {self.name} shows why)"
            )

    def _answers(self, runner: AsyncRunner, spec: InstallSpec, version: str) -> bool:
        try:
            return self._ask(runner, spec, PROBE_TIMEOUT).agent_version == version
        except (MleError, TimeoutError):
            return False

    def _ask(self, runner: AsyncRunner, spec: InstallSpec, timeout: float) -> pb.AgentInfo:
        from mle_cli.targets.pki import operator_identity

        endpoint = Endpoint(
            name=spec.name,
            address=_address(spec),
            tls=operator_identity(self.settings),
            fingerprint=self.fingerprint,
        )
        return runner.run(_info(endpoint, timeout), timeout + 5.0)

    def run(self, session: SshSession, op: Operation) -> None:
        """Run an operation's command; a non-zero exit fails the phase in one line."""
        done = session.run(op.command, timeout=op.timeout)
        if done.exit_code != 0:
            raise FailedPrecondition(f"{self.name}: {op.phase}: {last(done)}")


class _Upload:
    """What an upload phase sent, and how fast."""

    def __init__(self) -> None:
        self.bytes = 0
        self.seconds = 0.0
        self.files = 0

    def add(self, size: int, mb_per_s: float) -> None:
        self.files += 1
        self.bytes += size
        self.seconds += size / 1e6 / max(mb_per_s, 1e-9)

    def summary(self, spec: InstallSpec) -> str:
        wanted = 1 + len(spec.dependencies)
        if not self.files:
            return f"all {wanted} wheels already on the device"
        rate = self.bytes / 1e6 / max(self.seconds, 1e-9)
        kept = f", {wanted - self.files} already there" if wanted > self.files else ""
        files = f"{self.files} wheel{'s' * (self.files != 1)}"
        return f"{files}, {self.bytes / 1e6:.1f} MB at {rate:.1f} MB/s{kept}"


async def _info(endpoint: Endpoint, timeout: float) -> pb.AgentInfo:
    """GetInfo over a fresh connection (the agent's identity checked first)."""
    from mle_cli.targets.connection import connect

    conn = await connect(endpoint, timeout)
    try:
        return await conn.info()
    finally:
        await conn.close()


def _local(path: Path) -> LocalWheel:
    return LocalWheel(path, path.stat().st_size)


def _address(spec: InstallSpec) -> str:
    return join_address(spec.host, spec.port)


def _last_of(operations: tuple[Operation, ...], phase: str) -> Operation | None:
    return next((op for op in reversed(operations) if op.phase == phase), None)

"""`mle agent install | upgrade | uninstall | logs` over SSH, on one device or many at once.

Targets come from the inventory (`targets/*.yaml`: host, ssh, agent {port, dir}), picked by a
selector (names, globs, labels). Each device runs in its own thread, at most `parallel` at once;
a failure stops that device only, and every device gets a `HostResult`. Progress is reported per
phase through a callback; nothing here prints.

On a device an install is: connect (host key verified), facts (Python, disk, init system),
upload (the mle-toolchain wheel of this operator's version, and the dependency wheels when
installing with no index), venv (a release per version), identity (the key made on the device,
its CSR signed here), config, service (systemd or a supervised process), start, and a wait until
the agent answers GetInfo over mutual TLS. Re-running with nothing changed restarts nothing; a
new version is installed beside the old one, which is kept until the new one answers and is put
back when it never does. See `_install_plan` for the layout on the device.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mle_cli.render import printable
from mle_cli.settings import Settings
from mle_cli.targets._installer import HostJob, Progress
from mle_cli.targets.inventory import InventoryEntry, load_inventory
from mle_cli.targets.selectors import Selector, SelectorError
from mle_proto.errors import FailedPrecondition, MleError, NotFound, UsageError

__all__ = [
    "DEFAULT_PARALLEL",
    "AsyncRunner",
    "HostResult",
    "InstallOptions",
    "Progress",
    "agent_logs",
    "failure",
    "install_agents",
    "select_hosts",
    "uninstall_agents",
]

T = TypeVar("T")
DEFAULT_PARALLEL = 4
DEFAULT_START_TIMEOUT = 60.0


@dataclass(frozen=True)
class InstallOptions:
    """How to reach the devices and what to install on them."""

    trust_new_host_key: bool = False
    parallel: int = DEFAULT_PARALLEL
    wheelhouse: Path | None = None  # upload its wheels and install with no index
    offline: bool = False  # download the dependencies here for each device's platform
    wheel: Path | None = None  # this mle-toolchain wheel instead of the operator's version
    start_timeout: float = DEFAULT_START_TIMEOUT
    upgrade: bool = False  # refuse a device without an agent


@dataclass(frozen=True)
class HostResult:
    """What happened on one device."""

    target: str
    outcome: str  # installed, upgraded, repaired, already installed, uninstalled, ..., failed
    detail: str = ""
    error: MleError | None = None

    @property
    def ok(self) -> bool:
        """Whether the device ended as asked."""
        return self.error is None


class AsyncRunner:
    """One event loop on its own thread for every host's gRPC calls (grpc.aio objects belong to
    the loop that made them; hosts run on a thread pool)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mle-install-rpc")

    def __enter__(self) -> AsyncRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """The coroutine's result; TimeoutError when it takes longer (it is cancelled)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


def select_hosts(settings: Settings, selector: str) -> list[InventoryEntry]:
    """The inventory entries with a host that the selector (`pi-01`, `pi-*`, `role=edge`) picks."""
    try:
        chosen = Selector.parse(selector)
    except SelectorError as exc:
        raise UsageError(f"--target {selector!r}: {exc}") from None
    entries = load_inventory(settings.project_dir)
    matched = [e for e in entries if chosen.matches(e.name, e.labels)]
    hosted = [e for e in matched if e.host]
    if hosted:
        return hosted
    if matched:
        entry = matched[0]
        raise NotFound(
            f"target {entry.name!r} ({entry.where}) has no host: write its host: to reach it "
            "over SSH"
        )
    known = ", ".join(e.name for e in entries if e.host) or "none"
    raise NotFound(
        f"no inventory target matches {selector!r} (targets with a host: {known})",
        hint="targets are defined in targets/*.yaml (name, host, ssh, agent)",
    )


def install_agents(
    settings: Settings, selector: str, options: InstallOptions, progress: Progress
) -> list[HostResult]:
    """Install (or upgrade) the agent on every selected device."""
    from mle_cli.targets._wheels import Wheels, operator_wheel
    from mle_cli.targets.pki import operator_identity
    from mle_proto import __version__

    hosts = select_hosts(settings, selector)
    _check_options(options)
    wheel = options.wheel or operator_wheel(settings, __version__, options.wheelhouse)
    wheels = Wheels(settings, wheel, options.wheelhouse, options.offline)
    _ = wheels.version  # a wrong --wheel fails here, once, not on every host
    operator_identity(settings)  # the project CA and client certificate, made before any thread

    with AsyncRunner() as runner:

        def one(job: HostJob) -> tuple[str, str]:
            return job.install(
                wheels, runner, upgrade=options.upgrade, start_timeout=options.start_timeout
            )

        return _on_hosts(settings, hosts, options, progress, one)


def uninstall_agents(
    settings: Settings, selector: str, options: InstallOptions, progress: Progress
) -> list[HostResult]:
    """Stop and remove the agent on every selected device."""
    hosts = select_hosts(settings, selector)
    return _on_hosts(settings, hosts, options, progress, _uninstall)


def agent_logs(
    settings: Settings, selector: str, lines: int, options: InstallOptions
) -> list[HostResult]:
    """The last `lines` log lines of every selected device's agent (in each result's detail)."""
    if lines < 1:
        raise UsageError("-n must be at least 1")
    hosts = select_hosts(settings, selector)
    quiet: Progress = lambda name, text: None  # noqa: E731 - logs show only the logs
    return _on_hosts(settings, hosts, options, quiet, lambda job: ("logs", _logs(job, lines)))


def failure(results: Sequence[HostResult]) -> MleError | None:
    """The error to end the command with when any device failed (its own, when only one)."""
    failed = [r for r in results if r.error is not None]
    if not failed:
        return None
    if len(failed) == 1 and failed[0].error is not None:
        return failed[0].error
    names = ", ".join(r.target for r in failed)
    codes = {r.error.exit_code for r in failed if r.error is not None}
    error = MleError(f"{len(failed)} of {len(results)} targets failed: {names}")
    error.exit_code = codes.pop() if len(codes) == 1 else 1
    return error


def _uninstall(job: HostJob) -> tuple[str, str]:
    """Stop the agent, remove its service and what install made; (outcome, detail)."""
    from mle_cli.targets import _service
    from mle_cli.targets._device import find_installed
    from mle_cli.targets._install_plan import plan_uninstall

    with job.session() as (session, user, layout):
        found = find_installed(session, layout, user)
        if not found.present and not found.kinds:
            return "not installed", f"nothing at {layout.root}"
        if found.present and found.owner != job.name:  # data/, releases/... may be the user's
            held = f"the agent of target {found.owner!r}" if found.owner else "no install.json"
            raise FailedPrecondition(
                f"{job.name}: {layout.root} holds {held}, not an install of {job.name}; "
                "nothing removed"
            )
        removers = [_service.remove_command(k, layout, user.home) for k in found.kinds]
        for op in plan_uninstall(layout, removers):
            job.run(session, op)
        kept = session.run(f"test -d {shlex.quote(layout.root)}").exit_code == 0
    services = ", ".join(_service.describe(k, layout) for k in found.kinds) or "no service"
    version = f"mle {found.version}, " if found.version else ""
    where = f"kept {layout.root} (it holds other files)" if kept else f"removed {layout.root}"
    return "uninstalled", f"stopped and removed {version}{services}; {where}"


def _logs(job: HostJob, lines: int) -> str:
    """The agent's last log lines (its journal, or the tail of agent.log)."""
    from mle_cli.targets import _service
    from mle_cli.targets._device import find_installed, last

    with job.session() as (session, user, layout):
        found = find_installed(session, layout, user)
        if not found.kinds:
            raise NotFound(f"{job.name}: no agent installed in {layout.root}")
        done = session.run(_service.logs_command(found.kinds[0], layout, lines))
        if done.exit_code != 0:
            raise FailedPrecondition(f"{job.name}: cannot read the agent's log: {last(done)}")
        return done.stdout


def _check_options(options: InstallOptions) -> None:
    if options.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    if options.offline and options.wheelhouse is not None:
        raise UsageError("--offline downloads a wheelhouse; give it or --wheelhouse, not both")
    if options.start_timeout <= 0:
        raise UsageError("--start-timeout must be positive")


def _on_hosts(
    settings: Settings,
    hosts: Sequence[InventoryEntry],
    options: InstallOptions,
    progress: Progress,
    action: Callable[[HostJob], tuple[str, str]],
) -> list[HostResult]:
    """Run the action on each host, `parallel` at once, each failure kept to its host."""
    lock = threading.Lock()

    def report(name: str, text: str) -> None:
        with lock:  # one whole line at a time from many threads
            progress(name, text)

    def one(entry: InventoryEntry) -> HostResult:
        job = HostJob(settings, entry, report, trust_new_host_key=options.trust_new_host_key)
        try:
            outcome, detail = action(job)
        except MleError as exc:
            error = exc if entry.name in str(exc) else _named(exc, entry.name)
            return HostResult(entry.name, "failed", str(error), error)
        except Exception as exc:  # noqa: BLE001 - one host's bug must not abort the others
            error = _unexpected(entry.name, exc)
            return HostResult(entry.name, "failed", str(error), error)
        return HostResult(entry.name, outcome, printable(detail))

    if len(hosts) == 1:
        return [one(hosts[0])]
    workers = min(options.parallel, len(hosts))
    with ThreadPoolExecutor(workers, thread_name_prefix="mle-install") as pool:
        return list(pool.map(one, hosts))


def _unexpected(name: str, exc: Exception) -> MleError:
    """An error that is no MleError, as this host's one-line failure; its traceback goes to the
    debug log (the main error boundary's file)."""
    import traceback

    from mle_cli.errors import debug_log_path

    path = debug_log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as log:
            log.write(f"--- {name}\n{traceback.format_exc()}\n")
        where = f"details in {path}"
    except OSError:
        where = "no debug log could be written"
    return MleError(f"{name}: internal error: {printable(type(exc).__name__)}; {where}")


def _named(exc: MleError, name: str) -> MleError:
    """The same error, its message starting with the device's name."""
    named = type(exc)(f"{name}: {exc}", hint=exc.hint)
    named.exit_code = exc.exit_code
    return named

"""The install plan of `mle agent install`, without a network: what a device has and what the
operator wants in, operations out. The scripts it writes (the supervisor, the stop and restart
commands, the state reader) run here for real under /bin/sh and python3 against a tmp layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from mle_agent.identity import agent_csr
from mle_agent.settings import build_settings
from mle_cli.settings import Settings
from mle_cli.targets import _service
from mle_cli.targets._device import Login, certificate_usable, find_installed, install_dir, last
from mle_cli.targets._install_plan import (
    MIN_FREE_BYTES,
    DeviceState,
    InstallSpec,
    LocalWheel,
    agent_config,
    check_device,
    check_directory,
    parse_state,
    plan_install,
    plan_rollback,
    plan_uninstall,
    rolls_back,
    state_command,
)
from mle_cli.targets._service import SUPERVISE, SYSTEMD_SYSTEM, SYSTEMD_USER, Layout
from mle_cli.targets._wheels import pip_download_argv, wheel_version
from mle_cli.targets.facts import DeviceFacts, pip_platforms
from mle_cli.targets.install import HostResult, failure, select_hosts
from mle_cli.targets.inventory import load_inventory
from mle_cli.targets.pki import ensure_ca, sign_agent_csr
from mle_cli.targets.ssh import CommandResult
from mle_proto.errors import FailedPrecondition, InvalidInput, NotFound, PermissionDenied

ROOT = "/home/pi/.mle-agent"
WHEEL = LocalWheel(Path("/w/mle_toolchain-0.2.0-py3-none-any.whl"), 300_000)
GRPC = LocalWheel(Path("/w/grpcio-1.85.1-cp311-cp311-manylinux_2_17_aarch64.whl"), 6_000_000)


def _spec(**changes: object) -> InstallSpec:
    spec = InstallSpec(
        name="pi-01",
        host="192.168.1.50",
        port=7443,
        labels={"role": "edge", "site/room": "lab-2"},
        layout=Layout(ROOT, "pi-01"),
        home="/home/pi",
        python="/usr/bin/python3",
        version="0.2.0",
        wheel=WHEEL,
        dependencies=(GRPC,),
        no_index=True,
        service=SUPERVISE,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def _installed(spec: InstallSpec, **changes: object) -> DeviceState:
    """The state of a device where `spec` is installed and answering."""
    _, text, _ = _service.service_file(spec.service, spec.layout, spec.name, spec.home)
    state = DeviceState(
        version=spec.version,
        releases=(spec.version,),
        venv_ok=True,
        config=agent_config(spec),
        service=spec.service,
        service_file=text,
        wheels={WHEEL.path.name: WHEEL.size, GRPC.path.name: GRPC.size},
        cert_ok=True,
        answering=True,
        owner=spec.name,
        entries=8,
    )
    return replace(state, **changes)  # type: ignore[arg-type]


def _phases(ops: object) -> list[str]:
    seen: list[str] = []
    for op in ops:  # type: ignore[attr-defined]
        if not seen or seen[-1] != op.phase:
            seen.append(op.phase)
    return seen


# -- plans ------------------------------------------------------------------------------------


def test_a_fresh_device_gets_every_phase_in_order() -> None:
    plan = plan_install(_spec(), DeviceState())
    assert _phases(plan.operations) == [
        "prepare", "upload", "venv", "config", "identity", "service", "switch", "start",
    ]  # fmt: skip
    assert plan.previous == ""
    claim = plan.operations[1]  # install.json first: a failed install can still be uninstalled
    assert (claim.kind, claim.remote) == ("write", f"{ROOT}/install.json")
    assert json.loads(claim.content)["name"] == "pi-01"
    uploads = [op for op in plan.operations if op.kind == "upload"]
    assert [(op.local, op.remote) for op in uploads] == [
        (WHEEL.path, f"{ROOT}/wheels/{WHEEL.path.name}"),
        (GRPC.path, f"{ROOT}/wheels/{GRPC.path.name}"),
    ]
    venv = [op.command for op in plan.operations if op.phase == "venv"]
    assert f"/usr/bin/python3 -m venv {ROOT}/releases/0.2.0/venv" in venv[0]
    assert venv[1] == (
        f"{ROOT}/releases/0.2.0/venv/bin/python -m pip install -q --disable-pip-version-check "
        f"--no-input --no-index --find-links {ROOT}/wheels {ROOT}/wheels/{WHEEL.path.name}"
    )
    make_csr = next(op.command for op in plan.operations if op.phase == "identity")
    assert make_csr.endswith(
        f"{ROOT}/releases/0.2.0/venv/bin/mle-agentd --config {ROOT}/agent.toml --name pi-01 "
        f"--data-dir {ROOT}/data --make-csr {ROOT}/tls/agent.csr"
    )
    kinds = [op.kind for op in plan.operations if op.phase in ("identity", "start")]
    assert kinds == ["run", "sign", "run", "wait", "write"]
    wait = next(op for op in plan.operations if op.kind == "wait")
    assert wait.version == "0.2.0"


def test_from_the_device_index_only_the_mle_wheel_is_sent() -> None:
    plan = plan_install(_spec(dependencies=(), no_index=False), DeviceState())
    assert [op.local for op in plan.operations if op.kind == "upload"] == [WHEEL.path]
    pip = [op.command for op in plan.operations if op.phase == "venv"][1]
    assert "--no-index" not in pip and pip.endswith(f"{ROOT}/wheels/{WHEEL.path.name}")


def test_nothing_to_do_when_installed_configured_and_answering() -> None:
    spec = _spec()
    assert plan_install(spec, _installed(spec)).empty


def test_a_silent_agent_is_only_restarted_and_waited_for() -> None:
    spec = _spec()
    plan = plan_install(spec, _installed(spec, answering=False))
    assert [(op.phase, op.kind) for op in plan.operations] == [
        ("start", "run"), ("start", "wait"), ("start", "write"),
    ]  # fmt: skip


def test_a_changed_config_is_rewritten_and_the_agent_restarted_in_the_same_release() -> None:
    spec = _spec()
    plan = plan_install(spec, _installed(spec, config="name = 'old'\n"))
    assert _phases(plan.operations) == ["config", "start"]
    assert plan.operations[0].content.decode() == agent_config(spec)


def test_a_certificate_that_is_no_longer_good_is_made_again() -> None:
    spec = _spec()
    plan = plan_install(spec, _installed(spec, cert_ok=False))
    assert _phases(plan.operations) == ["identity", "start"]


def test_a_new_version_is_a_new_release_kept_apart_until_it_answers() -> None:
    old = _installed(_spec(version="0.1.0"), releases=("0.1.0",))
    spec = _spec()
    plan = plan_install(spec, replace(old, wheels={GRPC.path.name: GRPC.size}))
    phases = _phases(plan.operations)
    assert phases == ["upload", "venv", "switch", "start", "cleanup"]  # identity kept
    assert [op.local for op in plan.operations if op.kind == "upload"] == [WHEEL.path]
    assert plan.previous == "0.1.0"
    kinds = [(op.phase, op.kind) for op in plan.operations]
    assert kinds.index(("start", "wait")) < kinds.index(("cleanup", "run"))
    cleanup = plan.operations[-1]
    assert cleanup.command == f"rm -rf {ROOT}/releases/0.1.0"
    switch = next(op for op in plan.operations if op.phase == "switch")
    assert switch.command == f"ln -sfn releases/0.2.0 {ROOT}/current"


def test_a_wheel_of_another_size_is_sent_again() -> None:
    state = DeviceState(wheels={WHEEL.path.name: 1, GRPC.path.name: GRPC.size})
    plan = plan_install(_spec(), state)
    assert [op.local for op in plan.operations if op.kind == "upload"] == [WHEEL.path]


def test_rollback_switches_back_restarts_waits_and_drops_the_failed_release() -> None:
    ops = plan_rollback(_spec(), "0.1.0")
    assert [op.kind for op in ops] == ["run", "run", "wait", "run"]
    assert ops[0].command == f"ln -sfn releases/0.1.0 {ROOT}/current"
    assert ops[2].version == "0.1.0"
    assert ops[3].command == f"rm -rf {ROOT}/releases/0.2.0"


def test_moving_from_a_supervised_process_to_systemd_removes_the_supervisor() -> None:
    spec = _spec(service=SYSTEMD_SYSTEM)
    before = _installed(_spec(), service=SUPERVISE)
    ops = [op for op in plan_install(spec, before).operations if op.phase == "service"]
    assert f"rm -f {ROOT}/supervise.sh" in ops[0].command
    assert ops[-1].remote == "/etc/systemd/system/mle-agent-pi-01.service"
    assert f"ExecStart={ROOT}/current/venv/bin/mle-agentd --config {ROOT}/agent.toml" in (
        ops[-1].content.decode()
    )


def test_uninstall_removes_only_what_install_made() -> None:
    ops = plan_uninstall(Layout("/opt/mle"), ["stop-it"])
    assert ops[0].command == "stop-it"
    remove = ops[-1].command
    assert "rm -rf /opt/mle/releases /opt/mle/current /opt/mle/data" in remove
    assert "rm -rf /opt/mle " not in remove and remove.endswith(
        "(rmdir /opt/mle 2>/dev/null; true)"
    )


@pytest.mark.parametrize(
    ("state", "held"),
    [
        (DeviceState(entries=3), "other files"),  # agent.dir: /home/pi
        (DeviceState(entries=9, owner="pi-02"), "the agent of target 'pi-02'"),
    ],
)
def test_a_directory_that_is_not_this_targets_install_is_refused(
    state: DeviceState, held: str
) -> None:
    with pytest.raises(FailedPrecondition) as refused:
        plan_install(_spec(), state)
    assert str(refused.value) == (
        f"pi-01: agent.dir {ROOT} holds {held}, no install of pi-01 (install.json); choose an "
        "empty or new directory"
    )


def test_an_empty_or_new_directory_or_this_targets_own_is_accepted() -> None:
    spec = _spec()
    check_directory(spec, DeviceState())
    check_directory(spec, DeviceState(entries=2, owner="pi-01"))  # a failed first install
    assert "prepare" not in _phases(plan_install(spec, _installed(spec, cert_ok=False)).operations)


def test_a_failure_after_the_switch_and_before_the_answer_is_rolled_back() -> None:
    old = _installed(_spec(version="0.1.0"), releases=("0.1.0",))
    ops = plan_install(_spec(), old).operations
    where = {(op.phase, op.kind): i for i, op in enumerate(ops)}
    assert not rolls_back(ops, where["venv", "run"])  # current still the old release
    assert not rolls_back(ops, where["switch", "run"])  # the switch itself failed: nothing moved
    assert rolls_back(ops, where["start", "run"])  # the restart failed: no agent otherwise
    assert rolls_back(ops, where["start", "wait"])
    assert not rolls_back(ops, where["start", "write"])  # the new agent answered
    assert not rolls_back(ops, where["cleanup", "run"])


def test_rollback_and_unit_paths_are_quoted_for_a_home_with_a_space(tmp_path: Path) -> None:
    layout = Layout("/home/pi pi/.mle-agent", "pi-01")
    ops = plan_rollback(_spec(layout=layout), "0.1.0")
    assert ops[0].command == "ln -sfn releases/0.1.0 '/home/pi pi/.mle-agent/current'"
    for op in ops:
        if op.kind == "run":
            assert subprocess.run(["sh", "-n", "-c", op.command]).returncode == 0
    _, unit, _ = _service.service_file(SYSTEMD_USER, layout, "pi-01", "/home/pi pi")
    assert (
        'ExecStart="/home/pi pi/.mle-agent/current/venv/bin/mle-agentd" '
        '--config "/home/pi pi/.mle-agent/agent.toml"\n'
    ) in unit
    odd = _service.exec_start(Layout('/h/100% "$x"\\', "pi-01"))
    assert odd == (
        'ExecStart="/h/100%% \\"$$x\\"\\\\/current/venv/bin/mle-agentd" '
        '--config "/h/100%% \\"$$x\\"\\\\/agent.toml"'
    )


def test_two_targets_on_one_host_have_a_unit_each() -> None:
    a, b = Layout("/srv/a", "pi-01"), Layout("/srv/b", "pi-02")
    for kind in (SYSTEMD_SYSTEM, SYSTEMD_USER):
        paths = {_service.unit_path(kind, layout, "/home/pi") for layout in (a, b)}
        assert len(paths) == 2
        assert "mle-agent-pi-02.service" in _service.restart_command(kind, b)
        assert "mle-agent-pi-01.service" not in _service.remove_command(kind, b, "/home/pi")
    assert _service.describe(SYSTEMD_USER, a) == (
        "systemd unit mle-agent-pi-01.service (systemctl --user)"
    )


class _Shell:
    """The session find_installed needs, running its probe under this machine's /bin/sh."""

    def run(self, command: str, *, timeout: float = 30.0, stdin: bytes = b"") -> CommandResult:
        done = subprocess.run(
            ["sh", "-c", command], input=stdin, capture_output=True, timeout=timeout
        )
        return CommandResult(done.returncode, done.stdout.decode(), done.stderr.decode())


def test_the_unit_found_is_the_one_naming_exactly_this_install(tmp_path: Path) -> None:
    """A unit whose paths contain this install's as a substring belongs to another one."""
    home = tmp_path / "home"
    user = Login(str(home), 1000)
    mine = Layout(str(home / "a"), "pi-01")
    theirs = Layout(str(tmp_path / "x" / str(home / "a").lstrip("/")), "pi-01")
    path, text, _ = _service.service_file(SYSTEMD_USER, theirs, "pi-01", str(home))
    Path(path).parent.mkdir(parents=True)
    Path(path).write_text(text)
    Path(mine.root).mkdir(parents=True)
    Path(mine.record).write_text('{"name": "pi-01", "version": "0.1.0"}')
    found = find_installed(_Shell(), mine, user)  # type: ignore[arg-type]
    assert (found.present, found.kinds, found.owner, found.version) == (
        True, (), "pi-01", "0.1.0"
    )  # fmt: skip
    Path(path).write_text(_service.service_file(SYSTEMD_USER, mine, "pi-01", str(home))[1])
    assert find_installed(_Shell(), mine, user).kinds == (SYSTEMD_USER,)  # type: ignore[arg-type]


def test_device_text_in_an_error_line_has_its_control_characters_escaped() -> None:
    said = CommandResult(1, "", "ok\n\x1b]0;pwned\x07\x1b[2Jerror: disk full\r\n")
    assert last(said) == "\\x1b]0;pwned\\x07\\x1b[2Jerror: disk full"


# -- config, facts, offline wheels -------------------------------------------------------------


def test_the_config_is_what_the_agent_reads(tmp_path: Path) -> None:
    spec = _spec(layout=Layout(str(tmp_path)))
    path = tmp_path / "agent.toml"
    path.write_text(agent_config(spec))
    settings = build_settings({}, {}, path)
    assert settings.name == "pi-01" and settings.listen == "0.0.0.0:7443"
    assert settings.labels == {"role": "edge", "site/room": "lab-2"}
    assert settings.data_dir == tmp_path / "data" and settings.announce
    assert settings.tls_cert == tmp_path / "tls/agent.crt"
    assert settings.tls_key == tmp_path / "data/agent.key"  # where --make-csr left it
    assert settings.tls_ca == tmp_path / "tls/ca.crt"
    assert settings.state_file == tmp_path / "agent.state.json"
    assert "[::]:7443" in agent_config(replace(spec, host="fd00::5"))


def test_a_label_with_quotes_stays_one_toml_string() -> None:
    text = agent_config(_spec(labels={'a"b': 'x"\n[evil]'}))
    assert tomllib.loads(text)["labels"] == {'a"b': 'x"\n[evil]'}


def _facts(**changes: object) -> DeviceFacts:
    facts = DeviceFacts(
        arch="aarch64", os="Debian 12", os_id="debian", os_version="12",
        os_pretty="Debian GNU/Linux 12 (bookworm)", python="/usr/bin/python3.11",
        python_version="3.11.2", python_venv=True, python_implementation="cpython",
        pip_platforms=("manylinux_2_36_aarch64", "linux_aarch64"),
        disk_free_bytes=12_300_000_000, disk_total_bytes=31_000_000_000,
        memory_total_bytes=4 * 10**9, memory_available_bytes=3 * 10**9, init_system="systemd",
        agent_version="",
    )  # fmt: skip
    return replace(facts, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "message"),
    [
        (_facts(python_version="3.9.2", python="/usr/bin/python3.9"),
         "pi-01: Python 3.9.2 at /usr/bin/python3.9 is too old; the agent needs Python 3.11 or "
         "later"),
        (_facts(python_venv=False),
         "pi-01: /usr/bin/python3.11 cannot create virtual environments (venv/ensurepip missing; "
         "on Debian and Raspberry Pi OS: apt-get install python3-venv)"),
        (_facts(python="", python_version=""),
         "pi-01: no python3 found; the agent needs Python 3.11 or later"),
        (_facts(disk_free_bytes=100_000_000),
         "pi-01: only 100 MB free for the agent; it needs 419 MB"),
    ],
)  # fmt: skip
def test_a_device_that_cannot_run_the_agent_is_refused_in_one_line(
    facts: DeviceFacts, message: str
) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_device("pi-01", facts.python_problem, facts.disk_free_bytes, True)
    assert str(caught.value) == message


def test_a_device_that_can_run_the_agent_passes() -> None:
    facts = _facts()
    assert facts.summary == "aarch64, Debian 12, Python 3.11.2, systemd, 12.3 GB free"
    check_device("pi-01", facts.python_problem, MIN_FREE_BYTES, True)
    check_device("pi-01", "", 0, False)  # a disk the facts could not measure


def test_offline_downloads_for_the_devices_platform_not_this_one() -> None:
    # a Raspberry Pi 4 with a 64-bit Debian 12: glibc 2.36, aarch64, Python 3.11
    facts = _facts(pip_platforms=pip_platforms("aarch64", 64, "glibc 2.36"))
    tags = list(facts.pip_platforms)
    assert tags[:2] == ["manylinux_2_36_aarch64", "manylinux_2_35_aarch64"]
    assert "manylinux2014_aarch64" in tags and tags[-1] == "linux_aarch64"
    argv = pip_download_argv(
        "/venv/bin/python", Path("/w/mle.whl"), Path("/p/.mle/wheels/x"), facts.python_version, tags
    )
    assert argv == [
        "/venv/bin/python", "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
        "--dest", "/p/.mle/wheels/x", "--only-binary=:all:",
        "--python-version", "3.11", "--implementation", "cp",
        "--abi", "cp311", "--abi", "abi3", "--abi", "none",
        *(word for tag in tags for word in ("--platform", tag)),
        "/w/mle.whl",
    ]  # fmt: skip
    with pytest.raises(InvalidInput):
        pip_download_argv("python", Path("w"), Path("d"), "3.11", [])


@pytest.mark.parametrize("version", ["..", ".", "", "latest", "v0.2.0", "0.2.0$(id)"])
def test_a_wheel_whose_version_is_not_pep_440_is_refused(tmp_path: Path, version: str) -> None:
    """The version names releases/<version> on the device, which the venv step rm -rf's."""
    wheel = tmp_path / f"mle_toolchain-{version}-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    with pytest.raises(InvalidInput) as refused:
        wheel_version(wheel)
    assert str(refused.value) == f"{wheel}: {version!r} is not a PEP 440 version (as in 0.4.1)"


def test_a_wheel_with_a_pep_440_version_gives_it(tmp_path: Path) -> None:
    for version in ("0.2.0", "0.2.0rc1", "1.0.dev3+g1234abc"):
        wheel = tmp_path / f"mle_toolchain-{version}-py3-none-any.whl"
        wheel.write_bytes(b"PK")
        assert wheel_version(wheel) == version


# -- the scripts, run for real ------------------------------------------------------------------


def test_every_generated_script_is_valid_sh() -> None:
    layout = Layout("/opt/mle agent")  # a space: every path must be quoted
    scripts = [
        _service.supervisor_script(layout),
        *(_service.stop_command(k, layout) for k in _service.KINDS),
        *(_service.restart_command(k, layout) for k in _service.KINDS),
        *(_service.crash_command(k, layout) for k in _service.KINDS),
        *(_service.remove_command(k, layout, "/home/pi") for k in _service.KINDS),
    ]
    for script in scripts:
        done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)


def test_units_and_logs_per_service_kind() -> None:
    layout = Layout(ROOT, "pi-01")
    system = _service.service_file(SYSTEMD_SYSTEM, layout, "pi-01", "/home/pi")
    user = _service.service_file(SYSTEMD_USER, layout, "pi-01", "/home/pi")
    assert system[0] == "/etc/systemd/system/mle-agent-pi-01.service"
    assert "multi-user.target" in system[1]
    assert user[0] == "/home/pi/.config/systemd/user/mle-agent-pi-01.service"
    assert "WantedBy=default.target" in user[1]
    assert _service.logs_command(SYSTEMD_USER, layout, 50) == (
        "journalctl --user -u mle-agent-pi-01.service -n 50 --no-pager -o short-iso"
    )
    assert _service.logs_command(SUPERVISE, layout, 7) == f"tail -n 7 {ROOT}/agent.log"


FAKE_AGENTD = """#!/bin/sh
# a stand-in for mle-agentd: records its pid, then sleeps or exits as the test asks
echo $$ > "{root}/agentd.pid"
if [ -f "{root}/broken" ]; then echo "Traceback: broken on purpose" >&2; exit 3; fi
trap 'echo drained; exit 0' TERM
while :; do sleep 0.1; done
"""


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Layout]:
    """A layout whose `current` release holds a fake mle-agentd; every process killed after."""
    layout = Layout(str(tmp_path / "agent dir"))
    bin_dir = Path(layout.release("1.0")) / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mle-agentd").write_text(FAKE_AGENTD.format(root=layout.root))
    (bin_dir / "mle-agentd").chmod(0o755)
    Path(layout.current).symlink_to("releases/1.0")
    path, text, mode = _service.service_file(SUPERVISE, layout, "pi-01", str(tmp_path))
    Path(path).write_text(text)
    Path(path).chmod(mode)
    try:
        yield layout
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if any(layout.root in part for part in process.info["cmdline"] or ()):
                process.kill()


def _sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


def _wait_for(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_supervisor_starts_restarts_and_stops_the_agent(supervised: Layout) -> None:
    layout = supervised
    assert _sh(_service.restart_command(SUPERVISE, layout)).returncode == 0
    supervisor = int(Path(layout.pid_file).read_text())
    agent_pid = Path(layout.root) / "agentd.pid"
    first = int(_wait_for(agent_pid))
    assert _sh(_service.crash_command(SUPERVISE, layout)).stdout == ""
    os.kill(first, signal.SIGKILL)  # it dies: the supervisor starts another
    deadline = time.monotonic() + 20
    while int(_wait_for(agent_pid)) == first and time.monotonic() < deadline:
        time.sleep(0.05)
    second = int(agent_pid.read_text())
    assert second != first and _alive(second) and _alive(supervisor)
    assert _sh(_service.crash_command(SUPERVISE, layout)).stdout.strip() == "exited 137"
    assert _sh(_service.stop_command(SUPERVISE, layout)).returncode == 0
    assert not _alive(second) and not _alive(supervisor)
    assert not Path(layout.pid_file).exists()
    assert "drained" in Path(layout.log_file).read_text()  # SIGTERM reached the agent


def test_an_agent_that_dies_at_start_is_seen_as_crashed(supervised: Layout) -> None:
    layout = supervised
    Path(layout.root, "broken").touch()
    assert _sh(_service.restart_command(SUPERVISE, layout)).returncode == 0
    _wait_for(Path(layout.exit_file))
    assert _sh(_service.crash_command(SUPERVISE, layout)).stdout.strip() == "exited 3"
    assert "broken on purpose" in _sh(_service.logs_command(SUPERVISE, layout, 5)).stdout
    _sh(_service.stop_command(SUPERVISE, layout))
    assert not Path(layout.pid_file).exists()


def test_stop_leaves_alone_a_process_that_took_over_a_stale_pid(supervised: Layout) -> None:
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        Path(supervised.pid_file).write_text(f"{stranger.pid}\n")
        assert _sh(_service.stop_command(SUPERVISE, supervised)).returncode == 0
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_state_reader_reports_what_is_installed(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path / "mle"))
    agentd = Path(layout.agentd("0.1.0"))
    agentd.parent.mkdir(parents=True)
    agentd.write_text("#!/bin/sh\n")
    agentd.chmod(0o755)
    Path(layout.releases, "0.2.0").mkdir()  # a release whose venv never finished
    Path(layout.current).symlink_to("releases/0.1.0")
    Path(layout.wheels).mkdir()
    Path(layout.wheels, "a.whl").write_bytes(b"x" * 10)
    Path(layout.config).write_text("name = 'pi-01'\n")
    Path(layout.record).write_text('{"service": "supervise"}')
    command, script = state_command(sys.executable, layout, str(tmp_path / "no-unit"))
    done = subprocess.run(["sh", "-c", command], input=script, capture_output=True, check=True)
    state = parse_state(done.stdout.decode())
    assert state["current"] == "0.1.0" and state["releases"] == ["0.1.0", "0.2.0"]
    assert state["agentd"] == {"0.1.0": True, "0.2.0": False}
    assert state["wheels"] == {"a.whl": 10} and state["config"] == "name = 'pi-01'\n"
    assert state["unit"] is None and state["cert"] is None
    assert state["entries"] == 5  # releases, current, wheels, agent.toml, install.json
    assert json.loads(state["record"]) == {"service": "supervise"}
    with pytest.raises(InvalidInput):
        parse_state("Traceback (most recent call last):")


# -- certificates, targets, results ------------------------------------------------------------


def test_a_certificate_is_usable_only_from_this_ca_for_this_name_and_host(
    tmp_path: Path,
) -> None:
    settings = Settings(project_dir=tmp_path / "p")
    other = Settings(project_dir=tmp_path / "other")
    csr = agent_csr(tmp_path / "agent.key", "pi-01")
    ca = (ensure_ca(settings) / "ca.crt").read_bytes()
    cert = sign_agent_csr(settings, csr, "pi-01", ["192.168.1.50"])
    assert certificate_usable(cert, ca, "pi-01", "192.168.1.50")
    assert not certificate_usable(cert, ca, "pi-02", "192.168.1.50")
    assert not certificate_usable(cert, ca, "pi-01", "192.168.1.51")
    assert not certificate_usable(cert, ca, "pi-01", "pi-01.local")
    foreign = sign_agent_csr(other, csr, "pi-01", ["192.168.1.50"])
    assert not certificate_usable(foreign, ca, "pi-01", "192.168.1.50")
    assert not certificate_usable(b"garbage", ca, "pi-01", "192.168.1.50")


def test_the_install_dir_is_absolute_on_the_device(tmp_path: Path) -> None:
    assert install_dir("~/.mle-agent", "/home/pi") == "/home/pi/.mle-agent"
    assert install_dir("~/a/b/", "/root/") == "/root/a/b"
    assert install_dir("/opt/mle", "/home/pi") == "/opt/mle"
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "pi.yaml").write_text("name: pi-01\nagent: {port: 7450, dir: /opt/mle/}\n")
    [entry] = load_inventory(tmp_path)
    assert entry.agent_dir == "/opt/mle" and entry.port == 7450


def test_targets_are_picked_by_name_glob_or_labels(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "fleet.yaml").write_text(
        "- {name: pi-01, host: 10.0.0.1, labels: {role: edge}}\n"
        "- {name: pi-02, host: 10.0.0.2}\n"
        "- {name: srv-01, host: 10.0.0.9, labels: {role: edge}}\n"
        "- {name: pi-09}\n"
    )
    settings = Settings(project_dir=tmp_path)
    names = lambda text: [e.name for e in select_hosts(settings, text)]  # noqa: E731
    assert names("pi-*") == ["pi-01", "pi-02"]  # pi-09 has no host
    assert names("role=edge") == ["pi-01", "srv-01"]
    assert names("pi-* role=edge") == ["pi-01"]
    with pytest.raises(NotFound, match=r"target 'pi-09' \(targets/fleet.yaml:4\) has no host"):
        select_hosts(settings, "pi-09")
    with pytest.raises(NotFound, match=r"no inventory target matches 'gpu-\*'.*pi-01, pi-02"):
        select_hosts(settings, "gpu-*")


def test_one_failure_is_the_command_s_error_and_many_are_counted() -> None:
    refused = PermissionDenied("pi-02 (10.0.0.2:22): unknown host key SHA256:abc")
    results = [HostResult("pi-01", "installed", "mle 0.1.0"), HostResult("pi-02", "failed",
               str(refused), refused)]  # fmt: skip
    assert failure(results[:1]) is None
    assert failure(results) is refused
    third = HostResult("pi-03", "failed", "x", FailedPrecondition("x"))
    many = failure([*results, third])
    assert many is not None and str(many) == "2 of 3 targets failed: pi-02, pi-03"
    assert many.exit_code == 1
    same = failure([*results, HostResult("pi-04", "failed", "y", PermissionDenied("y"))])
    assert same is not None and same.exit_code == PermissionDenied.exit_code


def test_an_unexpected_error_on_one_host_fails_that_host_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug met on one device is that device's one-line failure (its traceback in the debug
    log); the other devices go on, and every one gets a result for the summary."""
    from mle_cli.targets.install import InstallOptions, _on_hosts
    from mle_cli.targets.inventory import InventoryEntry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hosts = [InventoryEntry("pi-01", "10.0.0.1"), InventoryEntry("pi-02", "10.0.0.2")]

    def action(job: Any) -> tuple[str, str]:
        if job.name == "pi-01":
            raise KeyError("a bug")
        return "installed", "mle 0.2.0 \x1b[2J"

    settings = Settings(project_dir=tmp_path)
    results = _on_hosts(settings, hosts, InstallOptions(parallel=2), lambda n, t: None, action)
    log = tmp_path / "cache" / "mle" / "debug.log"
    assert [(r.target, r.outcome) for r in results] == [("pi-01", "failed"), ("pi-02", "installed")]
    assert results[0].detail == f"pi-01: internal error: KeyError; details in {log}"
    assert results[1].detail == "mle 0.2.0 \\x1b[2J"  # the device's text, escaped
    assert "KeyError: 'a bug'" in log.read_text()

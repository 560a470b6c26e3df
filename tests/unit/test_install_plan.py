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

import psutil
import pytest

from mle_agent.identity import agent_csr
from mle_agent.settings import build_settings
from mle_cli.settings import Settings
from mle_cli.targets import _service
from mle_cli.targets._device import certificate_usable, install_dir
from mle_cli.targets._install_plan import (
    MIN_FREE_BYTES,
    DeviceState,
    InstallSpec,
    LocalWheel,
    agent_config,
    check_device,
    parse_state,
    plan_install,
    plan_rollback,
    plan_uninstall,
    state_command,
)
from mle_cli.targets._service import SUPERVISE, SYSTEMD_SYSTEM, SYSTEMD_USER, Layout
from mle_cli.targets._wheels import pip_download_argv
from mle_cli.targets.facts import DeviceFacts, pip_platforms
from mle_cli.targets.install import HostResult, failure, select_hosts
from mle_cli.targets.inventory import load_inventory
from mle_cli.targets.pki import ensure_ca, sign_agent_csr
from mle_proto.errors import FailedPrecondition, InvalidInput, NotFound, PermissionDenied

ROOT = "/home/pi/.mle-agent"
WHEEL = LocalWheel(Path("/w/mle_toolchain-0.2.0-py3-none-any.whl"), 300_000)
GRPC = LocalWheel(Path("/w/grpcio-1.85.1-cp311-cp311-manylinux_2_17_aarch64.whl"), 6_000_000)


def _spec(**changes: object) -> InstallSpec:
    spec = InstallSpec(
        name="pi-01",
        host="192.168.1.50",
        port=7443,
        labels={"role": "edge", "site/room": "lab 2"},
        layout=Layout(ROOT),
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
        "upload", "venv", "config", "identity", "service", "switch", "start",
    ]  # fmt: skip
    assert plan.previous == ""
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
    assert ops[-1].remote == "/etc/systemd/system/mle-agent.service"
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


# -- config, facts, offline wheels -------------------------------------------------------------


def test_the_config_is_what_the_agent_reads(tmp_path: Path) -> None:
    spec = _spec(layout=Layout(str(tmp_path)))
    path = tmp_path / "agent.toml"
    path.write_text(agent_config(spec))
    settings = build_settings({}, {}, path)
    assert settings.name == "pi-01" and settings.listen == "0.0.0.0:7443"
    assert settings.labels == {"role": "edge", "site/room": "lab 2"}
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
    layout = Layout(ROOT)
    system = _service.service_file(SYSTEMD_SYSTEM, layout, "pi-01", "/home/pi")
    user = _service.service_file(SYSTEMD_USER, layout, "pi-01", "/home/pi")
    assert system[0] == "/etc/systemd/system/mle-agent.service" and "multi-user.target" in system[1]
    assert user[0] == "/home/pi/.config/systemd/user/mle-agent.service"
    assert "WantedBy=default.target" in user[1]
    assert _service.logs_command(SYSTEMD_USER, layout, 50) == (
        "journalctl --user -u mle-agent.service -n 50 --no-pager -o short-iso"
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

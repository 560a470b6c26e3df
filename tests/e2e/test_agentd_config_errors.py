"""`mle-agentd` refuses bad paths, numbers and addresses with one line, never a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from mle_agent.settings import MAX_MESSAGE_BYTES, MAX_SLOTS
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import Client, Daemon, daemon, leak_check, subprocess_env

pytestmark = pytest.mark.e2e
LISTEN = ("--listen", "127.0.0.1:0")
NOT_HERE = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this host


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the daemon to completion with extra MLE_AGENT_* variables; empty config file."""
    config = tmp_path / "empty.toml"
    config.touch()
    return subprocess.run(
        [sys.executable, "-m", "mle_agent", "--config", str(config), *args],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def _refused(done: subprocess.CompletedProcess[str], message: str) -> None:
    """Exactly `mle-agentd: error: <message>` on stderr, nothing on stdout, non-zero exit."""
    assert done.returncode != 0
    assert done.stderr == f"mle-agentd: error: {message}\n"
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data-dir", "f"], "data dir f is not a directory"),
        (["--data-dir", "f/sub"], "cannot create data dir f/sub: Not a directory"),
        (["--data-dir", "d", "--artifacts-dir", "f"], "artifacts dir f is not a directory"),
        (
            ["--data-dir", "d", "--artifacts-dir", "f/store"],
            "cannot create artifacts dir f/store: Not a directory",
        ),
        (
            ["--data-dir", "/proc/nope"],
            "cannot create data dir /proc/nope: No such file or directory",
        ),
    ],
)
def test_a_data_or_artifacts_dir_that_cannot_be_made_is_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "f").write_text("x\n")
    _refused(_run(tmp_path, *LISTEN, *args), message)
    assert (tmp_path / "f").read_text() == "x\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_a_data_dir_that_is_not_writable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir(mode=0o555)
    done = _run(tmp_path, *LISTEN, "--data-dir", "theirs")
    _refused(done, "cannot write to data dir theirs: permission denied")


def test_an_empty_data_dir_is_one_line(tmp_path: Path) -> None:
    done = _run(tmp_path, *LISTEN, MLE_AGENT_DATA_DIR="")
    _refused(done, "invalid data_dir: must not be empty")


def test_other_empty_paths_stay_unset(tmp_path: Path) -> None:
    env = {"MLE_AGENT_ARTIFACTS_DIR": "", "MLE_AGENT_TOKEN_FILE": ""}
    with _daemon_with_env(tmp_path, **env) as agentd:
        state = agentd.wait_ready()
        client = Client(state["address"])  # no token file: none needed
        try:
            assert client.health_status() == health_pb2.HealthCheckResponse.SERVING
        finally:
            client.close()
    assert (agentd.data_dir / "artifacts" / "sha256").is_dir()  # the default store root


_FINITE = "expected a finite number of seconds, got"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("slots = inf\n", {}, "invalid slots: expected a whole number, got inf"),
        ("slots = -inf\n", {}, "invalid slots: expected a whole number, got -inf"),
        ("max_log_line = inf\n", {}, "invalid max_log_line: expected a whole number, got inf"),
        (
            "max_message_bytes = nan\n",
            {},
            "invalid max_message_bytes: expected a whole number, got nan",
        ),
        ("kill_grace = inf\n", {}, f"invalid kill_grace: {_FINITE} inf"),
        (
            f"kill_grace = 1{'0' * 400}\n",
            {},
            "invalid kill_grace: int too large to convert to float",
        ),
        ("output_grace = inf\n", {}, f"invalid output_grace: {_FINITE} inf"),
        ("load_check_timeout = inf\n", {}, f"invalid load_check_timeout: {_FINITE} inf"),
        ("", {"MLE_AGENT_LOAD_WAIT": "inf"}, f"invalid load_wait: {_FINITE} 'inf'"),
        (
            "",
            {"MLE_AGENT_SHUTDOWN_GRACE": "Infinity"},
            f"invalid shutdown_grace: {_FINITE} 'Infinity'",
        ),
        (
            "",
            {"MLE_AGENT_HEARTBEAT_INTERVAL": "inf"},
            f"invalid heartbeat_interval: {_FINITE} 'inf'",
        ),
    ],
)
def test_infinite_numbers_are_one_line(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    done = _run(tmp_path, *LISTEN, "--data-dir", "d", "--config", str(config), **env)
    _refused(done, message)


def test_an_infinite_drain_timeout_waits_for_tasks_and_still_stops(tmp_path: Path) -> None:
    with daemon(tmp_path, *LISTEN, "--drain-timeout", "inf") as agentd:
        agentd.wait_ready()
        agentd.signal(signal.SIGTERM)
        assert agentd.wait() == 0
    assert "up to infs for running ones" in agentd.stderr()
    assert "Traceback" not in agentd.stderr()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MLE_AGENT_MAX_MESSAGE_BYTES": "100000000000000"},
            f"invalid max_message_bytes: must be between 65536 and {MAX_MESSAGE_BYTES}",
        ),
        (
            {"MLE_AGENT_MAX_MESSAGE_BYTES": str(2**31)},
            f"invalid max_message_bytes: must be between 65536 and {MAX_MESSAGE_BYTES}",
        ),
        ({"MLE_AGENT_SLOTS": str(MAX_SLOTS + 1)}, "invalid slots: must be at most 4096"),
        ({"MLE_AGENT_SLOTS": str(2**32)}, "invalid slots: must be at most 4096"),
    ],
)
def test_limits_beyond_what_grpc_and_the_protocol_carry_are_one_line(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    _refused(_run(tmp_path, *LISTEN, "--data-dir", "d", **env), message)


def test_the_largest_limits_allowed_are_served(tmp_path: Path) -> None:
    config = tmp_path / "limits.toml"
    config.write_text(f"slots = {MAX_SLOTS}\nmax_message_bytes = {MAX_MESSAGE_BYTES}\n")
    with daemon(tmp_path, *LISTEN, "--config", str(config)) as agentd:
        state = agentd.wait_ready()
        client = Client(state["address"])
        try:
            info = client.agent.GetInfo(pb.GetInfoRequest(), timeout=10)
        finally:
            client.close()
    assert info.slots == MAX_SLOTS


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--listen", f"{NOT_HERE}:7000", "--insecure"],
            f"cannot listen on {NOT_HERE}:7001 for HTTP: cannot assign requested address",
        ),
        (
            ["--listen", f"{NOT_HERE}:7000", "--insecure", "--http-listen", "off"],
            f"cannot listen on {NOT_HERE}:7000: cannot assign requested address",
        ),
        (
            ["--listen", f"{NOT_HERE}:0", "--insecure"],
            f"cannot listen on {NOT_HERE}:0 for HTTP: cannot assign requested address",
        ),
    ],
)
def test_an_address_not_on_this_host_is_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    _refused(_run(tmp_path, "--data-dir", "d", *args), message)


def test_a_taken_derived_http_port_still_falls_back_to_a_free_one(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with socket.socket() as probe:  # the port below must be free for gRPC
            probe.bind(("127.0.0.1", taken - 1))
        with daemon(tmp_path, "--listen", f"127.0.0.1:{taken - 1}") as agentd:
            state = agentd.wait_ready()
    assert state["http_port"] not in (0, taken)
    assert f"HTTP port {taken} is taken (address already in use); using a free port" in (
        agentd.stderr()
    )


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        ("garbage", "garbage"),
        ("127.0.0.1, eth0", "eth0"),
        ("all,127.0.0.1", "all"),
        ("ALL", "ALL"),
        ("10.0.0.256", "10.0.0.256"),
    ],
)
def test_announce_interfaces_that_are_not_ips_are_refused_before_listening(
    tmp_path: Path, value: str, entry: str
) -> None:
    done = _run(
        tmp_path, "--announce", *LISTEN, "--data-dir", "d", MLE_AGENT_ANNOUNCE_INTERFACES=value
    )
    _refused(
        done,
        f"invalid announce_interfaces: {entry!r} is not an IP address; "
        "give IPs, comma-separated, or all",
    )


def test_an_announce_address_not_on_this_host_is_a_warning_and_the_agent_serves_on(
    tmp_path: Path,
) -> None:
    args = ("--announce", "--announce-interfaces", f"127.0.0.1,{NOT_HERE}")
    with daemon(tmp_path, *LISTEN, *args) as agentd:
        state = agentd.wait_ready()
        _wait_for_line(agentd, "not announcing on mDNS")
        client = Client(state["address"])
        try:
            assert client.health_status() == health_pb2.HealthCheckResponse.SERVING
        finally:
            client.close()
        agentd.signal(signal.SIGTERM)
        assert agentd.wait() == 0
    expected = (
        f"WARNING mle_agent.announce: not announcing on mDNS: {NOT_HERE} (announce_interfaces) "
        "is not an address of this host"
    )
    assert expected in agentd.stderr()
    assert "Traceback" not in agentd.stderr()


def _wait_for_line(agentd: Daemon, text: str) -> None:
    """Poll the daemon's stderr until it says `text` (the test's own timeout bounds this)."""
    assert agentd.process is not None
    while text not in agentd.stderr():
        assert agentd.process.poll() is None, agentd.stderr()
        time.sleep(0.02)


@contextlib.contextmanager
def _daemon_with_env(tmp_path: Path, **env: str) -> Iterator[Daemon]:
    """A started daemon with extra MLE_AGENT_* variables, stopped on exit even on failure."""
    agentd = Daemon(tmp_path, *LISTEN)
    with agentd.stderr_path.open("wb") as err:
        agentd.process = subprocess.Popen(
            agentd.argv, env=subprocess_env(**env), stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        yield agentd
    finally:
        agentd.stop()

"""`python -m mle_agent` (mle-agentd) as a subprocess, started and stopped as a user would."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from mle_agent.tasks import DRAIN_MESSAGE, READOPTED_MESSAGE
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import (
    Client,
    daemon,
    kill_task_processes,
    leak_check,
    pid_dead,
    run_daemon,
    subprocess_env,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
TOKEN = "e2e-token-0123456789"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _wait_for_file(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def _lines(events: list[pb.TaskEvent]) -> list[str]:
    return [e.log.text for e in events if e.HasField("log")]


def test_daemon_starts_writes_its_state_file_and_requires_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with daemon(tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token_file)) as agentd:
        state = agentd.wait_ready()
        assert set(state) == {
            "pid", "address", "port", "http_port", "name", "boot_id", "version", "proto"
        }  # fmt: skip
        assert state["address"] == f"127.0.0.1:{state['port']}" and state["proto"] == "v1"
        assert stat.S_IMODE(agentd.state_file.stat().st_mode) == 0o600
        assert TOKEN not in agentd.state_file.read_text()
        client = Client(state["address"], TOKEN)
        try:
            info = client.agent.GetInfo(pb.GetInfoRequest(), metadata=client.metadata, timeout=10)
            assert (info.boot_id, info.name) == (state["boot_id"], state["name"])
            with pytest.raises(grpc.RpcError) as refused:
                client.agent.GetInfo(pb.GetInfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            assert client.health_status() == health_pb2.HealthCheckResponse.SERVING
        finally:
            client.close()
        assert f"listening on {state['address']}" in agentd.stderr()
        agentd.signal(signal.SIGTERM)
        assert agentd.wait() == 0
    assert TOKEN not in agentd.stderr()
    assert not agentd.state_file.exists()


def test_a_task_outlives_the_client_that_started_it(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = f"echo started; while [ ! -e {gate} ]; do sleep 0.02; done; echo finished"
    with daemon(tmp_path, "--listen", "127.0.0.1:0") as agentd:
        address = agentd.wait_ready()["address"]
        first = Client(address)
        first.start("r.detach.1", script)
        stream = first.agent.WatchTask(pb.WatchTaskRequest(task_id="r.detach.1"), timeout=60)
        seen = [next(stream) for _ in range(4)]  # PENDING, STAGING, RUNNING, "started"
        assert seen[-1].log.text == "started"
        first.close()  # the client goes away mid-task
        gate.touch()
        second = Client(address)
        try:
            events = second.events("r.detach.1")
        finally:
            second.close()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert _lines(events) == ["started", "finished"]
    assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED


def test_sigterm_drains_a_running_task_then_exits_cleanly(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with daemon(tmp_path, "--listen", "127.0.0.1:0") as agentd:
        client = Client(agentd.wait_ready()["address"])
        try:
            client.start("r.drain.1", f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done")
            client.wait_running("r.drain.1")
            watch = client.agent.WatchTask(pb.WatchTaskRequest(task_id="r.drain.1"), timeout=60)
            agentd.signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while client.health_status() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as refused:
                client.start("r.late.1", "true")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
            assert refused.value.details() == "agent is draining"  # type: ignore[attr-defined]
            gate.touch()
            events = list(watch)
        finally:
            client.close()
        assert agentd.wait() == 0
    assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED
    assert _lines(events) == ["done"]
    assert not agentd.state_file.exists()


def test_drain_timeout_stops_tasks_and_a_restart_still_shows_them(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with daemon(tmp_path, "--listen", "127.0.0.1:0", "--drain-timeout", "0.3") as agentd:
        client = Client(agentd.wait_ready()["address"])
        try:
            client.start("r.slow.1", f"sleep 300 & echo $! > {pid_file}; wait")
            _wait_for_file(pid_file)
        finally:
            client.close()
        agentd.signal(signal.SIGTERM)
        assert agentd.wait() == 0
    assert pid_dead(int(pid_file.read_text()))
    with daemon(tmp_path, "--listen", "127.0.0.1:0") as again:
        client = Client(again.wait_ready()["address"])
        try:
            result = client.events("r.slow.1")[-1].result
        finally:
            client.close()
    assert (result.state, result.message) == (pb.TASK_STATE_FAILED, DRAIN_MESSAGE)


def test_an_agent_killed_mid_task_re_adopts_it_after_restart(tmp_path: Path) -> None:
    pid_file, escaped_file = tmp_path / "pid", tmp_path / "escaped"
    script = (
        f"echo before; sleep 300 & echo $! > {pid_file}; "
        f"setsid sh -c 'echo $$ > {escaped_file}; exec sleep 300' & wait"
    )
    try:
        with daemon(tmp_path, "--listen", "127.0.0.1:0") as agentd:
            client = Client(agentd.wait_ready()["address"])
            try:
                client.start("r.crash.1", script)
                _wait_for_file(pid_file)
                _wait_for_file(escaped_file)
                seen = client.events_until("r.crash.1", lambda seen: seen[-1].HasField("log"))
                assert seen[-1].log.text == "before"  # what was sent is committed
            finally:
                client.close()
            agentd.signal(signal.SIGKILL)
            agentd.wait()
        pids = [int(pid_file.read_text()), int(escaped_file.read_text())]
        assert not any(pid_dead(pid, timeout=0.2) for pid in pids)  # the task lives on
        with daemon(tmp_path, "--listen", "127.0.0.1:0", "--drain-timeout", "0.3") as again:
            client = Client(again.wait_ready()["address"])
            try:
                resumed = client.events_until(
                    "r.crash.1", lambda seen: seen[-1].HasField("state"), seen[-1].seq
                )
            finally:
                client.close()
            assert "r.crash.1 was RUNNING when the agent stopped" in again.stderr()
            again.signal(signal.SIGTERM)  # drains: the re-adopted tree is killed, escapee too
            assert again.wait() == 0
        assert (resumed[0].seq, resumed[0].state.message) == (
            seen[-1].seq + 1,
            READOPTED_MESSAGE,
        )
        assert all(pid_dead(pid) for pid in pids)
        with daemon(tmp_path, "--listen", "127.0.0.1:0") as third:
            client = Client(third.wait_ready()["address"])
            try:
                events = client.events("r.crash.1")
            finally:
                client.close()
        assert _lines(events) == ["before"]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert (events[-1].result.state, events[-1].result.message) == (
            pb.TASK_STATE_FAILED,
            DRAIN_MESSAGE,
        )
    finally:
        kill_task_processes(tmp_path)


def test_a_public_address_without_tls_is_refused_before_binding(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    done = run_daemon(tmp_path, "--listen", "0.0.0.0:0", "--data-dir", str(data_dir))
    assert done.returncode == 2
    assert done.stderr == (
        "mle-agentd: error: refusing to listen on 0.0.0.0:0 without TLS; "
        "give --tls-cert/--tls-key/--tls-ca, or --insecure to accept the risk\n"
    )
    assert done.stdout == ""
    assert not data_dir.exists()


def test_insecure_listens_publicly_and_says_so_loudly(tmp_path: Path) -> None:
    with daemon(tmp_path, "--listen", "0.0.0.0:0", "--insecure") as agentd:
        state = agentd.wait_ready()
        assert state["address"] == f"0.0.0.0:{state['port']}"
        client = Client(f"127.0.0.1:{state['port']}")
        try:
            assert client.health_status() == health_pb2.HealthCheckResponse.SERVING
        finally:
            client.close()
        warnings = [line for line in agentd.stderr().splitlines() if "WARNING" in line]
        assert any("INSECURE" in line and "without TLS" in line for line in warnings)


def test_a_busy_port_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_daemon(
            tmp_path, "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")
        )
    assert done.returncode != 0
    assert done.stderr == (
        f"mle-agentd: error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config", "missing.toml"],
            "mle-agentd: error: config file missing.toml does not exist",
        ),
        (["--slots", "0"], "mle-agentd: error: invalid slots: must be at least 1"),
        (
            ["--token-file", "no-such-token"],
            "mle-agentd: error: cannot read token file no-such-token: No such file or directory",
        ),
        (["--tls-cert", "c.pem"], "mle-agentd: error: mutual TLS needs all three"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    common = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    done = run_daemon(tmp_path, *common, *args)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(message)
    assert "Traceback" not in done.stderr


def test_an_unwritable_state_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory")
    common = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")]
    done = run_daemon(tmp_path, *common, "--state-file", "afile/state.json")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "mle-agentd: error: cannot write state file afile/state.json: File exists"
    )
    assert "Traceback" not in done.stderr


def test_a_bad_flag_prints_usage_and_exits_2(tmp_path: Path) -> None:
    done = run_daemon(tmp_path, "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: mle-agentd")
    assert "unrecognized arguments: --bogus" in done.stderr


def test_help_has_an_example(tmp_path: Path) -> None:
    done = run_daemon(tmp_path, "--help")
    assert done.returncode == 0
    assert "example: mle-agentd --name pi-01" in done.stdout


def test_the_agent_never_imports_operator_side_packages() -> None:
    modules = [
        "mle_agent",
        "mle_agent.daemon",
        "mle_agent.server",
        "mle_agent.servicers",
        "mle_agent.tasks",
        "mle_agent.runner",
        "mle_agent.outbox",
        "mle_agent.facts",
        "mle_agent.settings",
        "mle_agent.staging",
        "mle_agent.execution",
        "mle_agent.heartbeat",
        "mle_agent.logs",
    ]
    code = f"import sys, json; import {', '.join(modules)}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    forbidden = {"mle_cli", "typer", "rich", "paramiko", "sqlite_utils", "yaml", "jinja2"}
    assert loaded & forbidden == set()
    assert {"onnxruntime", "ai_edge_litert", "tflite_runtime"} & loaded == set()

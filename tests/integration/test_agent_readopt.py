"""Tasks outlive their agent: mle-agentd killed with SIGKILL and restarted on the same data dir.

Each test runs real daemons in subprocesses and talks to them over gRPC. A task's processes are
nobody's children once its agent is killed, so every test kills what is left under its tmp_path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mle_agent.tasks import (
    ENDED_MESSAGE,
    READOPTED_MESSAGE,
    REQUEUED_MESSAGE,
    RESTART_MESSAGE,
)
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import (
    Client,
    Daemon,
    daemon,
    digest_of,
    kill_task_processes,
    leak_check,
    lines,
    pid_dead,
)

pytestmark = pytest.mark.timeout(120)
LISTEN = ("--listen", "127.0.0.1:0", "--slots", "4")


@pytest.fixture(autouse=True)
def _no_leaks(tmp_path: Path) -> Iterator[None]:
    try:
        yield from leak_check()
    finally:
        kill_task_processes(tmp_path)


def test_a_task_lives_through_an_agent_sigkill_and_is_re_adopted(tmp_path: Path) -> None:
    down, up, printed = tmp_path / "down", tmp_path / "up", tmp_path / "printed"
    script = (
        'echo "pid $$"; for i in $(seq 1 50); do echo "out $i"; echo "err $i" >&2; done; '
        f"printf partial; {_wait(down)}; "
        f"echo ' line'; for i in $(seq 51 80); do echo \"out $i\"; done; touch {printed}; "
        f"{_wait(up)}; "
        'for i in $(seq 81 100); do echo "out $i"; done; echo "pid $$"; echo model > model.txt'
    )
    with daemon(tmp_path, *LISTEN) as first:
        with _client(first) as client:
            client.start("r.adopt.1", script, outputs=["model.txt"])
            before = client.events_until("r.adopt.1", _saw("out 50", "err 50"))
            first_boot = client.heartbeats(1)[0].boot_id
        _crash(first)
    down.touch()  # the task writes on while no agent runs
    _wait_until(printed.exists)
    with daemon(tmp_path, *LISTEN) as second, _client(second) as client:
        beat = client.heartbeats(1)[0]
        after = client.events_until("r.adopt.1", _saw("out 80"), before[-1].seq)
        up.touch()
        rest = client.events("r.adopt.1", after[-1].seq)
        full = client.events("r.adopt.1")
    assert beat.boot_id != first_boot
    assert (list(beat.task_ids), beat.running_tasks) == (["r.adopt.1"], 1)
    assert [e.SerializeToString() for e in before + after + rest] == [
        e.SerializeToString() for e in full
    ]
    assert [e.seq for e in full] == list(range(1, len(full) + 1))
    assert [e.state.message for e in full if e.HasField("state")].count(READOPTED_MESSAGE) == 1
    stdout = lines(full, pb.LOG_STREAM_STDOUT)
    assert stdout[1:-1] == [
        *(f"out {i}" for i in range(1, 51)),
        "partial line",  # begun before the crash, finished after it: one line, once
        *(f"out {i}" for i in range(51, 101)),
    ]
    assert stdout[0] == stdout[-1]  # the same process all along, never started twice
    assert lines(full, pb.LOG_STREAM_STDERR) == [f"err {i}" for i in range(1, 51)]
    result = full[-1].result
    assert (result.state, result.exit_code) == (pb.TASK_STATE_SUCCEEDED, 0)
    assert [(o.path, o.digest) for o in result.outputs] == [("model.txt", digest_of(b"model\n"))]


def test_tasks_that_end_while_the_agent_is_down_are_concluded_on_restart(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    tasks = {
        "r.ok.1": f"echo one; {_wait(gate)}; echo two; echo data > out.bin",
        "r.exit.1": f"{_wait(gate)}; echo bye >&2; exit 3",
        "r.signal.1": f"{_wait(gate)}; kill -TERM $$",
    }
    with daemon(tmp_path, *LISTEN) as first:
        with _client(first) as client:
            for task_id, script in tasks.items():
                client.start(task_id, script, outputs=["out.bin"] if "ok" in task_id else [])
            for task_id in tasks:
                client.wait_running(task_id)
        _crash(first)
    gate.touch()
    status_files = [first.data_dir / "tasks" / f"{task_id}.status" for task_id in tasks]
    _wait_until(lambda: all(path.exists() for path in status_files))
    with daemon(tmp_path, *LISTEN) as second, _client(second) as client:
        events = {task_id: client.events(task_id) for task_id in tasks}
    ok = events["r.ok.1"][-1].result
    assert (ok.state, ok.exit_code, ok.message) == (pb.TASK_STATE_SUCCEEDED, 0, "")
    assert [(o.path, o.digest) for o in ok.outputs] == [("out.bin", digest_of(b"data\n"))]
    assert lines(events["r.ok.1"]) == ["one", "two"]
    failed = events["r.exit.1"][-1].result
    assert (failed.state, failed.exit_code, failed.message) == (
        pb.TASK_STATE_FAILED,
        3,
        "exit code 3",
    )
    assert lines(events["r.exit.1"], pb.LOG_STREAM_STDERR) == ["bye"]
    killed = events["r.signal.1"][-1].result
    assert (killed.state, killed.exit_code, killed.message) == (
        pb.TASK_STATE_FAILED,
        -15,
        "killed by signal SIGTERM",
    )
    for task_id, task_events in events.items():
        assert [e.seq for e in task_events] == list(range(1, len(task_events) + 1))
        messages = [e.state.message for e in task_events if e.HasField("state")]
        assert messages[-1] == ENDED_MESSAGE
        assert not list((first.data_dir / "tasks").glob(f"{task_id}.*"))  # lines in the outbox


def test_a_task_killed_while_the_agent_is_down_fails_with_the_reason(tmp_path: Path) -> None:
    gate, pid_file, printed = tmp_path / "gate", tmp_path / "pid", tmp_path / "printed"
    script = (
        f"echo $$ > {pid_file}; echo started; {_wait(gate)}; echo while-down; "
        f"touch {printed}; sleep 300"
    )
    with daemon(tmp_path, *LISTEN) as first:
        with _client(first) as client:
            client.start("r.killed.1", script)
            client.events_until("r.killed.1", _saw("started"))
        _crash(first)
    gate.touch()
    _wait_until(printed.exists)
    pid = int(pid_file.read_text())
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the shim's whole group, as `kill -9 -PGID` does
    assert pid_dead(pid)
    with daemon(tmp_path, *LISTEN) as second, _client(second) as client:
        events = client.events("r.killed.1")
    assert lines(events) == ["started", "while-down"]  # what it wrote before dying is not lost
    assert [e.state.message for e in events if e.HasField("state")][-1] == ""  # not re-adopted
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    result = events[-1].result
    assert (result.state, result.message) == (pb.TASK_STATE_FAILED, RESTART_MESSAGE)
    assert "r.killed.1 was RUNNING when the agent stopped" in second.stderr()


def test_re_adopted_tasks_can_be_cancelled_and_time_out(tmp_path: Path) -> None:
    pids = {name: tmp_path / name for name in ("bg", "cancel", "late", "soon")}
    tasks = {
        "r.cancel.1": (f"sleep 300 & echo $! > {pids['bg']}; echo $$ > {pids['cancel']}; wait", 0),
        "r.late.1": (f"echo $$ > {pids['late']}; sleep 300", 1.5),  # times out while agent is down
        "r.soon.1": (f"echo $$ > {pids['soon']}; sleep 300", 6.0),  # after the restart
    }
    with daemon(tmp_path, *LISTEN) as first:
        with _client(first) as client:
            for task_id, (script, timeout) in tasks.items():
                client.start(task_id, script, timeout_seconds=timeout)
            _wait_until(lambda: all(path.exists() and path.read_text() for path in pids.values()))
        _crash(first)
    time.sleep(2.0)  # past r.late.1's deadline
    with daemon(tmp_path, *LISTEN) as second, _client(second) as client:
        late = client.events("r.late.1")[-1].result
        handle = client.cancel("r.cancel.1", "operator said so")
        cancelled = client.events("r.cancel.1")[-1].result
        soon = client.events("r.soon.1")[-1].result
    assert (late.state, late.message) == (pb.TASK_STATE_TIMED_OUT, "timed out after 1.5s")
    assert handle.state == pb.TASK_STATE_CANCELLED
    assert (cancelled.state, cancelled.message) == (
        pb.TASK_STATE_CANCELLED,
        "cancelled: operator said so",
    )
    assert cancelled.exit_code < 0
    assert (soon.state, soon.message) == (pb.TASK_STATE_TIMED_OUT, "timed out after 6s")
    assert soon.duration_seconds >= 5.9  # the original deadline, not a fresh one
    assert all(pid_dead(int(path.read_text())) for path in pids.values())


def test_waiting_tasks_are_queued_again_behind_re_adopted_ones(tmp_path: Path) -> None:
    gate, order = tmp_path / "gate", tmp_path / "order"
    with daemon(tmp_path, *LISTEN[:2], "--slots", "1") as first:
        with _client(first) as client:
            client.start("r.block.1", f"{_wait(gate)}; echo A >> {order}")
            client.wait_running("r.block.1")
            client.start("r.next.1", f"echo B >> {order}")
            statuses = client.agent.ListTasks(pb.ListTasksRequest(), timeout=10).tasks
            assert {t.task_id: t.state for t in statuses}["r.next.1"] == pb.TASK_STATE_PENDING
        _crash(first)
    with daemon(tmp_path, *LISTEN[:2], "--slots", "1") as second, _client(second) as client:
        client.events_until("r.next.1", lambda seen: seen[-1].state.message == REQUEUED_MESSAGE)
        assert not order.exists()  # the re-adopted task still holds the only slot
        gate.touch()
        events = client.events("r.next.1")
        assert client.events("r.block.1")[-1].result.state == pb.TASK_STATE_SUCCEEDED
    assert order.read_text() == "A\nB\n"
    states = [(e.state.state, e.state.message) for e in events if e.HasField("state")]
    assert states == [
        (pb.TASK_STATE_PENDING, ""),
        (pb.TASK_STATE_PENDING, REQUEUED_MESSAGE),
        (pb.TASK_STATE_STAGING, ""),
        (pb.TASK_STATE_RUNNING, ""),
    ]
    assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED


def _wait(path: Path) -> str:
    return f"while [ ! -e {path} ]; do sleep 0.02; done"


def _saw(*texts: str) -> Callable[[list[pb.TaskEvent]], bool]:
    return lambda seen: set(texts) <= set(lines(seen))


def _crash(agent: Daemon) -> None:
    agent.signal(signal.SIGKILL)
    agent.wait()


@contextlib.contextmanager
def _client(agent: Daemon) -> Iterator[Client]:
    client = Client(agent.wait_ready()["address"])
    try:
        yield client
    finally:
        client.close()


def _wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)

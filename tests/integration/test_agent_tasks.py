"""Tasks on a real in-process agent: start, watch, outputs, inputs, timeouts, cancel, restart."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from mle_agent.facts import RUNTIMES
from mle_agent.outbox import Outbox
from mle_agent.tasks import RESTART_MESSAGE, TaskManager
from mle_proto import PROTO_VERSION, __version__
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import (
    agent_settings,
    digest_of,
    leak_check,
    pid_dead,
    run,
    running_agent,
    wait_for_file,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def test_get_info_reports_the_agent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path, slots=3)) as agent:
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            assert info.name == "test-agent"
            assert (info.agent_version, info.proto_version) == (__version__, PROTO_VERSION)
            assert info.arch == platform.machine()
            assert info.os.startswith(platform.system())
            assert info.python == platform.python_version()
            assert info.cpus >= 1
            assert info.memory_bytes > 0
            assert info.disk_free_bytes > 0
            expected = [n for n in RUNTIMES if importlib.util.find_spec(n) is not None]
            assert list(info.runtimes) == expected
            assert dict(info.labels) == {"role": "test"}
            assert info.slots == 3
            assert uuid.UUID(info.boot_id)
            assert info.running_tasks == 0

    run(scenario())


def test_start_task_is_idempotent(tmp_path: Path) -> None:
    count = tmp_path / "count"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            shell = f"echo run >> {count}"
            first, second = await asyncio.gather(
                agent.start("r1.s.1", shell), agent.start("r1.s.1", shell)
            )
            assert sorted([first.created, second.created]) == [False, True]
            assert (await agent.result("r1.s.1")).state == pb.TASK_STATE_SUCCEEDED
            again = await agent.start("r1.s.1", shell)
            assert (again.created, again.state) == (False, pb.TASK_STATE_SUCCEEDED)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.start("r1.s.1", "echo something else")
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert info.value.details() == "task r1.s.1 already exists with a different spec"

    run(scenario())
    assert count.read_text() == "run\n"


def test_watch_replays_then_follows_live(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = f"echo one; echo two; while [ ! -e {gate} ]; do sleep 0.02; done; echo three"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.watch.1", script)
            request = pb.WatchTaskRequest(task_id="r.watch.1")
            seen: list[pb.TaskEvent] = []
            async for event in agent.agent.WatchTask(request):
                seen.append(event)
                if event.HasField("log") and event.log.text == "two":
                    gate.touch()  # the rest arrives live, on the same stream
            full = await agent.events("r.watch.1")
            assert [e.SerializeToString() for e in seen] == [e.SerializeToString() for e in full]
            assert [e.seq for e in full] == list(range(1, len(full) + 1))
            assert _lines(full) == ["one", "two", "three"]
            tail = await agent.events("r.watch.1", after_seq=4)
            assert [e.seq for e in tail] == list(range(5, len(full) + 1))
            assert await agent.events("r.watch.1", after_seq=len(full)) == []

    run(scenario())


def test_watchers_joining_at_any_point_see_no_gap_and_no_duplicate(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = (
        f"for i in $(seq 1 50); do echo line $i; done; "
        f"while [ ! -e {gate} ]; do sleep 0.02; done; "
        f"for i in $(seq 51 100); do echo line $i; done"
    )

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.join.1", script)
            await agent.wait_state("r.join.1", pb.TASK_STATE_RUNNING)
            watchers = [asyncio.create_task(agent.events("r.join.1", k)) for k in (0, 3, 20)]
            await asyncio.sleep(0.1)
            gate.touch()
            for after, watcher in zip((0, 3, 20), watchers, strict=True):
                events = await watcher
                assert events[0].seq == after + 1
                assert [e.seq for e in events] == list(range(after + 1, events[-1].seq + 1))
                assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED
            all_events = await agent.events("r.join.1")
            assert _lines(all_events) == [f"line {i}" for i in range(1, 101)]

    run(scenario())


def test_output_lines_keep_per_stream_order_without_seq_gaps(tmp_path: Path) -> None:
    long = "x" * (64 * 1024 + 10)
    script = (
        "for i in $(seq 1 300); do echo out $i; echo err $i >&2; done; "
        f"printf '%s\\n' {long}; printf 'caf\\303\\251 \\377 end'"
    )

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.lines.1", script)
            events = await agent.events("r.lines.1")
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            out = _lines(events, pb.LOG_STREAM_STDOUT)
            err = _lines(events, pb.LOG_STREAM_STDERR)
            assert out[:300] == [f"out {i}" for i in range(1, 301)]
            assert err == [f"err {i}" for i in range(1, 301)]
            assert out[300:302] == [long[: 64 * 1024], long[64 * 1024 :]]
            assert out[302:] == ["café \ufffd end"]  # invalid UTF-8 replaced, no newline needed

    run(scenario())


def test_nonzero_exit_fails_with_its_exit_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.fail.1", "echo partial > result.txt; exit 3")
            result = await agent.result("r.fail.1")
            assert (result.state, result.exit_code, result.message) == (
                pb.TASK_STATE_FAILED,
                3,
                "exit code 3",
            )
            kept = agent.settings.work_root / "r.fail.1" / "result.txt"
            assert kept.read_text() == "partial\n"  # kept for debugging

    run(scenario())


def test_timeout_kills_the_whole_tree(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            shell = f"sleep 300 & echo $! > {pid_file}; wait"
            await agent.start("r.timeout.1", shell, timeout_seconds=0.5)
            result = await agent.result("r.timeout.1")
            assert result.state == pb.TASK_STATE_TIMED_OUT
            assert result.exit_code == -15
            assert result.message == "timed out after 0.5s"

    run(scenario())
    assert pid_dead(int(pid_file.read_text()))


def test_timeout_also_kills_a_descendant_that_left_the_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    escape = f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' & wait"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.escape.1", escape, timeout_seconds=1)
            await wait_for_file(pid_file)
            assert (await agent.result("r.escape.1")).state == pb.TASK_STATE_TIMED_OUT

    run(scenario())
    assert pid_dead(int(pid_file.read_text()))


def test_timeout_kills_a_double_forked_process_by_its_environment(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    # The subshell exits at once: the setsid'd sleep is nobody's descendant when the timeout hits.
    shell = f"(setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' &); sleep 300"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.daemon.1", shell, timeout_seconds=1)
            await wait_for_file(pid_file)
            assert (await agent.result("r.daemon.1")).state == pb.TASK_STATE_TIMED_OUT

    run(scenario())
    assert pid_dead(int(pid_file.read_text()))


def test_background_processes_do_not_outlive_their_task(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.bg.1", f"sleep 300 & echo $! > {pid_file}; echo done")
            events = await agent.events("r.bg.1")
            assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED
            assert events[-1].result.exit_code == 0
            assert _lines(events) == ["done"]

    run(scenario())
    assert pid_dead(int(pid_file.read_text()))


def test_cancel_kills_the_tree_and_reports_cancelled(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.cancel.1", f"sleep 300 & echo $! > {pid_file}; wait")
            await wait_for_file(pid_file)
            request = pb.CancelTaskRequest(task_id="r.cancel.1", reason="operator said so")
            handle = await agent.agent.CancelTask(request)
            assert handle.state == pb.TASK_STATE_CANCELLED
            result = await agent.result("r.cancel.1")
            assert result.state == pb.TASK_STATE_CANCELLED
            assert result.message == "cancelled: operator said so"
            assert result.exit_code < 0
            again = await agent.agent.CancelTask(pb.CancelTaskRequest(task_id="r.cancel.1"))
            assert again.state == pb.TASK_STATE_CANCELLED

    run(scenario())
    assert pid_dead(int(pid_file.read_text()))


def test_cancelling_a_finished_or_pending_task(tmp_path: Path) -> None:
    gate, never = tmp_path / "gate", tmp_path / "never"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path, slots=1)) as agent:
            await agent.start("r.done.1", "true")
            assert (await agent.result("r.done.1")).state == pb.TASK_STATE_SUCCEEDED
            handle = await agent.agent.CancelTask(pb.CancelTaskRequest(task_id="r.done.1"))
            assert handle.state == pb.TASK_STATE_SUCCEEDED
            await agent.start("r.block.1", f"while [ ! -e {gate} ]; do sleep 0.02; done")
            await agent.wait_state("r.block.1", pb.TASK_STATE_RUNNING)
            await agent.start("r.pending.1", f"touch {never}")
            await agent.agent.CancelTask(pb.CancelTaskRequest(task_id="r.pending.1"))
            events = await agent.events("r.pending.1")
            assert [e.WhichOneof("body") for e in events] == ["state", "result"]
            assert events[-1].result.state == pb.TASK_STATE_CANCELLED
            gate.touch()
            assert (await agent.result("r.block.1")).state == pb.TASK_STATE_SUCCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.agent.CancelTask(pb.CancelTaskRequest(task_id="nope"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())
    assert not never.exists()


def test_outputs_are_hashed_into_the_store(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            shell = f"mkdir -p out && cp {source} out/model.bin && echo hi > note.txt"
            await agent.start("r.out.1", shell, outputs=["out/model.bin", "note.txt"])
            result = await agent.result("r.out.1")
            assert result.state == pb.TASK_STATE_SUCCEEDED, result.message
            assert [(o.path, o.digest, o.size) for o in result.outputs] == [
                ("out/model.bin", digest_of(payload), len(payload)),
                ("note.txt", digest_of(b"hi\n"), 3),
            ]
            chunks = await agent.get(digest_of(payload))
            assert b"".join(c.data for c in chunks) == payload
            assert not (agent.settings.work_root / "r.out.1").exists()  # removed after success

    run(scenario())


def test_a_missing_output_fails_the_task(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.miss.1", "echo nothing", outputs=["model.onnx"])
            result = await agent.result("r.miss.1")
            assert result.state == pb.TASK_STATE_FAILED
            assert result.message == "declared output 'model.onnx' was not produced"

    run(scenario())


@pytest.mark.parametrize(
    ("shell", "output", "message"),
    [
        (
            "ln -s /etc/passwd out.txt",
            "out.txt",
            "output 'out.txt' is a symlink, not a regular file",
        ),
        (
            "ln -s /etc sub",
            "sub/passwd",
            "output 'sub/passwd' goes through a symlink out of the work dir",
        ),
        ("mkfifo pipe", "pipe", "output 'pipe' is not a regular file"),
    ],
)
def test_hostile_outputs_are_refused_and_nothing_is_read(
    tmp_path: Path, shell: str, output: str, message: str
) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.evil.1", shell, outputs=[output])
            result = await agent.result("r.evil.1")
            assert (result.state, result.message) == (pb.TASK_STATE_FAILED, message)
            assert list(result.outputs) == []
            store = agent.settings.artifacts_root / "sha256"
            assert [p for p in store.rglob("*") if p.is_file()] == []

    run(scenario())


def test_inputs_are_copied_into_the_work_dir(tmp_path: Path) -> None:
    data = b"weights\n"

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            put = await agent.put(data)
            inputs = [pb.InputFile(path="in/w.txt", digest=put.digest)]
            shell = "test ! -L in/w.txt && cat in/w.txt && echo tampered >> in/w.txt"
            await agent.start("r.in.1", shell, inputs=inputs)
            events = await agent.events("r.in.1")
            assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED, events[-1].result.message
            assert _lines(events) == ["weights"]
            stored = agent.settings.artifacts_root / "sha256" / put.digest[7:9] / put.digest[7:]
            assert stored.read_bytes() == data  # the step changed its copy, not the store

    run(scenario())


def test_a_missing_input_is_a_failed_precondition(tmp_path: Path) -> None:
    absent = digest_of(b"not uploaded")

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            inputs = [pb.InputFile(path="x.bin", digest=absent)]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.start("r.noin.1", "true", inputs=inputs)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == f"input x.bin: artifact {absent} is not on this agent"
            assert (await agent.agent.ListTasks(pb.ListTasksRequest())).tasks == []

    run(scenario())


@pytest.mark.parametrize(
    ("spec", "details"),
    [
        (pb.TaskSpec(task_id="../x", shell="true"), "invalid task_id '../x'"),
        (pb.TaskSpec(task_id=""), "invalid task_id ''"),
        (pb.TaskSpec(task_id="a"), "task a: give exactly one of shell or argv"),
        (pb.TaskSpec(task_id="a", argv=pb.Argv()), "task a: argv is empty"),
        (pb.TaskSpec(task_id="a", shell="true", outputs=["../up"]), "task a: output path '../up'"),
        (pb.TaskSpec(task_id="a", shell="true", outputs=["/etc/x"]), "task a: output path"),
        (
            pb.TaskSpec(task_id="a", shell="true", inputs=[pb.InputFile(path="x", digest="md5:1")]),
            "task a: input x: not a sha256 digest",
        ),
        (pb.TaskSpec(task_id="a", shell="true", env={"A=B": "1"}), "task a: invalid environment"),
        (pb.TaskSpec(task_id="a", shell="true", timeout_seconds=-1), "task a: timeout_seconds"),
    ],
)
def test_invalid_specs_are_refused(tmp_path: Path, spec: pb.TaskSpec, details: str) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.agent.StartTask(spec)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith(details)

    run(scenario())


def test_a_program_that_cannot_start_fails_the_task(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.nx.1", argv=pb.Argv(args=["/nonexistent/prog", "x"]))
            result = await agent.result("r.nx.1")
            assert result.state == pb.TASK_STATE_FAILED
            assert result.message == "cannot start '/nonexistent/prog': No such file or directory"
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            assert info.name == "test-agent"  # still up

    run(scenario())


def test_task_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLE_AGENT_SECRET", "do-not-leak")
    argv = pb.Argv(
        args=[
            "/bin/sh",
            "-c",
            'echo "$MLE_TASK_ID|$MLE_WORK_DIR|$FOO|$MLE_AGENT_SECRET"; "$MLE_PYTHON" -c "print(1)"',
        ]
    )

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.env.1", argv=argv, env={"FOO": "bar baz"})
            events = await agent.events("r.env.1")
            work_dir = agent.settings.work_root / "r.env.1"
            assert _lines(events) == [f"r.env.1|{work_dir}|bar baz|", "1"]

    run(scenario())


def test_list_tasks_and_ack_prunes_acked_events(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("a.s.1", "echo 1; echo 2", run_id="a", step="s")
            await agent.start("b.s.1", "exit 4", run_id="b", step="s")
            full = await agent.events("a.s.1")
            await agent.result("b.s.1")
            listed = (await agent.agent.ListTasks(pb.ListTasksRequest(run_id="b"))).tasks
            assert [(t.task_id, t.step, t.state, t.exit_code) for t in listed] == [
                ("b.s.1", "s", pb.TASK_STATE_FAILED, 4)
            ]
            every = (await agent.agent.ListTasks(pb.ListTasksRequest())).tasks
            assert {t.task_id for t in every} == {"a.s.1", "b.s.1"}
            status = next(t for t in every if t.task_id == "a.s.1")
            assert status.last_seq == len(full) and status.finished >= status.created > 0
            ack = await agent.agent.Ack(pb.AckRequest(task_id="a.s.1", upto_seq=3))
            assert ack.acked_seq == 3
            assert [e.seq for e in await agent.events("a.s.1")] == [e.seq for e in full[3:]]
            lower = await agent.agent.Ack(pb.AckRequest(task_id="a.s.1", upto_seq=1))
            assert lower.acked_seq == 3  # monotonic
            everything = await agent.agent.Ack(pb.AckRequest(task_id="a.s.1", upto_seq=10**6))
            assert everything.acked_seq == len(full)
            remaining = await agent.events("a.s.1")
            assert [e.seq for e in remaining] == [len(full)]  # the result is always kept
            assert remaining[0].result.state == pb.TASK_STATE_SUCCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.agent.Ack(pb.AckRequest(task_id="zz", upto_seq=1))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())


def test_run_task_starts_and_streams_in_one_call_and_is_idempotent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            spec = pb.TaskSpec(task_id="r.one.1", shell="echo hi")
            first = [e async for e in agent.agent.RunTask(spec, metadata=agent.metadata)]
            assert [e.seq for e in first] == list(range(1, len(first) + 1))
            assert first[0].state.state == pb.TASK_STATE_PENDING
            assert first[-1].result.state == pb.TASK_STATE_SUCCEEDED
            assert [e.log.text for e in first if e.HasField("log")] == ["hi"]
            again = [e async for e in agent.agent.RunTask(spec, metadata=agent.metadata)]
            assert again == first  # the same task, replayed: no second process
            other = pb.TaskSpec(task_id="r.one.1", shell="echo else")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [e async for e in agent.agent.RunTask(other, metadata=agent.metadata)]
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

    run(scenario())


def test_one_ack_call_covers_several_tasks_and_skips_unknown_ones(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            ids = ["r.a.1", "r.b.1", "r.c.1"]
            for task_id in ids:
                await agent.start(task_id, "echo 1; echo 2", run_id="r", step=task_id[2])
            full = {task_id: await agent.events(task_id) for task_id in ids}
            more = [pb.TaskAck(task_id=t, upto_seq=len(full[t])) for t in ids[1:]]
            more.append(pb.TaskAck(task_id="pruned-or-elsewhere", upto_seq=1))
            request = pb.AckRequest(task_id=ids[0], upto_seq=2, more=more)
            assert (await agent.agent.Ack(request)).acked_seq == 2
            assert [e.seq for e in await agent.events(ids[0])] == [e.seq for e in full[ids[0]][2:]]
            for task_id in ids[1:]:  # only the result is left
                assert [e.seq for e in await agent.events(task_id)] == [len(full[task_id])]
            unknown_first = pb.AckRequest(task_id="zz", upto_seq=1, more=more[:1])
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.agent.Ack(unknown_first)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())


def test_watching_an_unknown_task_is_not_found(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.events("no.such.task")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == "task no.such.task is not on this agent"

    run(scenario())


def test_restart_fails_tasks_left_unfinished(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    stale = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        outbox = Outbox(settings.outbox_path)
        spec = pb.TaskSpec(task_id="r.lost.1", run_id="r", step="lost", shell="sleep 300")
        first = pb.TaskEvent(task_id="r.lost.1", seq=1, time=1.0, state=pb.StateChange(state=1))
        outbox.insert_task(spec, 1.0, first)
        running = pb.TaskEvent(task_id="r.lost.1", seq=2, time=2.0, state=pb.StateChange(state=3))
        outbox.append("r.lost.1", [running], state=pb.TASK_STATE_RUNNING)
        outbox.set_process("r.lost.1", stale.pid, psutil.Process(stale.pid).create_time())
        outbox.close()

        async def scenario() -> None:
            async with running_agent(settings) as agent:
                events = await agent.events("r.lost.1")
                assert [e.seq for e in events] == [1, 2, 3]
                assert events[-1].result.state == pb.TASK_STATE_FAILED
                assert events[-1].result.message == RESTART_MESSAGE
                again = await agent.start("r.lost.1", "sleep 300", run_id="r", step="lost")
                assert (again.created, again.state) == (False, pb.TASK_STATE_FAILED)

        run(scenario())
        assert stale.wait(10) == -9  # its process group was killed
    finally:
        stale.kill()
        stale.wait()


def test_a_hundred_tasks_with_a_watcher_each(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path, slots=8)) as agent:
            ids = [f"r.many.{i}" for i in range(100)]
            await asyncio.gather(*(agent.start(i, 'echo "$MLE_TASK_ID"') for i in ids))
            results = await asyncio.gather(*(agent.events(i) for i in ids))
            for task_id, events in zip(ids, results, strict=True):
                assert _lines(events) == [task_id]
                assert events[-1].result.state == pb.TASK_STATE_SUCCEEDED
                assert [e.seq for e in events] == list(range(1, len(events) + 1))

    run(scenario(), timeout=80)


def test_drain_lets_tasks_finish_then_stops_the_rest(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario() -> None:
        settings = agent_settings(tmp_path, drain_timeout=0.5)
        async with running_agent(settings) as agent:
            await agent.start("r.short.1", f"while [ ! -e {gate} ]; do sleep 0.02; done")
            await agent.start("r.long.1", "sleep 300")
            await agent.wait_state("r.long.1", pb.TASK_STATE_RUNNING)
            await agent.wait_state("r.short.1", pb.TASK_STATE_RUNNING)
            drain = asyncio.create_task(agent.manager.drain(settings.drain_timeout))
            await asyncio.sleep(0)
            gate.touch()
            assert await agent.health_status() == 2  # NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.start("r.late.1", "true")
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert info.value.details() == "agent is draining"
            await drain
            assert (await agent.result("r.short.1")).state == pb.TASK_STATE_SUCCEEDED
            long = await agent.result("r.long.1")
            assert (long.state, long.message) == (
                pb.TASK_STATE_FAILED,
                "agent shut down before the task finished",
            )

    run(scenario())


def test_an_unexpected_error_is_internal_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: TaskManager, run_id: str = "") -> list[pb.TaskStatus]:
        raise RuntimeError("boom in list_tasks")

    monkeypatch.setattr(TaskManager, "list_tasks", broken)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await agent.agent.ListTasks(pb.ListTasksRequest())
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "internal error: see agent log"
            assert (await agent.agent.GetInfo(pb.GetInfoRequest())).name == "test-agent"

    run(scenario())
    assert "boom in list_tasks" in caplog.text  # the traceback is in the log, not on the wire


def _lines(events: list[pb.TaskEvent], stream: int | None = None) -> list[str]:
    return [
        e.log.text
        for e in events
        if e.HasField("log") and (stream is None or e.log.stream == stream)
    ]

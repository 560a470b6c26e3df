"""Helpers for the agent's integration and e2e tests: in-process agents and daemon subprocesses.

pytest-asyncio is not a dependency, so each test runs its scenario with `run(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mle_agent.server import create_server
from mle_agent.settings import AgentSettings
from mle_agent.tasks import TaskManager
from mle_proto import AUTH_METADATA_KEY
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = [REPO / "cli", REPO / "protos", REPO / "agent"]
FINAL = {
    pb.TASK_STATE_SUCCEEDED,
    pb.TASK_STATE_FAILED,
    pb.TASK_STATE_CANCELLED,
    pb.TASK_STATE_TIMED_OUT,
    pb.TASK_STATE_LOST,
}


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run one async scenario with a hard deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def digest_of(data: bytes) -> str:
    """The store digest of some bytes."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def agent_settings(tmp_path: Path, **overrides: Any) -> AgentSettings:
    """Settings for an in-process agent on 127.0.0.1:0 with short timings."""
    base = AgentSettings(
        name="test-agent",
        labels={"role": "test"},
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        slots=4,
        drain_timeout=5.0,
        kill_grace=0.5,
        output_grace=0.5,
        shutdown_grace=0.2,
    )
    return replace(base, **overrides)


@dataclass
class Agent:
    """An in-process agent and a client channel to it."""

    settings: AgentSettings
    manager: TaskManager
    server: grpc.aio.Server
    port: int
    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    agent: Any = field(init=False)
    artifacts: Any = field(init=False)
    health: Any = field(init=False)

    def __post_init__(self) -> None:
        self.agent = pb_grpc.AgentStub(self.channel)
        self.artifacts = pb_grpc.ArtifactsStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def start(self, task_id: str, shell: str = "", **spec: Any) -> pb.TaskHandle:
        """StartTask with a shell command (or argv=pb.Argv(...) in spec)."""
        if shell:
            spec["shell"] = shell
        request = pb.TaskSpec(task_id=task_id, **spec)
        return await self.agent.StartTask(request, metadata=self.metadata)

    async def events(self, task_id: str, after_seq: int = 0) -> list[pb.TaskEvent]:
        """Watch a task to its end; every event."""
        request = pb.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
        return [e async for e in self.agent.WatchTask(request, metadata=self.metadata)]

    async def result(self, task_id: str) -> pb.TaskResult:
        """Watch a task to its end; its result."""
        events = await self.events(task_id)
        assert events[-1].HasField("result"), events[-1]
        return events[-1].result

    async def wait_state(self, task_id: str, state: int) -> None:
        """Watch until the task reports state (or fail if it ends first)."""
        request = pb.WatchTaskRequest(task_id=task_id)
        async for event in self.agent.WatchTask(request, metadata=self.metadata):
            if event.HasField("state") and event.state.state == state:
                return
        raise AssertionError(f"task {task_id} ended before reaching state {state}")

    async def put(self, data: bytes, chunk: int = 1024 * 1024) -> pb.PutResponse:
        """Upload bytes in chunks."""
        return await self.artifacts.Put(put_chunks(data, chunk), metadata=self.metadata)

    async def get(self, digest: str, offset: int = 0) -> list[pb.GetChunk]:
        """Download an artifact's chunks."""
        request = pb.GetRequest(digest=digest, offset=offset)
        return [c async for c in self.artifacts.Get(request, metadata=self.metadata)]

    async def health_status(self, service: str = "") -> int:
        """grpc.health.v1 Check."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health.Check(request, metadata=self.metadata)
        return int(response.status)


def put_chunks(data: bytes, chunk: int, digest: str | None = None) -> Iterator[pb.PutChunk]:
    """A Put stream: header, then data chunks."""
    header = pb.PutHeader(digest=digest or digest_of(data), size=len(data))
    yield pb.PutChunk(header=header)
    for start in range(0, len(data), chunk):
        yield pb.PutChunk(data=data[start : start + chunk])


@contextlib.asynccontextmanager
async def running_agent(settings: AgentSettings, token: str | None = None) -> AsyncIterator[Agent]:
    """Start an agent in this event loop; drain, stop and close it afterwards, even on failure."""
    if token is not None:
        token_file = settings.data_dir.parent / "token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        token_file.chmod(0o600)
        settings = replace(settings, token_file=token_file)
    manager = TaskManager.open(settings)
    server: grpc.aio.Server | None = None
    try:
        server, port = await create_server(settings, manager)
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()
            yield Agent(settings, manager, server, port, channel, metadata)
    finally:
        await manager.drain(0)
        if server is not None:
            await server.stop(None)
        manager.close()


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    """Poll until a file exists and is non-empty; return its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text()
            if text.strip():
                return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def pid_dead(pid: int, timeout: float = 10.0) -> bool:
    """Whether a pid is gone (or a zombie) within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def leak_check() -> Iterator[None]:
    """Fail a test that leaves a child process or a Python thread behind; clean them up."""
    threads_before = set(threading.enumerate())
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5.0
    children: list[psutil.Process] = []
    while time.monotonic() < deadline:
        children = [c for c in me.children(recursive=True) if _alive(c)]
        extra = [t for t in threading.enumerate() if t not in threads_before and _ours(t)]
        if not children and not extra:
            return
        time.sleep(0.05)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()
    raise AssertionError(f"left behind: processes {children}, threads {extra}")


def _ours(thread: threading.Thread) -> bool:
    # grpc.aio starts one process-wide poller thread on first use and keeps it: not a leak.
    return thread.is_alive() and "_poll_wrapper" not in thread.name


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_task_processes(root: Path) -> list[int]:
    """SIGKILL every task process whose work dir is under root; return their pids.

    Tasks outlive an agent killed with SIGKILL (that is the point), and they are then nobody's
    children here: a test that kills an agent cleans up with this, even when it fails.
    """
    killed = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("MLE_WORK_DIR", "").startswith(str(root)):
                process.kill()
                killed.append(process.pid)
    return killed


class Client:
    """A blocking client for one agent address (an agent in a subprocess)."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.channel = grpc.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.agent = pb_grpc.AgentStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def start(self, task_id: str, shell: str, **spec: Any) -> pb.TaskHandle:
        """StartTask."""
        request = pb.TaskSpec(task_id=task_id, shell=shell, **spec)
        return self.agent.StartTask(request, metadata=self.metadata, timeout=20)

    def events(self, task_id: str, after_seq: int = 0) -> list[pb.TaskEvent]:
        """Watch a task to its end."""
        request = pb.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
        return list(self.agent.WatchTask(request, metadata=self.metadata, timeout=60))

    def events_until(
        self, task_id: str, done: Callable[[list[pb.TaskEvent]], bool], after_seq: int = 0
    ) -> list[pb.TaskEvent]:
        """Watch a task until done(events seen so far) holds; those events."""
        request = pb.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
        stream = self.agent.WatchTask(request, metadata=self.metadata, timeout=60)
        seen: list[pb.TaskEvent] = []
        for event in stream:
            seen.append(event)
            if done(seen):
                stream.cancel()
                return seen
        raise AssertionError(f"{task_id} ended first: {seen[-1] if seen else None}")

    def wait_running(self, task_id: str) -> None:
        """Watch until RUNNING."""
        self.events_until(task_id, lambda seen: seen[-1].state.state == pb.TASK_STATE_RUNNING)

    def cancel(self, task_id: str, reason: str = "") -> pb.TaskHandle:
        """CancelTask."""
        request = pb.CancelTaskRequest(task_id=task_id, reason=reason)
        return self.agent.CancelTask(request, metadata=self.metadata, timeout=30)

    def heartbeats(self, count: int, interval: float = 0.0) -> list[pb.AgentHeartbeat]:
        """The first count heartbeats of a new Heartbeat stream."""
        request = pb.HeartbeatRequest(interval_seconds=interval)
        stream = self.agent.Heartbeat(request, metadata=self.metadata, timeout=60)
        beats = [next(stream) for _ in range(count)]
        stream.cancel()
        return beats

    def health_status(self) -> int:
        """grpc.health.v1 overall status."""
        request = health_pb2.HealthCheckRequest()
        return int(self.health.Check(request, metadata=self.metadata, timeout=10).status)


def lines(events: list[pb.TaskEvent], stream: int | None = None) -> list[str]:
    """The text of a task's log events, of one stream or both."""
    return [
        e.log.text
        for e in events
        if e.HasField("log") and (stream is None or e.log.stream == stream)
    ]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m mle_agent`: the source roots on PYTHONPATH, no MLE_AGENT_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLE_AGENT_")}
    paths = [str(p) for p in SOURCE_ROOTS]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


class Daemon:
    """`python -m mle_agent` as a subprocess, exactly as a user starts it."""

    def __init__(self, tmp_path: Path, *args: str, data_dir: Path | None = None) -> None:
        self.dir = tmp_path
        self.data_dir = data_dir or tmp_path / "data"
        self.state_file = tmp_path / "agent.json"
        self.stderr_path = tmp_path / f"agentd-{time.monotonic_ns()}.err"
        config = tmp_path / "empty.toml"
        config.touch()
        self.argv = [
            sys.executable,
            "-m",
            "mle_agent",
            "--config",
            str(config),
            "--data-dir",
            str(self.data_dir),
            "--state-file",
            str(self.state_file),
            "--kill-grace",
            "0.5",
            *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        """Spawn the daemon."""
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                self.argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the state file until it names this process; return its content."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited {self.process.returncode}: {self.stderr()}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                state: dict[str, Any] = json.loads(self.state_file.read_text())
                if state.get("pid") == self.process.pid:
                    return state
            time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        """What the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the daemon."""
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit; return its status."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit; never leaves the process behind."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@contextlib.contextmanager
def daemon(tmp_path: Path, *args: str, data_dir: Path | None = None) -> Iterator[Daemon]:
    """A started daemon, stopped on exit even when the test fails."""
    process = Daemon(tmp_path, *args, data_dir=data_dir).start()
    try:
        yield process
    finally:
        process.stop()


def run_daemon(
    tmp_path: Path, *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run the daemon to completion (for arguments it must refuse)."""
    return subprocess.run(
        [sys.executable, "-m", "mle_agent", *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        check=False,
    )

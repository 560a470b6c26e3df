"""Task processes: run in their own process group, output read line by line, killed as a tree."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from mle_agent.settings import ENV_PREFIX
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["LineSink", "TaskProcess", "kill_stale_task", "task_command", "task_environment"]

log = logging.getLogger(__name__)

LineSink = Callable[["pb.LogStream.ValueType", str], None]
_POLL = 0.05
_MARKS = ("MLE_TASK_ID", "MLE_WORK_DIR")  # set in every task's environment, see task_environment


def task_command(spec: pb.TaskSpec) -> list[str]:
    """The argv that runs a task: `sh -c <shell>` or its argv as given."""
    if spec.WhichOneof("command") == "shell":
        return ["/bin/sh", "-c", spec.shell]
    return list(spec.argv.args)


def task_environment(base: Mapping[str, str], spec: pb.TaskSpec, work_dir: Path) -> dict[str, str]:
    """The agent's environment minus its own settings, plus the spec's env and the task's ids."""
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.setdefault("PYTHONUNBUFFERED", "1")  # so Python steps stream their lines as they go
    env.update(spec.env)
    env["MLE_TASK_ID"] = spec.task_id
    env["MLE_WORK_DIR"] = str(work_dir)
    return env


def kill_stale_task(task_id: str, work_dir: Path, pid: int, started: float) -> int:
    """Kill what is left of a task an earlier agent ran; return how many processes were found.

    The recorded group leader is killed with its group only if it is that very process (same start
    time), never a process that reused the pid; descendants that left the group are found by the
    MLE_TASK_ID and MLE_WORK_DIR the agent put in their environment.
    """
    found = 0
    with contextlib.suppress(psutil.Error):
        if pid > 1 and abs(psutil.Process(pid).create_time() - started) < 0.01:
            _signal_group(pid, signal.SIGKILL)
            found += 1
    marked = _marked_processes({"MLE_TASK_ID": task_id, "MLE_WORK_DIR": str(work_dir)})
    _signal_each(marked, signal.SIGKILL)
    found += len(marked)
    if found:
        log.warning("task %s: killed processes left by an earlier agent", task_id)
    return found


class TaskProcess:
    """A running task: its process (a process group leader) and its two output pumps."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        pumps: Sequence[_LinePump],
        marks: Mapping[str, str],
    ) -> None:
        self._proc = proc
        self._pumps = pumps
        self._marks = marks
        self.pid = proc.pid
        self.started = _create_time(proc.pid)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        sink: LineSink,
        max_line: int,
    ) -> TaskProcess:
        """Start argv in a new session with piped output; raises OSError when it cannot start."""
        loop = asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                start_new_session=True,
            )
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        pumps = []
        for fd, stream in ((out_r, pb.LOG_STREAM_STDOUT), (err_r, pb.LOG_STREAM_STDERR)):
            pumps.append(await _attach(loop, fd, _LinePump(loop, stream, sink, max_line)))
        marks = {k: env[k] for k in _MARKS if k in env}
        return cls(proc, pumps, marks)

    @property
    def returncode(self) -> int | None:
        """Exit status (negative signal number when killed), None while running."""
        return self._proc.returncode

    async def wait(self, timeout: float | None = None) -> int:
        """Wait for the main process to exit; raises TimeoutError."""
        return await asyncio.wait_for(self._proc.wait(), timeout)

    async def kill_tree(self, grace: float) -> None:
        """SIGTERM the group and every descendant, then SIGKILL whatever is left after grace."""
        escaped = self._escaped()
        _signal_group(self.pid, signal.SIGTERM)
        _signal_each(escaped, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._tree_gone(escaped):
            await asyncio.sleep(_POLL)
        _signal_group(self.pid, signal.SIGKILL)
        _signal_each(escaped, signal.SIGKILL)
        await self._proc.wait()

    async def close(self, kill_grace: float, output_grace: float) -> None:
        """Make sure nothing of the task is left: the tree killed, its output read, pipes closed."""
        if self.returncode is None or _group_alive(self.pid):
            if self.returncode is not None:  # leftovers may still be printing: give them a moment
                await self._pumps_closed(output_grace)
            await self.kill_tree(kill_grace)
        if not await self._pumps_closed(output_grace):
            for pump in self._pumps:
                pump.close()  # an escaped process still holds the pipe

    async def _pumps_closed(self, timeout: float) -> bool:
        waiters = [pump.closed for pump in self._pumps]
        _, pending = await asyncio.wait(waiters, timeout=timeout)
        return not pending

    def _escaped(self) -> list[psutil.Process]:
        """Descendants (even outside the group), and marked processes that left the family too."""
        found = _descendants(self.pid) if self.returncode is None else []
        if len(self._marks) == len(_MARKS):
            pids = {p.pid for p in found}
            found += [p for p in _marked_processes(self._marks) if p.pid not in pids]
        return found

    def _tree_gone(self, escaped: Sequence[psutil.Process]) -> bool:
        return self.returncode is not None and not any(_alive(p) for p in escaped)


class _LinePump(asyncio.Protocol):
    """Splits one pipe's bytes into lines (long lines cut at max_line) for a sink."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stream: pb.LogStream.ValueType,
        sink: LineSink,
        max_line: int,
    ) -> None:
        self._stream = stream
        self._sink = sink
        self._max = max_line
        self._buffer = bytearray()
        self._transport: asyncio.BaseTransport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport so it can be closed by force."""
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        """Emit every complete line."""
        self._buffer += data
        while self._buffer:
            newline = self._buffer.find(b"\n", 0, self._max + 1)
            if newline >= 0:
                self._emit(newline, newline + 1)
            elif len(self._buffer) > self._max:  # data[max] exists: _utf8_boundary may look at it
                cut = _utf8_boundary(self._buffer, self._max)
                self._emit(cut, cut)
            else:
                break

    def connection_lost(self, exc: Exception | None) -> None:
        """Emit the unterminated last line, if any."""
        if self._buffer:
            self._emit(len(self._buffer), len(self._buffer))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        """Stop reading."""
        if self._transport is not None:
            self._transport.close()

    def _emit(self, end: int, consumed: int) -> None:
        line = bytes(self._buffer[:end])
        del self._buffer[:consumed]
        self._sink(self._stream, line.decode("utf-8", errors="replace"))


async def _attach(loop: asyncio.AbstractEventLoop, fd: int, pump: _LinePump) -> _LinePump:
    await loop.connect_read_pipe(lambda: pump, os.fdopen(fd, "rb", buffering=0))
    return pump


def _utf8_boundary(data: bytearray, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 sequence (when it can)."""
    cut = limit
    while cut > limit - 4 and cut > 0 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


def _create_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _descendants(pid: int) -> list[psutil.Process]:
    """Every descendant, including ones that left the process group."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _marked_processes(marks: Mapping[str, str]) -> list[psutil.Process]:
    """Processes whose environment carries every mark (a task's id and work dir)."""
    me = os.getpid()
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            environ = process.environ()
            if process.pid != me and all(environ.get(k) == v for k, v in marks.items()):
                found.append(process)
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    if pgid <= 1:  # never signal init's or our own group by accident
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_each(processes: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)

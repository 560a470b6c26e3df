"""Task processes: started through the shim in their own session, waited on, killed as a tree.

Each task runs under `shim.sh` (plain POSIX sh, no Python start-up): the shim is the session and
process group leader, the command's stdout and stderr go to files in the task's dir (never to pipes
into the agent), and the shim writes the command's exit status to a file when it ends. So a task
outlives an agent crash, and a restarted agent can re-adopt it by pid and create time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from mle_agent.settings import ENV_PREFIX
from mle_proto.v1 import agent_pb2 as pb

__all__ = [
    "SHIM",
    "TaskFiles",
    "TaskProcess",
    "alive_as",
    "exit_code",
    "kill_stale_task",
    "task_command",
    "task_environment",
    "task_marks",
]

log = logging.getLogger(__name__)

SHIM = Path(__file__).with_name("shim.sh")
_SH = "/bin/sh"
_POLL = 0.05
_MARKS = ("MLE_TASK_ID", "MLE_WORK_DIR")  # set in every task's environment, see task_environment
_SAME_START = 0.01  # create times of one process, read twice, agree within this (clock ticks)


def task_command(spec: pb.TaskSpec) -> list[str]:
    """The argv that runs a task: `sh -c <shell>` or its argv as given."""
    if spec.WhichOneof("command") == "shell":
        return [_SH, "-c", spec.shell]
    return list(spec.argv.args)


def task_environment(base: Mapping[str, str], spec: pb.TaskSpec, work_dir: Path) -> dict[str, str]:
    """The agent's environment minus its own settings, plus the spec's env and the task's ids."""
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.setdefault("PYTHONUNBUFFERED", "1")  # so Python steps stream their lines as they go
    env.update(spec.env)
    env.update(task_marks(spec.task_id, work_dir))
    # The agent's own interpreter: built-in steps run its tools with it
    # (`"$MLE_PYTHON" -m mle_agent.tools...`), whatever `python3` is on the device's PATH.
    env["MLE_PYTHON"] = sys.executable
    return env


def task_marks(task_id: str, work_dir: Path) -> dict[str, str]:
    """The variables that mark every process of a task, even one that left its process group."""
    return {"MLE_TASK_ID": task_id, "MLE_WORK_DIR": str(work_dir)}


def exit_code(status: int) -> int:
    """A task's exit code from a shell's status: above 128 means killed by signal (-N)."""
    return -(status - 128) if status > 128 else status


def alive_as(pid: int, started: float) -> bool:
    """Whether pid is alive and is the process that started at `started` (not a reused pid)."""
    if pid <= 1:
        return False
    try:
        process = psutil.Process(pid)
        same = abs(process.create_time() - started) < _SAME_START
        return same and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_stale_task(task_id: str, work_dir: Path, pid: int, started: float) -> int:
    """Kill what is left of a task an earlier agent ran; return how many processes were found.

    The recorded group leader is killed with its group only if it is that very process (same start
    time), never a process that reused the pid; descendants that left the group are found by the
    MLE_TASK_ID and MLE_WORK_DIR the agent put in their environment.
    """
    found = 0
    if alive_as(pid, started):
        _signal_group(pid, started, signal.SIGKILL)
        found += 1
    marked = _marked_processes(task_marks(task_id, work_dir))
    _signal_each(marked, signal.SIGKILL)
    found += len(marked)
    if found:
        log.warning("task %s: killed processes left by an earlier agent", task_id)
    return found


@dataclass(frozen=True)
class TaskFiles:
    """A task's control files, side by side in one dir: its two logs and the shim's exit status.

    Flat files named after the task, no dir per task: creating an inode is the slow part of
    starting a task on some file systems, and these are created for every task.
    """

    dir: Path
    task_id: str

    SUFFIXES = (".out", ".err", ".status")

    @property
    def stdout(self) -> Path:
        """The command's standard output."""
        return self.dir / f"{self.task_id}.out"

    @property
    def stderr(self) -> Path:
        """The command's standard error."""
        return self.dir / f"{self.task_id}.err"

    @property
    def status(self) -> Path:
        """The command's exit status as the shell reports it; complete once the shim is gone."""
        return self.dir / f"{self.task_id}.status"

    def exist(self) -> bool:
        """Whether a shim was (or was about to be) started for the task."""
        return self.stdout.exists()

    def create(self) -> tuple[int, int]:
        """Fresh log files opened for writing, no status; return their descriptors."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.status.unlink(missing_ok=True)  # left by an earlier attempt to start the task
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(self.stdout, flags, 0o600)
        try:
            return out, os.open(self.stderr, flags, 0o600)
        except BaseException:
            os.close(out)
            raise

    def read_status(self) -> int | None:
        """The status the shim wrote, or None when it wrote none."""
        try:
            text = self.status.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def remove(self) -> None:
        """Delete the files."""
        for path in (self.stdout, self.stderr, self.status):
            path.unlink(missing_ok=True)


class TaskProcess:
    """A task's shim (its process group leader): a child of this agent, or one re-adopted."""

    def __init__(
        self,
        pid: int,
        started: float,
        files: TaskFiles,
        marks: Mapping[str, str],
        proc: asyncio.subprocess.Process | None = None,
    ) -> None:
        self.pid = pid
        self.started = started
        self._files = files
        self._marks = dict(marks)
        self._proc = proc  # None when adopted: not our child, its end is seen by polling
        self._done = proc is None and not alive_as(pid, started)
        self._signalled: signal.Signals | None = None  # the last signal sent to the tree
        self._code: int | None = self._exit_code() if self._done else None

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], files: TaskFiles
    ) -> TaskProcess:
        """Start argv under the shim in a new session; raises OSError when it cannot start."""
        _check_program(argv[0], cwd, env)
        out, err = files.create()
        try:
            proc = await asyncio.create_subprocess_exec(
                _SH,
                str(SHIM),
                str(files.status),
                *argv,
                cwd=cwd,
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        finally:
            os.close(out)
            os.close(err)
        marks = {k: env[k] for k in _MARKS if k in env}
        return cls(proc.pid, _create_time(proc.pid), files, marks, proc)

    @classmethod
    def adopt(
        cls, pid: int, started: float, files: TaskFiles, marks: Mapping[str, str]
    ) -> TaskProcess:
        """A shim an earlier agent started; it may have ended already."""
        return cls(pid, started, files, marks)

    @property
    def done(self) -> bool:
        """Whether the shim has ended."""
        return self._done

    @property
    def returncode(self) -> int | None:
        """Exit code (-N when killed by signal N); None while running, or when it is unknown."""
        return self._code

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the shim to end; raises TimeoutError."""
        if not self._done:
            await asyncio.wait_for(self._ended(), timeout)

    async def kill_tree(self, grace: float) -> None:
        """SIGTERM the group and every descendant, then SIGKILL whatever is left after grace."""
        escaped = self._escaped()
        self._signal(signal.SIGTERM, escaped)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._tree_gone(escaped):
            await asyncio.sleep(_POLL)
        if not self._tree_gone(escaped) or self._group_alive():
            self._signal(signal.SIGKILL, escaped)
        await self._ended()

    async def close(self, kill_grace: float, output_grace: float) -> None:
        """Make sure nothing of the task is left: once the shim is done, its whole tree too."""
        if self._done and self._group_alive():  # leftovers may still be busy: give them a moment
            deadline = time.monotonic() + output_grace
            while time.monotonic() < deadline and self._group_alive():
                await asyncio.sleep(_POLL)
        stray = self._proc is None and bool(self._escaped())  # an earlier agent's, unwatched
        if not self._done or self._group_alive() or stray:
            await self.kill_tree(kill_grace)

    async def _ended(self) -> None:
        if self._proc is not None:
            await self._proc.wait()
        else:
            while alive_as(self.pid, self.started):
                await asyncio.sleep(_POLL)
        if not self._done:
            self._done = True
            self._code = self._exit_code()

    def _exit_code(self) -> int | None:
        """From the status file; else how the shim itself ended (killed, so no status)."""
        status = self._files.read_status()
        if status is not None:
            return exit_code(status)
        shim = self._proc.returncode if self._proc is not None else None
        if shim is not None:
            return exit_code(shim) if shim >= 0 else shim
        return -self._signalled if self._signalled is not None else None

    def _leader_running(self) -> bool:
        if self._proc is not None:
            return self._proc.returncode is None
        return alive_as(self.pid, self.started)

    def _group_alive(self) -> bool:
        return _group_alive(self.pid, self.started)

    def _signal(self, sig: signal.Signals, escaped: Sequence[psutil.Process]) -> None:
        self._signalled = sig
        _signal_group(self.pid, self.started, sig)
        _signal_each(escaped, sig)

    def _escaped(self) -> list[psutil.Process]:
        """Descendants (even outside the group), and marked processes that left the family too."""
        found = _descendants(self.pid) if self._leader_running() else []
        if len(self._marks) == len(_MARKS):
            pids = {p.pid for p in found}
            found += [p for p in _marked_processes(self._marks) if p.pid not in pids]
        return found

    def _tree_gone(self, escaped: Sequence[psutil.Process]) -> bool:
        return not self._leader_running() and not any(_alive(p) for p in escaped)


def _check_program(program: str, cwd: Path, env: Mapping[str, str]) -> None:
    """Raise OSError as exec would when program cannot be found or run (the shim would say 127)."""
    if "/" in program:
        path = cwd / program
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if path.is_dir() or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


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


def _owns_group(pgid: int, started: float) -> bool:
    """Whether process group pgid is still the one the shim that started at `started` leads.

    While the leader lives it must be that very process. Once it is gone the group id stays taken
    as long as any member lives: no new process can get it, so a live group is still ours.
    """
    try:
        return abs(psutil.Process(pgid).create_time() - started) < _SAME_START
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _group_alive(pgid: int, started: float) -> bool:
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, 0)  # the cheap test first: most often the group is gone
    except (ProcessLookupError, PermissionError):
        return False
    return _owns_group(pgid, started)


def _signal_group(pgid: int, started: float, sig: signal.Signals) -> None:
    if pgid <= 1 or not _owns_group(pgid, started):  # never init's group, nor a stranger's
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_each(processes: Sequence[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)

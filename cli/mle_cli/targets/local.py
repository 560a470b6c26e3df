"""The embedded local agent: started on 127.0.0.1 with a random token, or reused when alive.

State lives in `.mle/agent/`: `token` (0600, the bearer token), `state.json` (written by the agent
once it listens: pid, address, version), `agent.log`, and a lock so two `mle` processes starting
at once end up sharing one agent.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint
from mle_proto import __version__
from mle_proto.errors import AgentUnavailable

__all__ = ["LOCAL", "ensure_local_agent", "local_agent_endpoint", "stop_local_agent"]

LOCAL = "local"


def ensure_local_agent(settings: Settings) -> Endpoint:
    """Return the live local agent's endpoint, starting one when none is alive."""
    agent_dir = _agent_dir(settings)
    with _locked(agent_dir / "lock"):
        state = _live_state(agent_dir)
        if state is not None and state.get("version") != __version__:
            _terminate(int(state["pid"]))  # an agent of another mle version: replace it
            state = None
        if state is not None:
            return _endpoint(agent_dir, state)
        return _start(settings, agent_dir)


def local_agent_endpoint(settings: Settings) -> Endpoint | None:
    """The endpoint of the live local agent, or None. Never starts or stops anything."""
    state = _live_state(settings.local_agent_dir)
    return None if state is None else _endpoint(settings.local_agent_dir, state)


def stop_local_agent(settings: Settings, timeout: float = 30.0) -> bool:
    """Stop the local agent (it drains first); return whether one was running."""
    state = _live_state(settings.local_agent_dir)
    if state is None:
        return False
    _terminate(int(state["pid"]), timeout)
    return True


def _live_state(agent_dir: Path) -> dict[str, Any] | None:
    """The state file of the agent serving agent_dir, if that very agent is alive.

    The pid must be an agent started with this data dir: a stale state file whose pid now
    belongs to another process (or another project's agent) is ignored.
    """
    state = _read_state(agent_dir)
    if state is None:
        return None
    try:
        cmdline = psutil.Process(int(state.get("pid", 0))).cmdline()
    except (psutil.Error, ValueError, TypeError):
        return None
    serves_us = any(
        flag == "--data-dir" and value == str(agent_dir)
        for flag, value in itertools.pairwise(cmdline)
    )
    return state if serves_us else None


def _endpoint(agent_dir: Path, state: dict[str, Any]) -> Endpoint:
    token = (agent_dir / "token").read_text().strip()
    return Endpoint(name=LOCAL, address=str(state["address"]), token=token)


def _agent_dir(settings: Settings) -> Path:
    agent_dir = settings.local_agent_dir
    try:
        agent_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AgentUnavailable(
            f"cannot prepare the local agent in {agent_dir}: {e.strerror or e}"
        ) from None
    return agent_dir


class _locked:
    """An exclusive flock on a file, for the duration of a with block."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _start(settings: Settings, agent_dir: Path) -> Endpoint:
    # A restarted agent keeps its token and, when it can, its port: runs that were following
    # the previous one reconnect to it and find their re-adopted tasks.
    token_file = agent_dir / "token"
    token = _read_token(token_file) or _new_token(token_file)
    config = agent_dir / "agent.toml"
    config.touch(exist_ok=True)  # the local agent's own config; /etc/mle/agent.toml is for devices
    port = _free_port((_read_state(agent_dir) or {}).get("port"))
    state_file = agent_dir / "state.json"
    state_file.unlink(missing_ok=True)
    argv = [
        sys.executable, "-m", "mle_agent",
        "--name", LOCAL,
        "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(agent_dir),
        "--artifacts-dir", str(settings.artifacts_dir),
        "--token-file", str(token_file),
        "--state-file", str(state_file),
        "--config", str(config),
    ]  # fmt: skip
    if settings.local_agent_slots:
        argv += ["--slots", str(settings.local_agent_slots)]
    log_path = agent_dir / "agent.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C in the operator's terminal must not reach it
            cwd=agent_dir,
        )
    return _wait_ready(proc, state_file, log_path, token, settings.agent_start_timeout)


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _new_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return token


def _free_port(previous: object) -> int:
    """The previous agent's port if nothing holds it now, else 0 (any port)."""
    if not isinstance(previous, int) or not 0 < previous < 65536:
        return 0
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", previous))
        except OSError:
            return 0
    return previous


def _wait_ready(
    proc: subprocess.Popen[bytes], state_file: Path, log_path: Path, token: str, timeout: float
) -> Endpoint:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _read_state(state_file.parent)
        if state is not None and state.get("pid") == proc.pid:
            return Endpoint(name=LOCAL, address=str(state["address"]), token=token)
        if proc.poll() is not None:
            raise AgentUnavailable(
                f"the local agent failed to start: {_last_line(log_path)} (log: {log_path})"
            )
        time.sleep(0.02)
    proc.terminate()
    raise AgentUnavailable(f"the local agent did not start within {timeout:.0f}s (log: {log_path})")


def _read_state(agent_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((agent_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _terminate(pid: int, timeout: float = 30.0) -> None:
    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"

"""Fixtures shared by every layer: an isolated project directory and a way to run `mle` in it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent


def console_script(name: str, module: str) -> list[str]:
    """The installed console script next to this Python, as a user runs it; else `python -m`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


MLE = console_script("mle", "mle_cli")


@dataclass
class Project:
    """A throwaway project: its directory and the environment `mle` runs with."""

    root: Path
    env: dict[str, str]
    spawned: list[subprocess.Popen[str]] = field(default_factory=list)

    def mle(
        self, *args: str, check: bool = False, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `mle ARGS` in the project and return the finished process."""
        proc = subprocess.run(
            [*MLE, *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"mle {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        """Start `mle ARGS` without waiting; `finish` collects it."""
        proc = subprocess.Popen(
            [*MLE, *args],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.spawned.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
        """Wait for a spawned `mle` and return (exit code, stdout, stderr)."""
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    @property
    def ledger(self) -> Path:
        return self.root / ".mle" / "ledger.db"

    def rows(self, sql: str, *args: object) -> list[dict[str, Any]]:
        """Query the project's ledger, as a user with sqlite3 would."""
        conn = sqlite3.connect(self.ledger)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def wait_until(self, sql: str, *args: object, timeout: float = 60) -> None:
        """Poll the ledger until the query returns a row (it may not exist yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.ledger.exists() and self.rows(sql, *args):
                    return
            except sqlite3.OperationalError:  # the ledger is being created
                pass
            time.sleep(0.02)
        raise AssertionError(f"never true within {timeout:g}s: {sql}")

    def local_agent_pid(self) -> int | None:
        """The pid in the local agent's state file, if any."""
        try:
            return int(json.loads((self.root / ".mle/agent/state.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    """A project with a copy of recipes/, its own HOME, and no agent left behind afterwards."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "recipes", root / "recipes")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "PYTEST_"))}
    env.update(
        HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config")
    )
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / d) for d in ("cli", "agent", "protos"))
    proj = Project(root, env)
    try:
        yield proj
    finally:
        for proc in proj.spawned:
            proc.kill()
            proc.communicate()
        _stop_agents_under(root)


def _stop_agents_under(root: Path) -> None:
    """Kill every agent whose data dir is inside root, and every process working inside root."""
    doomed = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = proc.info.get("cmdline") or []
        cwd = proc.info.get("cwd") or ""
        is_agent = "mle_agent" in cmdline and any(str(root) in part for part in cmdline)
        if is_agent or cwd.startswith(str(root)):
            doomed.append(proc)
    for proc in doomed:
        try:
            for child in proc.children(recursive=True):
                child.kill()
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(doomed, timeout=10)

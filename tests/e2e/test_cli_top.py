"""`mle top` against the real local agent (`mle agent start`), on a pipe and on a terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pexpect
import psutil
import pytest
from pexpect.fdpexpect import fdspawn

from tests.agent_helpers import leak_check
from tests.conftest import MLE, REPO, Project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
HEAVY = {"grpc", "zeroconf", "paramiko", "cryptography", "sqlite_utils"}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture
def local(project: Project) -> Iterator[Project]:
    """The project with short heartbeats, mDNS on loopback, and the local agent running."""
    project.env.update(
        MLE_HEARTBEAT_INTERVAL="0.2", MLE_MDNS_INTERFACES="127.0.0.1", MLE_MDNS_BROWSE_SECONDS="0.5"
    )
    started = project.mle("agent", "start", check=True).stdout
    project.env["TEST_LOCAL_ADDRESS"] = started.split()[-1]
    try:
        yield project
    finally:
        project.mle("agent", "stop")


def _by_agent(stdout: str) -> dict[str, dict[str, Any]]:
    return {row["agent"]: row for row in json.loads(stdout)}


def _recorded(project: Project) -> int:
    rows = project.rows("SELECT COUNT(*) AS n FROM agent_metrics WHERE agent = 'local'")
    return int(rows[0]["n"])


def test_once_json_reports_the_local_agents_machine(local: Project) -> None:
    asked = time.time()
    done = local.mle("top", "--once", "--json", check=True)
    row = _by_agent(done.stdout)["local"]
    assert (row["state"], row["source"], row["error"]) == ("up", "local", "")
    assert row["address"] == local.env["TEST_LOCAL_ADDRESS"]
    assert row["cpus"] == os.cpu_count() and row["slots"] >= 1 and row["running_tasks"] == 0
    assert row["memory_total"] == psutil.virtual_memory().total
    assert 0 < row["memory_used"] < row["memory_total"]
    assert 0.0 <= row["cpu_percent"] <= 100.0 and row["load1"] >= 0.0
    assert row["disk_free"] > 0 and row["boot_id"]
    assert row["temperature"] is None or 0 < row["temperature"] < 150
    assert asked <= row["last_beat"] <= time.time() and row["silent_for"] >= 0
    [stored] = local.rows(
        "SELECT * FROM agent_metrics WHERE agent = 'local' ORDER BY time DESC LIMIT 1"
    )
    assert (stored["memory_total"], stored["boot_id"]) == (row["memory_total"], row["boot_id"])
    assert stored["time"] == row["last_beat"]


def test_once_prints_a_table(local: Project) -> None:
    out = local.mle("top", "--once", check=True).stdout
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["AGENT", "STATE", "CPU%", "LOAD"] and "LAST BEAT" in header
    [line] = [r for r in rows if r.startswith("local ")]
    cells = line.split()
    assert cells[1] == "up" and cells[-1] == "ago" and "/" in cells[4]
    assert cells[6] == "-" or cells[6].endswith("°C")


def test_piped_top_refreshes_until_ctrl_c(local: Project) -> None:
    before = _recorded(local) if local.ledger.exists() else 0
    proc = local.spawn("top")
    assert proc.stdout is not None
    out = fdspawn(proc.stdout.fileno(), encoding="utf-8", timeout=30)
    for _ in range(3):  # three refreshes, each a table with the agent in it
        out.expect("AGENT +STATE")
        out.expect(r"\nlocal +up ")
    proc.send_signal(signal.SIGINT)
    out.expect(pexpect.EOF)
    code, _, err = local.finish(proc, timeout=30)
    assert code == 0, err
    assert _recorded(local) >= before + 3


def test_json_lines_until_ctrl_c(local: Project) -> None:
    proc = local.spawn("top", "--json")
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    second = json.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    code, _, err = local.finish(proc, timeout=30)
    assert code == 0, err
    assert {row["agent"] for row in first} >= {"local"} and isinstance(second, list)


def test_a_terminal_gets_a_live_table(local: Project) -> None:
    before = _recorded(local) if local.ledger.exists() else 0
    child = pexpect.spawn(
        MLE[0],
        [*MLE[1:], "top"],
        cwd=str(local.root),
        env={**local.env, "COLUMNS": "120", "TERM": "xterm"},
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 120),
    )
    child.logfile_read = screen = io.StringIO()
    try:
        child.expect("AGENT")
        for _ in range(3):
            child.expect(r"local +up ")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, screen.getvalue()
    assert "0/" in screen.getvalue() and " ago" in screen.getvalue()
    assert _recorded(local) > before


def test_without_a_running_agent_nothing_is_up(project: Project) -> None:
    done = project.mle("top", "--once", "--json", check=True)
    rows = _by_agent(done.stdout)
    assert rows.get("local", {}).get("state") != "up"


def test_help_has_an_example_and_imports_nothing_heavy() -> None:
    code = (
        "import json, sys\nsys.argv = ['mle', 'top', '--help']\nfrom mle_cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    *help_lines, modules = out.strip().splitlines()
    assert "Example: mle top" in "\n".join(help_lines)
    assert {m.split(".")[0] for m in json.loads(modules)} & HEAVY == set()

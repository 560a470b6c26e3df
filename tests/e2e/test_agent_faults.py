"""The local agent killed under a running `mle run`: restarted within the grace period, the run
carries on with the same attempt (re-adopted task); not back in time, the attempt is lost,
fenced, and the step retried. Asserted from the ledger."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import Project

STEP = (
    "name: steady\nsteps:\n  work:\n"
    "    run: >-\n"
    '      i=0; while [ $i -lt 30 ]; do echo "tick $i"; i=$((i+1)); sleep 0.1; done;\n'
    "      echo done > out.txt\n"
    "    outputs: [out.txt]\n"
    "    retries: {max: 1, backoff: 0s}\n"
)


def _kill_local_agent(project: Project) -> None:
    pid = project.local_agent_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def test_an_agent_restarted_within_the_grace_period_keeps_the_attempt(project: Project) -> None:
    (project.root / "steady.yaml").write_text(STEP)
    project.env.update(MLE_AGENT_GRACE="20", MLE_HEARTBEAT_INTERVAL="0.2")
    runner = project.spawn("run", "steady.yaml")
    project.wait_until("SELECT 1 FROM events WHERE kind = 'log' AND text = 'tick 3'")
    _kill_local_agent(project)
    project.mle("agent", "start", "--local", check=True)
    code, _, stderr = project.finish(runner)
    assert code == 0, stderr
    [attempt] = project.rows("SELECT * FROM attempts")
    assert attempt["status"] == "succeeded" and not attempt["fenced"]
    lines = [
        r["text"] for r in project.rows("SELECT text FROM events WHERE kind = 'log' ORDER BY seq")
    ]
    assert lines == [f"tick {i}" for i in range(30)]
    seqs = [r["seq"] for r in project.rows("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    states = [r["text"] for r in project.rows("SELECT text FROM events WHERE kind = 'state'")]
    assert any("re-adopted" in s for s in states), states


def test_an_agent_gone_past_the_grace_period_loses_the_attempt_and_the_step_retries(
    project: Project,
) -> None:
    (project.root / "steady.yaml").write_text(STEP)
    project.env.update(MLE_AGENT_GRACE="1.5", MLE_HEARTBEAT_INTERVAL="0.2")
    runner = project.spawn("run", "steady.yaml")
    project.wait_until("SELECT 1 FROM events WHERE kind = 'log' AND text = 'tick 3'")
    _kill_local_agent(project)
    code, _, stderr = project.finish(runner, timeout=120)
    assert code == 0, stderr
    first, second = project.rows("SELECT * FROM attempts ORDER BY attempt")
    assert first["status"] == "lost" and first["fenced"] == 1
    assert first["message"].startswith("agent local silent for 1.5s")
    assert second["status"] == "succeeded"
    [step] = project.rows("SELECT * FROM steps")
    assert step["status"] == "succeeded" and step["attempts"] == 2
    seqs = [
        r["seq"]
        for r in project.rows(
            "SELECT seq FROM events WHERE task_id = ? ORDER BY seq", second["task_id"]
        )
    ]
    assert seqs == list(range(1, len(seqs) + 1))
    assert "lost" in stderr and "retry" in stderr

"""Crash and resume: `mle run` killed at exact points, and while a task runs; `mle resume`
converges to the run an uninterrupted `mle run` gives, and the ledger shows it.

The side-effect log (one line per execution of a step, written by the step itself outside the
ledger) proves that no step ran twice: each step executes exactly once across crash and resume.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from mle_cli.faults import POINTS
from tests.conftest import Project

RECIPE = """\
name: crashy
params: {trail: trail.log}
steps:
  a:
    run: echo a >> {{ params.trail }}; echo alpha > a.txt
    outputs: [a.txt]
  b:
    needs: [a]
    run: >-
      echo b >> {{ params.trail }};
      i=0; while [ $i -lt 40 ]; do echo "b line $i"; i=$((i+1)); sleep 0.01; done;
      cat a.txt > b.txt
    outputs: [b.txt]
  c:
    needs: [a]
    run: echo c >> {{ params.trail }}; echo gamma > c.txt
    outputs: [c.txt]
  d:
    needs: [b, c]
    run: echo d >> {{ params.trail }}; cat b.txt c.txt > d.txt
    outputs: [d.txt]
"""


def _setup(project: Project) -> Path:
    """The recipe, and the trail file its steps append to (outside their work dirs)."""
    trail = project.root / "trail.log"
    (project.root / "r.yaml").write_text(RECIPE.replace("trail.log", str(trail)))
    return trail


def _run_id(project: Project) -> str:
    [row] = project.rows("SELECT id FROM runs")
    return str(row["id"])


def _assert_converged(project: Project, trail: Path) -> None:
    """The run succeeded, every step ran exactly once, every attempt's events have no gap."""
    [run] = project.rows("SELECT * FROM runs")
    assert run["status"] == "succeeded", run["message"]
    steps = {r["step_id"]: r["status"] for r in project.rows("SELECT * FROM steps")}
    assert steps == dict.fromkeys("abcd", "succeeded")
    executions = Counter(trail.read_text().split())
    assert executions == Counter("abcd"), executions
    for attempt in project.rows("SELECT * FROM attempts"):
        assert attempt["status"] == "succeeded"
        seqs = [
            r["seq"]
            for r in project.rows(
                "SELECT seq FROM events WHERE task_id = ? ORDER BY seq", attempt["task_id"]
            )
        ]
        assert seqs == list(range(1, len(seqs) + 1)), attempt["task_id"]
        kinds = project.rows(
            "SELECT kind FROM events WHERE task_id = ? ORDER BY seq DESC LIMIT 1",
            attempt["task_id"],
        )
        assert kinds[0]["kind"] == "result"
        assert attempt["last_seq"] == seqs[-1]
    logs = project.rows("SELECT text FROM events WHERE step_id = 'b' AND kind = 'log' ORDER BY seq")
    assert [r["text"] for r in logs] == [f"b line {i}" for i in range(40)]
    [check] = project.rows("PRAGMA integrity_check")
    assert check["integrity_check"] == "ok"
    d = project.rows("SELECT digest FROM artifacts WHERE step_id = 'd'")
    assert len(d) == 1


@pytest.mark.parametrize("point", POINTS)
def test_resume_after_the_cli_is_killed_at_each_point(project: Project, point: str) -> None:
    trail = _setup(project)
    project.env["MLE_FAULT"] = point
    killed = project.mle("run", "r.yaml")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    del project.env["MLE_FAULT"]
    run_id = _run_id(project)
    [run] = project.rows("SELECT status FROM runs")
    assert run["status"] in ("pending", "running")
    resumed = project.mle("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    _assert_converged(project, trail)


def test_resume_re_attaches_to_a_task_that_kept_running(project: Project) -> None:
    trail = _setup(project)
    runner = project.spawn("run", "r.yaml")
    project.wait_until("SELECT 1 FROM events WHERE step_id = 'b' AND kind = 'log'")
    runner.send_signal(signal.SIGKILL)
    project.finish(runner)
    resumed = project.mle("resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "re-attached" in resumed.stderr
    _assert_converged(project, trail)


def test_run_with_resume_continues_that_run_and_refuses_what_it_would_ignore(
    project: Project,
) -> None:
    trail = _setup(project)
    (project.root / "other.yaml").write_text("name: other\nsteps:\n  s: {run: 'true'}\n")
    project.env["MLE_FAULT"] = POINTS[0]
    assert project.mle("run", "r.yaml").returncode == -signal.SIGKILL
    del project.env["MLE_FAULT"]
    run_id = _run_id(project)

    params = project.mle("run", "r.yaml", "--resume", run_id, "-p", "trail=elsewhere.log")
    assert params.returncode == 2
    assert params.stderr.splitlines() == [
        "error: -p does not apply with --resume: a run resumes with its own params"
    ]
    other = project.mle("run", "other.yaml", "--resume", run_id)
    assert other.returncode == 2
    assert other.stderr.splitlines() == [
        f"error: run {run_id} was started from r.yaml, not other.yaml",
        f"hint: mle resume {run_id}",
    ]
    assert len(project.rows("SELECT id FROM runs")) == 1  # neither started anything

    resumed = project.mle("run", "r.yaml", "--resume", run_id[:15])
    assert resumed.returncode == 0, resumed.stderr
    _assert_converged(project, trail)


def test_resume_of_a_finished_run_runs_nothing_again(project: Project) -> None:
    trail = _setup(project)
    project.mle("run", "r.yaml", check=True)
    [before] = project.rows("SELECT started, finished FROM runs")
    last_step = max(r["finished"] for r in project.rows("SELECT finished FROM steps"))
    assert before["finished"] == last_step  # a run ends when its last step did
    again = project.mle("resume")
    assert again.returncode == 0, again.stderr
    _assert_converged(project, trail)
    [after] = project.rows("SELECT started, finished FROM runs")
    assert after == before  # its history is unchanged: it started and ended when it did


def test_only_one_process_drives_a_run(project: Project) -> None:
    (project.root / "slow.yaml").write_text("name: slow\nsteps:\n  s:\n    run: sleep 30\n")
    runner = project.spawn("run", "slow.yaml")
    project.wait_until("SELECT 1 FROM attempts")
    second = project.mle("resume")
    assert second.returncode == 8, second.stderr
    lines = second.stderr.strip().splitlines()
    assert lines[0].startswith("error: run ") and "is being driven by mle pid" in lines[0]
    os.kill(runner.pid, signal.SIGINT)
    project.finish(runner)


def test_a_ledger_killed_during_a_write_burst_is_intact_and_resumes(project: Project) -> None:
    recipe = (
        "name: burst\nsteps:\n  loud:\n"
        '    run: i=0; while [ $i -lt 20000 ]; do echo "line $i"; i=$((i+1)); done\n'
    )
    (project.root / "burst.yaml").write_text(recipe)
    runner = project.spawn("run", "burst.yaml")
    project.wait_until("SELECT 1 WHERE (SELECT count(*) FROM events) > 2000")
    runner.send_signal(signal.SIGKILL)
    project.finish(runner)
    [check] = project.rows("PRAGMA integrity_check")
    assert check["integrity_check"] == "ok"
    resumed = project.mle("resume")
    assert resumed.returncode == 0, resumed.stderr
    seqs = [r["seq"] for r in project.rows("SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    [lines] = project.rows("SELECT count(*) AS n FROM events WHERE kind = 'log'")
    assert lines["n"] == 20000

"""`mle run` on a real terminal (a pty): the live progress table and the Ctrl-C prompt."""

from __future__ import annotations

import io
import sqlite3

import pexpect
import pytest

from tests.conftest import MLE, Project

pytestmark = pytest.mark.e2e


def _spawn(project: Project, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        MLE[0],
        [*MLE[1:], *args],
        cwd=str(project.root),
        env={**project.env, "COLUMNS": "120", "TERM": "xterm"},
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 120),
    )
    return child


def _status(project: Project, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(project.ledger)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def test_a_terminal_gets_a_live_table_of_steps(project: Project) -> None:
    child = _spawn(project, "run", "recipes/hello.yaml")
    child.logfile_read = screen = io.StringIO()
    try:
        child.expect("STEP")  # the live table's header
        child.expect(r"4/4 steps succeeded")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    table_rows = [line for line in screen.getvalue().splitlines() if "succeeded" in line]
    for step in ("prepare", "count", "shout", "report"):
        assert any(row.lstrip().startswith(step) for row in table_rows), screen.getvalue()


def _interrupt_and_answer(project: Project, answer: str) -> pexpect.spawn:
    """Start a long run on a terminal, press Ctrl-C once it runs, answer the prompt."""
    (project.root / "long.yaml").write_text(
        "name: long\nsteps:\n  long:\n    run: echo going; sleep 300\n"
    )
    child = _spawn(project, "run", "long.yaml")
    try:
        child.expect("going|running")
        child.sendintr()
        child.expect(r"\[c\]ancel run .*\[d\]etach")
        child.sendline(answer)
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return child


def test_ctrl_c_on_a_terminal_asks_and_can_detach(project: Project) -> None:
    child = _interrupt_and_answer(project, "d")
    assert child.exitstatus == 0
    assert _status(project, "SELECT status FROM runs") == [("detached",)]
    assert _status(project, "SELECT status FROM attempts") == [("running",)]  # still running
    run_id = _status(project, "SELECT id FROM runs")[0][0]
    cancel = project.mle("cancel", str(run_id))
    assert cancel.returncode == 0, cancel.stderr
    assert _status(project, "SELECT status FROM runs") == [("cancelled",)]


def test_ctrl_c_on_a_terminal_can_cancel(project: Project) -> None:
    child = _interrupt_and_answer(project, "c")
    assert child.exitstatus == 10
    assert "was cancelled" in child.before
    assert _status(project, "SELECT status FROM attempts") == [("cancelled",)]


def test_an_approval_gate_asks_on_a_terminal_and_records_the_answer(project: Project) -> None:
    (project.root / "gate.yaml").write_text(
        "name: gated\nsteps:\n"
        "  build:\n    run: echo built > model.txt\n    outputs: [model.txt]\n"
        "  approve:\n    needs: [build]\n    uses: mle/approve\n"
        '    with: {message: "ship the model?"}\n'
        "  ship:\n    needs: [approve]\n    run: cat model.txt\n"
    )
    child = _spawn(project, "run", "gate.yaml")
    try:
        child.expect(r"waits at approve: ship the model\?")
        child.expect(r"Approve\? \[y\]es, \[n\]o")
        child.sendline("y")
        child.expect("Reason")
        child.sendline("looks good")
        child.expect(r"3/3 steps succeeded")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    [(decision, reason)] = _status(project, "SELECT decision, reason FROM approvals")
    assert (decision, reason) == ("approved", "looks good")

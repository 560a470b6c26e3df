"""Recipe power end to end through `mle run` and the local agent: matrix fan-out, metrics,
`mle/select`, `when:`, approval gates, and the step cache, each asserted from the ledger."""

from __future__ import annotations

import json
import signal

import pytest

from tests.conftest import Project

SWEEP = """\
name: sweep
params: {min_score: 5, auto: false}
files: [score.sh]
steps:
  prepare:
    run: echo 3 > base.txt
    outputs: [base.txt]
  train:
    needs: [prepare]
    matrix: {k: [1, 4, 2]}
    run: sh score.sh {{ matrix.k }}
    outputs: [model.txt]
    metrics: metrics.json
  pick:
    needs: [train]
    uses: mle/select
    with: {metric: score}
  gate:
    needs: [pick]
    when: steps.pick.metrics.score >= params.min_score
    uses: mle/approve
    with: {message: "ship it?", auto: "{{ params.auto }}"}
  ship:
    needs: [gate]
    run: cat model.txt > shipped.txt
    outputs: [shipped.txt]
"""

SCORE = """\
base=$(cat base.txt)
echo "model k=$1" > model.txt
echo "{\\"score\\": $((base + $1)), \\"k\\": $1}" > "$MLE_METRICS"
"""


def _steps(project: Project, run_id: str | None = None) -> dict[str, str]:
    if run_id is None:
        run_id = project.rows("SELECT id FROM runs ORDER BY created DESC LIMIT 1")[0]["id"]
    rows = project.rows("SELECT step_id, status FROM steps WHERE run_id = ?", run_id)
    return {r["step_id"]: r["status"] for r in rows}


def _write(project: Project, recipe: str = SWEEP) -> None:
    (project.root / "sweep.yaml").write_text(recipe)
    (project.root / "score.sh").write_text(SCORE)


def test_matrix_metrics_select_and_an_automatic_gate(project: Project) -> None:
    _write(project)
    proc = project.mle("run", "sweep.yaml", "-p", "auto=true")
    assert proc.returncode == 0, proc.stderr
    assert _steps(project) == {
        "prepare": "succeeded",
        "train[k=1]": "succeeded",
        "train[k=4]": "succeeded",
        "train[k=2]": "succeeded",
        "pick": "succeeded",
        "gate": "succeeded",
        "ship": "succeeded",
    }
    metrics = {
        (r["step_id"], r["name"]): r["value"]
        for r in project.rows("SELECT * FROM metrics WHERE value IS NOT NULL")
    }
    assert metrics[("train[k=4]", "score")] == 7.0
    assert metrics[("pick", "score")] == 7.0
    [picked] = project.rows("SELECT text FROM metrics WHERE step_id = 'pick' AND name = 'selected'")
    assert picked["text"] == '"train[k=4]"'
    [pick] = project.rows("SELECT message FROM steps WHERE step_id = 'pick'")
    assert pick["message"] == "picked train[k=4] (score=7)"
    shipped, chosen = (
        project.rows("SELECT digest FROM artifacts WHERE step_id = ? AND path = ?", s, p)[0]
        for s, p in (("pick", "model.txt"), ("train[k=4]", "model.txt"))
    )
    assert shipped == chosen
    [approval] = project.rows("SELECT * FROM approvals")
    assert (approval["step_id"], approval["decision"], approval["who"]) == (
        "gate",
        "approved",
        "auto",
    )


def test_a_false_when_skips_the_gate_and_its_dependants_and_the_run_succeeds(
    project: Project,
) -> None:
    _write(project)
    proc = project.mle("run", "sweep.yaml", "-p", "min_score=100")
    assert proc.returncode == 0, proc.stderr
    steps = _steps(project)
    assert steps["gate"] == "skipped" and steps["ship"] == "skipped"
    [gate] = project.rows("SELECT message FROM steps WHERE step_id = 'gate'")
    assert gate["message"] == "when: steps.pick.metrics.score >= params.min_score is false"
    [run] = project.rows("SELECT status FROM runs")
    assert run["status"] == "succeeded"


def test_a_run_waits_at_the_gate_until_approved_from_another_terminal(project: Project) -> None:
    _write(project)
    runner = project.spawn("run", "sweep.yaml")
    project.wait_until("SELECT 1 FROM steps WHERE step_id = 'gate' AND status = 'waiting'")
    run_id = project.rows("SELECT id FROM runs")[0]["id"]
    assert _steps(project)["ship"] == "pending"
    approved = project.mle("approve", run_id, "gate", "--reason", "scores look fine")
    assert approved.returncode == 0, approved.stderr
    assert "step gate of run" in approved.stdout and "approved by" in approved.stdout
    code, _, stderr = project.finish(runner)
    assert code == 0, stderr
    assert _steps(project)["ship"] == "succeeded"
    [approval] = project.rows("SELECT * FROM approvals")
    assert approval["decision"] == "approved" and approval["reason"] == "scores look fine"
    assert "@" in approval["who"]
    again = project.mle("approve", run_id, "gate")
    assert again.returncode == 8
    assert again.stderr.startswith(f"error: step gate of run {run_id} is already approved by")


def test_a_rejected_gate_fails_the_run_with_who_and_why(project: Project) -> None:
    _write(project)
    runner = project.spawn("run", "sweep.yaml")
    project.wait_until("SELECT 1 FROM steps WHERE step_id = 'gate' AND status = 'waiting'")
    run_id = project.rows("SELECT id FROM runs")[0]["id"]
    # The reason is recorded as given, and shown with its terminal escapes made visible.
    reason = "too slow\x1b]0;owned\x07\x1b[2J\nerror: forged"
    rejected = project.mle("approve", run_id, "gate", "--reject", "--reason", reason)
    assert rejected.returncode == 0, rejected.stderr
    code, _, stderr = project.finish(runner)
    assert code == 10
    assert f"error: run {run_id} failed: step gate failed on local: rejected by " in stderr
    shown = "too slow\\x1b]0;owned\\x07\\x1b[2J\\nerror: forged"
    assert stderr.rstrip().splitlines()[-2].endswith(f": {shown}")
    [gate] = project.rows("SELECT status, message FROM steps WHERE step_id = 'gate'")
    assert gate["status"] == "failed"
    assert gate["message"].startswith("rejected by ") and gate["message"].endswith(f": {reason}")
    assert _steps(project)["ship"] == "skipped"
    show = project.mle("show", run_id, check=True).stdout
    assert "\x1b" not in show and "owned" in show
    assert not any(
        line.startswith("error: forged") for line in stderr.splitlines() + show.splitlines()
    )


def test_a_gate_outlives_the_cli_approve_then_resume(project: Project) -> None:
    _write(project)
    runner = project.spawn("run", "sweep.yaml")
    project.wait_until("SELECT 1 FROM steps WHERE step_id = 'gate' AND status = 'waiting'")
    runner.send_signal(signal.SIGKILL)
    project.finish(runner)
    run_id = project.rows("SELECT id FROM runs")[0]["id"]
    project.mle("approve", run_id, "gate", check=True)
    resumed = project.mle("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert _steps(project)["ship"] == "succeeded"
    attempts = project.rows("SELECT step_id, count(*) AS n FROM attempts GROUP BY step_id")
    assert {r["step_id"]: r["n"] for r in attempts} == {
        "prepare": 1,
        "train[k=1]": 1,
        "train[k=4]": 1,
        "train[k=2]": 1,
        "ship": 1,
    }


def test_unknown_gate_and_not_a_gate_are_clear_errors(project: Project) -> None:
    _write(project)
    project.mle("run", "sweep.yaml", "-p", "auto=true", check=True)
    run_id = project.rows("SELECT id FROM runs")[0]["id"]
    proc = project.mle("approve", run_id, "gaet")
    assert proc.returncode == 4
    assert (
        proc.stderr.strip()
        == f"error: run {run_id} has no step 'gaet'; `mle show {run_id}` lists them"
    )
    proc = project.mle("approve", run_id, "ship")
    assert proc.returncode == 8
    assert proc.stderr.strip() == f"error: step ship of run {run_id} is not an approval gate"


def test_a_second_run_is_served_from_the_cache_and_plan_says_why(project: Project) -> None:
    _write(project)
    project.mle("run", "sweep.yaml", "-p", "auto=true", check=True)
    plan = project.mle("plan", "sweep.yaml", "-p", "auto=true", "--json", check=True)
    import json

    cache = {s["id"]: s["cache"] for s in json.loads(plan.stdout)["steps"]}
    assert cache["prepare"]["result"] == "hit"
    assert cache["train[k=4]"]["result"] == "hit"
    assert cache["pick"]["result"] == "-"
    second = project.mle("run", "sweep.yaml", "-p", "auto=true")
    assert second.returncode == 0, second.stderr
    steps = _steps(project)
    assert steps["prepare"] == "cached" and steps["train[k=1]"] == "cached"
    assert steps["ship"] == "cached"
    [first_id, second_id] = [r["id"] for r in project.rows("SELECT id FROM runs ORDER BY created")]
    [row] = project.rows(
        "SELECT cached_from FROM steps WHERE run_id = ? AND step_id = 'prepare'",
        second_id,
    )
    assert row["cached_from"] == f"{first_id}/prepare"
    assert (
        project.rows("SELECT count(*) AS n FROM attempts WHERE run_id = ?", second_id)[0]["n"] == 0
    )
    # A changed shipped file misses for every step that ships it, and plan names the file.
    (project.root / "score.sh").write_text(SCORE + "echo changed\n")
    plan = project.mle("plan", "sweep.yaml", "-p", "auto=true", "--json", check=True)
    cache = {s["id"]: s["cache"] for s in json.loads(plan.stdout)["steps"]}
    assert cache["prepare"] == {"result": "miss", "reason": "file score.sh changed"}
    assert cache["train[k=1]"]["result"] == "miss"
    text = project.mle("plan", "sweep.yaml", check=True).stdout
    assert "cache: miss (file score.sh changed)" in text
    # --no-cache runs everything.
    third = project.mle("run", "sweep.yaml", "-p", "auto=true", "--no-cache")
    assert third.returncode == 0, third.stderr
    assert set(_steps(project).values()) == {"succeeded"}


def _nested(depth: int) -> str:
    """A shell command that writes `depth` nested JSON lists into metrics.json."""
    opens = f"head -c {depth} /dev/zero | tr '\\0' '['"
    closes = f"head -c {depth} /dev/zero | tr '\\0' ']'"
    return f"{{ printf '{{\"a\": '; {opens}; {closes}; printf '}}'; }} > metrics.json"


@pytest.mark.parametrize("depth", [100_000, 40])
def test_a_metrics_file_nested_too_deep_fails_its_step_in_one_line(
    project: Project, depth: int
) -> None:
    recipe = f"name: deep\nsteps:\n  s:\n    run: {json.dumps(_nested(depth))}\n"
    (project.root / "deep.yaml").write_text(recipe + "    metrics: metrics.json\n")
    proc = project.mle("run", "deep.yaml", "--no-live")
    assert proc.returncode == 10, proc.stderr
    assert "internal error" not in proc.stdout + proc.stderr
    reason = "step s: metrics file metrics.json nests deeper than 32 levels; write flatter metrics"
    [step] = project.rows("SELECT status, message FROM steps WHERE step_id = 's'")
    assert (step["status"], step["message"]) == ("failed", reason)
    assert project.rows("SELECT * FROM metrics") == []

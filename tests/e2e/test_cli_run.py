"""`mle` as a user runs it: real `mle` and `mle-agentd` processes, the ledger read afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import MLE, Project

pytestmark = pytest.mark.e2e


def _rows(project: Project, sql: str, *args: object) -> list[sqlite3.Row]:
    conn = sqlite3.connect(project.ledger)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def _write_recipe(project: Project, text: str, name: str = "r.yaml") -> str:
    (project.root / name).write_text(text)
    return name


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except sqlite3.OperationalError:  # the ledger is being created
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper (this sandbox's init may be slow to reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _assert_one_error_line(stderr: str, expected: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert lines[0] == f"error: {expected}", stderr
    assert all(line.startswith(("error:", "hint:")) for line in lines), stderr


def test_hello_recipe_runs_end_to_end_and_is_recorded(project: Project) -> None:
    proc = project.mle("run", "recipes/hello.yaml", "-p", "greeting=bonjour", "-p", "repeat=4")
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout and "4/4 steps succeeded" in proc.stdout

    [run] = _rows(project, "SELECT * FROM runs")
    assert run["status"] == "succeeded"
    assert json.loads(run["params"]) == {"greeting": "bonjour", "repeat": 4}
    steps = {r["step_id"]: r["status"] for r in _rows(project, "SELECT * FROM steps")}
    assert steps == dict.fromkeys(["prepare", "count", "shout", "report"], "succeeded")

    # Every task's events arrived, in order, without a gap, ending with its result.
    for attempt in _rows(project, "SELECT * FROM attempts"):
        events = _rows(
            project, "SELECT * FROM events WHERE task_id = ? ORDER BY seq", attempt["task_id"]
        )
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["kind"] == "result" and events[-1]["state"] == "succeeded"
        assert attempt["task_id"] == f"{run['id']}.{attempt['step_id']}.1"

    # Declared outputs are in the project's store, under their true digest.
    artifacts = {r["path"]: r for r in _rows(project, "SELECT * FROM artifacts")}
    assert set(artifacts) == {"words.txt", "count.txt", "loud.txt", "report.txt"}
    for artifact in artifacts.values():
        hexd = artifact["digest"].removeprefix("sha256:")
        stored = project.root / ".mle/artifacts/sha256" / hexd[:2] / hexd
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hexd
    report = (project.root / ".mle/artifacts/sha256").rglob(artifacts["report.txt"]["digest"][7:])
    text = next(report).read_text()
    assert text.startswith("bonjour report\n")
    assert f"run {run['id']}: 4 words: BONJOUR-1 BONJOUR-2 BONJOUR-3 BONJOUR-4" in text


def test_runs_show_and_logs_tell_what_happened(project: Project) -> None:
    project.mle("run", "recipes/hello.yaml", check=True)
    runs = json.loads(project.mle("runs", "--json", check=True).stdout)
    assert len(runs) == 1 and runs[0]["status"] == "succeeded" and runs[0]["steps"] == 4
    run_id = runs[0]["id"]
    assert run_id in project.mle("runs", check=True).stdout

    detail = json.loads(project.mle("show", run_id[:15], "--json", check=True).stdout)
    assert detail["id"] == run_id
    assert [s["step_id"] for s in detail["steps"]] == ["prepare", "count", "shout", "report"]
    stored = {o["path"]: o["stored"] for o in detail["outputs"]}
    assert stored["report.txt"].startswith(".mle/artifacts/sha256/")
    assert (project.root / stored["report.txt"]).is_file()
    human = project.mle("show", check=True).stdout
    assert stored["report.txt"] in human and "succeeded" in human

    logs = project.mle("logs", run_id, "prepare", check=True).stdout
    assert logs.strip() == "wrote 3 words to words.txt"
    all_logs = project.mle("logs", "--json", check=True).stdout.splitlines()
    steps_logged = {json.loads(line)["step_id"] for line in all_logs}
    assert steps_logged == {"prepare", "count", "shout", "report"}


def test_runs_refuses_a_limit_it_cannot_use(project: Project) -> None:
    project.mle("run", "recipes/hello.yaml", check=True)  # a ledger with a run to list
    for limit in ("99999999999999999999", "0", "-1"):
        proc = project.mle("runs", "-n", limit)
        assert proc.returncode == 2, proc.stderr
        first = proc.stderr.splitlines()[0]
        assert first.startswith("error: mle runs: Invalid value for '--limit' / '-n': "), first
        assert "range 1<=x<=1000000" in first and proc.stdout == ""


def test_output_that_cannot_be_written_is_an_error_not_a_success(project: Project) -> None:
    env = {k: v for k, v in project.env.items() if k != "PYTHONUNBUFFERED"}  # written at exit
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to stand for a full disk")
    with open("/dev/full", "w") as full:  # the run's summary line cannot be written
        proc = subprocess.run(
            [*MLE, "run", "recipes/hello.yaml"], cwd=project.root, env=env, stdout=full,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 120
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: cannot write the output: [Errno 28] No space left on device"


def test_plan_shows_the_dag_and_runs_nothing(project: Project) -> None:
    proc = project.mle("plan", "recipes/hello.yaml", "-p", "repeat=7")
    assert proc.returncode == 0, proc.stderr
    assert "stage 2  count on local  needs: prepare" in proc.stdout
    assert "--repeat 7" in proc.stdout
    plan = json.loads(project.mle("plan", "recipes/hello.yaml", "--json", check=True).stdout)
    assert {s["id"]: s["stage"] for s in plan["steps"]} == {
        "prepare": 1,
        "count": 2,
        "shout": 2,
        "report": 3,
    }
    assert not project.ledger.exists()
    assert project.local_agent_pid() is None


def test_a_failing_step_shows_its_last_lines_and_skips_its_dependants(project: Project) -> None:
    recipe = _write_recipe(
        project,
        "name: boom\nsteps:\n"
        "  ok:\n    run: echo fine\n"
        "  bad:\n    run: echo 'about to fail'; echo oops >&2; exit 3\n"
        "  after:\n    needs: [bad]\n    run: echo never\n",
    )
    proc = project.mle("run", recipe)
    assert proc.returncode == 10
    assert "about to fail" in proc.stderr and "oops" in proc.stderr
    assert "error: run " in proc.stderr and "failed: step bad exited with 3 on local" in proc.stderr
    assert "Traceback" not in proc.stderr
    steps = {r["step_id"]: r["status"] for r in _rows(project, "SELECT * FROM steps")}
    assert steps == {"ok": "succeeded", "bad": "failed", "after": "skipped"}
    show = project.mle("show").stdout
    assert "bad failed" in show and "| oops" in show and "exit=3" in show


def test_a_failed_attempt_is_retried_with_backoff(project: Project) -> None:
    recipe = _write_recipe(
        project,
        "name: flaky\nsteps:\n  flaky:\n"
        '    run: test "$MLE_ATTEMPT" -ge 3 || { echo attempt $MLE_ATTEMPT fails; exit 1; }\n'
        "    retries: {max: 3, backoff: 100ms}\n",
    )
    proc = project.mle("run", recipe)
    assert proc.returncode == 0, proc.stderr
    attempts = _rows(project, "SELECT * FROM attempts ORDER BY attempt")
    assert [(a["attempt"], a["status"]) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert _rows(project, "SELECT attempts FROM steps")[0]["attempts"] == 3


def test_a_timeout_kills_the_whole_process_tree(project: Project) -> None:
    recipe = _write_recipe(
        project,
        "name: slow\nsteps:\n  slow:\n"
        "    run: sleep 300 & echo $! > child.pid; echo started; wait\n"
        "    timeout: 1s\n",
    )
    proc = project.mle("run", recipe)
    assert proc.returncode == 10
    assert "failed: step slow timed-out on local" in proc.stderr
    [attempt] = _rows(project, "SELECT * FROM attempts")
    assert attempt["status"] == "timed-out"
    kept = list((project.root / ".mle/agent/work").glob("*/child.pid"))
    assert len(kept) == 1  # a failed task's work dir is kept for debugging
    _wait_for(lambda: _is_dead(int(kept[0].read_text())), timeout=10)


def test_mle_cancel_stops_a_running_run(project: Project) -> None:
    recipe = _write_recipe(
        project,
        "name: long\nsteps:\n  long:\n    run: echo going; sleep 300\n"
        "  later:\n    needs: [long]\n    run: echo never\n",
    )
    runner = project.spawn("run", recipe)
    try:
        _wait_for(
            lambda: (
                project.ledger.exists() and _rows(project, "SELECT * FROM events WHERE kind='log'")
            )
        )
        run_id = _rows(project, "SELECT id FROM runs")[0]["id"]
        cancel = project.mle("cancel", run_id)
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.strip() == f"run {run_id} cancelled"
    finally:
        assert project.finish(runner)[0] == 10
    steps = {r["step_id"]: r["status"] for r in _rows(project, "SELECT * FROM steps")}
    assert steps == {"long": "cancelled", "later": "cancelled"}
    assert _rows(project, "SELECT status FROM runs")[0]["status"] == "cancelled"


def test_ctrl_c_without_a_terminal_cancels_the_run(project: Project) -> None:
    recipe = _write_recipe(project, "name: long\nsteps:\n  long:\n    run: echo going; sleep 300\n")
    runner = project.spawn("run", recipe)
    try:
        _wait_for(
            lambda: (
                project.ledger.exists() and _rows(project, "SELECT * FROM events WHERE kind='log'")
            )
        )
        runner.send_signal(signal.SIGINT)
    finally:
        code, _, stderr = project.finish(runner)
    assert code == 10
    assert "was cancelled" in stderr
    assert _rows(project, "SELECT status FROM attempts")[0]["status"] == "cancelled"


def test_the_local_agent_is_reused_and_protected_by_a_token(project: Project) -> None:
    recipe = _write_recipe(project, "name: one\nsteps:\n  one:\n    run: echo one\n")
    project.mle("run", recipe, check=True)
    first = project.local_agent_pid()
    project.mle("run", recipe, check=True)
    assert project.local_agent_pid() == first and first is not None
    token = project.root / ".mle/agent/token"
    assert token.stat().st_mode & 0o777 == 0o600
    state = json.loads((project.root / ".mle/agent/state.json").read_text())
    assert state["address"].startswith("127.0.0.1:")
    assert token.read_text().strip() not in json.dumps(state)
    assert token.read_text().strip() not in (project.root / ".mle/agent/agent.log").read_text()


def test_runs_started_at_once_share_one_local_agent_and_ledger(project: Project) -> None:
    recipe = _write_recipe(project, "name: pair\nsteps:\n  a:\n    run: sleep 0.5; echo a\n")
    runners = [project.spawn("run", recipe) for _ in range(3)]  # all creating one new ledger
    results = [project.finish(r) for r in runners]
    assert [code for code, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    agents = {a["address"] for a in _rows(project, "SELECT address FROM attempts")}
    assert len(agents) == 1


def test_shell_metacharacters_in_params_stay_literal(project: Project) -> None:
    hostile = "$(touch pwned1); touch pwned2 `touch pwned3` 'quote\" && rm -rf ."
    proc = project.mle("run", "recipes/hello.yaml", "-p", f"greeting={hostile}", "-p", "repeat=1")
    assert proc.returncode == 0, proc.stderr
    assert not list(project.root.rglob("pwned*"))
    assert "recipes" in os.listdir(project.root)
    logs = project.mle("logs", "--json").stdout
    assert "wrote 1 words to words.txt" in logs


def test_an_output_symlink_leaving_the_work_dir_fails_the_step(
    project: Project, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    recipe = _write_recipe(
        project,
        f"name: sneaky\nsteps:\n  s:\n    run: ln -s {secret} out.txt\n    outputs: [out.txt]\n",
    )
    proc = project.mle("run", recipe)
    assert proc.returncode == 10
    assert "out.txt" in proc.stderr
    assert _rows(project, "SELECT * FROM artifacts") == []


@pytest.mark.parametrize(
    ("recipe_text", "expected"),
    [
        (None, "missing.yaml: no such file"),
        ("name: x\nsteps: [", "r.yaml:2:"),
        ("name: x\nsteps:\n  a:\n    run: echo\n    needs: [b]\n", "r.yaml:5:"),
        ("name: x\nsteps:\n  a:\n    run: echo {{ params.nope }}\n", "r.yaml:4:"),
    ],
)
def test_recipe_errors_are_one_line_without_traceback(
    project: Project, recipe_text: str | None, expected: str
) -> None:
    name = "missing.yaml" if recipe_text is None else _write_recipe(project, recipe_text)
    proc = project.mle("run", name)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {expected}")
    assert not project.ledger.exists()


def test_unknown_param_and_unknown_run_are_clear_errors(project: Project) -> None:
    proc = project.mle("run", "recipes/hello.yaml", "-p", "greting=hi")
    assert proc.returncode == 3
    assert "greting" in proc.stderr and "greeting" in proc.stderr and "Traceback" not in proc.stderr
    proc = project.mle("show", "nope")
    assert proc.returncode == 4
    _assert_one_error_line(proc.stderr, "no runs yet; start one with `mle run RECIPE`")


def test_an_unreachable_agent_fails_the_step_with_a_clear_error(project: Project) -> None:
    recipe = _write_recipe(project, "name: lost\nsteps:\n  s:\n    run: echo started; sleep 300\n")
    project.env["MLE_AGENT_GRACE"] = "1"
    runner = project.spawn("run", recipe)
    try:
        _wait_for(
            lambda: (
                project.ledger.exists() and _rows(project, "SELECT * FROM events WHERE kind='log'")
            )
        )
        pid = project.local_agent_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        code, _, stderr = project.finish(runner)
    assert code == 10
    assert "Traceback" not in stderr
    assert "failed: step s lost on local: agent local silent for 1s" in stderr
    [attempt] = _rows(project, "SELECT * FROM attempts")
    assert attempt["status"] == "lost"
    assert attempt["finished"] is not None


def test_an_unexpected_error_prints_internal_error_and_logs_the_traceback(project: Project) -> None:
    (project.root / ".mle").mkdir()
    (project.root / ".mle/artifacts").write_text("a file where the store should be")
    proc = project.mle("run", "recipes/hello.yaml")
    assert proc.returncode == 70
    assert "Traceback" not in proc.stderr
    debug_log = Path(project.env["XDG_CACHE_HOME"]) / "mle/debug.log"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"internal error: an unexpected problem occurred; details in {debug_log}"
    )
    assert "Traceback" in debug_log.read_text()


@pytest.mark.parametrize("delay", [0.4, 0.7, 1.0, 1.5])
def test_ctrl_c_at_any_moment_of_start_up_stops_the_run(project: Project, delay: float) -> None:
    recipe = _write_recipe(
        project, "name: s\nsteps:\n  a:\n    run: sleep 300\n  b:\n    run: sleep 300\n"
    )
    runner = project.spawn("run", recipe)
    time.sleep(delay)
    runner.send_signal(signal.SIGINT)
    code, _, stderr = project.finish(runner)
    assert code in (10, 130), stderr  # cancelled run, or interrupted before a run existed
    assert "Traceback" not in stderr
    if project.ledger.exists() and _rows(project, "SELECT * FROM runs"):
        assert _rows(project, "SELECT status FROM runs")[0]["status"] == "cancelled"
        assert {r["status"] for r in _rows(project, "SELECT status FROM attempts")} <= {"cancelled"}


def test_cancel_dispatches_nothing_more_in_a_fan_out(project: Project) -> None:
    steps = "".join(f"  s{i}:\n    run: echo up; sleep 300\n" for i in range(6))
    recipe = _write_recipe(project, "name: fan\nsteps:\n" + steps)
    project.env["MLE_LOCAL_AGENT_SLOTS"] = "2"
    runner = project.spawn("run", recipe)
    try:
        _wait_for(lambda: len(_rows(project, "SELECT * FROM events WHERE kind='log'")) >= 2)
        run_id = _rows(project, "SELECT id FROM runs")[0]["id"]
        assert project.mle("cancel", run_id).returncode == 0
    finally:
        assert project.finish(runner)[0] == 10
    assert len(_rows(project, "SELECT * FROM attempts")) == 2  # nothing started after the cancel
    statuses = {r["status"] for r in _rows(project, "SELECT status FROM steps")}
    assert statuses == {"cancelled"}


def test_a_stale_state_file_pointing_at_another_process_is_ignored(project: Project) -> None:
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        agent_dir = project.root / ".mle/agent"
        agent_dir.mkdir(parents=True)
        (agent_dir / "state.json").write_text(
            json.dumps({"pid": stranger.pid, "address": "127.0.0.1:1", "version": "0.1.0"})
        )
        (agent_dir / "token").write_text("stale")
        recipe = _write_recipe(project, "name: one\nsteps:\n  one:\n    run: echo one\n")
        proc = project.mle("run", recipe)
        assert proc.returncode == 0, proc.stderr
        assert project.local_agent_pid() not in (None, stranger.pid)
        assert project.mle("agent", "stop").stdout.strip() == "local agent stopped"
        assert stranger.poll() is None  # the stranger was never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_an_unknown_target_is_a_compile_error_for_run_too(project: Project) -> None:
    recipe = _write_recipe(project, "name: t\nsteps:\n  a:\n    run: echo\n    on: nosuch\n")
    proc = project.mle("run", recipe)
    assert proc.returncode == 3
    _assert_one_error_line(
        proc.stderr, "r.yaml:3:3: steps.a.on: no target 'nosuch'; targets seen: local"
    )
    assert not project.ledger.exists()


def test_control_characters_in_step_output_never_reach_the_terminal_raw(project: Project) -> None:
    recipe = _write_recipe(
        project, "name: t\nsteps:\n  a:\n    run: printf 'x\\033]0;TITLE\\007y\\n'\n"
    )
    proc = project.mle("run", recipe)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "a | x\\x1b]0;TITLE\\x07y" in proc.stderr
    logs = project.mle("logs", "--json").stdout
    assert json.loads(logs)["text"] == "x\x1b]0;TITLE\x07y"  # JSON keeps the exact bytes
    assert project.mle("logs").stdout == "a | x\\x1b]0;TITLE\\x07y\n"


def test_bad_flags_are_one_line_errors(project: Project) -> None:
    proc = project.mle("run", "--bogus")
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, "mle run: No such option: --bogus")
    proc = project.mle("runs", "-n", "many")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: mle runs: Invalid value for '--limit'")


def test_a_local_agent_that_cannot_start_fails_the_run_cleanly(project: Project) -> None:
    (project.root / ".mle").mkdir()
    (project.root / ".mle/agent").write_text("a file where the agent's directory should be")
    proc = project.mle("run", "recipes/hello.yaml")
    assert proc.returncode == 10
    assert "cannot prepare the local agent in" in proc.stderr and "Traceback" not in proc.stderr
    assert _rows(project, "SELECT status FROM runs")[0]["status"] == "failed"
    assert {r["status"] for r in _rows(project, "SELECT status FROM steps")} == {
        "failed",
        "skipped",
    }

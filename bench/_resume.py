"""The resume cost of bench/dispatch.py: a chain killed midway, resumed with `mle resume`."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _measure import Results
from _mle import LocalAgent, chain_recipe, local_agent, mle_command


def ledger_rows(ledger: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of a query, in a connection of its own (an `mle` process may be writing)."""
    conn = sqlite3.connect(ledger, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def new_run_id(ledger: Path, known: set[str]) -> str | None:
    new = [row[0] for row in ledger_rows(ledger, "SELECT id FROM runs") if row[0] not in known]
    return new[0] if new else None


def attempts_of(ledger: Path, run_id: str) -> dict[str, tuple[str, str, float]]:
    """task_id: (step_id, status, started) of each attempt of the run."""
    sql = "SELECT task_id, step_id, status, started FROM attempts WHERE run_id = ?"
    return {
        task: (step, status, started)
        for task, step, status, started in ledger_rows(ledger, sql, run_id)
    }


def first_dispatch_s(ledger: Path, run_id: str, launched: float, known: set[str]) -> float:
    """Seconds from `launched` (unix time) to the first attempt of the run not in `known`."""
    starts = [a[2] for task, a in attempts_of(ledger, run_id).items() if task not in known]
    if not starts:
        raise SystemExit(f"run {run_id}: no attempt was dispatched")
    return min(starts) - launched


def mle_process(agent: LocalAgent, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`mle ARGS --no-live` in the agent's project, its output to a file (it is not read)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [*mle_command(), *args, "--no-live"],
            cwd=agent.project,
            env=agent.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finished(proc: subprocess.Popen[bytes], log: Path, steps: int, what: str) -> None:
    """Wait for an `mle` process that must succeed with all the run's steps."""
    proc.wait(timeout=1800)
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or f" {steps}/{steps} steps succeeded" not in text:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{text[-2000:]}")


def kill_midway(agent: LocalAgent, recipe: Path, kill_at: int) -> tuple[str, float] | None:
    """Start `mle run`, SIGKILL it once `kill_at` of its steps succeeded in the ledger.

    Returns the run id and the launch time, or None if the run ended before that was seen.
    """
    known = {row[0] for row in ledger_rows(agent.ledger, "SELECT id FROM runs")}
    count = "SELECT count(*) FROM steps WHERE status = 'succeeded' AND run_id = ?"
    log = agent.project / "killed.log"
    launched = time.time()
    proc = mle_process(agent, log, "run", recipe.name)
    deadline = time.monotonic() + 600
    run_id = None
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            run_id = run_id or new_run_id(agent.ledger, known)
            if run_id and ledger_rows(agent.ledger, count, run_id)[0][0] >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return run_id, launched
        except sqlite3.OperationalError:  # the ledger is being created or migrated
            pass
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise SystemExit(f"mle run never reached {kill_at} succeeded steps")
    print(f"resume: the run ended before {kill_at} steps were seen; again", file=sys.stderr)
    return None


def resume_cycle(agent: LocalAgent, recipe: Path, steps: int, kill_at: int) -> dict[str, float]:
    """A fresh `mle run` of the recipe, then one killed midway and resumed, on a warm agent."""
    ledger = agent.ledger
    known = {row[0] for row in ledger_rows(ledger, "SELECT id FROM runs")}
    log = agent.project / "fresh.log"
    launched = time.time()
    proc = mle_process(agent, log, "run", recipe.name)
    finished(proc, log, steps, "mle run")
    fresh = {"fresh_wall_s": time.time() - launched}
    fresh_id = new_run_id(ledger, known)
    assert fresh_id is not None
    fresh["fresh_first_dispatch_s"] = first_dispatch_s(ledger, fresh_id, launched, set())

    for _ in range(3):
        killed = kill_midway(agent, recipe, kill_at)
        if killed:
            break
    else:
        raise SystemExit(f"mle run always ended before {kill_at} steps were seen: fewer steps?")
    run_id = killed[0]
    step_status = "SELECT step_id, status FROM steps WHERE run_id = ?"
    done_before = {
        s for s, status in ledger_rows(ledger, step_status, run_id) if status == "succeeded"
    }
    before = attempts_of(ledger, run_id)
    in_flight = {a[0] for a in before.values()} - done_before

    log = agent.project / "resume.log"
    launched = time.time()
    proc = mle_process(agent, log, "resume", run_id)
    finished(proc, log, steps, f"mle resume {run_id}")
    wall = time.time() - launched

    after = attempts_of(ledger, run_id)
    new_steps = {step for task, (step, _, _) in after.items() if task not in before}
    reruns = sorted(new_steps & done_before)
    succeeded = [step for step, status, _ in after.values() if status == "succeeded"]
    steps_ok = [
        s for s, status in ledger_rows(ledger, step_status, run_id) if status == "succeeded"
    ]
    if reruns:
        raise SystemExit(f"resume ran {len(reruns)} succeeded steps again: {reruns[:10]}")
    if sorted(succeeded) != sorted(steps_ok) or len(set(succeeded)) != steps:
        raise SystemExit(
            f"run {run_id}: {len(succeeded)} succeeded attempts for {len(set(succeeded))} "
            f"steps, {len(steps_ok)} of {steps} steps succeeded; each needs exactly one"
        )
    return {
        **fresh,
        "resume_first_dispatch_s": first_dispatch_s(ledger, run_id, launched, set(before)),
        "resume_wall_s": wall,
        "resume_done_at_kill": len(done_before),
        "resume_reruns": len(reruns),
        "resume_in_flight": len(in_flight),
        "resume_reattached": len(in_flight - new_steps),
        "resume_redispatched": len(in_flight & new_steps),
    }


def measure_resume(r: Results, steps: int, repeat: int) -> None:
    """Resume cost of a chain of no-op steps killed at half way; timings: best of `repeat`."""
    kill_at = steps // 2
    if kill_at < 1 or kill_at >= steps:
        raise SystemExit("--resume-steps must be at least 2")
    with local_agent() as agent:
        agent.run(chain_recipe(1), 1)  # creates the ledger
        recipe = agent.project / "resume.yaml"
        recipe.write_text(chain_recipe(steps))
        cycles = [resume_cycle(agent, recipe, steps, kill_at) for _ in range(repeat)]
    for key in (
        "fresh_first_dispatch_s",
        "fresh_wall_s",
        "resume_first_dispatch_s",
        "resume_wall_s",
    ):
        r.figures[key] = min(c[key] for c in cycles)
    for key in ("resume_reruns", "resume_in_flight", "resume_reattached", "resume_redispatched"):
        r.figures[key] = sum(c[key] for c in cycles)
    r.figures["resume_steps"] = steps
    r.figures["resume_kill_at"] = kill_at
    r.figures["resume_cycles"] = repeat
    r.figures["resume_done_at_kill_min"] = min(c["resume_done_at_kill"] for c in cycles)
    r.figures["resume_done_at_kill_max"] = max(c["resume_done_at_kill"] for c in cycles)

"""Recipes across three hosts: steps land where `on:` says, `each:` runs on every edge agent, a
cut link mid-task moves the step to another agent, and digits-edge runs unchanged on the fleet.
Everything is asserted from the operator's ledger."""

from __future__ import annotations

import json
import re
import shlex
import shutil

from tests.conftest import REPO
from tests.fleet._netns import Fleet

PLACED = """\
name: placed
steps:
  prepare:
    on: {labels: {role: server}}
    run: echo "made on $MLE_TARGET" > data.txt
    outputs: [data.txt]
  probe:
    needs: [prepare]
    on: {labels: {role: edge}}
    each: true
    run: cat data.txt; echo "probed on $MLE_TARGET"
  any-edge:
    needs: [prepare]
    on: "pi-*"
    run: echo "any edge"
  report:
    needs: [probe, any-edge]
    run: echo done
"""

SLOW = """\
name: slow
steps:
  work:
    on: {labels: {role: edge}}
    retries: {max: 1, backoff: 0s}
    run: sleep 6; echo "finished on $MLE_TARGET"
"""


def _write(fleet: Fleet, name: str, text: str) -> str:
    (fleet.project.root / name).write_text(text)
    return name


def _agents(fleet: Fleet, run_id: str) -> dict[str, list[tuple[str, str]]]:
    """Per step, its attempts as (agent, status), in order."""
    rows = fleet.project.rows(
        "SELECT step_id, agent, status FROM attempts WHERE run_id = ? ORDER BY attempt", run_id
    )
    placed: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        placed.setdefault(row["step_id"], []).append((row["agent"], row["status"]))
    return placed


def _latest_run(fleet: Fleet) -> str:
    return str(fleet.project.rows("SELECT id FROM runs ORDER BY created DESC LIMIT 1")[0]["id"])


def _logs(fleet: Fleet, run_id: str, step: str) -> str:
    rows = fleet.project.rows(
        "SELECT text FROM events WHERE run_id = ? AND step_id = ? AND kind = 'log' ORDER BY seq",
        run_id,
        step,
    )
    return "\n".join(r["text"] for r in rows)


def test_steps_land_where_their_selectors_say(fleet3: Fleet) -> None:
    recipe = _write(fleet3, "placed.yaml", PLACED)
    plan = fleet3.run_mle("plan", recipe, check=True).stdout
    assert "probe[target=pi-01] on pi-01" in plan
    assert "any-edge on pi-01, pi-02 (2 match pi-*" in plan
    fleet3.run_mle("run", recipe, check=True, timeout=180)
    run_id = _latest_run(fleet3)
    placed = _agents(fleet3, run_id)
    assert placed["prepare"] == [("srv-01", "succeeded")]
    assert placed["probe[target=pi-01]"] == [("pi-01", "succeeded")]
    assert placed["probe[target=pi-02]"] == [("pi-02", "succeeded")]
    assert placed["any-edge"][0][0] in ("pi-01", "pi-02")
    assert placed["report"] == [("local", "succeeded")]
    # data.txt moved from srv-01 to each edge agent
    assert "made on srv-01" in _logs(fleet3, run_id, "probe[target=pi-02]")
    assert "probed on pi-02" in _logs(fleet3, run_id, "probe[target=pi-02]")


def test_a_selector_matching_nothing_is_refused_naming_the_agents_seen(fleet3: Fleet) -> None:
    recipe = _write(
        fleet3,
        "gpu.yaml",
        "name: gpu\nsteps:\n  a:\n    run: echo\n    on: {labels: {role: gpu}}\n",
    )
    proc = fleet3.run_mle("run", recipe)
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert "no target matches 'role=gpu'; targets seen: local, pi-01 (role=edge)" in line
    assert "srv-01 (role=server)" in line
    assert (
        not fleet3.project.rows("SELECT id FROM runs") if fleet3.project.ledger.exists() else True
    )


def test_a_cut_link_mid_task_moves_the_step_to_another_matching_agent(fleet3: Fleet) -> None:
    recipe = _write(fleet3, "slow.yaml", SLOW)
    proc = fleet3.project.spawn("run", recipe)
    fleet3.project.wait_until(
        "SELECT 1 FROM attempts WHERE step_id = 'work' AND status = 'running'", timeout=60
    )
    first = fleet3.project.rows("SELECT agent FROM attempts WHERE step_id = 'work'")[0]["agent"]
    fleet3.cut(first)
    code, _out, err = fleet3.project.finish(proc, timeout=120)
    assert code == 0, err
    run_id = _latest_run(fleet3)
    attempts = _agents(fleet3, run_id)["work"]
    other = "pi-02" if first == "pi-01" else "pi-01"
    assert attempts == [(first, "lost"), (other, "succeeded")]
    fenced = fleet3.project.rows("SELECT fenced FROM attempts WHERE agent = ?", first)
    assert fenced == [{"fenced": 1}]
    assert f"finished on {other}" in _logs(fleet3, run_id, "work")


def test_digits_edge_runs_unchanged_on_the_fleet(fleet3: Fleet) -> None:
    shutil.copytree(REPO / "recipes", fleet3.project.root / "recipes")
    fleet3.run_mle(
        "run", "recipes/digits-edge.yaml",
        "-p", "trainer=role=server", "-p", "edge=role=edge", "-p", "auto_approve=true",
        check=True, timeout=600,
    )  # fmt: skip
    run_id = _latest_run(fleet3)
    placed = _agents(fleet3, run_id)
    for step in ("prepare", "train[hidden=16]", "train[hidden=64]", "quantize", "evaluate"):
        assert placed[step][-1] == ("srv-01", "succeeded"), step
    deployed = fleet3.project.rows(
        "SELECT target, model FROM deployments WHERE source_run = ? AND action = 'deploy' "
        "ORDER BY target",
        run_id,
    )
    assert [(d["target"], d["model"]) for d in deployed] == [
        ("pi-01", "digits"),
        ("pi-02", "digits"),
    ]
    metrics = {
        r["name"]: r["value"]
        for r in fleet3.project.rows(
            "SELECT name, value FROM metrics WHERE run_id = ? AND step_id = 'evaluate'", run_id
        )
    }
    assert metrics["accuracy_int8"] >= 0.9 and metrics["size_ratio"] >= 2.5
    lineage = json.loads(
        fleet3.run_mle("models", "--lineage", "digits", "--json", check=True).stdout
    )
    assert lineage["run"]["id"] == run_id
    served = json.loads(fleet3.run_mle("models", "--json", check=True).stdout)
    assert sorted(m["target"] for m in served if m["name"] == "digits") == ["pi-01", "pi-02"]


def test_the_readme_fleet_commands_run_on_the_fleet(fleet3: Fleet) -> None:
    readme = (REPO / "README.md").read_text()
    [block] = re.findall(r"```console\n(.*?)```", readme, flags=re.S)
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    assert len(commands) >= 4 and all(words[0] == "mle" for words in commands)
    shutil.copytree(REPO / "recipes", fleet3.project.root / "recipes")
    for words in commands:
        proc = fleet3.run_mle(*words[1:], timeout=600)
        assert proc.returncode == 0, f"{shlex.join(words)}:\n{proc.stderr}"
    top = fleet3.run_mle("top", "--once", "--json", check=True).stdout
    seen = {
        row["agent"]
        for row in json.loads(top)
        if row["state"] == "up" and row["cpu_percent"] is not None
    }
    assert {"srv-01", "pi-01", "pi-02"} <= seen

"""The report of bench/dispatch.py: summary figures and its markdown sections."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

from _measure import Results
from _peers import PREFECT_SETTINGS

# The table's columns; the peers measured per run are "dask_run" and "prefect_run" in the figures.
RUNTIMES = ("mle", "floor", "dask", "prefect")
PER_RUN = ("dask_run", "prefect_run")


def summarize(f: dict[str, float], n: int) -> dict[str, float]:
    """Per-step overhead, throughput, and mle's ratios to the floor and to each peer."""
    s: dict[str, float] = {"help_extra_ms": 1000 * (f["help_s"] - f["python_pass_s"])}
    for rt in RUNTIMES + PER_RUN:
        if f"{rt}_chain_s" not in f:
            continue
        s[f"{rt}_chain_ms_per_step"] = 1000 * f[f"{rt}_chain_s"] / n
        s[f"{rt}_fanout_ms_per_step"] = 1000 * f[f"{rt}_fanout_s"] / n
        s[f"{rt}_fanout_steps_per_s"] = n / f[f"{rt}_fanout_s"]
        if f"{rt}_one_step_s" in f and n > 1 and rt not in PER_RUN:
            # What a step adds to a run once its fixed cost (a 1-step run) is paid. From in-flow
            # times where a peer has them: Prefect's walls are rounded up to whole seconds.
            kind = "_body" if f"{rt}_chain_body_s" in f else ""
            extra = f[f"{rt}_chain{kind}_s"] - f[f"{rt}_one_step{kind}_s"]
            s[f"{rt}_chain_marginal_ms_per_step"] = 1000 * extra / (n - 1)
        if f"{rt}_fanout_body_s" in f:
            s[f"{rt}_fanout_body_steps_per_s"] = n / f[f"{rt}_fanout_body_s"]
        if rt != "mle":
            s[f"chain_ratio_mle_vs_{rt}"] = f["mle_chain_s"] / f[f"{rt}_chain_s"]
            s[f"fanout_ratio_mle_vs_{rt}"] = f["mle_fanout_s"] / f[f"{rt}_fanout_s"]
    if "shim_chain_s" in f:  # bench/_agent_floor.py
        s["agent_floor_ms_per_step"] = 1000 * (f["shim_chain_s"] + f["agent_rpc_chain_s"]) / n
    if "agent_floor_ms_per_step" in s and "prefect_chain_body_s" in f:
        s["prefect_in_flow_third_ms"] = 1000 * f["prefect_chain_body_s"] / n / 3
    return s


def markdown_section(
    path: Path,
    n: int,
    repeat: int,
    r: Results,
    s: dict[str, float],
    per_run: bool = True,
    flags: str = "",
) -> str:
    """One dated section with the figures, the command (`flags`: its other options) and the
    peers' configuration."""
    f = r.figures
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    workers = os.cpu_count() or 1
    per_run_heading = "per run (a new process each; agent / Prefect server kept running)"
    in_process_heading = (
        "in-process (Prefect's and Dask's best case: no interpreter start, no import)"
    )

    def cells(
        fmt: str, value: Callable[[str], float | None], columns: tuple[str | None, ...] = RUNTIMES
    ) -> str:
        out = []
        for rt in columns:
            try:
                v = None if rt is None else value(rt)
            except KeyError:
                v = None
            out.append("n/a" if v is None else fmt.format(v))
        return " | ".join(out)

    # The per-run rows: mle's own figures (each `mle run` is a new process), no floor.
    run_columns = ("mle", None, "dask_run", "prefect_run")

    def run_cells(fmt: str, value: Callable[[str], float | None]) -> str:
        return cells(fmt, value, run_columns)

    def not_run(rt: str) -> str:
        if rt in PER_RUN and not per_run:
            return "not measured: --no-per-run"
        return r.skipped.get(rt, "not installed")

    def ratio(rt: str) -> str:
        if f"chain_ratio_mle_vs_{rt}" not in s:
            return f"not run ({not_run(rt)})"
        return (
            f"chain {s[f'chain_ratio_mle_vs_{rt}']:.2f}×, "
            f"fan-out {s[f'fanout_ratio_mle_vs_{rt}']:.2f}×"
        )

    prefect_conf = (
        f"Prefect {r.versions['prefect']}: `@flow(task_runner=ThreadPoolTaskRunner"
        f"(max_workers={workers}))`, `@task(cache_policy=NO_CACHE)`, steps `.submit()`ted "
        "(chain: each gets the previous future); "
        + (
            "against the per-run measure's `prefect server start` (`--one-prefect-server`), "
            "fresh PREFECT_HOME, "
            + ", ".join(f"`{k}={v}`" for k, v in PREFECT_SETTINGS.items())
            + "; start-up = import + first 1-step flow (the server already up)."
            if "prefect_in_process_on_server" in f
            else "ephemeral API server (no PREFECT_API_URL), fresh PREFECT_HOME, "
            + ", ".join(f"`{k}={v}`" for k, v in PREFECT_SETTINGS.items())
            + "; start-up = import + first 1-step flow (boots the server)."
        )
        if "prefect" in r.versions
        else f"Prefect: not run ({r.skipped.get('prefect', '')})."
    )
    dask_conf = (
        f"Dask {r.versions['dask']}: LocalCluster(n_workers={workers}, threads_per_worker=1, "
        "processes=True), `client.submit(..., pure=False)`; start-up = cluster + client + "
        "first task."
        if "dask" in r.versions
        else f"Dask: not run ({r.skipped.get('dask', '')})."
    )
    prefect_run_conf = (
        "Prefect: the same flows, one run per `python bench/prefect_peer.py --once chain|fanout` "
        "process (`python flow.py`: interpreter start, `import prefect`, the flow, exit), "
        "with PREFECT_API_URL pointing at a `prefect server start --host 127.0.0.1` kept running "
        f"(same settings and PREFECT_HOME; up in {f['prefect_run_server_start_s']:.1f} s, not "
        "counted)²."
        if "prefect_run_chain_s" in f
        else f"Prefect: not run ({not_run('prefect_run')})."
    )
    dask_run_conf = (
        f"Dask: a `dask scheduler` and {workers} `dask worker --nthreads 1` processes kept "
        f"running (up in {f['dask_run_cluster_start_s']:.1f} s, not counted), one run per "
        "`python bench/dask_peer.py` process (interpreter start, `import distributed`, a "
        "`Client` connects, the tasks `client.submit(..., pure=False)`, the client closes, exit)."
        if "dask_run_chain_s" in f
        else f"Dask: not run ({not_run('dask_run')})."
    )
    command = f"python bench/dispatch.py --steps {n} --repeat {repeat} --out {path}{flags}"
    lines = [
        f"\n## dispatch — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `{command}`; "
        f"best of the repeats; warm runtimes; each step runs `true` in its own process; "
        f"fan-out at a concurrency of {workers} everywhere (the agent's default slots). "
        f"Two comparisons: **{per_run_heading}**, every run a new process timed from launch to "
        f"exit, as a user runs `mle run recipe.yaml` or `python flow.py`; and "
        f"**{in_process_heading}**: each peer runs its flows back to back in one process, "
        "against mle's same per-run figures (each `mle run` is a new process).\n",
        "| measure | mle | floor (direct spawn) | Dask distributed | Prefect 3 | target |",
        "|---|---|---|---|---|---|",
        f"| **{per_run_heading}** | | | | | |",
        f"| chain: ms per step (wall / N) | "
        f"{run_cells('{:.1f}', lambda rt: s[f'{rt}_chain_ms_per_step'])} | ≤ 25 |",
        f"| fan-out: steps/s | "
        f"{run_cells('{:.0f}', lambda rt: s[f'{rt}_fanout_steps_per_s'])} | ≥ 100 |",
        f"| a 1-step run (ms) | {run_cells('{:.0f}', lambda rt: 1000 * f[f'{rt}_one_step_s'])} | |",
        f"| **{in_process_heading}** | | | | | |",
        f"| chain: ms per step (wall / N) | "
        f"{cells('{:.1f}', lambda rt: s[f'{rt}_chain_ms_per_step'])} | ≤ 25 |",
        f"| fan-out: steps/s | {cells('{:.0f}', lambda rt: s[f'{rt}_fanout_steps_per_s'])} | ≥ 100 |",
        f"| chain: marginal ms per step ((wall N − wall 1) / (N − 1))¹ | "
        f"{cells('{:.1f}', lambda rt: s.get(f'{rt}_chain_marginal_ms_per_step'))} | |",
        f"| fixed cost per run: a 1-step run, warm (ms) | "
        f"{cells('{:.0f}', lambda rt: 1000 * f[f'{rt}_one_step_s'])} | |",
        f"| start-up, cold (s) | {cells('{:.2f}', lambda rt: f[f'{rt}_startup_s'])} | |",
        f"| `mle --help` extra over `python -c pass` | {s['help_extra_ms']:.0f} ms "
        f"({1000 * f['help_s']:.0f} vs {1000 * f['python_pass_s']:.0f} ms) | | | | ≤ 150 ms |",
        "",
        f"Ratios of mle's wall to the peer's in the same run (below 1: mle is faster). "
        f"P{per_run_heading[1:]}: Prefect {ratio('prefect_run')}; "
        f"Dask {ratio('dask_run')}. I{in_process_heading[1:]}: floor "
        f"chain {s['chain_ratio_mle_vs_floor']:.1f}×; Dask {ratio('dask')}; "
        f"Prefect {ratio('prefect')}. Issue target vs Prefect: ≤ 0.33 (Prefect 3× slower).",
        "",
        f"Per run: mle = `mle run bench.yaml --no-live`, a new CLI process, on the agent started "
        f"once; {prefect_run_conf} {dask_run_conf} One untimed warm-up run each; the per-run "
        "processes get the user's environment (bytecode cached).",
        "",
        f"In-process and start-up: mle = `mle agent start` + first 1-step run; {prefect_conf} "
        f"{dask_conf}",
    ]
    if "prefect_chain_body_s" in f:
        lines += [
            "",
            "¹ Prefect: from times taken inside the flow body (first line to the last task's "
            "result), because a sync flow's wall is rounded up to at least the next whole second "
            "after it starts: on exit it joins its heartbeat thread, which sleeps in 1 s slices "
            "(`prefect.flow_engine._send_heartbeats`; default heartbeat every 180 s). In-flow "
            f"fan-out: {s['prefect_fanout_body_steps_per_s']:.0f} steps/s; in-flow chain: "
            f"{1000 * f['prefect_chain_body_s'] / n:.1f} ms per step.",
        ]
    if "prefect_run_chain_s" in f:
        imported = (
            f" ({f['prefect_import_s']:.2f} s in the in-process peer)"
            if "prefect_import_s" in f
            else ""
        )
        lines += [
            "",
            "² Prefect per run: each process's wall holds the interpreter's start, "
            f"`import prefect`{imported}, the flow run's creation on the server and its end, "
            "which the heartbeat join rounds up to a whole second (¹); that fixed cost is in "
            "wall / N here, as mle's own fixed cost per run is in its figures.",
        ]
    if "prefect_in_flow_third_ms" in s:
        floor, third = s["agent_floor_ms_per_step"], s["prefect_in_flow_third_ms"]
        work = 1000 * f["floor_chain_s"] / n  # a `true` process spawned directly
        rest = s["mle_chain_marginal_ms_per_step"] - floor
        lines += [
            "",
            "³ The least a chain step can cost through an agent, measured apart in this run "
            "(bench/_agent_floor.py): its process started through the agent's shim and reaped, "
            f"{1000 * f['shim_chain_s'] / n:.2f} ms (spawned directly: {work:.2f} ms), plus one "
            f"call to the agent answered (a health check), {1000 * f['agent_rpc_chain_s'] / n:.2f}"
            f" ms: {floor:.2f} ms. A third of Prefect's in-flow chain step is {third:.2f} ms: "
            f"the floor alone is {floor / third:.2f}× that, before mle records anything in its "
            f"ledger (per-step cost = wall / steps, the step's own process included on both "
            f"sides). Without the step's process on both sides (the direct spawn taken off), "
            f"the floor is {floor - work:.2f} ms against a third of {third - work / 3:.2f} ms; "
            f"the rest of mle's marginal chain step (its scheduler, the ledger's and the agent's "
            f"commits) is {rest:.2f} ms here.",
        ]
    return "\n".join(lines) + "\n"


def summarize_resume(f: dict[str, float]) -> dict[str, float]:
    """Resume's first dispatch as a ratio to a fresh start's."""
    return {
        "resume_first_dispatch_ratio": f["resume_first_dispatch_s"] / f["fresh_first_dispatch_s"]
    }


def resume_section(path: Path, repeat: int, r: Results, s: dict[str, float]) -> str:
    """One dated section with the resume figures and the command."""
    f = r.figures
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    steps, kill_at = int(f["resume_steps"]), int(f["resume_kill_at"])
    lo, hi = int(f["resume_done_at_kill_min"]), int(f["resume_done_at_kill_max"])
    done = f"{lo}" if lo == hi else f"{lo}–{hi}"
    left = f"{steps - lo}" if lo == hi else f"{steps - hi}–{steps - lo}"
    in_flight, reattached = int(f["resume_in_flight"]), int(f["resume_reattached"])
    lines = [
        f"\n## resume cost — {time.strftime('%Y-%m-%d %H:%M')} ({machine})\n",
        f"Command: `python bench/dispatch.py --section resume --resume-steps {steps} "
        f"--repeat {repeat} --out {path}`; a chain of {steps} no-op steps (`true`, "
        f"`cache: false`) on a warm local agent; per cycle, a fresh `mle run` of it to the end, "
        f"then another `mle run` SIGKILLed once the ledger shows {kill_at} steps succeeded, "
        f"and `mle resume RUN`; best of {repeat} cycle(s). First dispatch = the smallest "
        f"`attempts.started` among attempts not in the ledger before the command, minus its "
        f"launch time.\n",
        "| measure | fresh `mle run` | `mle resume` after SIGKILL | resume / fresh |",
        "|---|---|---|---|",
        f"| launch → first new dispatch (ms) | {1000 * f['fresh_first_dispatch_s']:.0f} | "
        f"{1000 * f['resume_first_dispatch_s']:.0f} | {s['resume_first_dispatch_ratio']:.2f}× |",
        f"| wall (s) | {f['fresh_wall_s']:.2f} ({steps} steps) | "
        f"{f['resume_wall_s']:.2f} ({left} steps left) | |",
        f"| succeeded steps run again | | {int(f['resume_reruns'])} "
        f"({done} succeeded at the kill) | |",
        "",
        f"Every step ended with exactly one succeeded attempt. Steps in flight at the kill "
        f"(an attempt in the ledger, not yet succeeded): {in_flight} over {int(f['resume_cycles'])}"
        f" cycle(s); re-attached by the resume: {reattached}, dispatched again: "
        f"{int(f['resume_redispatched'])}.",
    ]
    return "\n".join(lines) + "\n"

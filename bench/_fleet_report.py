"""The report of bench/fleet.py: ratios in the same run and its markdown section."""

from __future__ import annotations

import argparse
import os
import platform
import time

from _measure import MB, Results


def summarize(f: dict[str, float]) -> dict[str, float]:
    """Ratios in the same run: mle's throughput over each peer's (above 1: mle is faster)."""
    out: dict[str, float] = {}
    if "agents_cached_p50_s" in f:
        out["agents_browse_vs_cached"] = f["agents_browse_p50_s"] / f["agents_cached_p50_s"]
    for peer in ("scp", "sftp_default", "sftp_tuned"):
        if f"{peer}_mbps" in f:
            out[f"move_vs_{peer}"] = f["mle_move_mbps"] / f[f"{peer}_mbps"]
            out[f"ship_vs_{peer}"] = f["mle_ship_mbps"] / f[f"{peer}_mbps"]
    return out


def markdown_section(args: argparse.Namespace, r: Results, s: dict[str, float]) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    command = (
        f"python bench/fleet.py --repeat {args.repeat} --browse-window {args.browse_window:g} "
        f"--size-mb {args.size_mb} --section {args.section} --out bench/RESULTS.md"
    )
    lines = [
        f"## fleet — {time.strftime('%Y-%m-%d %H:%M')} ({machine})",
        "",
        f"Command: `{command}`.",
    ]
    if "discovery_listed_p50_s" in r.figures:
        lines += discovery_rows(r.figures, s)
    if "mle_move_mbps" in r.figures:
        lines += transfer_rows(args, r.figures, s)
    if r.versions:
        lines += [
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(r.versions.items())) + ".",
        ]
    if r.skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in r.skipped.items()) + "."]
    return "\n".join(lines) + "\n"


def discovery_rows(f: dict[str, float], s: dict[str, float]) -> list[str]:
    n, window = int(f["discovery_repeat"]), f["discovery_browse_window_s"]
    return [
        "",
        f"Discovery ({n} agent starts; browses of {window:g} s back to back from the spawn, so "
        f"a figure is at most {window:g} s late):",
        "",
        "| measure | p50 | max | target |",
        "|---|---|---|---|",
        f"| `mle-agentd --announce` spawned → listed by a browse (s) | {f['discovery_listed_p50_s']:.2f} "
        f"| {f['discovery_listed_max_s']:.2f} | ~2 |",
        f"| spawned → listening (state file written) (s) | {f['discovery_listening_p50_s']:.2f} "
        f"| {f['discovery_listening_max_s']:.2f} | |",
        "",
        f"`mle agents --json`, agent up (p50 of {n}): browsing {f['agents_browse_p50_s']:.2f} s, "
        f"`--cached` {f['agents_cached_p50_s']:.2f} s; browsing / cached = "
        f"{s['agents_browse_vs_cached']:.2f}×.",
    ]


def transfer_rows(args: argparse.Namespace, f: dict[str, float], s: dict[str, float]) -> list[str]:
    def mbps(key: str) -> str:
        return f"{f[key]:.0f}" if key in f else "n/a"

    def ratio(key: str) -> str:
        return f"{s[key]:.2f}×" if key in s else "n/a"

    size = f["transfer_bytes"] / MB
    return [
        "",
        f"Transfer of one {size:.0f} MB random artifact (best of {args.repeat}), MB/s = 10^6 bytes/s:",
        "",
        "| path | MB/s | mle move / it | mle ship / it | target |",
        "|---|---|---|---|---|",
        f"| mle A → B end to end (fetch to the operator's store, then ship) | {mbps('mle_move_mbps')} | | | ≥ 300 |",
        f"| mle fetch A → operator store | {mbps('mle_fetch_mbps')} | | | |",
        f"| mle ship operator store → B | {mbps('mle_ship_mbps')} | | | |",
        f"| OpenSSH scp → sshd (net of its {1000 * f.get('scp_setup_s', 0):.0f} ms setup) | {mbps('scp_mbps')} | {ratio('move_vs_scp')} | {ratio('ship_vs_scp')} | |",
        f"| paramiko SFTP put, defaults | {mbps('sftp_default_mbps')} | {ratio('move_vs_sftp_default')} | {ratio('ship_vs_sftp_default')} | |",
        f"| paramiko SFTP, tuned (255 KiB pipelined writes, 64 MiB window, AES-GCM) | {mbps('sftp_tuned_mbps')} | {ratio('move_vs_sftp_tuned')} | {ratio('ship_vs_sftp_tuned')} | |",
        "",
        f"Dedup: a second ship of the same digest to B, on a new connection, took "
        f"{f['mle_reship_ms']:.1f} ms (one Stat call; nothing sent). scp wall including its "
        f"setup: {f.get('scp_wall_mbps', 0):.0f} MB/s.",
    ]

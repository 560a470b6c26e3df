"""Discovery across hosts: an agent in each of three namespaces, `mle agents` in the root one."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from mle_cli.targets.connection import connect
from mle_proto.errors import MleError
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import REPO, pid_dead, run
from tests.fleet._netns import Fleet, Network
from tests.pki_helpers import tls_endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
Rows = dict[str, dict[str, Any]]


def _listed(fleet: Fleet) -> tuple[Rows, str]:
    done = fleet.run_mle("agents", "--json", check=True)
    return {row["name"]: row for row in json.loads(done.stdout)}, done.stderr


def _until(fleet: Fleet, holds: Callable[[Rows], bool], timeout: float = 60.0) -> Rows:
    """`mle agents --json` (each one a bounded browse) until `holds`; the last listing."""
    deadline = time.monotonic() + timeout
    rows, err = _listed(fleet)
    while not holds(rows) and time.monotonic() < deadline:
        rows, err = _listed(fleet)
    assert holds(rows), f"{json.dumps(rows, indent=1)}\n{err}"
    return rows


def _states(rows: Rows, *names: str) -> list[str]:
    return [rows.get(name, {}).get("state", "missing") for name in names]


def test_mle_agents_lists_every_host_of_the_fleet(fleet3: Fleet) -> None:
    rows = fleet3.wait_listed()
    for name, agent in fleet3.agents.items():
        row = rows[name]
        host, _, port = row["address"].rpartition(":")
        assert host == agent.host.address and int(port) == agent.state["port"], row
        assert (row["labels"], row["source"], row["state"]) == (agent.labels, "mdns", "up")
        assert (row["arch"], row["version"]) == (platform.machine(), agent.state["version"])
        assert row["fingerprint"] == agent.fingerprint != ""
    addresses = sorted(rows[name]["address"].rpartition(":")[0] for name in fleet3.agents)
    subnet = fleet3.network.subnet
    assert addresses == [f"{subnet}.11", f"{subnet}.12", f"{subnet}.13"]
    assert {name: rows[name]["labels"]["role"] for name in fleet3.agents} == {
        "srv-01": "server",
        "pi-01": "edge",
        "pi-02": "edge",
    }


def test_browsing_every_interface_finds_the_fleet_across_the_bridge(fleet3: Fleet) -> None:
    # "all" is the default (the environment beats the project config); a short gone_after
    # means "up" can only come from this browse, not from the fixture's earlier ones.
    fleet3.project.env.update(MLE_MDNS_INTERFACES="all", MLE_AGENT_GONE_AFTER="0.5")
    fleet3.wait_listed()


def test_the_operator_reaches_each_agent_over_mutual_tls_across_the_bridge(fleet3: Fleet) -> None:
    async def info(name: str, address: str, fingerprint: str) -> pb.AgentInfo:
        endpoint = tls_endpoint(fleet3.settings, name, address, fingerprint)
        conn = await connect(endpoint, fleet3.settings.rpc_timeout)
        try:
            return await conn.info()
        finally:
            await conn.close()

    for name, agent in fleet3.agents.items():
        got = run(info(name, agent.address, agent.fingerprint))
        assert (got.name, dict(got.labels)) == (name, agent.labels)
    pi01, pi02 = fleet3.agents["pi-01"], fleet3.agents["pi-02"]
    with pytest.raises(MleError, match=r"agent pi-01 .*refusing"):  # pi-02 answers for pi-01
        run(info("pi-01", pi02.address, pi01.fingerprint))
    with pytest.raises(MleError, match=f"its mDNS record says {pi02.fingerprint[:16]}"):
        run(info("pi-01", pi01.address, pi02.fingerprint))  # a record with another identity


def test_a_cut_host_is_listed_gone_then_up_again_when_healed(fleet3: Fleet) -> None:
    fleet3.cut("pi-02")
    rows = _until(fleet3, lambda r: _states(r, "pi-02", "pi-01", "srv-01") == ["gone", "up", "up"])
    gone = rows["pi-02"]
    assert gone["address"] == fleet3.agents["pi-02"].address  # kept, not dropped
    assert time.time() - gone["last_seen"] > fleet3.settings.agent_gone_after
    assert fleet3.agents["pi-02"].process.poll() is None  # it was the link, not the agent
    fleet3.heal("pi-02")
    fleet3.wait_listed()


def _avahi_unavailable() -> str | None:
    for tool in ("avahi-browse", "avahi-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: avahi-daemon, avahi-utils)"
    probe = subprocess.run(
        ["avahi-browse", "-t", "-p", "_mle-agent._tcp"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 0:
        return f"avahi-daemon is not usable here: {probe.stderr.strip()[:120]}"
    return None


def _avahi_resolved(bridge: str) -> dict[str, list[str]]:
    """`avahi-browse -rtp`'s resolved mle services on the bridge: name -> fields."""
    out = subprocess.run(
        ["avahi-browse", "-r", "-t", "-p", "_mle-agent._tcp"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    fields = [line.split(";") for line in out.splitlines()]
    return {f[3]: f for f in fields if len(f) > 9 and f[0] == "=" and f[1] == bridge}


def test_avahi_browse_sees_the_three_agents(fleet3: Fleet) -> None:
    reason = _avahi_unavailable()
    if reason is not None:
        pytest.skip(reason)
    bridge, names = fleet3.network.bridge, set(fleet3.agents)
    deadline = time.monotonic() + 60
    seen = _avahi_resolved(bridge)
    while not names <= set(seen) and time.monotonic() < deadline:
        time.sleep(0.5)  # Avahi may still be adding the new bridge
        seen = _avahi_resolved(bridge)
    assert names <= set(seen), seen
    for name, agent in fleet3.agents.items():
        _, _, _, _, _, _, _, address, port, txt = seen[name][:10]
        assert f"{address}:{port}" == agent.address
        assert '"proto=v1"' in txt and f'"name={name}"' in txt
        assert f'"labels=role={agent.labels["role"]}"' in txt


_KILLED_RUN = """
import json, sys, time
from pathlib import Path
from tests.fleet._netns import Fleet
fleet = Fleet.start(Path(sys.argv[1]), {"pi-09": {"role": "edge"}})
agent = fleet.agents["pi-09"]
print(json.dumps({"tag": fleet.network.tag, "agent": agent.process.pid}), flush=True)
time.sleep(600)
"""


def _tagged(tag: str) -> list[str]:
    """Namespaces and links whose name starts with `tag`."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30)
    found = [line.split()[0] for line in names.stdout.splitlines() if line.strip()]
    found += [line.split(":")[1].strip() for line in links.stdout.splitlines()]
    return [name for name in found if name.startswith(tag)]


def test_closing_a_fleet_leaves_nothing_behind(netns: None, tmp_path: Path) -> None:
    with Fleet.start(tmp_path, {"pi-01": {"role": "edge"}}) as fleet:
        tag, agent = fleet.network.tag, fleet.agents["pi-01"]
        assert len(_tagged(tag)) == 3, _tagged(tag)  # namespace, bridge, veth
    assert _tagged(tag) == []
    assert agent.process.poll() == 0  # SIGTERM: drained and exited cleanly


def test_a_fleet_whose_agent_fails_to_start_is_removed(netns: None, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="pi-01 exited 2") as failed:
        Fleet.start(tmp_path, {"pi-01": {"bad key!": "x"}})
    assert "invalid labels" in str(failed.value)
    assert _tagged(f"mlf{os.getpid()}") == []  # no other harness of this process is open now


def test_what_a_killed_run_left_is_removed_by_the_next(netns: None, tmp_path: Path) -> None:
    earlier = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert earlier.stdout is not None
        left = json.loads(earlier.stdout.readline())
    finally:
        earlier.kill()  # no cleanup runs: its namespace, links and agent stay behind
        earlier.communicate(timeout=30)
    assert _tagged(left["tag"]) and psutil.pid_exists(left["agent"])
    with Network.create():  # the next run
        assert _tagged(left["tag"]) == []
    assert pid_dead(left["agent"])

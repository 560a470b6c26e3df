"""`mle agents` against a real `mle-agentd --announce`, both as subprocesses, mDNS on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mle_cli.settings import Settings
from tests.agent_helpers import Daemon, daemon, leak_check
from tests.conftest import Project
from tests.pki_helpers import issue_agent_tls

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
LOOPBACK = "127.0.0.1"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture
def fleet(project: Project) -> Project:
    """The project browsing on loopback, with short timings."""
    project.env.update(
        MLE_MDNS_INTERFACES=LOOPBACK, MLE_MDNS_BROWSE_SECONDS="1.0", MLE_AGENT_GONE_AFTER="1.0"
    )
    return project


def _agentd(tmp_path: Path, interfaces: str = LOOPBACK) -> Any:
    return daemon(
        tmp_path,
        "--name", "pi-01",
        "--labels", "role=edge",
        "--announce",
        "--announce-interfaces", interfaces,
        "--listen", "127.0.0.1:0",
        "--http-listen", "off",
    )  # fmt: skip


def _listed(project: Project, *args: str) -> dict[str, dict[str, Any]]:
    done = project.mle("agents", "--json", *args, check=True)
    return {row["name"]: row for row in json.loads(done.stdout)}


def _until(project: Project, state: str, timeout: float = 30.0) -> dict[str, Any]:
    """`mle agents --json` until pi-01 is in `state`; its row."""
    deadline = time.monotonic() + timeout
    rows = _listed(project)
    while rows.get("pi-01", {}).get("state") != state and time.monotonic() < deadline:
        rows = _listed(project)
    assert rows.get("pi-01", {}).get("state") == state, rows
    return rows["pi-01"]


def _announced(agentd: Daemon) -> None:
    deadline = time.monotonic() + 30
    while "announced on mDNS" not in agentd.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "announced on mDNS as pi-01" in agentd.stderr(), agentd.stderr()


def test_mle_agents_lists_an_announced_agent_then_marks_it_gone(
    fleet: Project, tmp_path: Path
) -> None:
    with _agentd(tmp_path) as agentd:
        state = agentd.wait_ready()
        row = _until(fleet, "up")
        assert row["address"] == state["address"] and row["source"] == "mdns"
        assert row["labels"] == {"role": "edge"} and row["version"] == state["version"]
        assert row["arch"] and row["os"]
        table = fleet.mle("agents", check=True).stdout
        assert "pi-01" in table and "role=edge" in table and "mdns" in table
        agentd.signal(signal.SIGTERM)
        assert agentd.wait() == 0
    gone = _until(fleet, "gone")  # withdrawn on drain, cached, not dropped
    assert gone["address"] == state["address"]
    assert _listed(fleet, "--cached")["pi-01"]["state"] == "gone"


def test_mle_agents_shows_the_local_agent(fleet: Project) -> None:
    started = fleet.mle("agent", "start", check=True).stdout
    address = started.split()[-1]
    try:
        rows = _listed(fleet, "--cached")
        local = rows["local"]
        assert (local["source"], local["state"], local["address"]) == ("local", "up", address)
        assert local["arch"] and local["os"] and local["version"]
    finally:
        fleet.mle("agent", "stop", check=True)
    assert "local" not in _listed(fleet, "--cached")


def test_watch_refreshes_until_interrupted(fleet: Project) -> None:
    proc = fleet.spawn("agents", "--watch", "--json")
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    second = json.loads(proc.stdout.readline())  # after one bounded browse
    proc.send_signal(signal.SIGINT)
    code, _, err = fleet.finish(proc, timeout=30)
    assert isinstance(first, list) and isinstance(second, list)
    assert code == 0, err


def test_inventory_targets_are_listed_with_where_they_came_from(fleet: Project) -> None:
    (fleet.root / "targets").mkdir()
    (fleet.root / "targets" / "cloud.yaml").write_text(
        "group: cloud\n"
        "labels: {role: server}\n"
        "targets:\n"
        "  - name: srv-01\n"
        "    host: 127.0.0.1\n"
        "    agent: {port: 9}\n"
        "  - name: srv-02\n"
        "    labels: {role: db}\n"
    )
    done = fleet.mle("agents", "--json", "--cached", check=True)
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    srv1, srv2 = rows["srv-01"], rows["srv-02"]
    assert (srv1["source"], srv1["state"], srv1["address"]) == (
        "inventory",
        "unknown",
        "127.0.0.1:9",
    )
    assert (srv1["labels"], srv1["placeable"], srv1["answered"]) == (
        {"role": "server"},
        True,
        False,
    )
    assert (srv2["source"], srv2["state"], srv2["address"]) == ("inventory", "unknown", "")
    assert (srv2["labels"], srv2["placeable"]) == ({"role": "db"}, False)
    assert not (fleet.root / ".mle").exists()  # neither a ledger nor a CA made for a listing
    table = fleet.mle("agents", "--cached", check=True)
    assert "srv-01" in table.stdout and "inventory" in table.stdout and "unknown" in table.stdout
    assert "note: srv-02: target 'srv-02' (targets/cloud.yaml:7) has no host" in table.stderr
    assert "Traceback" not in table.stderr


def test_a_bad_inventory_file_is_one_located_line(fleet: Project) -> None:
    (fleet.root / "targets").mkdir()
    (fleet.root / "targets" / "pi.yaml").write_text("name: pi-01\nhost: 10.0.0.5:7443\n")
    done = fleet.mle("agents")
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.strip().splitlines()[0] == (
        "error: targets/pi.yaml:2:7: host: '10.0.0.5:7443' holds a port; "
        "write it as agent: {port: 7443}"
    )


def test_an_announced_tls_agent_is_listed_with_its_live_facts(
    fleet: Project, tmp_path: Path
) -> None:
    name = f"pi-tls-{time.monotonic_ns() % 10**6}"  # other tests may announce pi-01 on loopback
    tls = issue_agent_tls(Settings(project_dir=fleet.root), name, out_dir=tmp_path / "tls")
    args = ["--name", name, "--labels", "role=edge", "--announce"]
    args += ["--announce-interfaces", LOOPBACK, "--listen", "127.0.0.1:0", "--http-listen", "off"]
    with daemon(tmp_path, *args, *tls.flags) as agentd:
        state = agentd.wait_ready()
        deadline = time.monotonic() + 30
        row = _listed(fleet).get(name, {})
        while not row.get("answered") and time.monotonic() < deadline:
            row = _listed(fleet).get(name, {})
        line = _table_line(fleet, name)
        while " up " not in line and time.monotonic() < deadline:  # one browse may miss it
            line = _table_line(fleet, name)
    assert row.get("answered"), row
    assert (row["source"], row["state"], row["address"]) == ("mdns", "up", state["address"])
    assert (row["fingerprint"], row["labels"], row["version"]) == (
        tls.fingerprint, {"role": "edge"}, state["version"],
    )  # fmt: skip
    assert row["python"] and row["cpus"] >= 1 and row["memory_bytes"] > 0
    assert row["disk_free_bytes"] > 0 and row["load1"] is not None
    assert (row["running_tasks"], row["slots"]) == (0, row["cpus"])
    assert f"0/{row['cpus']}" in line and " GB" in line and row["python"] in line


def _table_line(project: Project, name: str) -> str:
    table = project.mle("agents", check=True).stdout
    return next((line for line in table.splitlines() if line.startswith(name)), "")


def _require_avahi() -> None:
    """Skip unless avahi-browse and avahi-publish can talk to a running avahi-daemon."""
    for tool in ("avahi-browse", "avahi-publish"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: avahi-utils)")
    probe = subprocess.run(
        ["avahi-browse", "-t", "-p", "_mle-agent._tcp"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if "Daemon not running" in probe.stderr or probe.returncode != 0:
        pytest.skip(f"avahi-daemon is not usable here: {probe.stderr.strip()[:120]}")


def test_avahi_browse_sees_the_agent(tmp_path: Path) -> None:
    _require_avahi()
    with _agentd(tmp_path, "all") as agentd:  # Avahi does not listen on loopback
        agentd.wait_ready()
        _announced(agentd)
        seen = subprocess.run(
            ["avahi-browse", "-t", "-r", "-p", "_mle-agent._tcp"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    assert "pi-01" in seen and "proto=v1" in seen and "role=edge" in seen


def test_a_service_avahi_publishes_is_listed(project: Project) -> None:
    _require_avahi()
    project.env.update(MLE_MDNS_BROWSE_SECONDS="2.0")  # every interface: Avahi skips loopback
    txt = ["proto=v1", "ver=0.1.0", "arch=aarch64", "os=Linux 6.1", "rt=onnxruntime"]
    publisher = subprocess.Popen(
        ["avahi-publish", "-s", "pi-avahi", "_mle-agent._tcp", "7443", *txt, "labels=role=edge"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        rows = _listed(project)
        while "pi-avahi" not in rows and time.monotonic() < deadline:
            rows = _listed(project)
    finally:
        publisher.terminate()
        publisher.communicate(timeout=10)
    row = rows.get("pi-avahi")
    assert row is not None, rows
    assert (row["arch"], row["os"], row["runtimes"], row["labels"]) == (
        "aarch64",
        "Linux 6.1",
        ["onnxruntime"],
        {"role": "edge"},
    )
    assert row["source"] == "mdns" and row["state"] == "up" and row["address"].endswith(":7443")

"""mDNS record validation (pure): what is an agent, what is ignored, and the ledger cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from mle_cli.ledger import Ledger
from mle_cli.ledger._agents import MAX_AGENTS, discovered_agents, record_discovered
from mle_cli.targets.discovery import TXT_MAX_BYTES, DiscoveredAgent, RecordError, parse_record

GOOD = {
    b"proto": b"v1",
    b"ver": b"0.1.0",
    b"arch": b"aarch64",
    b"os": b"Linux 6.1 (Debian 12)",
    b"rt": b"onnxruntime,ai_edge_litert",
    b"labels": b"role=edge,site=lab",
    b"fp": b"sha256:" + b"ab" * 32,
    b"name": b"pi-01",
}


def test_a_good_record_becomes_an_agent() -> None:
    agent = parse_record("pi-01", GOOD, ["fe80::1", "192.168.1.50"], 7443, now=5.0)
    assert agent == DiscoveredAgent(
        name="pi-01",
        address="192.168.1.50",
        port=7443,
        arch="aarch64",
        os="Linux 6.1 (Debian 12)",
        runtimes=("onnxruntime", "ai_edge_litert"),
        labels={"role": "edge", "site": "lab"},
        fingerprint="sha256:" + "ab" * 32,
        version="0.1.0",
        last_seen=5.0,
    )
    assert agent.endpoint == "192.168.1.50:7443"


def test_the_instance_name_stands_in_for_a_missing_name_and_optional_keys_default() -> None:
    agent = parse_record("box", {b"proto": b"v1", b"ver": b"1"}, ["::1"], 1, now=0.0)
    assert (agent.name, agent.labels, agent.runtimes, agent.endpoint) == ("box", {}, (), "[::1]:1")


BAD: dict[str, tuple[dict[bytes, bytes | None], list[str], int | None, str]] = {
    "wrong proto": ({**GOOD, b"proto": b"v2"}, ["10.0.0.1"], 7443, "protocol 'v2'"),
    "no proto": ({b"ver": b"1"}, ["10.0.0.1"], 7443, "protocol None"),
    "no version": ({**GOOD, b"ver": b""}, ["10.0.0.1"], 7443, "no 'ver'"),
    "no address": (GOOD, [], 7443, "no address"),
    "no port": (GOOD, ["10.0.0.1"], 0, "invalid port"),
    "port too big": (GOOD, ["10.0.0.1"], 70000, "invalid port"),
    "not utf-8": ({**GOOD, b"os": b"\xff\xfe"}, ["10.0.0.1"], 7443, "not UTF-8"),
    "escape codes": ({**GOOD, b"name": b"\x1b]0;x\x07"}, ["10.0.0.1"], 7443, "control"),
    "huge": ({**GOOD, b"junk": b"x" * TXT_MAX_BYTES}, ["10.0.0.1"], 7443, "bytes (limit"),
    "label no =": ({**GOOD, b"labels": b"role"}, ["10.0.0.1"], 7443, "malformed label"),
    "label bad key": ({**GOOD, b"labels": b"=x"}, ["10.0.0.1"], 7443, "malformed label"),
    "runtime junk": ({**GOOD, b"rt": b"onnx runtime;rm"}, ["10.0.0.1"], 7443, "malformed 'rt'"),
    "many runtimes": ({**GOOD, b"rt": b"a," * 40}, ["10.0.0.1"], 7443, "malformed 'rt'"),
    "bad fingerprint": ({**GOOD, b"fp": b"sha256:xyz"}, ["10.0.0.1"], 7443, "malformed 'fp'"),
    "label space": ({**GOOD, b"labels": b"role=edge lab"}, ["10.0.0.1"], 7443, "malformed label"),
    "label glob": ({**GOOD, b"labels": b"role=*"}, ["10.0.0.1"], 7443, "malformed label"),
    "label 64 chars": (
        {**GOOD, b"labels": b"r=" + b"e" * 64},
        ["10.0.0.1"],
        7443,
        "malformed label",
    ),
    "label unicode": (
        {**GOOD, b"labels": "site=Zürich".encode()},
        ["1.2.3.4"],
        7443,
        "malformed label",
    ),
}

# Names a selector could not state, or that would turn into one: each would crash `mle plan` or
# draw steps meant for other agents.
BAD_NAMES = {
    "unicode": "Ünïcode", "glob": "pi-*", "glob ?": "pi-?", "brackets": "[pi]",
    "selector text": "a role=edge", "comma": "pi,01]", "200 chars": "x" * 200,
    "dot dot": "pi..01", "only dots": "..", "leading dash": "-pi", "leading dot": ".pi",
    "slash": "pi/01", "colon": "pi:01", "space": "pi 01",
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_NAMES))
def test_a_record_whose_name_no_selector_could_state_is_refused(case: str) -> None:
    name = BAD_NAMES[case]
    with pytest.raises(RecordError, match="invalid agent name"):
        parse_record("x", {**GOOD, b"name": name.encode()}, ["10.0.0.1"], 7443, now=0.0)
    without = {k: v for k, v in GOOD.items() if k != b"name"}  # the instance stands in for it
    with pytest.raises(RecordError, match="invalid agent name"):
        parse_record(name, without, ["10.0.0.1"], 7443, now=0.0)


def test_names_and_labels_within_the_selector_rules_are_kept() -> None:
    labels = b"role=edge,rack=3,zone=eu-west/1a,owner=ops@lab,ver=1.2+b,url=a:b,k8s.io/x=,y_z=1"
    agent = parse_record("x", {**GOOD, b"name": b"Pi_01.lab-2", b"labels": labels}, ["10.0.0.1"],
                         7443, now=0.0)  # fmt: skip
    assert agent.name == "Pi_01.lab-2"
    assert agent.labels == {
        "role": "edge", "rack": "3", "zone": "eu-west/1a", "owner": "ops@lab", "ver": "1.2+b",
        "url": "a:b", "k8s.io/x": "", "y_z": "1",
    }  # fmt: skip
    assert parse_record("n" * 63, {b"proto": b"v1", b"ver": b"1"}, ["::1"], 1, 0.0).name == "n" * 63


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_is_refused_with_its_reason(case: str) -> None:
    properties, addresses, port, reason = BAD[case]
    with pytest.raises(RecordError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        parse_record("x", properties, addresses, port, now=0.0)


def test_the_cache_upserts_and_ages_agents_into_gone(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        first = DiscoveredAgent("pi-01", "10.0.0.1", 7443, labels={"role": "edge"}, last_seen=100.0)
        record_discovered(
            ledger, [first, DiscoveredAgent("pi-02", "10.0.0.2", 7443, last_seen=100.0)]
        )
        moved = DiscoveredAgent(
            "pi-01", "10.0.0.9", 7444, runtimes=("onnxruntime",), last_seen=150.0
        )
        record_discovered(ledger, [moved])
        rows = {r["name"]: r for r in discovered_agents(ledger, gone_after=30.0, now=160.0)}
    finally:
        ledger.close()
    assert (rows["pi-01"]["address"], rows["pi-01"]["port"]) == ("10.0.0.9", 7444)
    assert rows["pi-01"]["runtimes"] == ["onnxruntime"] and rows["pi-01"]["labels"] == {}
    assert (rows["pi-01"]["first_seen"], rows["pi-01"]["last_seen"]) == (100.0, 150.0)
    assert (rows["pi-01"]["state"], rows["pi-02"]["state"]) == ("up", "gone")


def test_the_cache_forgets_agents_long_gone_and_keeps_the_most_recent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        old = [DiscoveredAgent(f"old-{i}", "10.0.0.1", 7443, last_seen=1000.0) for i in range(3)]
        record_discovered(ledger, old, forget_after=100.0, now=1000.0)
        recent = DiscoveredAgent("recent-1", "10.0.0.2", 7443, last_seen=1050.0)
        record_discovered(ledger, [recent], forget_after=100.0, now=1100.0)  # old-*: 100 s ago
        assert len(discovered_agents(ledger, 30.0, now=1100.0)) == 4
        record_discovered(
            ledger, [], forget_after=100.0, now=1100.5
        )  # a write of nothing forgets too
        assert [r["name"] for r in discovered_agents(ledger, 30.0)] == ["recent-1"]
        flood = [
            DiscoveredAgent(f"flood-{i:04d}", "10.0.0.3", 7443, last_seen=2000.0 + i)
            for i in range(MAX_AGENTS + 5)
        ]
        record_discovered(ledger, flood, forget_after=7 * 86400.0, now=3000.0)
        names = [r["name"] for r in discovered_agents(ledger, 30.0)]
    finally:
        ledger.close()
    assert len(names) == MAX_AGENTS == 1000
    assert "recent-1" not in names and "flood-0004" not in names  # seen longest ago: dropped
    assert names[0] == "flood-0005" and names[-1] == f"flood-{MAX_AGENTS + 4:04d}"

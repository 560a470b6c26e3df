"""The inventory (`targets/*.yaml`) and the fleet view merged from it and the mDNS cache.

Bad inventory files live in tests/unit/inventory/, one case per file whose first line is
`# expect: <the exact message>`; each is copied alone into a project's `targets/` and loaded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from mle_cli.errors import RecipeError
from mle_cli.ledger import Ledger
from mle_cli.ledger._agents import record_discovered
from mle_cli.settings import Settings
from mle_cli.targets import known_targets, resolve_target
from mle_cli.targets.discovery import DiscoveredAgent
from mle_cli.targets.fleet import Target, fleet_targets, merge_targets
from mle_cli.targets.inventory import InventoryEntry, SshConfig, load_inventory
from mle_proto.errors import NotFound

BAD = Path(__file__).parent / "inventory"
CASES = sorted(BAD.glob("*.yaml"))
FP = "sha256:" + "ab" * 32


def _project(tmp_path: Path, **files: str) -> Path:
    """A project whose targets/ holds these files (name -> YAML text)."""
    (tmp_path / "targets").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp_path / "targets" / name).write_text(text)
    return tmp_path


def test_one_target_per_file(tmp_path: Path) -> None:
    text = """\
name: pi-01
host: 192.168.1.50
labels: {role: edge, site: lab}
ssh: {user: pi, port: 22, key: ~/.ssh/id_ed25519}
agent: {port: 7443}
"""
    [entry] = load_inventory(_project(tmp_path, **{"pi-01.yaml": text}))
    assert entry == InventoryEntry(
        name="pi-01",
        host="192.168.1.50",
        port=7443,
        labels={"role": "edge", "site": "lab"},
        ssh=SshConfig(user="pi", port=22, key="~/.ssh/id_ed25519"),
        file=Path("targets/pi-01.yaml"),
        line=1,
    )
    assert entry.address == "192.168.1.50:7443" and entry.where == "targets/pi-01.yaml:1"


def test_a_list_of_targets_and_yml_files(tmp_path: Path) -> None:
    text = """\
- name: srv-01
  host: srv-01.example.com
- name: srv-02
  host: "::1"
- name: pi-09
"""
    entries = load_inventory(_project(tmp_path, **{"cloud.yml": text}))
    assert [(e.name, e.address, e.line) for e in entries] == [
        ("pi-09", "", 5),
        ("srv-01", "srv-01.example.com:7443", 1),
        ("srv-02", "[::1]:7443", 3),
    ]
    assert all(e.port is None and e.ssh == SshConfig() for e in entries)


def test_a_group_shares_fields_that_each_target_overrides(tmp_path: Path) -> None:
    text = """\
group: edge
labels: {role: edge, site: lab}
ssh: {user: pi, key: ~/.ssh/pi}
agent: {port: 7000}
targets:
  - name: pi-01
    host: pi-01.local
  - name: pi-02
    labels: {site: home, rack: 3, gpu: true}
    ssh: {port: 2222}
    agent: {port: 7444}
"""
    pi1, pi2 = load_inventory(_project(tmp_path, **{"edge.yaml": text}))
    assert (pi1.group, pi1.labels, pi1.ssh, pi1.address) == (
        "edge",
        {"role": "edge", "site": "lab"},
        SshConfig(user="pi", port=22, key="~/.ssh/pi"),
        "pi-01.local:7000",
    )
    # labels merged, the entry's win; a number or boolean label is the text written
    assert pi2.labels == {"role": "edge", "site": "home", "rack": "3", "gpu": "true"}
    assert pi2.ssh == SshConfig(user="pi", port=2222, key="~/.ssh/pi")
    assert (pi2.port, pi2.host, pi2.address) == (7444, "", "")


def test_files_that_are_not_inventory_are_skipped(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        **{
            "a.yaml": "name: a-1\n",
            "empty.yaml": "# nothing yet\n",
            ".#a.yaml": "x: [",
            "notes.txt": "[",
        },
    )
    assert [e.name for e in load_inventory(project)] == ["a-1"]
    assert load_inventory(tmp_path / "nowhere") == []


def test_a_name_defined_twice_across_files_is_refused_where_it_repeats(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        **{"a.yaml": "name: pi-01\n", "b.yaml": "- name: pi-02\n- name: pi-01\n  host: x.lan\n"},
    )
    with pytest.raises(RecipeError) as caught:
        load_inventory(project)
    assert str(caught.value) == (
        "targets/b.yaml:2:9: [1].name: target 'pi-01' is already defined in targets/a.yaml:1"
    )
    assert caught.value.exit_code == 3


def test_unreadable_files_are_one_line(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "targets" / "bin.yaml").write_bytes(b"name: pi-01\nhost: \xff\xfe\n")
    with pytest.raises(RecipeError, match=r"^targets/bin\.yaml:2:7: not UTF-8 text$"):
        load_inventory(project)
    (project / "targets" / "bin.yaml").unlink()
    (project / "targets" / "big.yaml").write_text("# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(RecipeError, match=r"^targets/big\.yaml is over 1 MiB; target files"):
        load_inventory(project)
    (project / "targets" / "big.yaml").unlink()
    (project / "targets" / "dir.yaml").mkdir()
    with pytest.raises(RecipeError, match=r"^targets/dir\.yaml is not a regular file$"):
        load_inventory(project)


def test_there_are_many_bad_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_inventory_is_refused_with_its_message(case: Path, tmp_path: Path) -> None:
    expected = case.read_text().splitlines()[0].removeprefix("# expect: ")
    shutil.copy(case, _project(tmp_path) / "targets" / case.name)
    with pytest.raises(RecipeError) as caught:
        load_inventory(tmp_path)
    assert str(caught.value) == expected
    assert "\n" not in str(caught.value)


# ---- the fleet: inventory and the mDNS cache merged, with a real ledger file ----


def _settings(tmp_path: Path) -> Settings:
    return Settings(project_dir=tmp_path, agent_gone_after=60.0, mdns_browse_seconds=0.0)


def _cache(settings: Settings, *agents: DiscoveredAgent) -> None:
    ledger = Ledger(settings.ledger_path)
    try:
        record_discovered(ledger, agents)
    finally:
        ledger.close()


def _seen(
    name: str, address: str, port: int = 7443, ago: float = 1.0, **facts: Any
) -> DiscoveredAgent:
    return DiscoveredAgent(name, address, port, last_seen=time.time() - ago, **facts)


INVENTORY = """\
- name: both-1
  host: 10.1.0.1
  labels: {role: server, site: dc}
- name: both-noport
  host: 10.1.0.2
- name: both-nohost
  agent: {port: 7500}
- name: both-gone
  host: 10.1.0.4
- name: inv-host
  host: cloud.example.com
  labels: {role: server}
- name: inv-nohost
"""


def test_the_fleet_merges_inventory_and_mdns_by_name(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"fleet.yaml": INVENTORY}))
    _cache(
        settings,
        _seen("both-1", "10.1.0.1", 7600, labels={"role": "edge", "arch": "arm"},
              fingerprint=FP, arch="aarch64", os="Linux 6.1", version="0.4.0"),
        _seen("both-noport", "10.1.0.2", 7601),
        _seen("both-nohost", "192.168.1.11", 7602),
        _seen("both-gone", "10.1.0.4", ago=3600),
        _seen("mdns-up", "192.168.1.13", labels={"role": "edge"}),
        _seen("mdns-gone", "192.168.1.14", ago=3600),
        _seen("local", "192.168.1.66"),  # a record claiming the reserved name is ignored
    )  # fmt: skip
    targets = {t.name: t for t in fleet_targets(settings)}
    assert list(targets) == [
        "local", "both-1", "both-gone", "both-nohost", "both-noport",
        "inv-host", "inv-nohost", "mdns-gone", "mdns-up",
    ]  # fmt: skip
    assert targets["local"] == Target("local", "", source="local", state="up")
    both = targets["both-1"]
    assert (both.source, both.state, both.address) == ("inventory+mdns", "up", "10.1.0.1:7600")
    assert both.labels == {"role": "server", "site": "dc", "arch": "arm"}  # inventory keys win
    assert (both.fingerprint, both.arch, both.os, both.version) == (
        FP, "aarch64", "Linux 6.1", "0.4.0",
    )  # fmt: skip
    assert both.last_seen > 0 and both.inventory is not None
    assert targets["both-noport"].address == "10.1.0.2:7601"  # the port it announced
    assert targets["both-nohost"].address == "192.168.1.11:7500"  # the inventory's port wins
    # Silent on mDNS, but the inventory says where: dialled to find out, not written off.
    assert (targets["both-gone"].state, targets["both-gone"].placeable) == ("unknown", True)
    inv = targets["inv-host"]
    assert (inv.source, inv.state, inv.address, inv.placeable) == (
        "inventory", "unknown", "cloud.example.com:7443", True,
    )  # fmt: skip
    assert (inv.labels, inv.fingerprint, inv.last_seen) == ({"role": "server"}, "", 0.0)
    nohost = targets["inv-nohost"]
    assert (nohost.address, nohost.state, nohost.placeable) == ("", "unknown", False)
    assert (targets["mdns-up"].source, targets["mdns-up"].state) == ("mdns", "up")
    assert targets["mdns-up"].address == "192.168.1.13:7443"
    assert (targets["mdns-gone"].state, targets["mdns-gone"].placeable) == ("gone", False)
    assert known_targets(settings) == list(targets)


SPOOFED = """\
- name: pi-01
  host: 10.1.0.1
  labels: {role: edge}
- name: srv-01
  host: srv-01.example.com
- name: v6-01
  host: "fd00::1"
"""


def test_an_mdns_record_from_another_address_has_no_say_over_an_inventory_entry(
    tmp_path: Path,
) -> None:
    settings = _settings(_project(tmp_path, **{"fleet.yaml": SPOOFED}))
    _cache(
        settings,
        # Anyone on the LAN may announce pi-01: labels to draw steps, a fingerprint to block it.
        _seen("pi-01", "192.168.1.66", 7600, labels={"gpu": "yes", "role": "server"},
              fingerprint=FP, arch="x86_64", version="6.6.6"),
        _seen("srv-01", "203.0.113.9", 7601, labels={"gpu": "yes"}, fingerprint=FP),  # no DNS
        _seen("v6-01", "fd00:0:0:0:0:0:0:1", 7602, labels={"site": "lab"}, fingerprint=FP),
    )  # fmt: skip
    targets = {t.name: t for t in fleet_targets(settings)}
    pi = targets["pi-01"]
    assert (pi.source, pi.state, pi.address, pi.labels) == (
        "inventory", "unknown", "10.1.0.1:7443", {"role": "edge"},
    )  # fmt: skip
    assert (pi.fingerprint, pi.arch, pi.version, pi.last_seen) == ("", "", "", 0.0)
    srv = targets["srv-01"]
    assert (srv.source, srv.labels, srv.fingerprint) == ("inventory", {}, "")
    v6 = targets["v6-01"]  # the same IP written another way is the same host
    assert (v6.source, v6.address, v6.labels) == (
        "inventory+mdns",
        "[fd00::1]:7602",
        {"site": "lab"},
    )
    assert v6.fingerprint == FP
    assert resolve_target("pi-01", settings, start=False).fingerprint == ""


def test_merge_without_inventory_or_cache() -> None:
    assert merge_targets([], []) == []
    [only] = merge_targets([InventoryEntry("a-1", host="10.0.0.1", port=9000)], [])
    assert (only.address, only.source, only.state) == ("10.0.0.1:9000", "inventory", "unknown")


def test_the_fleet_never_creates_a_ledger_for_nothing(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"a.yaml": "name: a-1\nhost: 10.0.0.1\n"}))
    assert [t.name for t in fleet_targets(settings, browse=True)] == ["local", "a-1"]
    assert not settings.ledger_path.exists() and not settings.mle_dir.exists()


def test_a_bad_inventory_file_fails_the_fleet_in_one_line(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"a.yaml": "name: a-1\nport: 7443\n"}))
    with pytest.raises(RecipeError, match=r"^targets/a\.yaml:2:1: port: unknown key; "):
        fleet_targets(settings)


# ---- resolving a name to an endpoint (no network: the browse is turned off) ----


def test_unknown_names_list_the_known_targets(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"a.yaml": "- name: a-1\n- name: b-2\n"}))
    with pytest.raises(NotFound) as caught:
        resolve_target("c-3", settings)
    assert str(caught.value) == "unknown target 'c-3'; known targets: local, a-1, b-2"


def test_a_target_without_address_or_gone_is_refused_naming_what_was_seen(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"a.yaml": "- name: a-1\n"}))
    _cache(settings, _seen("pi-gone", "192.168.1.14", ago=600))
    with pytest.raises(NotFound) as caught:
        resolve_target("a-1", settings)
    assert str(caught.value) == (
        "target 'a-1' (targets/a.yaml:1) has no host and mDNS has not seen it; "
        "write its host: in the inventory, or start its agent with --announce"
    )
    with pytest.raises(NotFound) as caught:
        resolve_target("pi-gone", settings, start=False)
    assert str(caught.value) == (
        "target 'pi-gone' is gone: last seen on mDNS at 192.168.1.14:7443 10 min ago"
    )


def test_a_placeable_target_resolves_to_a_mutual_tls_endpoint(tmp_path: Path) -> None:
    settings = _settings(_project(tmp_path, **{"a.yaml": "name: a-1\nhost: 10.0.0.1\n"}))
    _cache(settings, _seen("pi-01", "192.168.1.9", 7600, fingerprint=FP))
    endpoint = resolve_target("pi-01", settings)
    assert (endpoint.name, endpoint.address, endpoint.fingerprint) == (
        "pi-01", "192.168.1.9:7600", FP,
    )  # fmt: skip
    assert endpoint.tls is not None and endpoint.token is None
    assert b"BEGIN CERTIFICATE" in endpoint.tls.ca and b"BEGIN CERTIFICATE" in endpoint.tls.cert
    other = resolve_target("a-1", settings, start=False)
    assert (other.address, other.fingerprint, other.tls) == ("10.0.0.1:7443", "", endpoint.tls)

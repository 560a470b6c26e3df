"""The fleet test harness: hosts in network namespaces on one bridge, a real `mle-agentd` on each.

    net = Network.create()               # bridge in the root namespace on a free 10.77.N.0/24
    host = net.add_host("pi-01")         # namespace + veth on the bridge, address 10.77.N.1x
    net.command("pi-01", "ping", "-c1", net.gateway)  # argv that runs inside the namespace
    net.cut("pi-01"); net.heal("pi-01")  # the host's link down / up, from the root namespace
    net.close()                          # namespaces, veths and bridge removed (or `with`)

    fleet = Fleet.start(tmp_path, {"srv-01": {"role": "server"}, "pi-01": {"role": "edge"}})
    fleet.agents["pi-01"]                # FleetAgent: name, host, address, labels, fingerprint...
    fleet.wait_listed()                  # until `mle agents` lists every running agent up
    fleet.run_mle("agents", "--json")    # `mle` as a subprocess in the operator project (root ns)
    fleet.project                        # tests.conftest.Project: .rows(sql), .wait_until(sql)
    fleet.settings                       # the operator's Settings, as `mle` loads them
    fleet.cut("pi-01"); fleet.heal("pi-01"); fleet.stop_agent("pi-01", signal.SIGKILL)
    fleet.start_agent("pi-01", "pi-01", {"role": "edge"})  # (re)start an agent on a host
    fleet.close()                        # agents stopped (SIGTERM, then SIGKILL), network removed

The fixture `fleet3` (conftest.py) is a started Fleet of srv-01 (role=server), pi-01 and pi-02
(role=edge), already listed up by `mle agents`. Agents serve mutual TLS with certificates from the
project CA (tests/pki_helpers.py). Names start with `mlf<pid><letter>`, so parallel runs do not
collide, and the next run removes what a killed one left. The operator's project asks mDNS on the
bridge only (`mdns_interfaces`); Linux still hands it multicast heard on other interfaces, so
agents other tests announce on this machine may be listed too: assert on addresses.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from mle_cli.settings import Settings, load_settings
from tests.agent_helpers import subprocess_env
from tests.conftest import Project, _stop_agents_under
from tests.pki_helpers import AgentTls, issue_agent_tls

__all__ = ["Fleet", "FleetAgent", "Host", "Network", "netns_unavailable"]

PREFIX = "mlf"
OPERATOR_CONFIG: dict[str, float] = {
    "mdns_browse_seconds": 1.0,
    "agent_gone_after": 3.0,
    "heartbeat_interval": 0.2,
    "agent_grace": 3.0,
}
AGENT_HEARTBEAT = 0.2  # seconds; the agent's own default interval
_TAG = re.compile(rf"{PREFIX}(\d+)[a-z]")
_IFNAME_MAX = 15  # Linux IFNAMSIZ - 1
_SUBNETS = range(20, 250)  # third octet of 10.77.N.0/24
_IP_TIMEOUT = 30.0
_serial = itertools.count()


def netns_unavailable() -> str | None:
    """Why fleet tests cannot run here (a skip reason), or None when they can."""
    if os.geteuid() != 0:
        return "fleet tests need root (network namespaces, veths, a bridge)"
    if shutil.which("ip") is None:
        return "fleet tests need `ip` from iproute2 (Debian: iproute2)"
    return _probe_netns()


@functools.cache
def _probe_netns() -> str | None:
    """Try `ip netns add` once: unprivileged containers refuse it."""
    probe = f"{PREFIX}{os.getpid()}z-probe"  # a leftover of a dead run if deleting it fails
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()[:160]}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class Host:
    """A host: its namespace, its address on the bridge, and the root-side end of its veth."""

    name: str
    ns: str
    address: str
    veth: str
    iface: str = "eth0"  # the namespace-side end


class Network:
    """A bridge in the root namespace and hosts (namespaces) attached to it by veth pairs."""

    def __init__(self, tag: str, subnet: str) -> None:
        self.tag = tag
        self.subnet = subnet  # "10.77.N"
        self.hosts: dict[str, Host] = {}

    @classmethod
    def create(cls) -> Network:
        """Remove a dead run's leftovers, then make the bridge on a free subnet."""
        remove_leftovers()
        tag = f"{PREFIX}{os.getpid()}{string.ascii_lowercase[next(_serial) % 26]}"
        net = cls(tag, _free_subnet())
        try:
            # No IGMP querier runs here, so snooping could only drop multicast; mDNS groups are
            # link-local and flooded anyway, but do not depend on that.
            _ip("link", "add", net.bridge, "type", "bridge", "mcast_snooping", "0")
            _ip("addr", "add", f"{net.gateway}/24", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
        except BaseException:
            net.close()
            raise
        return net

    @property
    def bridge(self) -> str:
        """The bridge's interface name."""
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        """The bridge's (root namespace's) address."""
        return f"{self.subnet}.1"

    def add_host(self, name: str) -> Host:
        """A new namespace with a veth on the bridge, lo up, and a multicast route for mDNS."""
        index = len(self.hosts)
        address, veth = f"{self.subnet}.{11 + index}", f"{self.tag}v{index}"
        host = Host(name, f"{self.tag}-{name}", address, veth)
        assert len(host.veth) <= _IFNAME_MAX and index < 200, host
        self.hosts[name] = host
        _ip("netns", "add", host.ns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", host.iface, "netns", host.ns)
        _ip("link", "set", host.veth, "master", self.bridge, "up")
        inside = ("-n", host.ns)
        _ip(*inside, "addr", "add", f"{host.address}/24", "dev", host.iface)
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "link", "set", host.iface, "up")
        _ip(*inside, "route", "add", "224.0.0.0/4", "dev", host.iface)
        return host

    def command(self, name: str, *argv: str) -> list[str]:
        """The argv that runs `argv` inside host `name`'s namespace."""
        return ["ip", "netns", "exec", self.hosts[name].ns, *argv]

    def cut(self, name: str) -> None:
        """Take the host's link down (its veth on the bridge side): it is unreachable."""
        _ip("link", "set", self.hosts[name].veth, "down")

    def heal(self, name: str) -> None:
        """Bring the host's link back up."""
        _ip("link", "set", self.hosts[name].veth, "up")

    def close(self) -> None:
        """Remove everything with this network's tag (processes inside are killed)."""
        remove_tagged(self.tag)
        self.hosts.clear()

    def remaining(self) -> list[str]:
        """Namespaces and links that still carry this network's tag (none after `close`)."""
        return [name for name in _netns_names() + _link_names() if name.startswith(self.tag)]

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_leftovers() -> None:
    """Remove namespaces and links of harness runs whose process is gone."""
    tags = {m.group(0) for name in _netns_names() + _link_names() if (m := _TAG.match(name))}
    for tag in sorted(tags):
        pid = int(_TAG.fullmatch(tag).group(1))  # type: ignore[union-attr]
        if not psutil.pid_exists(pid):
            remove_tagged(tag)


def remove_tagged(tag: str) -> None:
    """Kill processes in, and delete, every namespace and link whose name starts with `tag`."""
    for ns in _netns_names():
        if ns.startswith(f"{tag}-"):
            _kill_inside(ns)
    for link in _link_names():
        if link.startswith(tag):
            _ip("link", "del", link, check=False)
    for ns in _netns_names():
        if ns.startswith(f"{tag}-"):
            _ip("netns", "del", ns, check=False)


def _kill_inside(ns: str) -> None:
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error, ValueError):
            proc = psutil.Process(int(pid))
            proc.kill()
            procs.append(proc)
    psutil.wait_procs(procs, timeout=10)


def _netns_names() -> list[str]:
    listed = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _link_names() -> list[str]:
    listed = _ip("-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in listed.splitlines()]


def _free_subnet() -> str:
    """A 10.77.N subnet no address or route in the root namespace uses yet (N from the pid)."""
    used = _ip("-4", "-o", "addr", "show", check=False).stdout + _ip("-4", "route").stdout
    start = os.getpid() % len(_SUBNETS)
    for offset in range(len(_SUBNETS)):
        subnet = f"10.77.{_SUBNETS[(start + offset) % len(_SUBNETS)]}"
        if f"{subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.77.N.0/24 subnet for the fleet bridge")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@dataclass
class FleetAgent:
    """A real `mle-agentd` inside a host's namespace."""

    name: str
    host: Host
    labels: dict[str, str]
    process: subprocess.Popen[bytes]
    dir: Path
    tls: AgentTls  # its certificate from the project CA (name and address in the SAN) and key
    address: str = ""  # host:port, once ready
    state: dict[str, Any] = field(default_factory=dict)  # its state file

    @property
    def fingerprint(self) -> str:
        """`sha256:<hex>` of its certificate, as its mDNS record says."""
        return self.tls.fingerprint

    @property
    def ns(self) -> str:
        """The namespace it runs in."""
        return self.host.ns

    def stderr(self) -> str:
        """What the agent logged so far."""
        return (self.dir / "agentd.err").read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll the state file until it names this process; fill in the address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited {self.process.returncode}: {self.stderr()}"
                )
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.state = json.loads((self.dir / "state.json").read_text())
                if self.state.get("pid") == self.process.pid:
                    self.address = str(self.state["address"])
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready within {timeout:g}s: {self.stderr()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send `sig`, wait; SIGKILL if it does not exit. Its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


class Fleet:
    """A network of hosts, one agent per host, and an operator project in the root namespace."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.network = Network.create()
        self.agents: dict[str, FleetAgent] = {}
        try:
            self.project = _operator_project(root / "project", self.network.gateway)
            self.settings: Settings = load_settings(self.project.root, env=self.project.env)
        except BaseException:
            self.network.close()
            raise

    @classmethod
    def start(cls, root: Path, hosts: Mapping[str, Mapping[str, str]]) -> Fleet:
        """A network with one host per name, each running a ready agent of that name and labels."""
        fleet = cls(root)
        try:
            for name in hosts:
                fleet.network.add_host(name)
            started = [fleet.spawn_agent(name, name, hosts[name]) for name in hosts]
            for agent in started:
                agent.wait_ready()
        except BaseException:
            fleet.close()
            raise
        return fleet

    @property
    def project_dir(self) -> Path:
        """The operator project (it holds `.mle/`)."""
        return self.project.root

    def run_mle(
        self, *args: str, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run `mle ARGS` in the operator project, in the root namespace."""
        return self.project.mle(*args, check=check, timeout=timeout)

    def wait_listed(self, timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """`mle agents --json` until it lists every running agent up at its address; the rows."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.run_mle("agents", "--json", check=True)
            rows = {row["name"]: row for row in json.loads(done.stdout)}
            running = [a for a in self.agents.values() if a.process.poll() is None]
            if all(_listed_up(rows.get(a.name, {}), a) for a in running):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"not all listed up in {timeout:g}s: {rows} {done.stderr}")

    def start_agent(self, host: str, name: str, labels: Mapping[str, str]) -> FleetAgent:
        """Start an agent on `host` (added when new) and wait until it listens."""
        if host not in self.network.hosts:
            self.network.add_host(host)
        agent = self.spawn_agent(host, name, labels)
        agent.wait_ready()
        return agent

    def spawn_agent(self, host: str, name: str, labels: Mapping[str, str]) -> FleetAgent:
        """Start an agent on `host` without waiting (see FleetAgent.wait_ready)."""
        old = self.agents.get(name)
        assert old is None or old.process.poll() is not None, f"{name} is already running"
        where = self.network.hosts[host]
        home = self.root / "agents" / name
        home.mkdir(parents=True, exist_ok=True)
        tls = issue_agent_tls(self.settings, name, (where.address,), home / "tls")
        argv = self.network.command(host, *_agent_argv(name, labels, where, home), *tls.flags)
        with (home / "agentd.err").open("ab") as err:
            process = subprocess.Popen(
                argv, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err
            )
        agent = FleetAgent(name, where, dict(labels), process, home, tls)
        self.agents[name] = agent
        return agent

    def stop_agent(self, name: str, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Stop one agent with `sig` (SIGKILL: it gets no chance to say goodbye)."""
        return self.agents[name].stop(sig)

    def cut(self, name: str) -> None:
        """Cut the link of the host running agent `name`."""
        self.network.cut(self.agents[name].host.name)

    def heal(self, name: str) -> None:
        """Restore the link of the host running agent `name`."""
        self.network.heal(self.agents[name].host.name)

    def close(self) -> None:
        """Stop every agent (SIGTERM, then SIGKILL), the project's spawned `mle` processes and
        local agent, and remove the network; even after errors."""
        try:
            for agent in self.agents.values():
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    agent.stop()
            for proc in self.project.spawned:
                proc.kill()
                proc.communicate(timeout=30)
            _stop_agents_under(self.project.root)
        finally:
            self.network.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _listed_up(row: Mapping[str, Any], agent: FleetAgent) -> bool:
    return row.get("address") == agent.address and row.get("state") == "up"


def _agent_argv(name: str, labels: Mapping[str, str], host: Host, home: Path) -> list[str]:
    config = home / "agent.toml"
    config.touch()
    return [
        sys.executable, "-m", "mle_agent",
        "--config", str(config),
        "--name", name,
        "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
        "--listen", f"{host.address}:0",
        "--announce",
        "--announce-interfaces", host.address,
        "--data-dir", str(home / "data"),
        "--state-file", str(home / "state.json"),
        "--heartbeat-interval", str(AGENT_HEARTBEAT),
        "--drain-timeout", "2",
        "--kill-grace", "0.5",
    ]  # fmt: skip


def _operator_project(root: Path, gateway: str) -> Project:
    """A project whose `.mle/config.toml` has short timings and browses on the bridge only."""
    (root / ".mle").mkdir(parents=True)
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    lines = [f"{key} = {value}" for key, value in OPERATOR_CONFIG.items()]
    lines.append(f'mdns_interfaces = "{gateway}"')
    (root / ".mle" / "config.toml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLE_", "PYTEST_"))}
    env.update(
        HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config")
    )
    env["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
    return Project(root, env)

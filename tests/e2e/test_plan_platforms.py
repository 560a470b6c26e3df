"""`mle plan` predicts a remote step's cache hit with that target's platform, not the operator's.

A result is reused only on the platform class (OS family and architecture) it was made on, so a
step cached on this machine is a hit on an announced agent of the same platform, a miss on one of
another, and cannot be told for a target that never announced its platform. Agents are announced
with real mDNS on 127.0.0.1 (records as `mle-agentd --announce` makes them); `mle plan` browses.
"""

from __future__ import annotations

import json
import platform
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mle_agent.announce import SERVICE_TYPE
from mle_proto import PROTO_VERSION, __version__
from tests.conftest import Project
from tests.mdns_helpers import LOOPBACK, unique

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

RECIPE = """\
name: platforms
params:
  where: local
steps:
  tally:
    run: echo 42 > n.txt
    outputs: [n.txt]
    on: "{{ params.where }}"
"""


@pytest.fixture
def announced(project: Project) -> Iterator[dict[str, str]]:
    """Two agents announced on loopback: one of this machine's architecture, one of another;
    their names by kind."""
    project.env.update(MLE_MDNS_INTERFACES=LOOPBACK, MLE_MDNS_BROWSE_SECONDS="1.5")
    here = platform.machine()
    other = "armv7l" if here != "armv7l" else "aarch64"
    names = {"same": unique("srv"), "other": unique("pi")}
    zc = Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    infos = [
        _publish(zc, names["same"], here, "role=bench"),
        _publish(zc, names["other"], other, "role=bench"),
    ]
    try:
        yield names
    finally:
        for info in infos:
            zc.unregister_service(info)
        zc.close()


def _publish(zc: Zeroconf, name: str, arch: str, labels: str) -> ServiceInfo:
    txt = {"proto": PROTO_VERSION, "ver": __version__, "arch": arch, "name": name}
    txt.update(os=f"{platform.system()} 6.1 (Debian 12)", labels=labels)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=7443,
        addresses=[socket.inet_aton(LOOPBACK)],
        properties={k.encode(): v.encode() for k, v in txt.items()},
        server=f"{name}.local.",
    )
    zc.register_service(info)
    return info


def _cache(project: Project, where: str) -> dict[str, Any]:
    done = project.mle("plan", "r.yaml", "-p", f"where={where}", "--json", check=True)
    [step] = json.loads(done.stdout)["steps"]
    return dict(step["cache"])


def test_plan_predicts_with_the_platform_of_the_step_s_target(
    project: Project, announced: dict[str, str]
) -> None:
    (project.root / "r.yaml").write_text(RECIPE)
    project.mle("run", "r.yaml", check=True)  # cached on the local agent, this machine
    try:
        assert _cache(project, "local")["result"] == "hit"
        assert _cache(project, announced["same"])["result"] == "hit"
        assert _cache(project, announced["other"]) == {
            "result": "miss",
            "reason": "platform changed",
        }
        mixed = _cache(project, "role=bench")
        assert mixed["result"] == "unknown"
        assert mixed["reason"].startswith("its targets differ in platform (linux-")
    finally:
        project.mle("agent", "stop")


def test_plan_cannot_tell_for_a_target_that_never_announced_its_platform(
    project: Project,
) -> None:
    project.env.update(MLE_MDNS_INTERFACES=LOOPBACK, MLE_MDNS_BROWSE_SECONDS="0.5")
    (project.root / "targets").mkdir()
    (project.root / "targets" / "box.yaml").write_text("name: box-01\nhost: 127.0.0.1\n")
    (project.root / "r.yaml").write_text(RECIPE)
    project.mle("run", "r.yaml", check=True)
    try:
        assert _cache(project, "box-01") == {
            "result": "unknown",
            "reason": "the platform of box-01 is known once it announces itself (mDNS)",
        }
    finally:
        project.mle("agent", "stop")

"""Fleet fixtures: skipped with a reason unless network namespaces can be made (root, iproute2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_helpers import leak_check
from tests.fleet._netns import Fleet, netns_unavailable

FLEET3 = {"srv-01": {"role": "server"}, "pi-01": {"role": "edge"}, "pi-02": {"role": "edge"}}


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    """No agent process or thread outlives a fleet test (checked after its fixtures close)."""
    yield from leak_check()


@pytest.fixture
def netns() -> None:
    """Skip the test unless this machine lets it make network namespaces."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def fleet3(netns: None, tmp_path: Path) -> Iterator[Fleet]:
    """srv-01 (role=server), pi-01 and pi-02 (role=edge): one agent per namespace, each listed
    up by `mle agents` (so the operator's cache holds all three)."""
    with Fleet.start(tmp_path, FLEET3) as fleet:
        fleet.wait_listed()
        yield fleet
    assert fleet.network.remaining() == []

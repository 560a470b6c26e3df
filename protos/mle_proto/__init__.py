"""The mle wire protocol and the contracts both sides share: stubs, errors, artifact store."""

from __future__ import annotations

__all__ = ["AUTH_METADATA_KEY", "MAX_SLOTS", "MAX_UINT32", "PROTO_VERSION", "__version__"]

# The one place the version is written: the build reads it from here (pyproject.toml), and no
# `mle` command pays ~12 ms for importlib.metadata to find it.
__version__ = "0.1.0"
PROTO_VERSION = "v1"
# Bearer token header carried by every call to a token-protected agent.
AUTH_METADATA_KEY = "authorization"
# Model versions and batch sizes travel as uint32.
MAX_UINT32 = 2**32 - 1
# Tasks one agent runs at once. AgentInfo.slots is a uint32, but far fewer tasks than that can run
# at once on one host; a bound this low also catches a typo before it reaches the protocol.
MAX_SLOTS = 4096

"""The mle wire protocol and the contracts both sides share: stubs, errors, artifact store."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["AUTH_METADATA_KEY", "PROTO_VERSION", "__version__"]

PROTO_VERSION = "v1"
# Bearer token header carried by every call to a token-protected agent.
AUTH_METADATA_KEY = "authorization"

try:
    __version__ = version("mle-toolchain")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

"""The mle wire protocol and the contracts both sides share: stubs, errors, artifact store."""

from __future__ import annotations

import functools

__all__ = ["AUTH_METADATA_KEY", "PROTO_VERSION", "__version__", "package_version"]

PROTO_VERSION = "v1"
# Bearer token header carried by every call to a token-protected agent.
AUTH_METADATA_KEY = "authorization"


@functools.cache
def package_version() -> str:
    """The installed mle-toolchain version ("0.0.0" from a source tree without an install).

    Looked up when first asked: importlib.metadata costs ~15 ms at every start of `mle`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mle-toolchain")
    except PackageNotFoundError:
        return "0.0.0"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

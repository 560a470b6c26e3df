"""mle, operator side: the CLI, recipe compiler, scheduler, ledger and target management."""

from __future__ import annotations

from mle_proto import package_version

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

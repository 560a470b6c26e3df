"""mle, operator side: the CLI, recipe compiler, scheduler, ledger and target management."""

from __future__ import annotations

from mle_proto import __version__

__all__ = ["__version__"]

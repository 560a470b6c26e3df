"""Helpers for tests that run real zeroconf on 127.0.0.1."""

from __future__ import annotations

import time

import pytest
import zeroconf

LOOPBACK = "127.0.0.1"


def fast_mdns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter probe and announce intervals, as python-zeroconf's own tests do."""
    for name, millis in (("_CHECK_TIME", 10), ("_REGISTER_TIME", 10), ("_UNREGISTER_TIME", 10)):
        monkeypatch.setattr(zeroconf._core, name, millis)


def unique(prefix: str) -> str:
    """A service name no other test on this machine announces."""
    return f"{prefix}-{time.monotonic_ns() % 10**9}"

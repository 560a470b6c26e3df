"""How to reach one agent."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Endpoint"]


@dataclass(frozen=True)
class Endpoint:
    """An agent's address and the credentials to call it. The token is never printed."""

    name: str
    address: str
    token: str | None = field(default=None, repr=False)

"""Operator settings: one frozen object, built once and passed down.

Precedence: defaults < user config (~/.config/mle/config.toml) < project config (.mle/config.toml)
< `MLE_*` environment variables < command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mle_proto import MAX_SLOTS
from mle_proto.errors import UsageError

__all__ = ["Settings", "find_project_dir", "load_settings"]


@dataclass(frozen=True)
class Settings:
    """Everything the operator side can be configured with. Durations are seconds."""

    project_dir: Path
    agent_start_timeout: float = 20.0
    rpc_timeout: float = 15.0
    heartbeat_interval: float = 2.0  # agents heartbeat this often while a run uses them
    agent_grace: float = 10.0  # an agent silent this long has lost its running attempts
    cancel_poll_interval: float = 0.5
    local_agent_slots: int = 0  # 0 = the agent's default (its cpu count)
    mdns_browse_seconds: float = 1.5  # how long `mle agents` listens for mDNS answers
    mdns_interfaces: str = "all"  # "all", or the IPs to browse on, comma-separated
    agent_gone_after: float = 10.0  # a discovered agent unseen this long is shown as gone
    agent_forget_after: float = 7 * 24 * 3600.0  # ... and this long, dropped from the cache
    agent_metrics_keep: int = 10_000  # heartbeat rows kept in the ledger per agent (newest)
    enroll_listen: str = "0.0.0.0:7444"  # where `mle agent enroll-token` serves enrollment

    @property
    def mle_dir(self) -> Path:
        """The project's state directory."""
        return self.project_dir / ".mle"

    @property
    def ledger_path(self) -> Path:
        """The SQLite ledger."""
        return self.mle_dir / "ledger.db"

    @property
    def artifacts_dir(self) -> Path:
        """The project's content-addressed artifact store."""
        return self.mle_dir / "artifacts"

    @property
    def local_agent_dir(self) -> Path:
        """Data directory of the embedded local agent."""
        return self.mle_dir / "agent"


def find_project_dir(start: Path) -> Path:
    """The nearest directory at or above `start` holding `.mle/`, else `start` itself."""
    for candidate in (start, *start.parents):
        if (candidate / ".mle").is_dir():
            return candidate
    return start


def load_settings(
    project_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    **flags: Any,
) -> Settings:
    """Build settings from config files, environment and flags (None flags are ignored)."""
    env = os.environ if env is None else env
    root = project_dir or Path(env.get("MLE_PROJECT_DIR") or find_project_dir(Path.cwd()))
    values: dict[str, Any] = {}
    user_config = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mle/config.toml"
    for config in (user_config, root / ".mle" / "config.toml"):
        values.update(_read_config(config))
    fields = {f.name: f for f in dataclasses.fields(Settings) if f.name != "project_dir"}
    for name in fields:
        if (raw := env.get(f"MLE_{name.upper()}")) is not None:
            values[name] = raw
    values.update({k: v for k, v in flags.items() if v is not None})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(fields))}")
    typed = {name: _coerce(name, fields[name].type, value) for name, value in values.items()}
    return Settings(project_dir=root.resolve(), **typed)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return dict(tomllib.load(f))
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read config: {e}") from None


# Seconds may be 0 where 0 means "not at all" (browse no mDNS, follow no heartbeats) and infinite
# where it means "never" (show an agent gone, forget it). Elsewhere 0 or a negative would fail every
# call or declare every agent lost, and more than _MAX_SECONDS is no wait at all to gRPC (a
# deadline that far away expires at once) or never ends.
_ZERO_SECONDS_OK = {"mdns_browse_seconds", "heartbeat_interval"}
_NEVER_OK = {"agent_gone_after", "agent_forget_after"}
_MAX_SECONDS = 10**8  # three years
_MAX_COUNT = 2**31 - 1  # ledger rows kept: no use beyond


def _coerce(name: str, type_name: object, value: Any) -> Any:
    kind = {"float": float, "int": int}.get(str(type_name), str)
    try:
        coerced = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise UsageError(f"setting {name}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and not _seconds_ok(name, coerced):
        least = "0" if name in _ZERO_SECONDS_OK else "more than 0"
        most = "inf" if name in _NEVER_OK else str(_MAX_SECONDS)
        raise UsageError(f"setting {name}: expected seconds from {least} to {most}, got {value!r}")
    count_max = MAX_SLOTS if name == "local_agent_slots" else _MAX_COUNT
    if kind is int and not 0 <= coerced <= count_max:
        raise UsageError(f"setting {name}: expected 0 to {count_max}, got {value!r}")
    return coerced


def _seconds_ok(name: str, seconds: float) -> bool:
    if seconds == math.inf:
        return name in _NEVER_OK
    least_ok = seconds > 0 or (seconds == 0 and name in _ZERO_SECONDS_OK)
    return least_ok and seconds <= _MAX_SECONDS  # NaN fails both comparisons

"""The agent's one frozen settings object and how it is built.

Precedence, lowest first: defaults < TOML file (`--config`, else `MLE_AGENT_CONFIG`, else
`/etc/mle/agent.toml`, which may be absent) < `MLE_AGENT_<FIELD>` environment < command-line flags.
TOML keys and environment suffixes are the field names (`data_dir`, `MLE_AGENT_DATA_DIR`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mle_proto import MAX_SLOTS
from mle_proto.errors import UsageError

__all__ = [
    "DEFAULT_CONFIG",
    "ENV_PREFIX",
    "HEARTBEAT_RANGE",
    "MAX_MESSAGE_BYTES",
    "MAX_SLOTS",
    "NAME",
    "AgentSettings",
    "build_settings",
    "check_listen_security",
    "split_listen",
]

DEFAULT_CONFIG = Path("/etc/mle/agent.toml")
ENV_PREFIX = "MLE_AGENT_"
MiB = 1024 * 1024
_KEY_FILE = "agent.key"  # in the data dir (mle_agent.identity.KEY_FILE, which imports this module)
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
# The operator's rules (mle_cli.targets.selectors LABEL_VALUE and NAME): an agent it would ignore
# is refused here, at start, instead of silently never being listed.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9._/:@+-]{0,63}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # an agent (target) name
_LOG_LEVELS = ("debug", "info", "warning", "error")
HEARTBEAT_RANGE = (0.05, 60.0)  # seconds: any interval asked for is clamped to this
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC takes its message size limits as a C int
# A duration of infinity means "wait forever". Only the drain may do that: an operator may want
# running tasks to finish however long they take, and a second SIGTERM still hurries them. Every
# other wait (a kill grace, a load check, a request waiting for a model) must end.
_UNBOUNDED_DURATIONS = {"drain_timeout"}


def _default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/mle-agent")
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "mle-agent"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class AgentSettings:
    """Everything the agent is configured with; built once, passed down."""

    name: str = field(default_factory=socket.gethostname)
    labels: Mapping[str, str] = field(default_factory=dict)
    listen: str = "127.0.0.1:7443"
    data_dir: Path = field(default_factory=_default_data_dir)
    artifacts_dir: Path | None = None  # None = <data_dir>/artifacts
    slots: int = field(default_factory=_cpu_count)
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    insecure: bool = False
    state_file: Path | None = None
    drain_timeout: float = 30.0
    log_level: str = "info"
    kill_grace: float = 2.0  # SIGTERM to SIGKILL
    output_grace: float = 2.0  # how long to read pipes after the task's main process exited
    shutdown_grace: float = 1.0  # in-flight RPCs at server stop
    max_message_bytes: int = 4 * MiB
    max_log_line: int = 64 * 1024
    heartbeat_interval: float = 1.0  # seconds between heartbeats when the caller asks for 0
    # Model serving. http_listen: the OIP v2 REST routes and /metrics; None = the gRPC host at
    # the gRPC port + 1 (port 0 when the gRPC port is 0), "off" = no HTTP listener.
    http_listen: str | None = None
    serve_threads: int = 0  # runtime intra-op threads per loaded version; 0 = the runtime's choice
    infer_workers: int = 16  # threads running inference calls for the gRPC and HTTP front-ends
    load_check_timeout: float = 120.0  # seconds for the child-process load check of a new model
    load_wait: float = 10.0  # seconds a request waits for a version that is still loading
    # mDNS: always announced beyond loopback; interfaces: "all" or IPs, comma-separated.
    announce: bool = False
    announce_interfaces: str = "all"

    @property
    def artifacts_root(self) -> Path:
        """The content-addressed store's root."""
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def work_root(self) -> Path:
        """Where per-task work dirs live."""
        return self.data_dir / "work"

    @property
    def task_root(self) -> Path:
        """Where per-task control dirs live: the shim's log files and exit status."""
        return self.data_dir / "tasks"

    @property
    def models_root(self) -> Path:
        """Where served models live: `<name>/<version>/` and `<name>/route.json`."""
        return self.data_dir / "models"

    @property
    def outbox_path(self) -> Path:
        """The agent-local SQLite outbox."""
        return self.data_dir / "agent.db"

    @property
    def tls(self) -> bool:
        """Whether mutual TLS is configured."""
        return self.tls_cert is not None

    def is_loopback(self) -> bool:
        """Whether the listen address only accepts local connections."""
        host, _ = split_listen(self.listen)
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False  # any other name may resolve to a public address


def split_listen(listen: str) -> tuple[str, int]:
    """Split `HOST:PORT` (or `[v6]:PORT`) into host and port; raise UsageError when malformed."""
    host, sep, port_text = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"invalid listen address {listen!r}: expected HOST:PORT")
    return host, int(port_text)


def build_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], config: Path | None = None
) -> AgentSettings:
    """Merge defaults, the config file, the environment and flags (None = not given)."""
    explicit = config is not None or f"{ENV_PREFIX}CONFIG" in env
    path = config or Path(env.get(f"{ENV_PREFIX}CONFIG", DEFAULT_CONFIG))
    merged: dict[str, Any] = {}
    merged.update(_from_toml(path, required=explicit))
    merged.update(_from_env(env))
    merged.update({k: v for k, v in flags.items() if v is not None and k in _FIELDS})
    settings = AgentSettings(**{k: _coerce(k, v) for k, v in merged.items()})
    if settings.tls_cert is not None and settings.tls_key is None:
        # the key `mle-agentd --make-csr` made, where it stays: in the data dir
        settings = dataclasses.replace(settings, tls_key=settings.data_dir / _KEY_FILE)
    _validate(settings)
    return settings


_FIELDS: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(AgentSettings)}
_PATHS = {"data_dir", "artifacts_dir", "token_file", "tls_cert", "tls_key", "tls_ca", "state_file"}
_FLOATS = {
    "drain_timeout",
    "kill_grace",
    "output_grace",
    "shutdown_grace",
    "heartbeat_interval",
    "load_check_timeout",
    "load_wait",
}
_INTS = {"slots", "max_message_bytes", "max_log_line", "serve_threads", "infer_workers"}


def _from_toml(path: Path, *, required: bool) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise UsageError(f"config file {path} does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key {unknown[0]!r}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    names = {key: f"{ENV_PREFIX}{key.upper()}" for key in _FIELDS}
    return {key: env[name] for key, name in names.items() if name in env}


def _coerce(key: str, value: Any) -> Any:
    """Turn a TOML, environment or flag value into the field's type."""
    try:
        if key in _PATHS:
            return _coerce_path(key, value)
        if key in _FLOATS:
            return _duration(key, value)
        if key in _INTS:
            return _number(int, value)
        if key in ("insecure", "announce"):
            return _boolean(value)
        if key == "labels":
            return _parse_labels(value) if isinstance(value, str) else _label_table(value)
        if key == "log_level":
            return str(value).lower()
        return str(value)
    except (TypeError, ValueError, OverflowError) as exc:  # float() of a huge TOML integer
        raise UsageError(f"invalid {key}: {exc}") from None


def _coerce_path(key: str, value: Any) -> Path | None:
    """A path with `~` expanded; None when empty, except for the data dir, which is required."""
    if str(value):
        return Path(os.path.expanduser(str(value)))
    if key == "data_dir":
        raise ValueError("must not be empty")
    return None


def _duration(key: str, value: Any) -> float:
    """Seconds: a non-negative number, finite unless the field may wait forever."""
    number = float(_number(float, value))
    if number == math.inf and key not in _UNBOUNDED_DURATIONS:
        raise ValueError(f"expected a finite number of seconds, got {value!r}")
    return number


def _number(kind: type[int] | type[float], value: Any) -> int | float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if kind is int and isinstance(value, float) and not math.isfinite(value):  # TOML inf, nan
        raise ValueError(f"expected a whole number, got {value!r}")
    number = kind(value)
    if number != number or number < 0:  # NaN or negative
        raise ValueError(f"expected a non-negative number, got {value!r}")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _parse_labels(text: str) -> dict[str, str]:
    """Parse `k=v,k=v` into a dict; raise ValueError on a malformed pair."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"label {pair!r} is not key=value")
        labels.update(_label_table({key.strip(): value.strip()}))
    return labels


def _label_table(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError("labels must be a table of strings or 'k=v,k=v'")
    for key in value:
        if not _LABEL_KEY.fullmatch(str(key)):
            raise ValueError(f"label key {str(key)[:80]!r} is not valid")
        if not _LABEL_VALUE.fullmatch(str(value[key])):
            raise ValueError(
                f"label value {str(value[key])[:80]!r} is not valid: letters, digits and "
                ". _ / : @ + - (up to 63)"
            )
    return {str(k): str(v) for k, v in value.items()}


def _validate(settings: AgentSettings) -> None:
    split_listen(settings.listen)
    if not settings.name:
        raise UsageError("invalid name: must not be empty")
    if not NAME.fullmatch(settings.name) or ".." in settings.name:
        raise UsageError(
            f"invalid name {settings.name[:80]!r}: letters, digits and . _ - (up to 63, starting "
            "with a letter or digit); give --name"
        )
    if settings.slots < 1:
        raise UsageError("invalid slots: must be at least 1")
    if settings.slots > MAX_SLOTS:
        raise UsageError(f"invalid slots: must be at most {MAX_SLOTS}")
    if settings.log_level not in _LOG_LEVELS:
        choices = ", ".join(_LOG_LEVELS)
        raise UsageError(f"invalid log_level {settings.log_level!r}: one of {choices}")
    tls = (settings.tls_cert, settings.tls_key, settings.tls_ca)
    if any(tls) and not all(tls):
        raise UsageError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    if not 64 * 1024 <= settings.max_message_bytes <= MAX_MESSAGE_BYTES:
        raise UsageError(
            f"invalid max_message_bytes: must be between {64 * 1024} and {MAX_MESSAGE_BYTES}"
        )
    if settings.max_log_line < 1:
        raise UsageError("invalid max_log_line: must be at least 1")
    _check_interfaces(settings.announce_interfaces)
    low, high = HEARTBEAT_RANGE
    if not low <= settings.heartbeat_interval <= high:
        raise UsageError(
            f"invalid heartbeat_interval: must be between {low:g} and {high:g} seconds"
        )


def _check_interfaces(setting: str) -> None:
    """`all`, or IP addresses, comma-separated (empty means all, as when it is not set)."""
    if setting.strip() == "all":
        return
    for entry in filter(None, (part.strip() for part in setting.split(","))):
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            raise UsageError(
                f"invalid announce_interfaces: {entry[:80]!r} is not an IP address; "
                "give IPs, comma-separated, or all"
            ) from None


def check_listen_security(settings: AgentSettings) -> None:
    """Refuse TLS without its key, and a non-loopback listen address without mutual TLS unless
    --insecure accepts it."""
    _check_tls_key(settings)
    if settings.is_loopback() or settings.tls or settings.insecure:
        return
    raise UsageError(
        f"refusing to listen on {settings.listen} without TLS; "
        "give --tls-cert/--tls-key/--tls-ca, or --insecure to accept the risk"
    )


def _check_tls_key(settings: AgentSettings) -> None:
    """Say which key is missing and how to get one, not what loading it later would say."""
    key = settings.tls_key
    if settings.tls_cert is None or key is None:
        return
    try:
        key.stat()
    except (FileNotFoundError, NotADirectoryError):
        if key == settings.data_dir / _KEY_FILE:  # the default: where --make-csr puts it
            raise UsageError(
                f"no TLS key: expected {key} (made by mle-agentd --make-csr) or give --tls-key"
            ) from None
        raise UsageError(f"no TLS key: {key} (--tls-key) does not exist") from None
    except OSError:
        return  # there but not readable, say: loading it tells why

"""The target inventory: `targets/*.yaml` (and `.yml`) in the project, read safely and checked.

A file holds one target, a list of targets, or a group whose shared `labels`, `ssh` and `agent`
each of its targets overrides key by key. Every problem is a RecipeError located at
`targets/FILE:line:col: key.path:`. Pure: files in, entries out, no network.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mle_cli.errors import RecipeError
from mle_cli.recipe._loader import MAX_RECIPE_BYTES, Document, KeyPath, describe
from mle_cli.targets.selectors import LABEL_KEY, NAME, Selector, SelectorError

__all__ = ["DEFAULT_AGENT_PORT", "InventoryEntry", "SshConfig", "join_address", "load_inventory"]

DEFAULT_AGENT_PORT = 7443
_SUFFIXES = (".yaml", ".yml")
_ENTRY_KEYS = ("name", "host", "labels", "ssh", "agent")
_GROUP_KEYS = ("group", "labels", "ssh", "agent", "targets")
_SSH_KEYS = ("user", "port", "key")
_AGENT_KEYS = ("port", "dir")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*\.?")
_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# The agent's install directory on the device: absolute or under the login's home, in plain
# characters (it is written into shell commands, a systemd unit and a config file).
_AGENT_DIR = re.compile(r"(/|~/)[A-Za-z0-9._+@/-]{1,250}")
_SHAPE = "one target (name: ...), a list of targets, or a group (group: ..., targets: [...])"


@dataclass(frozen=True)
class SshConfig:
    """How to reach a target over SSH to install its agent (issue 5); never used to connect."""

    user: str = ""  # "" = the operator's SSH default
    port: int = 22
    key: str = ""  # a private key's path as written (`~` allowed); "" = the SSH agent's keys


@dataclass(frozen=True)
class InventoryEntry:
    """One target as the inventory describes it."""

    name: str
    host: str = ""  # "" = found by mDNS under its name
    port: int | None = None  # the agent's port; None = not written (DEFAULT_AGENT_PORT)
    labels: Mapping[str, str] = field(default_factory=dict)
    ssh: SshConfig = SshConfig()
    agent_dir: str = ""  # the agent's install directory on the device; "" = the default
    group: str = ""
    file: Path = Path()  # relative to the project, as messages show it
    line: int = 0

    @property
    def where(self) -> str:
        """`targets/pi-01.yaml:3`, for messages."""
        return f"{self.file}:{self.line}"

    @property
    def address(self) -> str:
        """`host:port` (IPv6 in brackets) to dial, or "" without a host."""
        if not self.host:
            return ""
        return join_address(self.host, self.port or DEFAULT_AGENT_PORT)


def join_address(host: str, port: int) -> str:
    """`host:port`, IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_inventory(project_dir: Path) -> list[InventoryEntry]:
    """Every target of `<project_dir>/targets/*.yaml` by name; RecipeError on any problem."""
    seen: dict[str, InventoryEntry] = {}
    for path in _inventory_files(project_dir):
        _FileReader(path, path.relative_to(project_dir)).read(seen)
    return sorted(seen.values(), key=lambda entry: entry.name)


def _inventory_files(project_dir: Path) -> list[Path]:
    folder = project_dir / "targets"
    try:
        names = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise RecipeError(f"{folder}: cannot list it ({exc.strerror or exc})") from None
    return [path for path in names if path.suffix in _SUFFIXES]


class _FileReader:
    """Reads one inventory file into entries, adding them to `seen` (name -> first entry)."""

    def __init__(self, path: Path, shown: Path) -> None:
        self.path = path
        self.shown = shown
        self.doc = Document(shown, {}, "", {}, {}, {})

    def read(self, seen: dict[str, InventoryEntry]) -> None:
        """Parse the file and add its entries to `seen`, refusing a name seen before."""
        data = self._parse()
        if data is None:
            return  # an empty file (or only comments) holds no target
        for entry, path in self._entries(data):
            if entry.name in seen:
                message = f"target {entry.name!r} is already defined in {seen[entry.name].where}"
                raise self.doc.error((*path, "name"), message)
            seen[entry.name] = entry

    def _parse(self) -> object:
        # The recipe loader's safe YAML: standard tags only, bounded depth, nodes and aliases.
        from mle_cli.recipe._loader import _Converter, _RecipeLoader

        text = _decode(self.shown, _read(self.path, self.shown))
        try:
            node = yaml.compose(text, Loader=_RecipeLoader)
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(self.shown, exc) from None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            message = f"invalid YAML: {exc.reason} (#x{exc.character:04x})"
            raise RecipeError(message, file=self.shown, line=line, col=col) from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"invalid YAML: {exc}", file=self.shown) from None
        if node is None:
            return None
        converter = _Converter(self.shown)
        data = converter.convert(node, ())
        self.doc = Document(self.shown, {}, "", converter.values, converter.keys, converter.texts)
        return data

    def _entries(self, data: object) -> Iterator[tuple[InventoryEntry, KeyPath]]:
        if isinstance(data, list):
            for index, item in enumerate(data):
                yield self._entry(item, (index,), _Shared()), (index,)
        elif isinstance(data, dict) and "group" in data:
            shared = self._group(data)
            if "targets" not in data:
                raise self.doc.error((), "a group needs its list of targets (targets: [...])")
            targets = data["targets"]
            if not isinstance(targets, list):
                message = f"expected a list of targets, not {describe(targets)}"
                raise self.doc.error(("targets",), message)
            for index, item in enumerate(targets):
                yield self._entry(item, ("targets", index), shared), ("targets", index)
        elif isinstance(data, dict):
            yield self._entry(data, (), _Shared()), ()
        else:
            raise self.doc.error((), f"a target file holds {_SHAPE}, not {describe(data)}")

    def _group(self, data: dict[str, object]) -> _Shared:
        self._known_keys(data, (), _GROUP_KEYS, "a group")
        name = self._name(data["group"], ("group",), "group")
        return _Shared(
            group=name,
            labels=self._labels(data.get("labels", {}), ("labels",)),
            ssh=self._section(data.get("ssh", {}), ("ssh",), _SSH_KEYS),
            agent=self._section(data.get("agent", {}), ("agent",), _AGENT_KEYS),
        )

    def _entry(self, item: object, path: KeyPath, shared: _Shared) -> InventoryEntry:
        if not isinstance(item, dict):
            raise self.doc.error(
                path, f"expected a target (a mapping with name:), not {describe(item)}"
            )
        self._known_keys(item, path, _ENTRY_KEYS, "a target")
        if "name" not in item:
            raise self.doc.error(path, "a target needs a name")
        name = self._name(item["name"], (*path, "name"), "target")
        ssh = {**shared.ssh, **self._section(item.get("ssh", {}), (*path, "ssh"), _SSH_KEYS)}
        agent = {
            **shared.agent,
            **self._section(item.get("agent", {}), (*path, "agent"), _AGENT_KEYS),
        }
        return InventoryEntry(
            name=name,
            host=self._host(item["host"], (*path, "host")) if "host" in item else "",
            port=_int_or_none(agent.get("port")),
            labels={**shared.labels, **self._labels(item.get("labels", {}), (*path, "labels"))},
            ssh=SshConfig(
                user=str(ssh.get("user", "")),
                port=_int_or_none(ssh.get("port")) or 22,
                key=str(ssh.get("key", "")),
            ),
            agent_dir=str(agent.get("dir", "")),
            group=shared.group,
            file=self.shown,
            line=self.doc.location(path).line or 0,
        )

    def _known_keys(
        self, data: Mapping[str, object], path: KeyPath, known: tuple[str, ...], what: str
    ) -> None:
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                message = f"unknown key; {what} has {', '.join(known)}"
                raise self.doc.error(
                    (*path, key), message, at_key=True, suggestion=close[0] if close else ""
                )

    def _name(self, value: object, path: KeyPath, what: str) -> str:
        text = self._string(value, path)
        if not NAME.fullmatch(text):
            raise self.doc.error(
                path,
                f"{text!r} is not a valid {what} name "
                "(letters, digits, '.', '_' and '-', starting with a letter or digit; at most 63)",
            )
        if what == "target" and text == "local":
            raise self.doc.error(
                path, "'local' is the embedded local agent; name this target otherwise"
            )
        return text

    def _string(self, value: object, path: KeyPath) -> str:
        if not isinstance(value, str):
            raise self.doc.error(path, f"expected a string, not {describe(value)}")
        return value

    def _host(self, value: object, path: KeyPath) -> str:
        host = self._string(value, path).strip()
        if _HOST.fullmatch(host) and len(host) <= 253:
            return host
        try:
            return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
        except ValueError:
            pass
        _, sep, port = host.rpartition(":")
        if sep and port.isdigit():
            raise self.doc.error(
                path, f"{host!r} holds a port; write it as agent: {{port: {port}}}"
            )
        raise self.doc.error(path, f"{host!r} is not a host name or an IP address")

    def _labels(self, value: object, path: KeyPath) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.doc.error(
                path, f"expected a mapping of label names to values, not {describe(value)}"
            )
        labels: dict[str, str] = {}
        for key, raw in value.items():
            if not LABEL_KEY.fullmatch(key):
                raise self.doc.error(
                    (*path, key), f"{key!r} is not a valid label name", at_key=True
                )
            labels[key] = self._label_value(raw, (*path, key), key)
        return labels

    def _label_value(self, raw: object, path: KeyPath, key: str) -> str:
        if isinstance(raw, bool | int | float):
            raw = self.doc.text(path)  # `rack: 3` or `gpu: true`: the label is the text written
        if not isinstance(raw, str):
            raise self.doc.error(path, f"expected a string, not {describe(raw)}")
        try:
            Selector.build((), {key: raw})
        except SelectorError:
            raise self.doc.error(path, f"{raw!r} is not a valid label value") from None
        return raw

    def _section(self, value: object, path: KeyPath, known: tuple[str, ...]) -> dict[str, object]:
        """The `ssh:` or `agent:` mapping, checked key by key."""
        if not isinstance(value, dict):
            raise self.doc.error(
                path, f"expected a mapping ({', '.join(known)}), not {describe(value)}"
            )
        self._known_keys(value, path, known, str(path[-1]))
        section: dict[str, object] = {}
        for key, raw in value.items():
            if key == "port":
                section[key] = self._port(raw, (*path, key))
            elif key == "user":
                section[key] = self._ssh_user(raw, (*path, key))
            elif key == "dir":
                section[key] = self._agent_dir(raw, (*path, key))
            else:
                section[key] = self._string(raw, (*path, key))
        return section

    def _port(self, value: object, path: KeyPath) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            shown = describe(value) if isinstance(value, bool) else repr(value)
            if not isinstance(value, str | int):
                shown = describe(value)
            raise self.doc.error(path, f"expected a port number (1-65535), not {shown}")
        return value

    def _agent_dir(self, value: object, path: KeyPath) -> str:
        text = self._string(value, path).rstrip("/")
        parts = text.split("/")[1:]
        if not _AGENT_DIR.fullmatch(text) or any(p in ("", ".", "..") for p in parts):
            raise self.doc.error(
                path,
                f"{text[:80]!r} is not an install directory: an absolute path or ~/..., of "
                "letters, digits and . _ + @ - (no . or .. parts)",
            )
        return text

    def _ssh_user(self, value: object, path: KeyPath) -> str:
        user = self._string(value, path)
        if not _SSH_USER.fullmatch(user):
            raise self.doc.error(path, f"{user!r} is not a valid user name")
        return user


@dataclass(frozen=True)
class _Shared:
    """What a group gives each of its targets."""

    group: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ssh: Mapping[str, object] = field(default_factory=dict)
    agent: Mapping[str, object] = field(default_factory=dict)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _read(path: Path, shown: Path) -> bytes:
    """The file's bytes, refusing anything but a regular file of at most MAX_RECIPE_BYTES."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"{shown} is not a regular file")
        with path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)  # one byte past the limit: it may have grown
    except PermissionError:
        raise RecipeError(f"{shown}: cannot read (permission denied)") from None
    except OSError as exc:
        raise RecipeError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{shown} is over 1 MiB; target files are limited to 1 MiB")
    return raw


def _decode(shown: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError("not UTF-8 text", file=shown, line=line, col=col) from None
    return text.removeprefix("\ufeff")


def _syntax_error(shown: Path, exc: yaml.MarkedYAMLError) -> RecipeError:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    if exc.context and "single document" in exc.context:
        message = "a target file is a single YAML document, but another one starts here"
    elif exc.context:
        message = f"invalid YAML: {exc.problem} ({exc.context})"
    else:
        message = f"invalid YAML: {exc.problem}"
    return RecipeError(message, file=shown, line=line, col=col)

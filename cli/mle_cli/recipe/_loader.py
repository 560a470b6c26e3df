"""Read a recipe file safely: size-limited, UTF-8, standard YAML tags only, every node located."""

from __future__ import annotations

import hashlib
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mle_cli.errors import RecipeError
from mle_cli.recipe.plan import SourceLocation

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_RECIPE_BYTES",
    "Document",
    "KeyPath",
    "describe",
    "format_path",
    "load_document",
]

MAX_RECIPE_BYTES = 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64

KeyPath = tuple[str | int, ...]
Mark = tuple[int, int]

_YAML = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"{_YAML}{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP, _MERGE = f"{_YAML}seq", f"{_YAML}map", f"{_YAML}merge"
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL})
_TAGS_BY_KIND: dict[type[Node], frozenset[str]] = {
    ScalarNode: _SCALAR_TAGS,
    SequenceNode: frozenset({_SEQ}),
    MappingNode: frozenset({_MAP}),
}
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_KINDS: tuple[tuple[type, str], ...] = (
    (bool, "true/false"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
)


@dataclass(frozen=True)
class Document:
    """A recipe's top-level mapping as plain values, with the line and column of every node."""

    source: Path
    data: dict[str, object]
    digest: str
    values: Mapping[KeyPath, Mark]
    keys: Mapping[KeyPath, Mark]
    texts: Mapping[KeyPath, str]

    def location(self, path: KeyPath, *, at_key: bool = False) -> SourceLocation:
        """Where the value (or key) at path was written, else its nearest located parent."""
        marks = self.keys if at_key else self.values
        probe = path
        while probe and probe not in marks:
            probe, marks = probe[:-1], self.values
        line, col = marks.get(probe, (1, 1))
        return SourceLocation(self.source, line, col)

    def error(
        self,
        path: KeyPath,
        message: str,
        *,
        at_key: bool = False,
        label: KeyPath | None = None,
        suggestion: str = "",
    ) -> RecipeError:
        """A RecipeError located at path, labelled with `label` (default: path)."""
        where = self.location(path, at_key=at_key)
        key = format_path(path if label is None else label)
        return RecipeError(
            message, file=where.file, line=where.line, col=where.col, key=key, suggestion=suggestion
        )

    def text(self, path: KeyPath) -> str:
        """The scalar at path exactly as written (`yes`, `010`), for values that are really text."""
        return self.texts[path]


def format_path(path: KeyPath) -> str:
    """`('steps', 'train', 'needs', 0)` -> `steps.train.needs[0]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def load_document(path: Path) -> Document:
    """Read and parse a recipe file into a located Document, or raise RecipeError."""
    raw = _read(path)
    text = _decode(path, raw)
    root = _compose(path, text)
    converter = _Converter(path)
    data = converter.convert(root, ())
    if not isinstance(data, dict):
        raise RecipeError(
            f"the top level must be a mapping (name:, steps:, ...), not {describe(data)}",
            file=path,
            line=root.start_mark.line + 1,
            col=root.start_mark.column + 1,
        )
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    return Document(path, data, digest, converter.values, converter.keys, converter.texts)


def _read(path: Path) -> bytes:
    """The file's bytes, refusing anything but a regular file of at most MAX_RECIPE_BYTES."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise RecipeError(f"{path} is a directory, not a recipe file")
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"{path} is not a regular file")
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(_too_big(path, info.st_size))
        with path.open("rb") as f:
            # Read one byte past the limit: the file may have grown since stat().
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such file") from None
    except PermissionError:
        raise RecipeError(f"{path}: cannot read (permission denied)") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(_too_big(path, len(raw)))
    return raw


def _too_big(path: Path, size: int) -> str:
    shown = f"{size / 1_000_000:.1f} MB" if size >= 2_000_000 else f"{size} bytes"
    return f"{path} is {shown}; recipes are limited to 1 MiB"


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError("not UTF-8 text", file=path, line=line, col=col) from None
    return text.removeprefix("\ufeff")


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting and reads `yes`, `on`, `2024-01-01` and `=` as strings."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        """Compose one node, refusing nesting deeper than MAX_DEPTH (the composer recurses)."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.1's implicit booleans (yes/no/on/off) and timestamps surprise people: `on: local`,
# `country: no`, `version: 2024-01-01`. Keep YAML 1.2's true/false; everything else stays a string.
_DROPPED = frozenset({_BOOL, f"{_YAML}timestamp", f"{_YAML}value"})
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _compose(path: Path, text: str) -> Node:
    try:
        node = yaml.compose(text, Loader=_RecipeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(path, exc) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"invalid YAML: {exc.reason} (#x{exc.character:04x})"
        raise RecipeError(message, file=path, line=line, col=col) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"invalid YAML: {exc}", file=path) from None
    if node is None:
        raise RecipeError(f"{path} is empty; a recipe needs at least 'name' and 'steps'")
    return node


def _syntax_error(path: Path, exc: yaml.MarkedYAMLError) -> RecipeError:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    if exc.context and "single document" in exc.context:
        message = "a recipe is a single YAML document, but another one starts here"
    elif exc.context:
        message = f"invalid YAML: {exc.problem} ({exc.context})"
    else:
        message = f"invalid YAML: {exc.problem}"
    return RecipeError(message, file=path, line=line, col=col)


def _mark(node: Node) -> Mark:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _display(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag


def describe(value: object) -> str:
    """How a value reads in a message: `a list`, `an integer`, `null`."""
    if value is None:
        return "null"
    for kind, name in _KINDS:
        if isinstance(value, kind):
            return name
    return type(value).__name__


class _Converter:
    """Turns composed nodes into plain values, recording marks, refusing foreign tags and bombs."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.values: dict[KeyPath, Mark] = {}
        self.keys: dict[KeyPath, Mark] = {}
        self.texts: dict[KeyPath, str] = {}
        self._constructor = SafeConstructor()
        self._count = 0
        self._open: set[int] = set()

    def convert(self, node: Node, path: KeyPath) -> object:
        """The plain value of node, found at path."""
        self._enter(node, path)
        self.values[path] = _mark(node)
        self._open.add(id(node))
        try:
            if isinstance(node, ScalarNode):
                return self._scalar(node, path)
            if isinstance(node, SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            raise self._error(node, path, f"unsupported YAML node {type(node).__name__}")
        finally:
            self._open.discard(id(node))

    def _error(self, node: Node, path: KeyPath, message: str) -> RecipeError:
        line, col = _mark(node)
        return RecipeError(message, file=self.source, line=line, col=col, key=format_path(path))

    def _enter(self, node: Node, path: KeyPath) -> None:
        self._count += 1
        if self._count > MAX_NODES:
            raise self._error(node, path, "too many nodes (YAML alias expansion?)")
        if id(node) in self._open:
            raise self._error(node, path, "recursive YAML alias")
        if node.tag not in _TAGS_BY_KIND.get(type(node), ()):
            raise self._error(node, path, f"unsupported YAML tag {_display(node.tag)!r}")

    def _scalar(self, node: ScalarNode, path: KeyPath) -> object:
        text: str = node.value
        self.texts[path] = text
        if node.tag == _STR:
            return text
        if node.tag == _NULL:
            return None
        if node.tag == _BOOL:
            if text.lower() not in SafeConstructor.bool_values:
                raise self._error(node, path, f"{text!r} is not a valid !!bool")
            return SafeConstructor.bool_values[text.lower()]
        try:
            if node.tag == _INT:
                return self._constructor.construct_yaml_int(node)
            return self._constructor.construct_yaml_float(node)
        except ValueError:
            raise self._error(node, path, f"{text!r} is not a valid {_display(node.tag)}") from None

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, object]:
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            child = (*path, key)
            if key in result:
                first = self.keys[child][0]
                message = f"duplicate key {key!r} (first defined on line {first})"
                raise self._error(key_node, path, message)
            self.keys[child] = _mark(key_node)
            result[key] = self.convert(value_node, child)
        return result

    def _key(self, node: Node, path: KeyPath) -> str:
        """A mapping key as written: keys are names, so `on`, `1` and `null` stay strings."""
        if isinstance(node, ScalarNode) and node.tag == _MERGE:
            # Merge keys are rejected: they hide where a value came from, and errors could not
            # point at the line the user has to change.
            raise self._error(node, path, "merge keys ('<<') are not supported; write the keys out")
        if node.tag not in _TAGS_BY_KIND.get(type(node), ()):
            raise self._error(node, path, f"unsupported YAML tag {_display(node.tag)!r}")
        if not isinstance(node, ScalarNode):
            raise self._error(node, path, "mapping keys must be plain strings")
        return str(node.value)

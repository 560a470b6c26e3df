"""Built-in steps that run on an agent: `mle/quantize` and `mle/benchmark` compile to commands.

Each becomes an ordinary command step running one of the agent's model tools with the agent's own
interpreter (`"$MLE_PYTHON" -m mle_agent.tools.<tool>`); its outputs and metrics file are derived
from `with:`. Literal values are shell-quoted here; templates are quoted when rendered at dispatch.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from mle_cli.recipe._fields import (
    TemplateSource,
    check_keys,
    closest,
    expect_mapping,
    scalar_text,
    work_path,
)
from mle_cli.recipe._loader import Document, KeyPath, describe

__all__ = [
    "BENCHMARK",
    "BENCHMARK_METRICS",
    "QUANTIZE",
    "QUANTIZE_METRICS",
    "TASK_BUILTINS",
    "TaskCommand",
    "compile_task",
    "is_template",
]

QUANTIZE, BENCHMARK = "mle/quantize", "mle/benchmark"
TASK_BUILTINS = (QUANTIZE, BENCHMARK)
QUANTIZE_METRICS, BENCHMARK_METRICS = "quantize.json", "bench.json"
MODES = ("int8-dynamic", "int8-static")
FORMATS = ("onnx", "tflite")
_OPTIONS = {
    QUANTIZE: ("model", "mode", "calibration", "eval", "to", "out"),
    BENCHMARK: ("models", "eval", "seconds", "pick"),
}
_TOOL = '"$MLE_PYTHON" -m mle_agent.tools.'
# A `{{ ... }}` expression; `{%` and `{#` (statements, comments) are refused in these values.
_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")


@dataclass(frozen=True)
class TaskCommand:
    """A task built-in compiled: its command, outputs (with where each was given), metrics file."""

    run: str
    outputs: tuple[tuple[KeyPath, str], ...]
    metrics: str
    templates: tuple[TemplateSource, ...]


def is_template(text: str) -> bool:
    """Whether a value holds template syntax (rendered at dispatch) rather than literal text."""
    return any(marker in text for marker in _MARKERS)


def compile_task(doc: Document, path: KeyPath, uses: str, value: object) -> TaskCommand:
    """The command step that a `uses: mle/quantize` or `uses: mle/benchmark` step stands for."""
    where = (*path, "with")
    options = expect_mapping(doc, where, value, "a mapping of options")
    check_keys(doc, where, options, _OPTIONS[uses])
    words = _Words(doc, where)
    if uses == QUANTIZE:
        return _quantize(doc, path, options, words)
    return _benchmark(doc, path, options, words)


class _Words:
    """Turns `with:` values into shell words and remembers the templates among them."""

    def __init__(self, doc: Document, where: KeyPath) -> None:
        self.doc = doc
        self.where = where
        self.templates: list[TemplateSource] = []

    def path(self, key: str | KeyPath, value: object, what: str = "a path") -> str:
        """A path in the work dir (literal: normalized and quoted)."""
        at = self._at(key)
        text = self._text(at, value, what)
        if is_template(text):
            return self._template(at, text)
        if text.startswith("-"):
            raise self.doc.error(at, f"path {text!r} must not start with '-'")
        return shlex.quote(work_path(self.doc, at, text, "path"))

    def text(self, key: str, value: object, what: str) -> str:
        """Any text (literal: quoted)."""
        at = self._at(key)
        text = self._text(at, value, what)
        return self._template(at, text) if is_template(text) else shlex.quote(text)

    def _at(self, key: str | KeyPath) -> KeyPath:
        return (*self.where, key) if isinstance(key, str) else key

    def _text(self, at: KeyPath, value: object, what: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.doc.error(at, f"expected {what}, got {describe(value)}")
        text = scalar_text(self.doc, at, value, what)
        if not text.strip():
            raise self.doc.error(at, f"expected {what}, got an empty string")
        return text

    def _template(self, at: KeyPath, text: str) -> str:
        """The value as one shell word: its expressions are quoted at dispatch, and each piece of
        literal text beside them is quoted here (quoting the whole would break the expressions)."""
        if "{%" in text or "{#" in text:
            message = "only {{ ... }} expressions may be used here ({% and {# are not allowed)"
            raise self.doc.error(at, message)
        self.templates.append(TemplateSource(at, text, quote=True))
        pieces: list[str] = []
        last = 0
        for match in _EXPRESSION.finditer(text):
            pieces += [_literal(text[last : match.start()]), match.group(0)]
            last = match.end()
        if "{{" in text[last:]:
            raise self.doc.error(at, "invalid template: '{{' is not closed by '}}'")
        pieces.append(_literal(text[last:]))
        return "".join(pieces)


def _literal(text: str) -> str:
    return shlex.quote(text) if text else ""


def _quantize(
    doc: Document, path: KeyPath, options: Mapping[str, object], words: _Words
) -> TaskCommand:
    where = words.where
    if "model" not in options:
        raise doc.error(where, "mle/quantize needs the model to quantize: with: {model: PATH}")
    model = words.path("model", options["model"])
    mode_text = words.text("mode", options.get("mode", MODES[0]), "int8-dynamic or int8-static")
    mode = str(options.get("mode", MODES[0]))
    if not is_template(mode) and mode not in MODES:
        hint = closest(mode, MODES)
        raise doc.error(
            (*where, "mode"), f"expected int8-dynamic or int8-static, got {mode!r}", suggestion=hint
        )
    words_ = [model, "--mode", mode_text]
    words_ += _calibration(doc, options, words, mode)
    if "eval" in options:
        words_ += ["--eval", words.path("eval", options["eval"])]
    to = _format(doc, where, options.get("to", FORMATS[0]))
    if to != "onnx":
        words_ += ["--to", to]
    out_path, out = _out(doc, path, options, to)
    words_ += ["--out", shlex.quote(out), "--metrics", QUANTIZE_METRICS]
    return TaskCommand(
        run=_TOOL + "quantize " + " ".join(words_),
        outputs=((out_path, out), ((*path, "uses"), QUANTIZE_METRICS)),
        metrics=QUANTIZE_METRICS,
        templates=tuple(words.templates),
    )


def _calibration(
    doc: Document, options: Mapping[str, object], words: _Words, mode: str
) -> list[str]:
    where = words.where
    if "calibration" not in options:
        if mode == "int8-static":
            message = "mode int8-static needs calibration data: add calibration: PATH (.npy/.npz)"
            raise doc.error((*where, "mode"), message)
        return []
    if mode == "int8-dynamic":
        message = "calibration data is used by mode int8-static only (add mode: int8-static)"
        raise doc.error((*where, "calibration"), message)
    return ["--calibration", words.path("calibration", options["calibration"])]


def _format(doc: Document, where: KeyPath, value: object) -> str:
    if isinstance(value, str) and value in FORMATS:
        return value
    shown = repr(value) if isinstance(value, str) else describe(value)
    hint = closest(value, FORMATS) if isinstance(value, str) else ""
    raise doc.error((*where, "to"), f"expected onnx or tflite, got {shown}", suggestion=hint)


def _out(
    doc: Document, path: KeyPath, options: Mapping[str, object], to: str
) -> tuple[KeyPath, str]:
    """The quantized model's path: `with.out`, else `<model stem>.int8.<format>` next to it."""
    where = (*path, "with")
    if "out" not in options:
        model = str(options["model"])
        if is_template(model):
            message = "the model is a template, so name the quantized file: add out: PATH"
            raise doc.error((*where, "model"), message)
        source = PurePosixPath(work_path(doc, (*where, "model"), model, "path"))
        return (*path, "uses"), str(source.with_name(f"{source.stem}.int8.{to}"))
    at = (*where, "out")
    value = options["out"]
    if not isinstance(value, str) or not value.strip():
        raise doc.error(at, f"expected a path, got {describe(value)}")
    if is_template(value):
        raise doc.error(at, "out names an output of the step: it cannot be a template")
    out = work_path(doc, at, value, "output path")
    if out == QUANTIZE_METRICS:
        message = f"{out!r} is where mle/quantize writes its metrics; choose another path"
        raise doc.error(at, message)
    return at, out


def _benchmark(
    doc: Document, path: KeyPath, options: Mapping[str, object], words: _Words
) -> TaskCommand:
    where = words.where
    if "models" not in options:
        message = "mle/benchmark needs the models to compare: with: {models: [PATH, ...]}"
        raise doc.error(where, message)
    words_ = _models(doc, options["models"], words)
    if "eval" in options:
        words_ += ["--eval", words.path("eval", options["eval"])]
    if "seconds" in options:
        words_ += ["--seconds", _seconds(doc, (*where, "seconds"), options["seconds"], words)]
    if "pick" in options:
        words_ += ["--pick", words.text("pick", options["pick"], "a budget such as p95<=20ms")]
    words_ += ["--metrics", BENCHMARK_METRICS]
    return TaskCommand(
        run=_TOOL + "benchmark " + " ".join(words_),
        outputs=(((*path, "uses"), BENCHMARK_METRICS),),
        metrics=BENCHMARK_METRICS,
        templates=tuple(words.templates),
    )


def _models(doc: Document, value: object, words: _Words) -> list[str]:
    at = (*words.where, "models")
    if not isinstance(value, list):
        return [words.path("models", value, "a path or a list of paths")]
    if not value:
        raise doc.error(at, "expected at least one model path, got an empty list")
    return [words.path((*at, i), item) for i, item in enumerate(value)]


def _seconds(doc: Document, at: KeyPath, value: object, words: _Words) -> str:
    if isinstance(value, str) and is_template(value):
        return words.text("seconds", value, "a number of seconds")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 0 < value <= 3600:  # type: ignore[operator]
        shown = doc.texts.get(at, repr(value)) if number else describe(value)
        shown = repr(value) if isinstance(value, str) else shown
        raise doc.error(at, f"expected a number of seconds from 0 to 3600, e.g. 5, got {shown}")
    return shlex.quote(doc.text(at))

"""The trace as one self-contained HTML page: a Gantt chart in inline SVG, inline CSS, no script.

Everything that comes from the ledger is escaped: step output is hostile, and a `</svg>` or
`<script>` in a log line must stay text. A Content-Security-Policy forbids scripts and any network
access as a second line of defence.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from html import escape

from mle_cli._trace_text import seconds
from mle_cli.render import printable
from mle_cli.trace import Phase, Row, Timeline

__all__ = ["OUTCOME_COLOURS", "PHASE_COLOURS", "render_html"]

PHASE_COLOURS = {
    "queued": "#ced4da",
    "retry": "#ffd43b",
    "pending": "#a5d8ff",
    "staging": "#b197fc",
    "running": "#1971c2",
    "waiting": "#ff922b",
}
OUTCOME_COLOURS = {
    "succeeded": "#2f9e44",
    "cached": "#8ce99a",
    "failed": "#e03131",
    "timed-out": "#f76707",
    "lost": "#862e9c",
    "cancelled": "#868e96",
    "skipped": "#adb5bd",
    "running": "#1c7ed6",
    "retrying": "#f59f00",
    "waiting": "#f59f00",
    "pending": "#ced4da",
    "detached": "#fab005",
}
_LABEL_W, _CHART_W, _PAD_R = 320, 860, 40
_ROW_H, _BAR_H, _AXIS_H = 26, 16, 34
_CSS = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #212529; background: #fff; }
h1 { font-size: 20px; margin: 0 0 8px; } code { font-size: 0.95em; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0 0 12px; }
dt { color: #868e96; } dd { margin: 0; }
.legend span { display: inline-block; margin-right: 14px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; }
figure { margin: 12px 0; overflow-x: auto; }
svg text { font: 12px system-ui, sans-serif; fill: #212529; }
svg .tick-label { fill: #868e96; }
table { border-collapse: collapse; margin-top: 12px; }
td, th { padding: 2px 10px; text-align: left; vertical-align: top; border-bottom: 1px solid #eee; }
td.text { font-family: ui-monospace, monospace; white-space: pre-wrap; max-width: 480px; }
"""


def render_html(timeline: Timeline) -> str:
    """The page for a timeline."""
    title = _text(f"mle trace {timeline.run_id}")
    policy = "default-src 'none'; style-src 'unsafe-inline'"
    return "\n".join(
        [
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
            f"<title>{title}</title><style>{_CSS}</style></head><body>",
            _header(timeline),
            _legend(),
            f"<figure>{_svg(timeline)}</figure>",
            _table(timeline),
            "</body></html>\n",
        ]
    )


def _text(value: object) -> str:
    """Escaped for HTML text and attributes alike, control characters made visible."""
    return escape(printable(str(value)), quote=True)


def _colour(status: str) -> str:
    return OUTCOME_COLOURS.get(status, "#495057")


def _wall(timeline: Timeline, offset: float) -> str:
    moment = dt.datetime.fromtimestamp(timeline.origin + offset)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _header(t: Timeline) -> str:
    items = [
        ("recipe", f"{_text(t.recipe)} ({_text(t.source)})"),
        ("status", f'<strong style="color:{_colour(t.status)}">{_text(t.status)}</strong>'),
        ("started", _text(_wall(t, 0.0))),
        ("duration", _text(seconds(t.duration))),
        ("attempts", str(len(t.attempts))),
    ]
    if t.message:
        items.append(("message", _text(t.message)))
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f"<header><h1>run <code>{_text(t.run_id)}</code></h1><dl>{body}</dl></header>"


def _legend() -> str:
    swatches = [(kind, colour) for kind, colour in PHASE_COLOURS.items()]
    swatches += [(f"outcome: {s}", OUTCOME_COLOURS[s]) for s in ("succeeded", "failed", "cached")]
    spans = "".join(
        f'<span><i class="swatch" style="background:{c}"></i>{_text(k)}</span>' for k, c in swatches
    )
    return f'<p class="legend">{spans}</p>'


def _svg(t: Timeline) -> str:
    width = _LABEL_W + _CHART_W + _PAD_R
    height = _AXIS_H + len(t.rows) * _ROW_H + 8
    scale = _CHART_W / t.end if t.end > 0 else 0.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="timeline of the run">',
        *_axis(t, scale, height),
    ]
    for i, row in enumerate(t.rows):
        parts.append(_row(t, row, _AXIS_H + i * _ROW_H, scale, stripe=i % 2 == 0))
    parts.append("</svg>")
    return "\n".join(parts)


def _axis(t: Timeline, scale: float, height: int) -> Iterator[str]:
    step = _tick_step(t.end)
    for k in range(int(t.end / step + 1e-9) + 1):
        x = _LABEL_W + k * step * scale
        yield (
            f'<line class="tick" x1="{x:.1f}" y1="{_AXIS_H - 6}" x2="{x:.1f}" y2="{height}" '
            f'stroke="#e9ecef"/><text class="tick-label" x="{x:.1f}" y="{_AXIS_H - 12}" '
            f'text-anchor="middle">{_text(seconds(k * step))}</text>'
        )


def _tick_step(end: float) -> float:
    """1, 2 or 5 times a power of ten, giving at most ten ticks."""
    if end <= 0:
        return 1.0
    raw = end / 10
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _row(t: Timeline, row: Row, y: int, scale: float, stripe: bool) -> str:
    kind = "attempt" if row.attempt is not None else "step"
    label = row.step_id + (f" #{row.attempt}" if row.attempt is not None else "")
    mid = y + _ROW_H / 2 + 4
    parts = [
        f'<g class="row {kind}" data-step="{_text(row.step_id)}" '
        f'data-attempt="{row.attempt or ""}" data-status="{_text(row.status)}">',
        f"<title>{_text(_row_title(t, row))}</title>",
    ]
    if stripe:
        parts.append(f'<rect x="0" y="{y}" width="100%" height="{_ROW_H}" fill="#f8f9fa"/>')
    parts.append(f'<text x="8" y="{mid:.1f}">{_text(label)}</text>')
    parts.append(
        f'<text x="{_LABEL_W - 12}" y="{mid:.1f}" text-anchor="end" '
        f'style="fill:{_colour(row.status)}">{_text(row.status)}</text>'
    )
    top = y + (_ROW_H - _BAR_H) / 2
    parts += [_phase(t, row, p, top, scale) for p in row.phases if p.duration > 0]
    parts.append(_outcome(row, top, scale))
    parts.append("</g>")
    return "".join(parts)


def _phase(t: Timeline, row: Row, phase: Phase, top: float, scale: float) -> str:
    x = _LABEL_W + phase.start * scale
    width = max(phase.duration * scale, 1.0)
    title = (
        f"{row.step_id}: {phase.kind} {seconds(phase.duration)} "
        f"({_wall(t, phase.start)} -> {_wall(t, phase.end)})"
    )
    return (
        f'<rect class="phase {phase.kind}" x="{x:.2f}" y="{top:.1f}" width="{width:.2f}" '
        f'height="{_BAR_H}" fill="{PHASE_COLOURS.get(phase.kind, "#495057")}">'
        f"<title>{_text(title)}</title></rect>"
    )


def _outcome(row: Row, top: float, scale: float) -> str:
    """A tick in the outcome's colour where the row ends (or a diamond for a mark)."""
    if row.end is None:
        return ""
    x = _LABEL_W + row.end * scale
    colour = _colour(row.status)
    if not row.phases:
        cy, r = top + _BAR_H / 2, _BAR_H / 2
        points = (
            f"{x:.1f},{cy - r:.1f} {x + r:.1f},{cy:.1f} {x:.1f},{cy + r:.1f} {x - r:.1f},{cy:.1f}"
        )
        return f'<polygon class="mark" points="{points}" fill="{colour}"/>'
    return (
        f'<rect class="outcome" x="{x:.2f}" y="{top - 2:.1f}" width="4" '
        f'height="{_BAR_H + 4}" fill="{colour}"/>'
    )


def _row_title(t: Timeline, row: Row) -> str:
    head = row.step_id
    if row.attempt is not None:
        head += f" attempt {row.attempt} on {row.agent}"
    lines = [
        f"{head}: {row.status}" + (f", exit {row.exit_code}" if row.exit_code is not None else "")
    ]
    if row.start is not None:
        lines.append(
            f"start +{seconds(row.start)} ({_wall(t, row.start)}), "
            f"duration {seconds(row.duration)}" + (" so far" if row.live else "")
        )
    lines += [f"{p.kind}: {seconds(p.duration)}" for p in row.phases]
    if row.message:
        lines.append(row.message)
    if row.last_line:
        lines.append(f"last line: {row.last_line}")
    return "\n".join(lines)


def _table(t: Timeline) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("step", "#", "agent", "status", "exit", "start", "time", "message", "last line")
    )
    body = []
    for row in t.rows:
        cells = (
            row.step_id,
            "" if row.attempt is None else row.attempt,
            row.agent,
            row.status,
            "" if row.exit_code is None else row.exit_code,
            "" if row.start is None else f"+{seconds(row.start)}",
            seconds(row.duration) if row.phases or row.attempt else "-",
        )
        tds = "".join(f"<td>{_text(c)}</td>" for c in cells)
        texts = "".join(f'<td class="text">{_text(c)}</td>' for c in (row.message, row.last_line))
        body.append(f"<tr>{tds}{texts}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

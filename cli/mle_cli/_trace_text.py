"""The trace as lines of text for a terminal: columns, then a bar per row drawn to scale.

A line is a list of (text, style key) pieces; `render.print_trace` colours them by key, so this
module stays free of rich. Keys: "" (plain), "head", a phase kind, or "status:<status>".
"""

from __future__ import annotations

from collections.abc import Sequence

from mle_cli.trace import Row, Timeline

__all__ = ["BAR_CHARS", "Line", "bar", "seconds", "trace_lines"]

Piece = tuple[str, str]
Line = list[Piece]

BAR_CHARS = {
    "queued": ".",
    "retry": "~",
    "pending": ":",
    "staging": "=",
    "running": "#",
    "waiting": "?",
}
_MARKS = {"cached": "*"}  # a step without attempts and without a wait; other statuses: "x"
_LEGEND = (
    ("queued", "queued"),
    ("retry", "retry wait"),
    ("pending", "pending on the agent"),
    ("staging", "staging"),
    ("running", "running"),
    ("waiting", "waiting for approval"),
)
_COLUMNS = ("STEP", "#", "AGENT", "START", "TIME", "STATUS", "EXIT")
_MIN_BAR = 10


def trace_lines(timeline: Timeline, width: int) -> list[Line]:
    """The whole trace: a title, a header, one line per row and a legend, fitting `width`."""
    cells = [_cells(r) for r in timeline.rows]
    widths = [max(len(c[i]) for c in [_COLUMNS, *cells]) for i in range(len(_COLUMNS))]
    bar_width = max(_MIN_BAR, width - sum(widths) - 2 * len(widths) - 2)
    lines = [_title(timeline), _header(widths, bar_width, timeline.end)]
    for row, row_cells in zip(timeline.rows, cells, strict=True):
        pieces = _columns(row_cells, widths, row.status)
        lines.append([*pieces, ("|", ""), *bar(row, timeline.end, bar_width), ("|", "")])
    return lines + _legend(width)


def bar(row: Row, end: float, width: int) -> list[Piece]:
    """The row's phases as `width` characters on a scale from 0 to `end` seconds."""
    kinds = [""] * width
    scale = width / end if end > 0 else 0.0
    for phase in row.phases:
        if phase.duration <= 0:
            continue
        first = min(int(phase.start * scale), width - 1)
        last = max(first + 1, min(width, round(phase.end * scale)))
        kinds[first:last] = [phase.kind] * (last - first)
    if row.start is not None and not any(kinds):  # too short to see, or a mark: one character
        kind = row.phases[-1].kind if row.phases else f"status:{row.status}"
        kinds[min(int(row.start * scale), width - 1)] = kind
    return _group(kinds)


def seconds(value: float | None) -> str:
    """0.25s, 12.3s, 3m04s, 2h01m."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _cells(row: Row) -> tuple[str, ...]:
    time_cell = seconds(row.duration) + ("+" if row.live else "")
    return (
        row.step_id,
        "-" if row.attempt is None else str(row.attempt),
        row.agent or "-",
        "-" if row.start is None else "+" + seconds(row.start),
        time_cell if row.duration is not None and (row.phases or row.attempt) else "-",
        row.status,
        "-" if row.exit_code is None else str(row.exit_code),
    )


def _columns(cells: Sequence[str], widths: Sequence[int], status: str) -> list[Piece]:
    pieces: list[Piece] = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        key = f"status:{status}" if _COLUMNS[i] == "STATUS" else ""
        pieces.append((cell.ljust(width), key))
        pieces.append(("  ", ""))
    return pieces


def _title(timeline: Timeline) -> Line:
    line: Line = [(f"run {timeline.run_id}", "head"), (f" {timeline.recipe} ", "")]
    line.append((timeline.status, f"status:{timeline.status}"))
    line.append((f" in {seconds(timeline.duration)}", ""))
    if timeline.message:
        line.append((f": {timeline.message}", ""))
    return line


def _header(widths: Sequence[int], bar_width: int, end: float) -> Line:
    names = "  ".join(name.ljust(width) for name, width in zip(_COLUMNS, widths, strict=True))
    label = seconds(end)
    axis = " " + "0s".ljust(bar_width - len(label)) + label + " "
    return [(f"{names}  {axis}", "head")]


def _legend(width: int) -> list[Line]:
    """The key to the bar characters, wrapped to `width`."""
    items = [(BAR_CHARS[kind], kind, label) for kind, label in _LEGEND]
    items += [("*", "status:cached", "cached"), ("x", "status:skipped", "skipped")]
    lines: list[Line] = [[]]
    used = 0
    for char, key, label in items:
        size = len(char) + len(label) + 3
        if used and used + size > width:
            lines.append([])
            used = 0
        lines[-1] += [(char, key), (f" {label}  ", "")]
        used += size
    return lines


def _group(kinds: Sequence[str]) -> list[Piece]:
    pieces: list[Piece] = []
    for kind in kinds:
        char = _char(kind)
        if pieces and pieces[-1][1] == kind:
            pieces[-1] = (pieces[-1][0] + char, kind)
        else:
            pieces.append((char, kind))
    return pieces


def _char(kind: str) -> str:
    if not kind:
        return " "
    if kind.startswith("status:"):
        return _MARKS.get(kind.removeprefix("status:"), "x")
    return BAR_CHARS.get(kind, "x")

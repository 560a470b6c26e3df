"""Everything the user sees: tables, JSON, progress, errors. The only module that imports rich.

Data goes to stdout, progress and errors to stderr. Rich is imported lazily so `mle --help`
stays fast.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mle_cli.states import Status

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from mle_cli.trace import Timeline

__all__ = [
    "LiveProgress",
    "LiveTable",
    "PlainProgress",
    "ago",
    "duration",
    "one_line",
    "print_error",
    "print_json",
    "print_log_line",
    "print_table",
    "print_trace",
    "printable",
    "stderr_console",
    "stdout_console",
]

_STYLE = {
    Status.PENDING: "dim",
    Status.RUNNING: "cyan",
    Status.RETRYING: "yellow",
    Status.SUCCEEDED: "green",
    Status.FAILED: "red",
    Status.TIMED_OUT: "red",
    Status.LOST: "red",
    Status.CANCELLED: "magenta",
    Status.SKIPPED: "dim",
    Status.DETACHED: "yellow",
    Status.CACHED: "green",
    Status.WAITING: "yellow",
}


# Control characters (ESC, BEL, CR, ...) in step output could rewrite the operator's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Step output made safe for a terminal: control characters shown as \\xNN escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str) -> str:
    """A message made safe for a terminal and kept to its line: a newline in it (an approval's
    reason, an agent's error) shown as \\n, so it cannot pass for a line of its own."""
    return printable(text).replace("\n", "\\n")


def print_log_line(row: Mapping[str, Any], *, json_out: bool, prefix: bool) -> None:
    """One log line of `mle logs`: raw JSON, or printable text with its step as prefix."""
    if json_out:
        keys = ("task_id", "step_id", "seq", "time", "stream", "text")
        sys.stdout.write(json.dumps({k: row[k] for k in keys}) + "\n")
    else:
        head = f"{row['step_id']} | " if prefix else ""
        sys.stdout.write(head + printable(row["text"]) + "\n")
    sys.stdout.flush()


def stdout_console() -> Console:
    """A console on stdout for data."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    """A console on stderr for progress and errors."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str, hint: str = "") -> None:
    """One red line on stderr, plus a hint line when there is one."""
    from rich.markup import escape

    console = stderr_console()
    console.print(f"[bold red]error:[/] {escape(one_line(message))}")
    if hint:
        console.print(f"[dim]hint: {escape(one_line(hint))}[/]")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """A simple table on stdout; a `status` column is coloured."""
    table = _table(rows, columns, title)
    console = stdout_console()
    if not console.is_terminal:  # piped: data is never cut to fit 80 columns
        from rich.measure import Measurement

        unbounded = console.options.update(max_width=1_000_000)
        console.width = max(console.width, Measurement.get(console, unbounded, table).maximum)
    console.print(table)


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str = "") -> Table:
    from rich.table import Table

    table = Table(title=title or None, box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(_cell(column, row.get(column)) for column in columns))
    return table


class LiveTable:
    """A table on stdout redrawn in place at each `update` (`mle top` on a terminal)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self._columns = columns
        self._live: Live | None = None

    def __enter__(self) -> LiveTable:
        from rich.live import Live

        self._live = Live(console=stdout_console(), auto_refresh=False)
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def update(self, rows: Sequence[Mapping[str, Any]], title: str = "") -> None:
        """Draw these rows now."""
        if self._live is not None:
            self._live.update(_table(rows, self._columns, title), refresh=True)


def styled_status(status: str) -> str:
    """A status word with its colour markup."""
    try:
        style = _STYLE[Status(status)]
    except ValueError:
        return status
    return f"[{style}]{status}[/]"


def duration(seconds: float | None) -> str:
    """1.2s, 3m04s, 2h01m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def ago(timestamp: float | None) -> str:
    """Local wall-clock time of a timestamp."""
    if not timestamp:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _cell(column: str, value: Any) -> str:
    from rich.markup import escape

    if value is None:
        return "-"
    if column == "status":
        return styled_status(str(value))
    return escape(one_line(str(value)))


class PlainProgress:
    """Progress as plain timestamped lines on stderr (not a terminal, or --no-live)."""

    def __init__(self, show_logs: bool = True) -> None:
        self._show_logs = show_logs

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        """Print the new status."""
        suffix = f" ({one_line(detail)})" if detail else ""
        self._line(f"{step_id}: {status}{suffix}")

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        """Print the step's line, prefixed with its step."""
        if self._show_logs:
            self._line(f"{step_id} | {printable(text)}")

    def pause(self) -> None:
        """Nothing to pause for plain lines."""

    def resume(self) -> None:
        """Nothing to resume for plain lines."""

    def _line(self, text: str) -> None:
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        sys.stderr.flush()


class LiveProgress:
    """A live table of steps on the terminal: status, target, attempt, elapsed, last line."""

    def __init__(self, step_ids: Iterable[str], title: str) -> None:
        self._title = title
        self._rows: dict[str, dict[str, Any]] = {
            s: {"status": Status.PENDING, "detail": "", "last": "", "since": None} for s in step_ids
        }
        self._live: Live | None = None

    def __enter__(self) -> LiveProgress:
        from rich.live import Live

        self._live = Live(
            get_renderable=self._table, console=stderr_console(), refresh_per_second=8
        )
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        """Update the step's row."""
        row = self._rows[step_id]
        if status == Status.RUNNING and row["since"] is None:
            row["since"] = time.monotonic()
        if status != Status.RUNNING and row["since"] is not None:
            row["elapsed"] = time.monotonic() - row["since"]
        row.update(status=status, detail=detail)

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        """Remember the step's last line."""
        self._rows[step_id]["last"] = printable(text)

    def pause(self) -> None:
        """Stop drawing (before a prompt)."""
        if self._live is not None:
            self._live.stop()

    def resume(self) -> None:
        """Draw again."""
        if self._live is not None:
            self._live.start()

    def _table(self) -> Table:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=self._title, box=None, header_style="bold", title_justify="left")
        for column in ("step", "status", "time", "detail"):
            table.add_column(column.upper(), no_wrap=column != "detail", overflow="ellipsis")
        for step_id, row in self._rows.items():
            elapsed = row.get("elapsed")
            if row["status"] == Status.RUNNING and row["since"] is not None:
                elapsed = time.monotonic() - row["since"]
            detail = (
                row["last"] if row["status"] == Status.RUNNING and row["last"] else row["detail"]
            )
            table.add_row(
                escape(step_id),
                styled_status(row["status"]),
                duration(elapsed),
                escape(detail[:120]),
            )
        return table


def print_plan(plan: Mapping[str, Any]) -> None:
    """The DAG of a plan: stages, placement, commands, outputs."""
    from rich.markup import escape

    console = stdout_console()
    params = ", ".join(f"{k}={v}" for k, v in plan["params"].items()) or "none"
    console.print(
        f"[bold]{escape(plan['name'])}[/] ({escape(plan['source'])}) params: {escape(params)}"
    )
    for f in plan["files"]:
        console.print(f"  ships {escape(f['path'])} ({f['size']} bytes)")
    for step in plan["steps"]:
        needs = ", ".join(step["needs"]) or "-"
        console.print(
            f"  stage {step['stage']}  [bold]{escape(step['id'])}[/] on {escape(step['placement'])}"
            f"  needs: {escape(needs)}"
        )
        if step["uses"]:
            console.print(f"      uses {escape(step['uses'])}")
        else:
            command = step["run"] if step["run"] is not None else " ".join(step["argv"])
            console.print(f"      $ {escape(command)}")
        if step["when"]:
            console.print(f"      when: {escape(step['when'])}")
        if step["outputs"]:
            console.print(f"      outputs: {escape(', '.join(step['outputs']))}")
        cache = step["cache"]
        console.print(f"      cache: {escape(cache['result'])} ({escape(cache['reason'])})")
    for name, where in plan["targets"].items():
        console.print(f"  target {escape(name)}: {escape(where)}")
    console.print("[dim]nothing was run[/]")


def print_outcome(outcome: Any) -> None:
    """The last lines of failed steps (stderr), then one summary line (stdout)."""
    failed = [s for s in outcome.failed_steps if s.last_lines]
    done = sum(1 for s in outcome.steps.values() if s.status == Status.SUCCEEDED)
    summary = f"in {duration(outcome.duration)}: {done}/{len(outcome.steps)} steps succeeded"
    if not (sys.stdout.isatty() or sys.stderr.isatty()):  # scripts: the same text, without
        for step in failed:  # importing rich (a tenth of a short `mle run`)
            lines = "".join(f"  {printable(line)}\n" for line in step.last_lines)
            sys.stderr.write(f"{step.step_id} last lines:\n{lines}")
        sys.stdout.write(f"run {outcome.run_id} {outcome.status} {summary}\n")
        return
    from rich.markup import escape

    err = stderr_console()
    for step in failed:
        err.print(f"[red]{escape(step.step_id)}[/] last lines:")
        for line in step.last_lines:
            err.print(f"  {escape(printable(line))}")
    stdout_console().print(f"run {outcome.run_id} {styled_status(outcome.status)} {summary}")


def print_run(run: Mapping[str, Any]) -> None:
    """`mle show`: the run, its steps and attempts, failures and where outputs are stored."""
    from rich.markup import escape

    console = stdout_console()
    console.print(
        f"[bold]run {escape(run['id'])}[/] {escape(run['recipe'])} ({escape(run['source'])}) "
        f"{styled_status(run['status'])} in {duration(run['duration'])}, "
        f"started {ago(run['started'])}"
    )
    if run.get("message"):
        console.print(f"  {escape(one_line(run['message']))}")
    if run["params"]:
        params = ", ".join(f"{k}={v}" for k, v in run["params"].items())
        console.print("  params: " + escape(one_line(params)))
    rows = [
        {
            "step": s["step_id"],
            "status": s["status"],
            "target": s["target"],
            "attempts": s["attempts"],
            "time": duration(s["duration"]),
            "exit": s["exit_code"],
            "detail": s["message"] or "",
        }
        for s in run["steps"]
    ]
    print_table(rows, ["step", "status", "target", "attempts", "time", "exit", "detail"])
    _print_failures(console, run.get("failed", []))
    _print_attempts(console, [s for s in run["steps"] if len(s["attempt_history"]) > 1])
    if run["outputs"]:
        console.print("[bold]outputs[/] (in the project's artifact store):")
        for out in run["outputs"]:
            missing = "" if out["present"] else " [red](missing)[/]"
            console.print(
                f"  {escape(out['step_id'])}/{escape(out['path'])} ({out['size']} bytes) -> "
                f"{escape(out['stored'])}{missing}"
            )


def _print_failures(console: Console, failed: Sequence[Mapping[str, Any]]) -> None:
    """The Failed section: each failing step, its exit code and its attempt's last lines."""
    from rich.markup import escape

    if failed:
        console.print("[bold red]Failed[/]")
    for step in failed:
        exit_code = "" if step["exit_code"] is None else f" (exit={step['exit_code']})"
        where = f" on {escape(step['agent'])}" if step["agent"] else ""
        console.print(
            f"  [red]{escape(step['step_id'])} {escape(step['status'])}[/]{exit_code}{where}: "
            f"{escape(one_line(step['message'] or ''))}"
        )
        if step["last_lines"]:
            console.print(f"    last lines of attempt {step['attempt']}:")
        for line in step["last_lines"]:
            console.print(f"    | {escape(printable(line))}")


def _print_attempts(console: Console, steps: Sequence[Mapping[str, Any]]) -> None:
    """The attempt history of each step that needed more than one attempt."""
    from rich.markup import escape

    if steps:
        console.print("[bold]Attempts[/]")
    for step in steps:
        console.print(f"  {escape(step['step_id'])}")
        for a in step["attempt_history"]:
            console.print(
                f"    #{a['attempt']} on {escape(a['agent'])}: {styled_status(a['status'])} "
                f"exit={'-' if a['exit_code'] is None else a['exit_code']} "
                f"{duration(a['duration'])}  {escape(one_line(a['message'] or ''))}".rstrip()
            )


_TRACE_STYLE = {
    "head": "bold",
    "queued": "dim",
    "retry": "yellow",
    "pending": "blue",
    "staging": "magenta",
    "running": "cyan",
    "waiting": "yellow",
}


def print_trace(timeline: Timeline) -> None:
    """`mle trace`: one line per attempt with a bar to scale; colours only on a terminal."""
    from rich.text import Text

    from mle_cli._trace_text import trace_lines

    console = stdout_console()
    for i, line in enumerate(trace_lines(timeline, console.width)):
        text = Text()
        for piece, key in line:
            text.append(printable(piece), style=_trace_style(key))
        if i == 0:  # the title may wrap; the rows are cropped to keep their columns
            console.print(text)
        else:
            console.print(text, no_wrap=True, overflow="crop", soft_wrap=False)


def _trace_style(key: str) -> str:
    if key.startswith("status:"):
        try:
            return _STYLE[Status(key.removeprefix("status:"))]
        except ValueError:
            return ""
    return _TRACE_STYLE.get(key, "")

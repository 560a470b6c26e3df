"""The timeline model, built from a real ledger file whose rows carry chosen times."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mle_cli._trace_html import render_html
from mle_cli._trace_text import bar, trace_lines
from mle_cli.ledger import EventRecord, Ledger
from mle_cli.trace import Phase, Row, Timeline, build_timeline, timeline_dict, write_html
from mle_proto.errors import InvalidInput

T0 = 1_800_000_000.0
HOSTILE = "<script>alert(1)</script></svg><b>"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        yield ledger
    finally:
        ledger.close()


def _run(ledger: Ledger, steps: Sequence[tuple[str, Sequence[str]]], **fields: object) -> None:
    ledger.create_run(
        "r1",
        recipe="demo",
        source="demo.yaml",
        recipe_digest="sha256:" + "0" * 64,
        params={},
        steps=[(step, "local", needs) for step, needs in steps],
    )
    ledger.update_run("r1", created=T0, started=T0, **fields)


def _attempt(
    ledger: Ledger,
    step: str,
    n: int,
    span: tuple[float, float | None],
    status: str,
    states: Sequence[tuple[str, float]] = (),
    **fields: object,
) -> None:
    task = f"r1.{step}.{n}"
    ledger.start_attempt(task, "r1", step, n, "local", "127.0.0.1:1")
    start, end = span
    finished = None if end is None else T0 + end
    ledger.update_attempt(task, started=T0 + start, finished=finished, status=status, **fields)
    ledger.record_events(
        EventRecord(task, seq, "r1", step, T0 + t, "state", state=state)
        for seq, (state, t) in enumerate(states, start=1)
    )


def _kinds(row: Row) -> list[tuple[str, float, float]]:
    return [(p.kind, round(p.start, 6), round(p.end, 6)) for p in row.phases]


def test_attempts_get_queued_pending_staging_running_phases_from_their_events(
    ledger: Ledger,
) -> None:
    _run(ledger, [("a", []), ("b", ["a"])], status="succeeded", finished=T0 + 5)
    _attempt(
        ledger,
        "a",
        1,
        (0.5, 2.0),
        "succeeded",
        [("pending", 0.6), ("staging", 0.7), ("running", 1.0)],
        exit_code=0,
    )
    ledger.update_step("r1", "a", status="succeeded", finished=T0 + 2.1)
    _attempt(
        ledger, "b", 1, (2.5, 4.0), "succeeded", [("pending", 2.5), ("running", 3.0)], exit_code=0
    )
    ledger.update_step("r1", "b", status="succeeded", finished=T0 + 4.2)

    timeline = build_timeline(ledger, None, now=T0 + 100)

    a, b = timeline.rows
    assert _kinds(a) == [
        ("queued", 0.0, 0.5),
        ("pending", 0.5, 0.7),
        ("staging", 0.7, 1.0),
        ("running", 1.0, 2.0),
    ]
    assert (a.start, a.end, a.duration, a.exit_code, a.live) == (0.5, 2.0, 1.5, 0, False)
    # b was ready when a finished (the step's finish), not when the run started.
    assert _kinds(b) == [("queued", 2.1, 2.5), ("pending", 2.5, 3.0), ("running", 3.0, 4.0)]
    assert timeline.duration == 5.0 and timeline.end == 5.0
    assert timeline.origin == T0 and timeline.status == "succeeded"


def test_a_retry_is_a_second_row_led_by_its_wait(ledger: Ledger) -> None:
    _run(ledger, [("s", [])], status="succeeded", finished=T0 + 10)
    _attempt(ledger, "s", 1, (1.0, 3.0), "lost", [("running", 1.5)], message="agent silent")
    _attempt(ledger, "s", 2, (4.0, 6.0), "succeeded", [("running", 4.5)], exit_code=0)
    ledger.update_step("r1", "s", status="succeeded", finished=T0 + 6)

    first, second = build_timeline(ledger, "r1").rows

    assert (first.attempt, first.status, first.message) == (1, "lost", "agent silent")
    assert _kinds(second)[0] == ("retry", 3.0, 4.0)
    assert [p.kind for p in second.phases] == ["retry", "pending", "running"]


def test_agent_clock_skew_is_clamped_into_the_attempt(ledger: Ledger) -> None:
    _run(ledger, [("s", [])], status="failed", finished=T0 + 3)
    # The agent's clock is off: staging "before" the dispatch, running "after" the result.
    _attempt(
        ledger, "s", 1, (1.0, 2.0), "failed", [("staging", 0.2), ("running", 9.0)], exit_code=3
    )

    [row] = build_timeline(ledger, None).rows

    attempt_phases = [p for p in row.phases if p.kind != "queued"]
    assert [p.kind for p in attempt_phases] == ["pending", "staging", "running"]
    assert all(p.duration >= 0 for p in row.phases)
    assert all(x.end == y.start for x, y in itertools.pairwise(row.phases))
    assert sum(p.duration for p in attempt_phases) == pytest.approx(row.duration)


def test_steps_without_attempts_are_marks_or_waits(ledger: Ledger) -> None:
    steps = [("c", []), ("gate", ["c"]), ("late", ["gate"]), ("skip", ["c"]), ("open", ["c"])]
    _run(ledger, steps, status="running")
    ledger.update_step("r1", "c", status="cached", finished=T0 + 1, message="cached from r0")
    ledger.update_step("r1", "gate", status="succeeded", started=T0 + 1, finished=T0 + 4)
    ledger.update_step("r1", "skip", status="skipped", finished=T0 + 2)
    ledger.update_step("r1", "open", status="waiting", started=T0 + 2)

    rows = {r.step_id: r for r in build_timeline(ledger, None, now=T0 + 7).rows}

    assert (rows["c"].start, rows["c"].end, rows["c"].phases) == (1.0, 1.0, ())
    assert rows["c"].message == "cached from r0"
    assert _kinds(rows["gate"]) == [("waiting", 1.0, 4.0)] and not rows["gate"].live
    assert _kinds(rows["late"]) == [("queued", 4.0, 7.0)] and rows["late"].live
    assert (rows["skip"].status, rows["skip"].start, rows["skip"].phases) == ("skipped", 2.0, ())
    assert _kinds(rows["open"]) == [("waiting", 2.0, 7.0)] and rows["open"].live


def test_a_live_attempt_and_a_pending_retry_run_until_now(ledger: Ledger) -> None:
    _run(ledger, [("s", []), ("t", [])], status="running")
    _attempt(ledger, "s", 1, (1.0, None), "running", [("running", 1.5)])
    _attempt(ledger, "t", 1, (1.0, 2.0), "failed", [("running", 1.5)], exit_code=1)
    ledger.update_step("r1", "t", status="retrying")

    s, t, t_wait = build_timeline(ledger, None, now=T0 + 5).rows

    assert (s.end, s.live, s.phases[-1].end) == (5.0, True, 5.0)
    assert (t.status, t.exit_code, t.live) == ("failed", 1, False)
    assert t_wait.status == "retrying" and _kinds(t_wait) == [("retry", 2.0, 5.0)]
    assert timeline_dict(build_timeline(ledger, None, now=T0 + 5))["end"] == 5.0


def test_json_has_every_row_with_phases_and_durations(ledger: Ledger) -> None:
    _run(ledger, [("a", [])], status="succeeded", finished=T0 + 2)
    _attempt(ledger, "a", 1, (0.25, 1.5), "succeeded", [("running", 0.5)], exit_code=0)
    data = timeline_dict(build_timeline(ledger, None))
    assert data["run"] == {
        "id": "r1",
        "recipe": "demo",
        "source": "demo.yaml",
        "status": "succeeded",
        "message": "",
        "origin": T0,
        "duration": 2.0,
    }
    [row] = data["rows"]
    assert (row["attempt"], row["start"], row["duration"]) == (1, 0.25, 1.25)
    assert [(p["kind"], p["duration"]) for p in row["phases"]] == [
        ("queued", 0.25),
        ("pending", 0.25),
        ("running", 1.0),
    ]


def _timeline(*rows: Row, end: float = 10.0) -> Timeline:
    return Timeline("r1", "demo", "demo.yaml", "failed", "", T0, end, end, rows)


def test_the_bar_is_drawn_to_scale() -> None:
    row = Row("s", "failed", 1, phases=(Phase("queued", 0, 2.5), Phase("running", 5, 10)), start=5)
    assert "".join(text for text, _ in bar(row, 10.0, 20)) == "....." + " " * 5 + "#" * 10
    mark = Row("c", "cached", start=5.0, end=5.0)
    assert "".join(text for text, _ in bar(mark, 10.0, 20)) == " " * 10 + "*" + " " * 9


def test_trace_lines_fit_the_width_and_keep_plan_order() -> None:
    rows = (
        Row(
            "prepare", "succeeded", 1, "local", 0, start=0, end=4, phases=(Phase("running", 0, 4),)
        ),
        Row("train", "failed", 1, "local", 3, start=4, end=10, phases=(Phase("running", 4, 10),)),
    )
    for width in (72, 80, 132):
        lines = ["".join(text for text, _ in line) for line in trace_lines(_timeline(*rows), width)]
        assert all(len(line.rstrip()) <= width for line in lines[1:]), lines
        assert lines[2].startswith("prepare  1  local  +0.00s  4.00s  succeeded  0")
        assert lines[3].startswith("train    1  local  +4.00s  6.00s  failed     3")
        assert lines[2].index("#") < lines[3].index("#")


def test_html_escapes_everything_from_the_ledger(tmp_path: Path) -> None:
    row = Row("s", "failed", 1, "local", 1, HOSTILE, HOSTILE, 0, 1, (Phase("running", 0, 1),))
    page = render_html(_timeline(row))
    assert "<script" not in page and "<b>" not in page
    assert page.count("</svg>") == 1
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/svg&gt;&lt;b&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_writing_the_page_refuses_a_directory_or_a_missing_folder(tmp_path: Path) -> None:
    timeline, state = _timeline(), tmp_path / ".mle"
    page = write_html(timeline, tmp_path / "t.html", state)
    assert page.read_text().startswith("<!doctype html>")
    with pytest.raises(InvalidInput, match=r"^cannot write the trace to .*: it is a directory$"):
        write_html(timeline, tmp_path, state)
    with pytest.raises(InvalidInput, match=r": No such file or directory$"):
        write_html(timeline, tmp_path / "nowhere" / "t.html", state)


def test_writing_the_page_never_goes_into_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / ".mle"
    state.mkdir()
    ledger = state / "ledger.db"
    ledger.write_bytes(b"SQLite format 3\x00")
    (tmp_path / "link").symlink_to(state)
    for path in (ledger, state / "new.html", tmp_path / "link" / "ledger.db"):
        with pytest.raises(InvalidInput, match=r"holds mle's own state .*; choose a file outside"):
            write_html(_timeline(), path, state)
    assert ledger.read_bytes() == b"SQLite format 3\x00"
    assert sorted(p.name for p in state.iterdir()) == ["ledger.db"]

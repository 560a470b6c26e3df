"""`mle trace` and `mle show` after real runs on the local agent; the HTML page in real Chromium."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from mle_cli._trace_html import OUTCOME_COLOURS, PHASE_COLOURS
from tests.conftest import Project

pytestmark = pytest.mark.e2e

HOSTILE = "<script>alert(1)</script></svg>"
CHROMIUMS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome")


def _attempts(project: Project) -> list[dict[str, Any]]:
    conn = sqlite3.connect(project.ledger)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM attempts ORDER BY started").fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


def _run(project: Project, recipe: str, expected: int) -> None:
    (project.root / "r.yaml").write_text(recipe)
    proc = project.mle("run", "r.yaml")
    assert proc.returncode == expected, proc.stderr


def _trace(project: Project) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(project.mle("trace", "--json", check=True).stdout)
    return data


def _assert_consistent(trace: dict[str, Any], attempts: list[dict[str, Any]]) -> None:
    """Every attempt row matches the attempts table; phases are ordered and never negative."""
    origin = trace["run"]["origin"]
    by_key = {(a["step_id"], a["attempt"]): a for a in attempts}
    rows = [r for r in trace["rows"] if r["attempt"] is not None]
    assert len(rows) == len(attempts)
    for row in rows:
        recorded = by_key[(row["step_id"], row["attempt"])]
        assert row["status"] == recorded["status"] and row["exit_code"] == recorded["exit_code"]
        assert row["start"] == pytest.approx(recorded["started"] - origin, abs=1e-5)
        assert row["duration"] == pytest.approx(
            recorded["finished"] - recorded["started"], abs=1e-5
        )
        phases = row["phases"]
        assert all(p["duration"] >= 0 for p in phases)
        assert all(x["end"] == pytest.approx(y["start"]) for x, y in itertools.pairwise(phases))
        own = [p for p in phases if p["kind"] not in ("queued", "retry")]
        assert own[0]["start"] == pytest.approx(row["start"])
        assert sum(p["duration"] for p in own) == pytest.approx(row["duration"], abs=1e-5)


def test_trace_of_a_three_step_run(project: Project) -> None:
    _run(
        project,
        # a takes a while too: on a loaded machine its bar must still start a column before b's.
        "name: three\nsteps:\n  a:\n    run: sleep 0.2; echo a\n"
        "  b:\n    needs: [a]\n    run: sleep 0.6; echo b\n"
        "  c:\n    needs: [b]\n    run: echo c\n",
        expected=0,
    )
    trace = _trace(project)
    _assert_consistent(trace, _attempts(project))
    assert [r["step_id"] for r in trace["rows"]] == ["a", "b", "c"]
    for row in trace["rows"]:
        assert [p["kind"] for p in row["phases"]] == ["queued", "pending", "staging", "running"]
    a, b, c = trace["rows"]
    assert a["end"] <= b["phases"][0]["start"] and b["end"] <= c["phases"][0]["start"]
    assert b["phases"][-1]["duration"] >= 0.6  # the sleep is in b's running phase
    assert trace["run"]["status"] == "succeeded" and trace["end"] >= c["end"]

    project.env["COLUMNS"] = "100"
    text = project.mle("trace", check=True).stdout
    assert "\x1b" not in text  # not a terminal: plain text
    lines = text.splitlines()
    assert lines[0].startswith(f"run {trace['run']['id']} three succeeded in ")
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert list(rows) == ["a", "b", "c"]
    assert all(len(line) <= 100 for line in lines)
    assert rows["a"].index("#") < rows["b"].index("#") < rows["c"].index("#")
    assert rows["b"].count("#") > rows["a"].count("#")  # b ran longest: the longest bar


def test_a_retried_step_in_trace_show_and_chromium(project: Project, tmp_path: Path) -> None:
    marker = tmp_path / "failed-once"
    _run(
        project,
        "name: flaky\nsteps:\n  prep:\n    run: echo prep\n"
        "  flaky:\n    needs: [prep]\n"
        f"    run: test -f {marker} || {{ touch {marker}; echo '{HOSTILE}'; exit 4; }}\n"
        "    retries: {max: 2, backoff: 0s}\n",
        expected=0,
    )
    attempts = _attempts(project)
    trace = _trace(project)
    _assert_consistent(trace, attempts)
    first, second = (r for r in trace["rows"] if r["step_id"] == "flaky")
    assert (first["status"], first["exit_code"], first["last_line"]) == ("failed", 4, HOSTILE)
    assert (second["status"], second["exit_code"]) == ("succeeded", 0)
    retry = second["phases"][0]
    assert retry["kind"] == "retry"
    assert retry["start"] == pytest.approx(first["end"]) and retry["end"] == second["start"]

    show = project.mle("show", check=True).stdout
    assert "Attempts\n  flaky\n    #1 on local: failed exit=4 " in show
    assert "    #2 on local: succeeded exit=0 " in show and "Failed" not in show
    detail = json.loads(project.mle("show", "--json", check=True).stdout)
    [flaky] = [s for s in detail["steps"] if s["step_id"] == "flaky"]
    assert [a["status"] for a in flaky["attempt_history"]] == ["failed", "succeeded"]
    assert all(a["duration"] >= 0 for a in flaky["attempt_history"]) and detail["failed"] == []

    page = project.root / "trace.html"
    proc = project.mle("trace", "--html", "trace.html", check=True)
    assert proc.stdout == "wrote trace.html\n"
    html = page.read_text()
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/svg&gt;" in html
    _check_in_chromium(page, tmp_path, attempts=len(attempts))


def test_a_failed_run_in_show_and_trace(project: Project) -> None:
    lines = "; ".join(f"echo line {i}" for i in range(1, 16))
    _run(
        project,
        "name: boom\nsteps:\n  ok:\n    run: echo fine\n"
        f"  bad:\n    needs: [ok]\n    run: {lines}; exit 3\n"
        "  after:\n    needs: [bad]\n    run: echo never\n",
        expected=10,
    )
    show = project.mle("show").stdout
    failed = show[show.index("Failed\n") :]
    assert failed.startswith("Failed\n  bad failed (exit=3) on local: exit code 3\n")
    assert "    last lines of attempt 1:\n    | line 6\n" in failed
    assert "| line 15\n" in failed and "| line 5\n" not in failed
    [failure] = json.loads(project.mle("show", "--json").stdout)["failed"]
    assert failure["step_id"] == "bad" and failure["exit_code"] == 3
    assert failure["last_lines"] == [f"line {i}" for i in range(6, 16)]

    trace = _trace(project)
    _assert_consistent(trace, _attempts(project))
    rows = {r["step_id"]: r for r in trace["rows"]}
    assert (rows["bad"]["status"], rows["bad"]["exit_code"]) == ("failed", 3)
    assert rows["after"]["status"] == "skipped" and rows["after"]["phases"] == []
    assert rows["after"]["attempt"] is None
    after = next(line for line in project.mle("trace").stdout.splitlines() if line[:5] == "after")
    assert "skipped" in after and "x|" in after.replace(" ", "")

    (project.root / "adir").mkdir()
    for target, reason in (
        ("adir", "it is a directory"),
        ("no/t.html", "No such file or directory"),
    ):
        proc = project.mle("trace", "--html", target)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"error: cannot write the trace to {target}: {reason}\n"


# -- Chromium ------------------------------------------------------------------------------------


def _chromium() -> str:
    for name in CHROMIUMS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no Chromium binary on PATH (looked for {', '.join(CHROMIUMS)}); CI installs one")


def _headless(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium in its own session; kill the whole group if it hangs."""
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, command
    return out


class _Dom(HTMLParser):
    """Counts the elements a test cares about in a serialized DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.attempt_rows: list[dict[str, str | None]] = []
        self.tags: Counter[str] = Counter()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        found = dict(attrs)
        if tag == "g" and "attempt" in (found.get("class") or "").split():
            self.attempt_rows.append(found)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _check_in_chromium(page: Path, tmp_path: Path, attempts: int) -> None:
    dom_text = _headless(tmp_path, "--dump-dom", page.as_uri())
    dom = _Dom()
    dom.feed(dom_text)
    assert len(dom.attempt_rows) == attempts  # one bar per attempt
    assert {r["data-status"] for r in dom.attempt_rows} == {"failed", "succeeded"}
    assert dom.tags["script"] == 0 and dom.tags["svg"] == 1
    assert dom_text.index("</svg>") > dom_text.rindex('class="row attempt"')  # svg not cut short
    assert any(HOSTILE in text for text in dom.text)  # shown as text, not run

    shot = tmp_path / "trace.png"
    _headless(tmp_path, "--window-size=1280,720", f"--screenshot={shot}", page.as_uri())
    width, height, pixels = _decode_png(shot.read_bytes())
    assert (width, height) == (1280, 720)
    colours = Counter(pixels)
    assert colours[_rgb("#ffffff")] < 0.95 * width * height  # not blank
    assert colours[_rgb(PHASE_COLOURS["running"])] > 100  # the running bars are drawn
    assert colours[_rgb(OUTCOME_COLOURS["failed"])] > 20  # the failed attempt's outcome


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    value = int(hex_colour.removeprefix("#"), 16)
    return value >> 16, (value >> 8) & 255, value & 255


def _decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Width, height and RGB pixels of an 8-bit RGB or RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", (0, 0, 0, 0, 0, 0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 3 if colour_type == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    pixels: list[tuple[int, int, int]] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, bpp)
        pixels += [(line[i], line[i + 1], line[i + 2]) for i in range(0, stride, bpp)]
        previous = line
    return width, height, pixels


def _unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> bytearray:
    if kind == 0:
        return line
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up_left = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + left) & 255
        elif kind == 2:
            line[i] = (line[i] + prev[i]) & 255
        elif kind == 3:
            line[i] = (line[i] + (left + prev[i]) // 2) & 255
        elif kind == 4:
            p = left + prev[i] - up_left
            pa, pb, pc = abs(p - left), abs(p - prev[i]), abs(p - up_left)
            best = left if pa <= pb and pa <= pc else prev[i] if pb <= pc else up_left
            line[i] = (line[i] + best) & 255
        else:
            raise AssertionError(f"unknown PNG filter {kind}")
    return line

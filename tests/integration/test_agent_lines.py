"""Output lines: cut at `max_log_line` bytes, never inside a UTF-8 character; `\\r` kept."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mle_agent.logs import LineSplitter
from tests.agent_helpers import agent_settings, run, running_agent


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # exactly the limit, a pause, then more: one full line, then the rest
        ("printf aaaaaaaaaaaaaaaa; sleep 0.3; printf 'bb\\n'", ["a" * 16, "bb"]),
        ("printf '%s\\n' aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", ["a" * 16, "a" * 16, "aa"]),
        # a 2-byte character straddling the limit moves whole to the next piece
        ("printf 'aaaaaaaaaaaaaaa\\303\\251z\\n'", ["a" * 15, "éz"]),
        ("printf 'no newline at the end'", ["no newline at th", "e end"]),
        # a carriage return is text, not a line break: progress bars stay one line
        ("printf 'step 1\\rstep 2\\r\\nok\\n'", ["step 1\rstep 2\r", "ok"]),
    ],
)
def test_long_lines_are_split_at_the_limit(
    tmp_path: Path, script: str, expected: list[str]
) -> None:
    settings = agent_settings(tmp_path, max_log_line=16)

    async def scenario() -> list[str]:
        async with running_agent(settings) as agent:
            await agent.start("t.1", script)
            events = await agent.events("t.1")
            assert events[-1].result.state == 4  # SUCCEEDED
            return [e.log.text for e in events if e.HasField("log")]

    assert run(scenario()) == expected


@given(
    data=st.binary(max_size=300).map(lambda b: b.replace(b"x", b"\n")),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    max_line=st.integers(min_value=1, max_value=40),
)
def test_lines_do_not_depend_on_how_the_log_was_read(
    data: bytes, cuts: list[int], max_line: int
) -> None:
    # A restarted agent reads the rest of a log in other chunks than the first agent did.
    whole = LineSplitter(max_line)
    expected = whole.feed(data) + whole.rest()
    pieces = LineSplitter(max_line)
    got = []
    edges = [0, *sorted(cuts), len(data)]
    for start, end in itertools.pairwise(edges):
        got += pieces.feed(data[start:end])
    assert got + pieces.rest() == expected
    assert sum(used for _, used in expected) == len(data)

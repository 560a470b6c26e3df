"""Long output lines are cut at `max_log_line` bytes, never inside a UTF-8 character."""

from __future__ import annotations

from pathlib import Path

import pytest

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

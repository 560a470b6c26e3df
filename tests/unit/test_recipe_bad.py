"""Every recipe in recipes/bad/ fails to compile with exactly the message in its first line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import compile_recipe, parse_overrides

BAD = Path(__file__).parent / "recipes" / "bad"
CASES = sorted(BAD.glob("*.yaml"))


def _header(path: Path) -> tuple[str, dict[str, str]]:
    """The `# expect:` message and the `# params:` overrides written at the top of a case."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# expect: "), f"{path.name} must start with '# expect: '"
    expected = lines[0].removeprefix("# expect: ")
    params: list[str] = []
    for line in lines[1:]:
        if line.startswith("# params:"):
            params += line.removeprefix("# params:").split()
    return expected, parse_overrides(params)


def test_there_are_many_bad_cases() -> None:
    assert len(CASES) >= 80


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_bad_recipe_is_refused_with_its_message(
    case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected, overrides = _header(case)
    monkeypatch.chdir(BAD)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(Path(case.name), overrides)
    assert str(caught.value) == expected
    assert caught.value.exit_code == 3

"""The README is the front door: every `mle` command and the recipe it shows really work."""

from __future__ import annotations

import re
import shlex
import shutil

import pytest

from tests.conftest import REPO, Project

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _mle_commands() -> list[list[str]]:
    """Every `mle ...` command in the README's shell blocks, in order, comments stripped."""
    commands = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["mle"]:
                    commands.append(words[1:])
    return commands


def test_the_readme_shows_the_two_front_door_commands() -> None:
    first, second = (block.strip().splitlines()[0] for block in _blocks("sh")[:2])
    assert first == "python3 -m pip install -e '.[all]' && mle run recipes/hello.yaml"
    assert second == "python3 -m pip install -e '.[dev]' && scripts/check"
    assert "scripts/check" in (REPO / ".ci/run").read_text()


def test_every_mle_command_in_the_readme_succeeds(project: Project) -> None:
    # The serving examples use the model fixtures, at the paths a clone has them.
    shutil.copytree(REPO / "tests/fixtures/models", project.root / "tests/fixtures/models")
    commands = _mle_commands()
    assert len(commands) >= 6
    for args in commands:
        proc = project.mle(*args)
        assert proc.returncode == 0, f"mle {shlex.join(args)}:\n{proc.stderr}"


def test_the_readme_recipe_runs(project: Project) -> None:
    [recipe] = [b for b in _blocks("yaml") if b.startswith("name:")]
    (project.root / "recipes/readme.yaml").write_text(recipe)
    proc = project.mle("run", "recipes/readme.yaml", "-p", "repeat=2")
    assert proc.returncode == 0, proc.stderr
    assert "3/3 steps succeeded" in proc.stdout


def test_the_readme_inventory_entry_loads(project: Project) -> None:
    from mle_cli.targets.inventory import load_inventory

    [entry] = [b for b in _blocks("yaml") if b.startswith("# targets/")]
    path = entry.splitlines()[0].removeprefix("# ")
    (project.root / path).parent.mkdir()
    (project.root / path).write_text(entry)
    [loaded] = load_inventory(project.root)
    assert (loaded.name, loaded.host, dict(loaded.labels)) == (
        "srv-01",
        "203.0.113.7",
        {"role": "server"},
    )
    listed = project.mle("agents", "--cached", "--json", check=True).stdout
    assert '"srv-01"' in listed

"""`files:` never ships mle's state or VCS internals, skips hidden files like a shell, is capped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import compile_recipe
from mle_cli.recipe._files import MAX_FILES, MAX_FILES_BYTES

NEVER_SHIPS = "matches only files mle never ships (.mle/, .git/)"


@pytest.fixture(autouse=True)
def _back_to_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path.cwd())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root as `mle init` leaves it, with a git repo, dot-files and bytecode."""
    root = tmp_path / "project"
    files = {
        ".mle/agent/token": "bearer-secret",
        ".mle/ledger.db": "ledger",
        ".mle/store/ab/abcdef": "artifact",
        ".git/config": "[core]",
        ".git/objects/ab/cdef": "blob",
        ".env": "SECRET=1",
        ".github/workflows/ci.yml": "on: push",
        ".venv/lib/site.py": "venv",
        "steps/train.py": "print('train')",
        "steps/.cache/x.py": "cache",
        "steps/__pycache__/train.cpython-311.pyc": "bytecode",
        "config/model.json": "{}",
        "config/.env": "NESTED=1",
        "token": "a file named token at the top",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _compile(project: Path, files: str) -> list[str]:
    """The paths a recipe at the project root ships with `files: <files>`."""
    recipe = project / "recipe.yaml"
    recipe.write_text(f"name: x\nfiles: {files}\nsteps: {{a: {{run: echo}}}}\n")
    os.chdir(project)
    return [f.path for f in compile_recipe(Path("recipe.yaml")).files]


def _refused(project: Path, files: str) -> str:
    with pytest.raises(RecipeError) as caught:
        _compile(project, files)
    return str(caught.value)


def test_a_star_star_glob_ships_no_state_no_vcs_no_hidden_files_and_no_bytecode(
    project: Path,
) -> None:
    assert _compile(project, "['**/*']") == [
        "config/model.json",
        "recipe.yaml",
        "steps/train.py",
        "token",
    ]


def test_the_agent_token_is_never_shipped_by_a_star_star_glob(project: Path) -> None:
    (project / "token").unlink()
    message = _refused(project, "['**/token']")
    assert message == f"recipe.yaml:2:9: files[0]: files pattern '**/token' {NEVER_SHIPS}"


@pytest.mark.parametrize(
    "pattern",
    [
        ".mle/agent/token",
        ".mle/**/*",
        ".mle/*",
        ".git/config",
        ".git/**/*",
        ".*/agent/token",
        "*/agent/token",
    ],
)
def test_mle_and_git_dirs_are_refused_even_when_named_explicitly(
    project: Path, pattern: str
) -> None:
    message = _refused(project, repr(pattern))
    assert message == f"recipe.yaml:2:8: files: files pattern {pattern!r} {NEVER_SHIPS}"


def test_mle_and_git_dirs_are_refused_whatever_their_case(project: Path) -> None:
    (project / ".MLE").mkdir()
    (project / ".MLE" / "token").write_text("on a case-insensitive disk this is .mle")
    (project / ".Git").mkdir()
    (project / ".Git" / "HEAD").write_text("ref")
    assert _refused(project, "'.MLE/token'").endswith(f"files pattern '.MLE/token' {NEVER_SHIPS}")
    assert _refused(project, "'.Git/*'").endswith(f"files pattern '.Git/*' {NEVER_SHIPS}")


def test_a_symlink_into_the_mle_dir_is_not_shipped(project: Path) -> None:
    (project / "steps" / "creds").symlink_to(project / ".mle" / "agent" / "token")
    (project / "linked").symlink_to(project / ".mle", target_is_directory=True)
    assert _refused(project, "'steps/creds'").endswith(f"'steps/creds' {NEVER_SHIPS}")
    assert _refused(project, "'linked/agent/*'").endswith(f"'linked/agent/*' {NEVER_SHIPS}")
    assert _compile(project, "['steps/*']") == ["steps/train.py"]


def test_mle_state_in_a_sub_directory_is_never_shipped_either(project: Path) -> None:
    (project / "sub" / ".mle").mkdir(parents=True)
    (project / "sub" / ".mle" / "token").write_text("secret")
    (project / "sub" / "run.py").write_text("")
    assert _compile(project, "['sub/**/*', 'sub/*']") == ["sub/run.py"]
    assert _refused(project, "'sub/.*/*'").endswith(f"files pattern 'sub/.*/*' {NEVER_SHIPS}")


@pytest.mark.parametrize(
    ("pattern", "shipped"),
    [
        (".env", [".env"]),
        (".*", [".env"]),
        ("**/.env", [".env", "config/.env"]),
        ("config/.*", ["config/.env"]),
        (".github/**/*.yml", [".github/workflows/ci.yml"]),
        (".*/**/*.yml", [".github/workflows/ci.yml"]),
        ("steps/.cache/*", ["steps/.cache/x.py"]),
        ("steps/__pycache__/*", ["steps/__pycache__/train.cpython-311.pyc"]),
    ],
)
def test_dot_files_ship_only_when_the_pattern_writes_the_dot(
    project: Path, pattern: str, shipped: list[str]
) -> None:
    assert _compile(project, repr(pattern)) == shipped


@pytest.mark.parametrize(
    ("pattern", "shipped"),
    [
        ("*", ["recipe.yaml", "token"]),
        ("config/*", ["config/model.json"]),
        ("**/*.py", ["steps/train.py"]),
    ],
)
def test_wildcards_do_not_match_a_leading_dot(
    project: Path, pattern: str, shipped: list[str]
) -> None:
    files = f"[{pattern!r}, 'token']"
    assert _compile(project, files) == sorted({*shipped, "token"})


@pytest.mark.parametrize("pattern", ["config/*env", "?env", "[.]env", "**/*env"])
def test_a_pattern_matching_only_hidden_files_says_so(project: Path, pattern: str) -> None:
    message = _refused(project, f"['config/*.json', {pattern!r}]")
    column = len("files: ['config/*.json', ") + 1
    assert message == (
        f"recipe.yaml:2:{column}: files[1]: files pattern {pattern!r} matches only hidden files "
        "(write the leading '.' in the pattern to ship them, e.g. '.env')"
    )


def test_a_pattern_matching_only_bytecode_says_so(project: Path) -> None:
    message = _refused(project, "'**/*.pyc'")
    assert message == (
        "recipe.yaml:2:8: files: files pattern '**/*.pyc' "
        "matches only files in __pycache__/ (which '**' skips)"
    )


def test_a_pattern_matching_several_kinds_of_skipped_files_names_each(project: Path) -> None:
    (project / ".mle" / "x.cfg").write_text("")
    (project / ".venv" / "y.cfg").write_text("")
    message = _refused(project, "'**/*.cfg'")
    assert message == (
        "recipe.yaml:2:8: files: files pattern '**/*.cfg' matches only files mle never ships "
        "(.mle/, .git/) and hidden files (write the leading '.' in the pattern to ship them, "
        "e.g. '.env')"
    )


def test_a_pattern_matching_nothing_at_all_keeps_the_usual_message(project: Path) -> None:
    message = _refused(project, "['steps/*.py', 'nowhere/*']")
    assert message == "recipe.yaml:2:23: files[1]: files pattern 'nowhere/*' matches no files"


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (".", "it names no file"),
        ("steps/a**", "'**' can only be a whole path component"),
    ],
)
def test_malformed_patterns_are_refused(project: Path, pattern: str, problem: str) -> None:
    message = _refused(project, repr(pattern))
    assert message == f"recipe.yaml:2:8: files: invalid files pattern {pattern!r}: {problem}"


def _many(root: Path, count: int) -> None:
    (root / "data").mkdir()
    for i in range(count):
        (root / "data" / f"{i:04}.txt").write_text(str(i))


def test_up_to_1000_files_are_shipped(tmp_path: Path) -> None:
    _many(tmp_path, MAX_FILES - 1)
    assert len(_compile(tmp_path, "['data/*', recipe.yaml]")) == MAX_FILES == 1000


def test_more_than_1000_files_is_a_located_error(tmp_path: Path) -> None:
    _many(tmp_path, 1200)
    message = _refused(tmp_path, "['recipe.yaml', 'data/*']")
    assert message == (
        "recipe.yaml:2:24: files[1]: files pattern 'data/*' brings the files to ship to 1201, "
        "over the limit of 1000; use a narrower glob"
    )


def test_the_file_count_does_not_count_a_file_twice(tmp_path: Path) -> None:
    _many(tmp_path, MAX_FILES)
    assert len(_compile(tmp_path, "['data/*', 'data/0*', '**/*.txt']")) == MAX_FILES


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)


def test_up_to_100_mib_in_total_is_shipped(tmp_path: Path) -> None:
    _sparse(tmp_path / "data" / "a.bin", MAX_FILES_BYTES // 2)
    _sparse(tmp_path / "data" / "b.bin", MAX_FILES_BYTES // 2 - 200)
    assert _compile(tmp_path, "data/*.bin") == ["data/a.bin", "data/b.bin"]
    assert MAX_FILES_BYTES == 100 * 1024 * 1024


def test_more_than_100_mib_in_total_is_a_located_error_before_anything_is_hashed(
    tmp_path: Path,
) -> None:
    _sparse(tmp_path / "data" / "a.bin", 60 * 1024 * 1024)
    _sparse(tmp_path / "big" / "b.bin", 40 * 1024 * 1024 + 1)
    message = _refused(tmp_path, "[data/*, 'big/*']")
    assert message == (
        "recipe.yaml:2:17: files[1]: files pattern 'big/*' brings the files to ship to "
        "100.1 MiB, over the limit of 100 MiB; use a narrower glob"
    )
    _sparse(tmp_path / "huge.bin", 10 * 1024**3)
    assert _refused(tmp_path, "huge.bin") == (
        "recipe.yaml:2:8: files: files pattern 'huge.bin' brings the files to ship to "
        "10240.0 MiB, over the limit of 100 MiB; use a narrower glob"
    )

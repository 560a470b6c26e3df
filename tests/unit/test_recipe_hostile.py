"""Hostile recipes: code-running YAML tags, alias bombs, huge files, path escapes, injection."""

from __future__ import annotations

import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from mle_cli.errors import RecipeError
from mle_cli.recipe import compile_recipe, render_step


def _refused(tmp_path: Path, text: str | bytes, name: str = "recipe.yaml") -> str:
    """Write a recipe into tmp_path, compile it from there and return the error message."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    os.chdir(tmp_path)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(Path(name))
    return str(caught.value)


@pytest.fixture(autouse=True)
def _back_to_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path.cwd())


PYTHON_TAGS = [
    ("!!python/object/apply:os.system ['touch pwned']", "!!python/object/apply:os.system"),
    (
        "!!python/object/new:subprocess.Popen [['touch', 'pwned']]",
        "!!python/object/new:subprocess.Popen",
    ),
    ("!!python/name:os.system", "!!python/name:os.system"),
    ("!!python/module:os", "!!python/module:os"),
    ("!!python/tuple [a, b]", "!!python/tuple"),
    ("!!python/object:os._wrap_close {}", "!!python/object:os._wrap_close"),
    (
        "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch pwned']",
        "!!python/object/apply:os.system",
    ),
    ("!!set {a, b}", "!!set"),
    ("!!omap [a: 1]", "!!omap"),
    ("!Ref steps.a", "!Ref"),
]


@pytest.mark.parametrize(("value", "shown"), PYTHON_TAGS, ids=[t for _, t in PYTHON_TAGS])
def test_python_and_custom_tags_are_refused_without_running_anything(
    tmp_path: Path, value: str, shown: str
) -> None:
    message = _refused(tmp_path, f"name: evil\nsteps:\n  a:\n    run: {value}\n")
    assert message == f"recipe.yaml:4:10: steps.a.run: unsupported YAML tag {shown!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_a_python_tag_on_a_key_is_refused(tmp_path: Path) -> None:
    text = (
        "name: evil\nsteps:\n  ? !!python/object/apply:os.system ['touch pwned']\n  : {run: echo}\n"
    )
    message = _refused(tmp_path, text)
    assert (
        message == "recipe.yaml:3:5: steps: unsupported YAML tag '!!python/object/apply:os.system'"
    )
    assert not (tmp_path / "pwned").exists()


BILLION_LAUGHS = """name: bomb
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
steps:
  x:
    run: *i
"""


def test_an_alias_bomb_is_stopped_after_a_bounded_number_of_nodes(tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        message = _refused(tmp_path, BILLION_LAUGHS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 9**9 strings would need gigabytes; the expansion stops at 100,000 nodes.
    assert message == "recipe.yaml:2:8: f[0][3][3][7][2][0]: too many nodes (YAML alias expansion?)"
    assert peak < 100_000_000


def test_a_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, "name: loop\nsteps: &s {a: {run: echo, env: *s}}\n")
    assert message == "recipe.yaml:2:8: steps.a.env: recursive YAML alias"


def test_a_10_mb_recipe_is_refused_without_reading_it(tmp_path: Path) -> None:
    with (tmp_path / "big.yaml").open("wb") as f:
        f.truncate(10_000_000)  # sparse: costs no disk, and reading it all would show in memory
    os.chdir(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError) as caught:
            compile_recipe(Path("big.yaml"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == "big.yaml is 10.0 MB; recipes are limited to 1 MiB"
    assert peak < 1_000_000


def test_a_recipe_just_over_the_limit_shows_its_size_in_bytes(tmp_path: Path) -> None:
    text = "name: big\ndescription: " + "x" * (1024 * 1024) + "\n"
    message = _refused(tmp_path, text)
    assert message == f"recipe.yaml is {len(text)} bytes; recipes are limited to 1 MiB"


def test_a_missing_recipe_is_a_recipe_error(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(Path("recipes/x.yaml"))
    assert str(caught.value) == "recipes/x.yaml: no such file"


def test_a_directory_is_not_a_recipe(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    os.chdir(tmp_path)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(Path("recipes"))
    assert str(caught.value) == "recipes is a directory, not a recipe file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_recipe_is_a_recipe_error(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    os.chdir(tmp_path)
    with pytest.raises(RecipeError) as caught:
        compile_recipe(Path("recipe.yaml"))
    assert str(caught.value) == "recipe.yaml: cannot read (permission denied)"


def test_a_recipe_that_is_not_utf8_is_located(tmp_path: Path) -> None:
    message = _refused(tmp_path, b"name: x\ndescription: caf\xe9\n")
    assert message == "recipe.yaml:2:17: not UTF-8 text"


def test_control_characters_are_refused(tmp_path: Path) -> None:
    message = _refused(tmp_path, "name: x\ndescription: a\x1bb\n")
    assert message == "recipe.yaml:2:15: invalid YAML: special characters are not allowed (#x001b)"


def _project(tmp_path: Path) -> Path:
    """A project dir with steps/ok.py and a secret beside (outside) it."""
    project = tmp_path / "project"
    (project / "steps").mkdir(parents=True)
    (project / "steps" / "ok.py").write_text("print('ok')\n")
    (tmp_path / "secret.txt").write_text("do not ship\n")
    return project


def test_files_cannot_escape_through_a_symlinked_file(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "steps" / "zz.py").symlink_to(tmp_path / "secret.txt")
    text = "name: x\nfiles: [steps/*.py]\nsteps: {a: {run: echo}}\n"
    message = _refused(project, text)
    assert (
        message
        == "recipe.yaml:2:9: files[0]: 'steps/zz.py' resolves outside the recipe's directory"
    )


def test_files_cannot_escape_through_a_symlinked_directory(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "linked").symlink_to(tmp_path, target_is_directory=True)
    text = "name: x\nfiles: [steps/ok.py, linked/*.txt]\nsteps: {a: {run: echo}}\n"
    message = _refused(project, text)
    assert (
        message
        == "recipe.yaml:2:22: files[1]: 'linked/secret.txt' resolves outside the recipe's directory"
    )


def test_a_symlink_that_stays_inside_is_shipped_under_its_own_name(tmp_path: Path) -> None:
    project = _project(tmp_path)
    (project / "steps" / "alias.py").symlink_to(project / "steps" / "ok.py")
    (project / "recipe.yaml").write_text("name: x\nfiles: [steps/*.py]\nsteps: {a: {run: echo}}\n")
    plan = compile_recipe(project / "recipe.yaml")
    assert [(f.path, f.source) for f in plan.files] == [
        ("steps/alias.py", (project / "steps" / "ok.py").resolve()),
        ("steps/ok.py", (project / "steps" / "ok.py").resolve()),
    ]
    assert plan.files[0].digest == plan.files[1].digest


def test_files_refuse_a_fifo_instead_of_blocking_on_it(tmp_path: Path) -> None:
    project = _project(tmp_path)
    os.mkfifo(project / "steps" / "pipe.py")
    message = _refused(project, "name: x\nfiles: steps/*.py\nsteps: {a: {run: echo}}\n")
    assert message == "recipe.yaml:2:8: files: 'steps/pipe.py' is not a regular file"


def test_files_patterns_cannot_climb_out(tmp_path: Path) -> None:
    project = _project(tmp_path)
    message = _refused(project, "name: x\nfiles: ['steps/../../*.txt']\nsteps: {a: {run: echo}}\n")
    assert message == (
        "recipe.yaml:2:9: files[0]: "
        "files pattern 'steps/../../*.txt' must stay inside the recipe's directory"
    )


HOSTILE_VALUES = [
    "$(touch pwned)",
    "; touch pwned",
    "`touch pwned`",
    "x && touch pwned",
    "x | tee pwned",
    "> pwned",
    'it\'s "quoted" \\ back',
    "line one\ntouch pwned",
    "*",
    "$HOME ${PATH} $0",
    "",
    "  spaced  out  ",
]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_shell_metacharacters_in_params_reach_the_command_as_one_literal_argument(
    tmp_path: Path, value: str
) -> None:
    (tmp_path / "recipe.yaml").write_text(
        "name: quoting\n"
        "params: {value: safe}\n"
        "steps:\n"
        "  echo:\n"
        "    run: printf '%s\\0' {{ params.value }} > seen.bin\n"
    )
    plan = compile_recipe(tmp_path / "recipe.yaml", {"value": value})
    rendered = render_step(plan, plan.steps[0], run_id="r1", target="local")
    assert rendered.shell is not None
    subprocess.run(["sh", "-c", rendered.shell], cwd=tmp_path, check=True, timeout=10)
    # printf repeats its format per argument: exactly one NUL-terminated value means one argument.
    assert (tmp_path / "seen.bin").read_bytes() == value.encode() + b"\0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "seen.bin"]


def test_values_in_argv_and_env_are_not_shell_quoted(tmp_path: Path) -> None:
    (tmp_path / "recipe.yaml").write_text(
        "name: literal\n"
        "params: {value: safe}\n"
        "steps:\n"
        "  a:\n"
        "    argv: [printf, '%s', '{{ params.value }}']\n"
        "    env: {VALUE: '{{ params.value }}'}\n"
    )
    value = "$(touch pwned); `rm -rf /`"
    plan = compile_recipe(tmp_path / "recipe.yaml", {"value": value})
    rendered = render_step(plan, plan.steps[0], run_id="r1", target="local")
    assert rendered.argv == ("printf", "%s", value)
    assert rendered.env == {"VALUE": value}
    out = subprocess.run(list(rendered.argv), capture_output=True, check=True, timeout=10)
    assert out.stdout == value.encode()
    assert not (tmp_path / "pwned").exists()


def test_templates_cannot_reach_python_internals(tmp_path: Path) -> None:
    text = "name: x\nsteps:\n  a:\n    run: echo {{ run.__class__.__init__.__globals__ }}\n"
    message = _refused(tmp_path, text)
    assert message == (
        "recipe.yaml:4:10: steps.a.run: access to attribute '__class__' is not allowed in templates"
    )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ 2 ** 100000000 }}", "exponent 100000000 is too large for a template"),
        ("{{ 99 ** 64 ** 64 }}", "power is too large for a template"),
        ("{{ 'x' * 10**8 }}", "repetition is too large for a template"),
        ("{{ [1] * 1000000 }}", "repetition is too large for a template"),
    ],
)
def test_templates_cannot_exhaust_cpu_or_memory(
    tmp_path: Path, template: str, message: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'name: x\nsteps:\n  a:\n    run: echo "{template}"\n')
    with pytest.raises(RecipeError, match=message):
        compile_recipe(recipe)


def test_ordinary_arithmetic_still_works_in_templates(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: x\nparams: {n: 3}\nsteps:\n  a:\n    run: echo {{ params.n * 2 }} {{ 2 ** 10 }}\n"
    )
    plan = compile_recipe(recipe)
    rendered = render_step(plan, plan.steps[0], run_id="r", target="local")
    assert rendered.shell == "echo 6 1024"

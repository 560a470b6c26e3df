"""Device facts: each parser from recorded outputs, and the one script that gathers them.

Cases live in tests/unit/facts/, one device per file: a `# description`, then `== expected ==`
with the DeviceFacts fields (plus `summary` and `python_problem`) as JSON, then `== output ==`
with what the facts script printed on that device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mle_cli.targets.facts import (
    FACTS,
    DeviceFacts,
    PythonInfo,
    facts_script,
    parse_df,
    parse_facts,
    parse_init,
    parse_meminfo,
    parse_os_release,
    parse_pythons,
    pip_platforms,
)
from mle_proto import __version__

CASES = sorted((Path(__file__).parent / "facts").glob("*.txt"))
SH = shutil.which("sh")


def _case(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text()
    head, output = text.split("== output ==\n", 1)
    expected = json.loads(head.split("== expected ==\n", 1)[1])
    return expected, output


def _run_script(install_dir: str, env: dict[str, str] | None = None) -> str:
    assert SH is not None
    done = subprocess.run(
        [SH, "-s"], input=facts_script(install_dir), capture_output=True, text=True, timeout=60,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_case_file_is_read() -> None:
    names = {path.stem for path in CASES}
    assert {"raspios-bookworm-aarch64", "raspbian-bullseye-armv7l", "debian12-x86_64"} <= names
    assert {"alpine-3.19-x86_64", "garbage"} <= names


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_facts_parsed_from_a_recorded_output(path: Path) -> None:
    expected, output = _case(path)
    facts = parse_facts(output)
    got = dataclasses.asdict(facts)
    got["pip_platforms"] = list(got["pip_platforms"])
    got["summary"] = facts.summary
    got["python_problem"] = facts.python_problem
    assert got == expected


def test_the_case_files_name_every_field() -> None:
    fields = {f.name for f in dataclasses.fields(DeviceFacts)} | {"summary", "python_problem"}
    for path in CASES:
        assert set(_case(path)[0]) == fields, path.name


def test_pip_platforms_of_this_machine_are_what_packaging_computes() -> None:
    tags = pytest.importorskip("packaging.tags", reason="packaging is not installed")
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    if not (libc or "").startswith("glibc"):
        pytest.skip("this machine does not run glibc")
    bits = 64 if sys.maxsize > 2**32 else 32
    # The same tags (packaging 26.3 lists linux_* first, 26.2 last: pip takes them in any order).
    assert set(pip_platforms(platform.machine(), bits, libc or "")) == set(tags.platform_tags())


@pytest.mark.parametrize(
    ("machine", "bits", "libc", "first", "last", "count"),
    [
        ("x86_64", 32, "glibc 2.17", "manylinux_2_17_i686", "linux_i686", 17),
        ("armv7l", 32, "musl 1.2", "musllinux_1_2_armv7l", "linux_armv7l", 4),
        ("riscv64", 64, "", "linux_riscv64", "linux_riscv64", 1),
        ("aarch64", 64, "glibc 2.16", "linux_aarch64", "linux_aarch64", 1),  # older than 2.17
    ],
)
def test_pip_platforms_edges(
    machine: str, bits: int, libc: str, first: str, last: str, count: int
) -> None:
    tags = pip_platforms(machine, bits, libc)
    assert (tags[0], tags[-1], len(tags)) == (first, last, count)


def test_pip_platforms_of_no_machine_are_none() -> None:
    assert pip_platforms("", 64, "glibc 2.36") == ()


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("NAME='Foo OS'\nVERSION_ID=\"1.0\"\n", {"NAME": "Foo OS", "VERSION_ID": "1.0"}),
        ('PRETTY_NAME="A \\"quoted\\" name"', {"PRETTY_NAME": 'A "quoted" name'}),
        ("# comment\n\nID=x\nID=y\n", {"ID": "y"}),
        ('NAME="open\nID=ok', {"ID": "ok"}),
    ],
)
def test_os_release(output: str, expected: dict[str, str]) -> None:
    assert parse_os_release(output) == expected


def test_df_keeps_the_first_data_line_and_ignores_headers() -> None:
    output = "Filesystem 1024-blocks Used Available Capacity Mounted on\nfs 10 4 6 40% /a b\n"
    assert parse_df(output) == (6 * 1024, 10 * 1024)
    assert parse_df("df: /nope: No such file or directory") == (0, 0)


def test_meminfo_without_mem_available_adds_free_buffers_and_cached() -> None:
    output = "MemTotal: 100 kB\nMemFree: 10 kB\nBuffers: 1 kB\nCached: 5 kB\n"
    assert parse_meminfo(output) == (100 * 1024, 16 * 1024)


@pytest.mark.parametrize(
    ("output", "init"),
    [
        ("run-systemd-system\n/usr/bin/systemctl", "systemd"),
        ("/usr/bin/systemctl", "none"),  # installed, not running (a container)
        ("run-systemd-system", "none"),  # no systemctl to drive it
        ("", "none"),
    ],
)
def test_init_system(output: str, init: str) -> None:
    assert parse_init(output) == init


def test_the_newest_python_that_can_make_a_venv_is_chosen() -> None:
    probe = "path=/usr/bin/python3.{m}\nversion=3.{m}.1\nvenv={v}\n"
    output = "\n".join(probe.format(m=m, v=v) for m, v in ((12, "no"), (11, "yes"), (9, "yes")))
    facts = parse_facts(f"@@mle-fact python\n{output}")
    assert (facts.python, facts.python_venv) == ("/usr/bin/python3.11", True)
    assert [p.version for p in parse_pythons(output)] == ["3.12.1", "3.11.1", "3.9.1"]


def test_python_versions_compare_as_numbers() -> None:
    assert PythonInfo("/p", "3.10.12").version_tuple > PythonInfo("/p", "3.9.18").version_tuple
    assert PythonInfo("/p", "3.13.0rc1").version_tuple == (3, 13, 0)


# -- the script itself, run by this machine's sh ------------------------------------------------


@pytest.fixture
def sh() -> str:
    if SH is None:
        pytest.skip("no POSIX sh on this machine")
    return SH


def test_the_script_prints_every_fact_once_in_order(sh: str, tmp_path: Path) -> None:
    output = _run_script(str(tmp_path))
    markers = [line for line in output.splitlines() if line.startswith("@@mle-fact ")]
    assert markers == [f"@@mle-fact {fact.name}" for fact in FACTS]


def test_the_script_on_this_machine(sh: str, tmp_path: Path) -> None:
    """What the script reports here matches what Python and the OS say directly."""
    install = tmp_path / "not" / "yet" / "made"  # df looks at the nearest existing parent
    facts = parse_facts(_run_script(str(install)))
    assert facts.arch == platform.uname().machine
    stat = os.statvfs(tmp_path)
    assert facts.disk_total_bytes == stat.f_blocks * stat.f_frsize
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    assert facts.memory_total_bytes == total_kib * 1024
    systemd = Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None
    assert facts.init_system == ("systemd" if systemd else "none")
    assert facts.agent_version == ""
    if facts.python:  # the Python found reports its own version
        said = subprocess.run(
            [facts.python, "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()  # fmt: skip
        assert facts.python_version == said


def test_the_script_reads_the_installed_agents_version(sh: str, tmp_path: Path) -> None:
    agentd = Path(sys.executable).parent / "mle-agentd"
    if not agentd.exists():
        pytest.skip("mle-agentd is not installed next to this Python")
    bin_dir = tmp_path / "agent" / "releases" / __version__ / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "mle-agentd").symlink_to(agentd)
    (tmp_path / "agent" / "current").symlink_to(f"releases/{__version__}")
    facts = parse_facts(_run_script(str(tmp_path / "agent")))
    assert facts.agent_version == __version__


def test_a_home_relative_install_dir_and_shell_metacharacters(sh: str, tmp_path: Path) -> None:
    """`~/` is the login's home; a hostile directory name stays one word."""
    home = tmp_path / "home"
    (home / "odd dir;x").mkdir(parents=True)
    canary = tmp_path / "pwned"
    env = {**os.environ, "HOME": str(home)}
    dirs = ["~/odd dir;x", f"/nowhere/$(touch {canary})", f"/x'; touch {canary}; '"]
    for install_dir in dirs:
        facts = parse_facts(_run_script(install_dir, env))
        assert facts.disk_total_bytes > 0
    assert not canary.exists()

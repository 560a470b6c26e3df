"""Device facts, pyinfra style: each fact is a shell command plus a pure parser of its output.

`gather_facts` sends every fact's command as one `sh` script (one round trip), each output after a
marker line, and parses the sections into `DeviceFacts`. A fact the device cannot answer is left
unknown ("" or 0), never an exception: the install decides what it cannot do without.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mle_cli.targets.ssh import SshSession

__all__ = [
    "FACTS",
    "MIN_PYTHON",
    "DeviceFacts",
    "Fact",
    "PythonInfo",
    "facts_script",
    "gather_facts",
    "parse_facts",
    "pip_platforms",
]

MIN_PYTHON = (3, 11)
MARKER = "@@mle-fact "
GATHER_TIMEOUT = 60.0  # seconds; a Pi Zero starts several Pythons for the python fact

# Printed by each python3 found, as key=value lines: old Pythons must parse it (no f-strings).
_PYTHON_PROBE = """\
import os, platform, struct, sys
print("path=" + sys.executable)
print("version=" + platform.python_version())
print("implementation=" + sys.implementation.name)
print("machine=" + platform.machine())
print("bits=%d" % (struct.calcsize("P") * 8))
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (AttributeError, ValueError, OSError):
    libc = ""
print("glibc=" + libc)
try:
    import ensurepip, venv
    print("venv=yes")
except ImportError:
    print("venv=no")
"""


@dataclass(frozen=True)
class Fact:
    """A shell command (run by `sh`, the install directory in "$D") and its output's parser."""

    name: str
    command: str
    parse: Callable[[str], Any]


@dataclass(frozen=True)
class PythonInfo:
    """One Python interpreter found on the device."""

    path: str
    version: str  # "3.11.2"
    implementation: str = "cpython"
    machine: str = ""  # platform.machine(): the kernel's view
    bits: int = 64  # the interpreter's pointer size (a 32-bit userland on a 64-bit kernel)
    glibc: str = ""  # "2.36", "" when not glibc
    venv: bool = False  # `python3 -m venv` can work (Debian: the python3-venv package)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", self.version)[:3])


@dataclass(frozen=True)
class DeviceFacts:
    """What the install needs to know of a device. Unknown text is "", unknown sizes are 0."""

    arch: str  # `uname -m`: aarch64, armv7l, x86_64
    os: str  # short: "Debian 12", "Alpine Linux 3.19.1"
    os_id: str  # /etc/os-release ID: debian, raspbian, alpine
    os_version: str  # VERSION_ID
    os_pretty: str  # PRETTY_NAME
    python: str  # path of the Python to use ("" = none found)
    python_version: str  # "3.11.2"
    python_venv: bool
    python_implementation: str
    pip_platforms: tuple[str, ...]  # `pip download --platform` tags, most specific first
    disk_free_bytes: int  # in the install directory's filesystem
    disk_total_bytes: int
    memory_total_bytes: int
    memory_available_bytes: int
    init_system: str  # "systemd" or "none"
    agent_version: str  # the installed mle-agentd's version, "" = none
    libc: str = ""  # "glibc 2.36", "musl 1.2.4", ""

    @property
    def summary(self) -> str:
        """`aarch64, Debian 12, Python 3.11.2, systemd, 12.3 GB free`."""
        python = f"Python {self.python_version}" if self.python else "no python3"
        free = f"{self.disk_free_bytes / 1e9:.1f} GB free" if self.disk_total_bytes else "disk ?"
        return f"{self.arch or '?'}, {self.os}, {python}, {self.init_system}, {free}"

    @property
    def python_problem(self) -> str:
        """Why the agent cannot run on this Python ("" when it can), said so a user can act."""
        need = ".".join(map(str, MIN_PYTHON))
        if not self.python:
            return f"no python3 found; the agent needs Python {need} or later"
        version = PythonInfo(self.python, self.python_version).version_tuple
        if version < MIN_PYTHON:
            return (
                f"Python {self.python_version or '(unknown)'} at {self.python} is too old; the "
                f"agent needs Python {need} or later"
            )
        if not self.python_venv:
            return (
                f"{self.python} cannot create virtual environments (venv/ensurepip missing; on "
                "Debian and Raspberry Pi OS: apt-get install python3-venv)"
            )
        return ""


def parse_arch(output: str) -> str:
    """`uname -m`: its first word when it looks like a machine name."""
    words = output.split()
    return words[0] if words and re.fullmatch(r"[A-Za-z0-9_]{1,32}", words[0]) else ""


def parse_os_release(output: str) -> dict[str, str]:
    """/etc/os-release: KEY=value lines, values unquoted as a shell would."""
    values: dict[str, str] = {}
    for line in output.splitlines():
        key, sep, raw = line.strip().partition("=")
        if not sep or not re.fullmatch(r"[A-Z0-9_]+", key):
            continue
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        values[key] = " ".join(words)
    return values


def parse_pythons(output: str) -> list[PythonInfo]:
    """Blocks of the probe's key=value lines, one per interpreter found."""
    found: list[PythonInfo] = []
    for block in output.split("\n\n"):
        values = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
        path, version = values.get("path", ""), values.get("version", "")
        if not path.startswith("/") or not re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", version):
            continue
        bits = values.get("bits", "64")
        found.append(
            PythonInfo(
                path=path,
                version=version,
                implementation=values.get("implementation", ""),
                machine=values.get("machine", ""),
                bits=int(bits) if bits.isdigit() else 64,
                glibc=_glibc_version(values.get("glibc", "")),
                venv=values.get("venv") == "yes",
            )
        )
    return found


def parse_musl(output: str) -> str:
    """`ldd --version` on musl says `musl libc (x86_64)` and `Version 1.2.4`; glibc: ""."""
    if "musl" not in output:
        return ""
    match = re.search(r"^Version\s+(\d+\.\d+(?:\.\d+)?)", output, re.MULTILINE)
    return match.group(1) if match else "0.0"


def parse_df(output: str) -> tuple[int, int]:
    """`df -Pk`: (free, total) bytes of the filesystem on its data line, (0, 0) if none."""
    for line in output.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 6 and fields[1].isdigit() and fields[3].isdigit():
            return int(fields[3]) * 1024, int(fields[1]) * 1024
    return 0, 0


def parse_meminfo(output: str) -> tuple[int, int]:
    """/proc/meminfo: (MemTotal, MemAvailable) bytes; old kernels lack MemAvailable."""
    kib: dict[str, int] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"(\w+):\s+(\d+)\s*kB", line.strip())
        if match:
            kib[match.group(1)] = int(match.group(2))
    available = kib.get("MemAvailable")
    if available is None:
        available = sum(kib.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return kib.get("MemTotal", 0) * 1024, available * 1024


def parse_init(output: str) -> str:
    """systemd when /run/systemd/system exists (systemd is PID 1) and systemctl is there."""
    lines = {line.strip() for line in output.splitlines()}
    has_ctl = any(line.startswith("/") and line.endswith("/systemctl") for line in lines)
    return "systemd" if "run-systemd-system" in lines and has_ctl else "none"


def parse_agent_version(output: str) -> str:
    """`mle-agentd 0.1.0 (protocol v1)` -> `0.1.0`."""
    match = re.search(r"^mle-agentd\s+(\d[\w.+!-]*)", output, re.MULTILINE)
    return match.group(1) if match else ""


FACTS: tuple[Fact, ...] = (
    Fact("arch", "uname -m", parse_arch),
    Fact("os", "cat /etc/os-release || cat /usr/lib/os-release", parse_os_release),
    Fact(
        "python",
        "for p in python3 python3.14 python3.13 python3.12 python3.11; do "
        'command -v "$p"; done | while read -r p; do readlink -f "$p"; done | sort -u | '
        f'while read -r p; do "$p" -c {shlex.quote(_PYTHON_PROBE)} </dev/null; echo; done',
        parse_pythons,
    ),
    Fact("libc", "ldd --version 2>&1 | head -n 2", parse_musl),
    Fact(
        "disk",
        'd="$D"; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"',
        parse_df,
    ),
    Fact("memory", "cat /proc/meminfo", parse_meminfo),
    Fact(
        "init",
        "test -d /run/systemd/system && echo run-systemd-system; command -v systemctl",
        parse_init,
    ),
    Fact("agent", '"$D/current/venv/bin/mle-agentd" --version', parse_agent_version),
)


def facts_script(install_dir: str) -> str:
    """One `sh` script printing every fact's output after a marker line (`~/` = $HOME)."""
    if install_dir.startswith("~/"):
        where = '"$HOME"/' + shlex.quote(install_dir[2:])
    else:
        where = shlex.quote(install_dir)
    lines = [f"D={where}"]
    for fact in FACTS:
        lines.append(f"printf '\\n{MARKER}%s\\n' {fact.name}")
        lines.append(f"( {fact.command} ) </dev/null 2>/dev/null")
    return "\n".join([*lines, "true", ""])


def gather_facts(session: SshSession, install_dir: str) -> DeviceFacts:
    """Run every fact on the device in one command and parse the answers."""
    done = session.run("sh -s", stdin=facts_script(install_dir).encode(), timeout=GATHER_TIMEOUT)
    return parse_facts(done.stdout)


def parse_facts(output: str) -> DeviceFacts:
    """The facts script's output -> DeviceFacts (pure: tested from recorded outputs)."""
    sections = _sections(output)
    parsed = {fact.name: fact.parse(sections.get(fact.name, "")) for fact in FACTS}
    release: dict[str, str] = parsed["os"]
    pythons: list[PythonInfo] = parsed["python"]
    python = _best_python(pythons)
    musl: str = parsed["libc"]
    free, total = parsed["disk"]
    mem_total, mem_available = parsed["memory"]
    libc = f"musl {musl}" if musl else (f"glibc {python.glibc}" if python and python.glibc else "")
    return DeviceFacts(
        arch=parsed["arch"],
        os=_short_os(release),
        os_id=release.get("ID", ""),
        os_version=release.get("VERSION_ID", ""),
        os_pretty=release.get("PRETTY_NAME", ""),
        python=python.path if python else "",
        python_version=python.version if python else "",
        python_venv=python.venv if python else False,
        python_implementation=python.implementation if python else "",
        pip_platforms=pip_platforms(python.machine or parsed["arch"], python.bits, libc)
        if python
        else (),
        disk_free_bytes=free,
        disk_total_bytes=total,
        memory_total_bytes=mem_total,
        memory_available_bytes=mem_available,
        init_system=parsed["init"],
        agent_version=parsed["agent"],
        libc=libc,
    )


def pip_platforms(machine: str, bits: int, libc: str) -> tuple[str, ...]:
    """pip platform tags a Python on this machine accepts, most specific first (as
    `packaging.tags` computes them; a 32-bit userland on a 64-bit kernel counts as 32-bit)."""
    arch = re.sub(r"[^\w]", "_", machine.lower())
    if not arch:
        return ()
    if bits == 32:
        arch = {"x86_64": "i686", "aarch64": "armv8l"}.get(arch, arch)
    archs = ["armv8l", "armv7l"] if arch == "armv8l" else [arch]
    kind, _, version = libc.partition(" ")
    numbers = [int(n) for n in re.findall(r"\d+", version)[:2]]
    tags: list[str] = []
    if kind == "glibc" and len(numbers) == 2 and numbers[0] == 2:
        tags += [tag for a in archs for tag in _manylinux(a, numbers[1])]
    if kind == "musl" and len(numbers) == 2 and numbers[0] == 1:
        tags += [f"musllinux_1_{minor}_{a}" for a in archs for minor in range(numbers[1], -1, -1)]
    return (*tags, *(f"linux_{a}" for a in archs))


_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def _manylinux(arch: str, glibc_minor: int) -> list[str]:
    """manylinux_2_N tags from this glibc down to the arch's oldest, with the legacy names."""
    oldest = 5 if arch in ("x86_64", "i686") else 17
    tags: list[str] = []
    for minor in range(glibc_minor, oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in _LEGACY_MANYLINUX:
            tags.append(f"{_LEGACY_MANYLINUX[minor]}_{arch}")
    return tags


def _sections(output: str) -> Mapping[str, str]:
    """Split the script's output at the marker lines: fact name -> its output."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(MARKER):
            current = sections.setdefault(line[len(MARKER) :].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


def _best_python(found: Sequence[PythonInfo]) -> PythonInfo | None:
    """The newest interpreter that can run the agent (venv included), else the newest one."""
    usable = [p for p in found if p.version_tuple >= MIN_PYTHON and p.venv]
    candidates = usable or list(found)
    return max(candidates, key=lambda p: p.version_tuple, default=None)


def _glibc_version(confstr: str) -> str:
    """`glibc 2.36` (os.confstr) -> `2.36`."""
    match = re.fullmatch(r"glibc\s+(\d+\.\d+)\S*", confstr.strip())
    return match.group(1) if match else ""


def _short_os(release: Mapping[str, str]) -> str:
    """`Debian 12`, `Raspbian 11`, `Ubuntu 22.04`, `Alpine Linux 3.19.1`."""
    name = release.get("NAME", "").replace(" GNU/Linux", "").strip()
    if name:
        return f"{name} {release.get('VERSION_ID', '')}".strip()
    return release.get("PRETTY_NAME") or release.get("ID") or "unknown OS"

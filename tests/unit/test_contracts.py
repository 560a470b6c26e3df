"""Architecture contracts: package boundaries, lazy imports, protocol stubs and version floors."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = {
    "mle_cli": REPO / "cli/mle_cli",
    "mle_agent": REPO / "agent/mle_agent",
    "mle_proto": REPO / "protos/mle_proto",
}
FORBIDDEN = {
    "mle_agent": {
        "mle_cli",
        "typer",
        "rich",
        "paramiko",
        "sqlite_utils",
        "yaml",
        "jinja2",
        "pydantic",
    },
    # sqlite-utils is only a dev dependency (a test reads the ledger with its CLI).
    "mle_cli": {"mle_agent", "sqlite_utils"},
    "mle_proto": {"mle_cli", "mle_agent", "typer", "rich", "sqlite_utils"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_package_boundaries(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & FORBIDDEN[package])
        for path in PACKAGES[package].rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


HELP = """
import json, sys
sys.argv = ['mle'] + {args!r}
from mle_cli.app import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""
HEAVY = {
    "grpc",
    "paramiko",
    "zeroconf",
    "onnxruntime",
    "sqlite_utils",
    "ai_edge_litert",
    "jinja2",
    "yaml",
    "numpy",
    "cryptography",
    "pydantic",
}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["agent", "--help"],
        ["deploy", "--help"],
        ["models", "--help"],
        ["predict", "--help"],
        ["quantize", "--help"],
        ["bench", "--help"],
        ["agents", "--help"],
        ["top", "--help"],
        ["init", "--help"],
        ["agent", "enroll-token", "--help"],
        ["--version"],
    ],
)
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    loaded = {m.split(".")[0] for m in _modules_after(HELP.format(args=args))}
    assert loaded & HEAVY == set()


def test_mle_version_names_the_package_and_protocol() -> None:
    from mle_proto import PROTO_VERSION, __version__

    done = subprocess.run(
        [sys.executable, "-m", "mle_cli", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"mle {__version__} (protocol {PROTO_VERSION})\n",
        "",
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_parsing_a_command_line_does_not_import_pydantic(tmp_path: Path) -> None:
    # typer 0.29 validates every option through pydantic: ~45 ms on every command (pyproject.toml).
    args = ["plan", str(tmp_path / "absent.yaml"), "-p", "a=b", "--json"]
    assert "pydantic" not in {m.split(".")[0] for m in _modules_after(HELP.format(args=args))}


def test_every_command_has_help_with_an_example() -> None:
    from typer.main import get_command

    from mle_cli.app import app

    def walk(command: object, path: str) -> list[tuple[str, str]]:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            return [
                pair for name, sub in subcommands.items() for pair in walk(sub, f"{path} {name}")
            ]
        return [(path, getattr(command, "help", "") or "")]

    commands = walk(get_command(app), "mle")
    assert len(commands) >= 8
    missing = [path for path, text in commands if "Example: mle" not in text]
    assert missing == []


def test_agent_imports_nothing_of_the_operator() -> None:
    loaded = _modules_after(
        "import json, sys, mle_agent.daemon; print(json.dumps(sorted(sys.modules)))"
    )
    assert {m.split(".")[0] for m in loaded} & FORBIDDEN["mle_agent"] == set()


def test_generated_stubs_match_the_protos() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dependency_floors_equal_the_generator_versions() -> None:
    pb2 = (REPO / "protos/mle_proto/v1/agent_pb2.py").read_text()
    grpc_stub = (REPO / "protos/mle_proto/v1/agent_pb2_grpc.py").read_text()
    protobuf_version = re.search(r"Protobuf Python Version: ([\d.]+)", pb2)
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub)
    assert protobuf_version and grpc_version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"protobuf>={protobuf_version.group(1)}" in deps
    assert f"grpcio>={grpc_version.group(1)}" in deps
    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "dev"
    ]
    assert f"grpcio-tools=={grpc_version.group(1)}" in dev

#!/usr/bin/env python3
"""Generate the committed gRPC stubs from protos/mle_proto/*/*.proto.

Usage: scripts/gen_protos.py [--check]   (--check compares instead of writing; exit 1 on drift)
The generator versions are pinned in pyproject.toml's dev extra; the drift test runs --check.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto file into out_dir; return the generated files."""
    protos = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.glob("mle_proto/*/*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        drift = []
        for generated in generate(out):
            target = PROTO_ROOT / generated.relative_to(out)
            if args.check:
                if not target.exists() or not filecmp.cmp(generated, target, shallow=False):
                    drift.append(str(target.relative_to(ROOT)))
            else:
                shutil.copyfile(generated, target)
                print(f"wrote {target.relative_to(ROOT)}")
    if drift:
        print("generated stubs differ from the committed ones: " + ", ".join(drift))
        print("run scripts/gen_protos.py and commit the result")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

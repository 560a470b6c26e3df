#!/usr/bin/env bash
# Build the wheelhouse agents are installed from without an index (`mle agent install
# --wheelhouse .wheelhouse`, the SSH tests and bench/install.py): the mle-toolchain wheel and
# every base dependency as wheels for this machine's platform and Python.
# Usage: scripts/wheelhouse.sh [DIR]   (default: .wheelhouse in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.wheelhouse}"
mkdir -p "$dir"
python -m pip wheel -q . -w "$dir"
echo "wheelhouse ready in $dir: $(ls "$dir"/*.whl | wc -l) wheels"

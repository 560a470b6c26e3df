#!/usr/bin/env bash
# Build the venv of peers that cannot share mle's environment: tritonclient and MLServer pin
# protobuf < 7, while mle's committed stubs need protobuf >= 7. Interop tests and
# bench/serving.py run these clients and servers as separate processes from this venv.
# Usage: scripts/peers.sh [DIR]   (default: $MLE_PEERS_DIR, else .peers in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${MLE_PEERS_DIR:-.peers}}"
if [ ! -x "$dir/bin/python" ]; then
  python3 -m venv "$dir"
fi
"$dir/bin/python" -m pip install -q --upgrade pip
# uvloop 0.22 raises from asyncio.get_event_loop() without a loop, which MLServer 1.7 calls.
"$dir/bin/python" -m pip install -q "tritonclient[grpc,http]>=2.40" "mlserver>=1.6" "onnxruntime>=1.17" "numpy>=1.24" "uvloop<0.22"
echo "peers ready in $dir"

"""Talk to an agent with tritonclient, gRPC and HTTP, as any Open Inference Protocol user would.

Runs in the peers venv (scripts/peers.sh: tritonclient pins protobuf < 7, mle needs >= 7), so it
imports nothing from mle. Reads rows from an .npy file, sends them in requests of --batch rows
(1 for fixed-batch TFLite models), and prints one JSON object with what each client saw:

    {"grpc": {"live", "ready", "model_ready", "server": {...}, "metadata": {...},
              "versions": ["1", ...], "outputs": [[...], ...]},
     "http": {...the same...}}

Usage: triton_client.py --grpc HOST:PORT --http HOST:PORT --model NAME --rows X.npy
                        [--version V] [--batch N] [--token T]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

INPUT, OUTPUT = "input", "probabilities"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--http", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--version", default="")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    rows = np.load(args.rows).astype(np.float32)
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    grpc_client = grpcclient.InferenceServerClient(url=args.grpc)
    http_client = httpclient.InferenceServerClient(url=args.http)
    try:
        report = {
            "grpc": session(grpc_client, grpcclient, args, rows, headers, grpc_version),
            "http": session(http_client, httpclient, args, rows, headers, http_version),
        }
    finally:
        grpc_client.close()
        http_client.close()
    json.dump(report, sys.stdout)
    return 0


def session(
    client: Any, module: Any, args: argparse.Namespace, rows: Any, headers: Any, version_of: Any
) -> dict[str, Any]:
    """Health, metadata and inference through one client."""
    report: dict[str, Any] = {
        "live": client.is_server_live(headers=headers),
        "ready": client.is_server_ready(headers=headers),
        "model_ready": client.is_model_ready(args.model, args.version, headers=headers),
        "server": as_dict(client.get_server_metadata(headers=headers)),
        "metadata": as_dict(client.get_model_metadata(args.model, args.version, headers=headers)),
    }
    outputs, versions = [], []
    for start in range(0, len(rows), args.batch):
        batch = rows[start : start + args.batch]
        tensor = module.InferInput(INPUT, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        wanted = [module.InferRequestedOutput(OUTPUT)]
        result = client.infer(
            args.model,
            [tensor],
            model_version=args.version,
            outputs=wanted,
            request_id=f"row-{start}",
            headers=headers,
        )
        outputs.extend(result.as_numpy(OUTPUT).tolist())
        versions.append(version_of(result))
    report["outputs"] = outputs
    report["versions"] = versions
    return report


def grpc_version(result: Any) -> str:
    return str(result.get_response().model_version)


def http_version(result: Any) -> str:
    return str(result.get_response()["model_version"])


def as_dict(metadata: Any) -> dict[str, Any]:
    """Metadata as a plain dict: HTTP gives JSON already, gRPC a protobuf message."""
    if isinstance(metadata, dict):
        return metadata
    from google.protobuf.json_format import MessageToDict

    found = MessageToDict(metadata, preserving_proto_field_name=True)
    for tensor in (*found.get("inputs", ()), *found.get("outputs", ())):
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # JSON mapping makes int64 strings
    return found


if __name__ == "__main__":
    sys.exit(main())

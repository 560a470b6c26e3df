"""A closed-loop load client for any Open Inference Protocol v2 gRPC server (tritonclient).

Runs in the peers venv (scripts/peers.sh), so the agent and the peer server are measured with the
very same client: C threads, each with its own tritonclient gRPC client, each sending one request
after another (one row of the input file per request, raw tensor contents), for --seconds after a
warm-up. Checks every answer (shape, finite probabilities) and counts failures instead of hiding
them. Prints one JSON object: requests, errors, p50/p99 latency (ms), requests/s, versions seen.

With --trace FILE it also writes one JSON line per request: its start and end (time.time()),
the version that answered, or the error (tests use it to check hot swaps request by request).

Usage: oip_load.py --url 127.0.0.1:PORT --model NAME --data X.npz --concurrency C --seconds S
                   [--warmup S] [--token T] [--input input] [--output probabilities]
                   [--trace FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections import Counter

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--token", default="")
    parser.add_argument("--input", default="input")
    parser.add_argument("--output", default="probabilities")
    parser.add_argument("--trace", default="")
    args = parser.parse_args()
    rows = np.load(args.data)["X"].astype(np.float32)
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    latencies: list[list[float]] = [[] for _ in range(args.concurrency)]
    errors = Counter[str]()
    versions = Counter[str]()
    lock = threading.Lock()
    trace: list[dict[str, object]] = []
    start = time.perf_counter()
    measure_from = start + args.warmup
    stop_at = measure_from + args.seconds
    stopping = threading.Event()  # SIGTERM ends the load early, and the figures are still printed
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def worker(slot: int) -> None:
        client = grpcclient.InferenceServerClient(url=args.url)
        out = grpcclient.InferRequestedOutput(args.output)
        i = slot
        while (now := time.perf_counter()) < stop_at and not stopping.is_set():
            x = rows[i % len(rows)][None, :]
            i += args.concurrency
            tensor = grpcclient.InferInput(args.input, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            began = time.time()
            try:
                result = client.infer(
                    args.model, [tensor], outputs=[out], headers=headers, request_id=f"{slot}-{i}"
                )
                y = result.as_numpy(args.output)
                if y is None or y.shape != (1, 10) or not np.isfinite(y).all():
                    raise ValueError(f"bad answer {None if y is None else y.shape}")
                version = result.get_response().model_version
            except Exception as exc:  # counted, reported: a failed request is a result
                with lock:
                    errors[type(exc).__name__] += 1
                    trace.append({"start": began, "end": time.time(), "error": str(exc)[:300]})
                continue
            done = time.perf_counter()
            if args.trace:
                with lock:
                    trace.append({"start": began, "end": time.time(), "version": version})
            if now >= measure_from:
                latencies[slot].append(done - now)
                with lock:
                    versions[version] += 1
        client.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if args.trace:
        with open(args.trace, "w") as f:
            f.writelines(json.dumps(t) + "\n" for t in trace)
    all_ms = np.array([v for per in latencies for v in per]) * 1000
    print(
        json.dumps(
            {
                "requests": int(all_ms.size),
                "errors": dict(errors),
                "p50_ms": float(np.percentile(all_ms, 50)) if all_ms.size else 0.0,
                "p99_ms": float(np.percentile(all_ms, 99)) if all_ms.size else 0.0,
                "rps": all_ms.size
                / max(1e-9, min(args.seconds, time.perf_counter() - measure_from)),
                "versions": dict(versions),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

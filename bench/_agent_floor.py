"""The least one chain step can cost through an agent, measured apart from mle's scheduler: the
step's process started through the agent's shim and reaped, plus one call to the agent answered.

Every step of a chain has to pay both, whatever the scheduler does: its process runs under the
shim (`mle_agent/shim.sh`, which records the exit status so that a restarted agent can re-adopt
the task), and the step's dispatch and its result cross the wire once each way. The call is a
`grpc.health.v1` check on the agent's own channel, token and interceptors, whose handler does no
work, so the pair is a floor. bench/dispatch.py compares it with Prefect's in-flow cost per step.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

from _measure import Results, best, timed


def shim_chain(n: int) -> float:
    """Seconds for N `true` processes, one after another, each started as the agent starts a
    task: `sh shim.sh STATUS /bin/sh -c true` in a new session, its output to a file."""
    from mle_agent.runner import SHIM

    with tempfile.TemporaryDirectory() as tmp:
        status, out = Path(tmp) / "status", Path(tmp) / "out"
        argv = ["/bin/sh", str(SHIM), str(status), "/bin/sh", "-c", "true"]

        def one() -> None:
            with out.open("wb") as log:
                subprocess.run(argv, stdout=log, stderr=log, start_new_session=True, check=True)
            recorded = status.read_text().strip() if status.exists() else "no status"
            if recorded != "0":
                raise SystemExit(f"the shim recorded {recorded!r}, not 0")

        return timed(lambda: [one() for _ in range(n)])


def rpc_round_trips(project: Path, n: int) -> float:
    """Seconds for N health checks, one after another, to the project's local agent."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mle_cli.settings import load_settings
    from mle_cli.targets.connection import open_channel
    from mle_cli.targets.local import local_agent_endpoint
    from mle_proto import AUTH_METADATA_KEY

    endpoint = local_agent_endpoint(load_settings(project))
    if endpoint is None:
        raise SystemExit(f"no local agent is running in {project}")
    metadata = ((AUTH_METADATA_KEY, f"Bearer {endpoint.token}"),)

    serving = health_pb2.HealthCheckResponse.SERVING

    async def calls() -> float:
        async with open_channel(endpoint) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            await health.Check(request, metadata=metadata, timeout=10)  # connected, warm
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(n):
                answer = await health.Check(request, metadata=metadata, timeout=10)
                if answer.status != serving:
                    raise SystemExit(f"the local agent is not serving: {answer}")
            return loop.time() - start

    try:
        return asyncio.run(calls())
    except grpc.RpcError as e:
        raise SystemExit(
            f"health check of the local agent failed: {e.code()} {e.details()}"
        ) from None


def measure_agent_floor(r: Results, project: Path, n: int, repeat: int) -> None:
    r.figures["shim_chain_s"] = best(lambda: shim_chain(n), repeat)
    r.figures["agent_rpc_chain_s"] = best(lambda: rpc_round_trips(project, n), repeat)

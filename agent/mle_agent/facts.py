"""Facts an agent reports about itself: platform, capacity, runtimes."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re

import psutil

from mle_agent.settings import AgentSettings
from mle_proto import PROTO_VERSION, __version__
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["FEATURES", "RUNTIMES", "agent_info", "os_description", "runtimes"]

# Model runtimes the agent can serve with, by import name; found without importing them.
RUNTIMES = ("onnxruntime", "ai_edge_litert", "tflite_runtime")


# Features beyond the first v1 agents (see AgentInfo.features): operators check before use.
FEATURES = ("run-task", "ack-batch")


def agent_info(
    settings: AgentSettings, *, boot_id: str, running_tasks: int, http_port: int = 0
) -> pb.AgentInfo:
    """The GetInfo answer: static facts plus what changes (disk, running tasks)."""
    return pb.AgentInfo(
        name=settings.name,
        agent_version=__version__,
        proto_version=PROTO_VERSION,
        arch=platform.machine(),
        os=os_description(),
        python=platform.python_version(),
        cpus=os.cpu_count() or 1,
        memory_bytes=psutil.virtual_memory().total,
        disk_free_bytes=_disk_free(settings),
        runtimes=runtimes(),
        labels=dict(settings.labels),
        slots=settings.slots,
        boot_id=boot_id,
        running_tasks=running_tasks,
        http_port=http_port,
        features=FEATURES,
    )


@functools.cache
def os_description() -> str:
    """E.g. `Linux 6.1 (Debian 12)`: kernel name and version, and the distribution when known."""
    kernel = f"{platform.system()} {_short_release(platform.release())}".strip()
    try:
        release = platform.freedesktop_os_release()
    except OSError:
        return kernel
    name = release.get("NAME", "").replace(" GNU/Linux", "")
    version = release.get("VERSION_ID", "")
    distro = f"{name} {version}".strip()
    return f"{kernel} ({distro})" if distro else kernel


@functools.cache
def runtimes() -> tuple[str, ...]:
    """Import names of the model runtimes installed here."""
    return tuple(name for name in RUNTIMES if importlib.util.find_spec(name) is not None)


def _short_release(release: str) -> str:
    match = re.match(r"\d+\.\d+", release)
    return match.group(0) if match else release


def _disk_free(settings: AgentSettings) -> int:
    try:
        return psutil.disk_usage(str(settings.data_dir)).free
    except OSError:
        return 0

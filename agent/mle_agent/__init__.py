"""mle-agentd: the device-side daemon that runs pipeline steps and keeps their artifacts.

Public surface for the operator side and tests: `AgentSettings`/`build_settings` (configuration),
`TaskManager` (tasks, outbox, store), `create_server` (a bound, not yet started gRPC server) and
`main` (the `mle-agentd` command).
"""

from __future__ import annotations

from mle_agent.daemon import main, run_agent
from mle_agent.server import create_server
from mle_agent.settings import AgentSettings, build_settings
from mle_agent.tasks import TaskManager

__all__ = ["AgentSettings", "TaskManager", "build_settings", "create_server", "main", "run_agent"]

"""What every command needs: the settings for this invocation."""

from __future__ import annotations

from pathlib import Path

import typer

from mle_cli.settings import Settings, load_settings

__all__ = ["settings_from"]


def settings_from(ctx: typer.Context) -> Settings:
    """Settings for this invocation (the root --project option is in ctx.obj)."""
    root = ctx.find_root()
    project = root.obj if isinstance(root.obj, Path) else None
    return load_settings(project_dir=project.resolve() if project else None)

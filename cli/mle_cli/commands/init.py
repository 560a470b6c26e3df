"""`mle init`: make this directory a project (`.mle/`) with its certificate authority."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]


def init(ctx: typer.Context) -> None:
    """Make the current directory (or --project) an mle project: .mle/ and its CA.

    The CA (.mle/pki/, key 0600) signs the certificates of agents and of this operator; it is
    otherwise made on first need. Running it again changes nothing.

    Example: mle init
    """
    from mle_cli.render import stdout_console
    from mle_cli.settings import load_settings
    from mle_cli.targets.pki import certificate_fingerprint, ensure_ca, pki_dir

    root = ctx.find_root().obj  # --project; unlike other commands, not a project found above
    settings = load_settings(project_dir=(root if isinstance(root, Path) else Path.cwd()).resolve())
    had_project = settings.mle_dir.is_dir()
    had_ca = (pki_dir(settings) / "ca.crt").exists()
    ca = ensure_ca(settings) / "ca.crt"
    fingerprint = certificate_fingerprint(ca.read_bytes())
    if had_project and had_ca:
        lines = [f"already initialized: {settings.mle_dir} (project CA {fingerprint})"]
    else:
        first = "initialized" if not had_project else "found"
        lines = [
            f"{first} {settings.mle_dir}",
            f"created the project CA: {ca} and {ca.with_name('ca.key')} (private, 0600)",
            f"CA fingerprint: {fingerprint}",
        ]
    stdout_console().print("\n".join(lines), markup=False)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command()(init)

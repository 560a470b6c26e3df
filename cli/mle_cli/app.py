"""The `mle` command line: the typer app and the one place errors are shown.

Commands live in `mle_cli.commands`; each parses its options, calls one library function and
renders the result. Heavy modules (grpc, zeroconf, paramiko, onnxruntime) are imported
inside command bodies only, so `mle --help` stays fast (a test checks it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mle_cli.commands import agent, agents, bench, history, init, models, quantize, run, top
from mle_cli.errors import debug_log_path

__all__ = ["app", "cli", "main"]

app = typer.Typer(
    name="mle",
    help="Run ML pipelines from a laptop on agents at the edge and in the cloud.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: typer's rich help imports rich and markdown-it (~80 ms)
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from mle_proto import PROTO_VERSION, __version__

        sys.stdout.write(f"mle {__version__} (protocol {PROTO_VERSION})\n")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    project: Annotated[
        Path | None,
        typer.Option(
            "--project",
            "-C",
            help="Project directory (holds .mle/). Default: the nearest one above the cwd.",
            envvar="MLE_PROJECT_DIR",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs on stderr.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Run ML pipelines from a laptop on agents at the edge and in the cloud."""
    ctx.obj = project
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


init.register(app)
run.register(app)
history.register(app)
models.register(app)
quantize.register(app)
bench.register(app)
agents.register(app)
top.register(app)
app.add_typer(agent.app, name="agent")


def main() -> None:
    """Entry point: run the app, turning every error into one line and an exit code."""
    from mle_proto.errors import MleError

    usage_error, no_args_is_help = _parser_errors()
    try:
        code = app(standalone_mode=False)
    except no_args_is_help as e:
        sys.stdout.write(e.ctx.get_help() + "\n")
        sys.exit(0)
    except usage_error as e:  # unknown option, missing argument: one line, like our errors
        from mle_cli.render import print_error

        where = e.ctx.command_path if e.ctx else "mle"
        print_error(f"{where}: {e.format_message()}", f"see `{where} --help`")
        sys.exit(2)
    except typer.Abort:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except MleError as e:
        from mle_cli.render import print_error

        print_error(str(e), e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception:  # noqa: BLE001 - the one boundary that catches everything
        path = _write_debug_log()
        sys.stderr.write(f"internal error: an unexpected problem occurred; details in {path}\n")
        sys.exit(70)
    sys.exit(code if isinstance(code, int) else 0)


def cli() -> NoReturn:
    """The `mle` command: `main`, then an exit that skips tearing the interpreter down.

    Finalizing the modules a command imported (grpc, rich...) took ~40 ms after
    every command, a tenth of a short `mle run`. The output is flushed first; nothing of ours
    waits for exit handlers (threads are joined, files closed). mypy exits the same way.
    """
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            sys.stderr.write(f"{e.code}\n")
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`mle runs | head`): nothing to report
        pass
    except (OSError, ValueError) as e:  # e.g. a full disk: the output is lost, so say so
        sys.stderr.write(f"error: cannot write the output: {e}\n")
        code = code or 120
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code)


def _parser_errors() -> tuple[type[Any], type[Any]]:
    """The parser's UsageError and NoArgsIsHelpError classes.

    Found through typer's public BadParameter because typer moved from depending on click to
    vendoring it (`typer._click`); this works with both.
    """
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    module = sys.modules[usage_error.__module__]
    return usage_error, getattr(module, "NoArgsIsHelpError", _Never)


class _Never(Exception):
    """Raised by nothing: stands in for an exception class this parser version lacks."""


def _write_debug_log() -> Path:
    path = debug_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f"--- mle {' '.join(sys.argv[1:])}\n{traceback.format_exc()}\n")
    return path

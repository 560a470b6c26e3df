"""`mle-agentd`: the agent daemon's command line, lifecycle and signals.

Errors a user can fix are one line on stderr and a non-zero exit; SIGTERM/SIGINT drain: no new
tasks, health NOT_SERVING, running tasks get `--drain-timeout` seconds, then the gRPC server and
the REST listener stop, inference threads finish and the models are unloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mle_agent.announce import announced
from mle_agent.server import Serving, create_server
from mle_agent.serving.httpd import HttpServer
from mle_agent.serving.oip_http import check_http_settings, http_address, start_http
from mle_agent.serving.registry import ModelRegistry
from mle_agent.settings import (
    DEFAULT_CONFIG,
    AgentSettings,
    build_settings,
    check_listen_security,
    split_listen,
)
from mle_agent.tasks import TaskManager
from mle_proto import PROTO_VERSION, __version__
from mle_proto.errors import MleError, UsageError
from mle_proto.files import write_atomic

__all__ = ["build_parser", "main", "run_agent", "state_file_content"]

log = logging.getLogger("mle_agent")
PROG = "mle-agentd"
_TOKEN_LINE = 4096  # a token is under 80 characters: never read an unbounded line
_ARGV_WARNING = (
    "a token given as --enroll TOKEN is visible to other local users (ps, /proc); give "
    "--enroll - and the token on stdin: printf '%s\\n' TOKEN | mle-agentd ... --enroll -"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon until it is told to stop; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        settings = build_settings(vars(args), os.environ, args.config)
        if args.make_csr is not None:  # before the listen check: TLS is what this prepares
            return _make_csr(settings, args.make_csr)
        if args.enroll is not None or args.operator or args.ca_fingerprint:
            settings = _enroll(settings, args)  # then serve with the certificate it brought
        check_listen_security(settings)
        check_http_settings(settings)
        _make_dirs(settings)  # after the checks: a refused start leaves nothing behind
    except MleError as exc:
        return _fail(exc)
    _configure_logging(settings.log_level)
    _watch_children_by_pidfd()
    try:
        return asyncio.run(run_agent(settings))
    except MleError as exc:
        return _fail(exc)
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 130
    except Exception:
        log.exception("internal error")
        return 1


def _make_dirs(settings: AgentSettings) -> None:
    """Create the data dir and artifact store root now, so a bad path is one line, not a
    traceback from whichever part of the agent touches it first."""
    _make_dir("data dir", settings.data_dir, 0o700)  # the mode TaskManager.open gives it
    _make_dir("artifacts dir", settings.artifacts_root, 0o777)  # as ArtifactStore: the umask's


def _make_dir(what: str, path: Path, mode: int) -> None:
    """mkdir -p, or a UsageError naming the path and the OS's reason."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except FileExistsError:  # with exist_ok, only when something other than a directory is there
        raise UsageError(f"{what} {path} is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):  # one there already, not ours (e.g. root's)
        raise UsageError(f"cannot write to {what} {path}: permission denied")


def _watch_children_by_pidfd() -> None:
    """On Python 3.11, learn of a task's exit through a pidfd in the event loop instead of a
    thread per child (one thread started for every task). Python 3.12 does this by itself."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel before 5.3
        return
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def build_parser() -> argparse.ArgumentParser:
    """The `mle-agentd` flags; every default is None so lower layers show through."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The mle agent: runs pipeline steps and serves their artifacts over gRPC.",
        epilog=f"example: {PROG} --name pi-01 --labels role=edge --listen 0.0.0.0:7443 "
        "--tls-cert agent.crt --tls-key agent.key --tls-ca ca.crt",
    )
    add = parser.add_argument
    add(
        "--version",
        action="version",
        version=f"{PROG} {__version__} (protocol {PROTO_VERSION})",
    )
    add("--config", type=Path, help=f"TOML settings file (default {DEFAULT_CONFIG}, if present)")
    add("--name", help="agent name (default: the hostname)")
    add("--labels", help="labels as k=v,k=v")
    add("--listen", help="HOST:PORT to listen on (default 127.0.0.1:7443; port 0 picks one)")
    add("--data-dir", help="outbox, work dirs and artifacts (default ~/.local/share/mle-agent)")
    add("--artifacts-dir", help="artifact store root (default <data-dir>/artifacts)")
    add("--slots", type=int, help="tasks run at once (default: the cpu count)")
    add("--token-file", help="file with the bearer token every call must carry")
    add("--tls-cert", help="server certificate (PEM) for mutual TLS")
    add("--tls-key", help="server private key (PEM)")
    add("--tls-ca", help="CA certificate (PEM) that client certificates must chain to")
    add("--insecure", action="store_true", default=None, help="allow non-loopback without TLS")
    add(
        "--make-csr",
        type=Path,
        metavar="PATH",
        help="write a certificate request for --name to PATH (its key stays in the data dir as "
        "agent.key) for `mle agent sign`, and exit",
    )
    add(
        "--enroll",
        metavar="TOKEN",
        help="exchange a token from `mle agent enroll-token` for this agent's certificate "
        "(written to the data dir as agent.crt and ca.crt, next to its key), then serve with it; "
        "'-' reads the token from stdin (on the command line, other local users can see it)",
    )
    add("--operator", metavar="HOST:PORT", help="where `mle agent enroll-token` serves (--enroll)")
    add(
        "--ca-fingerprint",
        metavar="SHA256",
        help="the project CA's fingerprint printed with the token: the operator must prove it",
    )
    add(
        "--announce",
        action="store_true",
        default=None,
        help="announce on mDNS even on loopback (always done on other addresses)",
    )
    add("--announce-interfaces", help="IPs to announce on, comma-separated (default: all)")
    add(
        "--http-listen",
        help="HOST:PORT for the Open Inference Protocol REST routes and /metrics "
        "(default: the gRPC host and port + 1; off = none)",
    )
    add("--state-file", help="write pid, address and ports here (JSON, 0600) once listening")
    add("--drain-timeout", type=float, help="seconds tasks get to finish on SIGTERM (default 30)")
    add("--kill-grace", type=float, help="seconds between SIGTERM and SIGKILL (default 2)")
    add("--heartbeat-interval", type=float, help="seconds between heartbeats (default 1)")
    add("--log-level", choices=("debug", "info", "warning", "error"), help="default info")
    parser.set_defaults(config=None, make_csr=None, enroll=None, operator=None, ca_fingerprint=None)
    return parser


async def run_agent(settings: AgentSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain and stop; return the exit status."""
    manager = TaskManager.open(settings)
    try:
        async with _model_serving(settings, manager) as (serving, http):
            await _serve(settings, manager, serving, http)
    finally:
        manager.close()
        _remove_state_file(settings.state_file)
    log.info("stopped")
    return 0


def state_file_content(
    settings: AgentSettings, manager: TaskManager, port: int, http_port: int = 0
) -> dict[str, Any]:
    """What the state file says: enough for the operator to connect, and no secret."""
    return {
        "pid": os.getpid(),
        "address": _address(settings, port),
        "port": port,
        "http_port": http_port,
        "name": settings.name,
        "boot_id": manager.boot_id,
        "version": __version__,
        "proto": PROTO_VERSION,
    }


@contextlib.asynccontextmanager
async def _model_serving(
    settings: AgentSettings, manager: TaskManager
) -> AsyncIterator[tuple[Serving, HttpServer | None]]:
    """The model registry (routes reloading), inference threads and REST listener; closed after."""
    registry = ModelRegistry(settings, manager.store)
    workers = max(1, settings.infer_workers)
    executor = ThreadPoolExecutor(workers, thread_name_prefix="mle-infer")
    http: HttpServer | None = None
    try:
        # Listen at once: the routed versions load (checked first) in the background, LOADING
        # and not ready meanwhile, so a model that now fails to load cannot keep the agent down.
        registry.start_background()
        http = await start_http(settings, registry, executor)
        yield Serving(registry, executor, http.port if http else 0), http
    finally:
        if http is not None:
            await http.close()
        await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(registry.close)


async def _serve(
    settings: AgentSettings, manager: TaskManager, serving: Serving, http: HttpServer | None
) -> None:
    server, port = await create_server(settings, manager, serving)
    stop = asyncio.Event()
    _install_signal_handlers(stop, manager)
    try:
        await server.start()
        _announce(settings, manager, port, serving.http_port)
        async with announced(settings, port):  # withdrawn before draining
            await stop.wait()
        log.info("draining: no new tasks; up to %gs for running ones", settings.drain_timeout)
        await manager.drain(settings.drain_timeout)
        grace = settings.shutdown_grace
        await asyncio.gather(server.stop(grace), http.close(grace) if http else asyncio.sleep(0))
    finally:
        _remove_signal_handlers()
        await manager.drain(0)
        await server.stop(None)


def _announce(settings: AgentSettings, manager: TaskManager, port: int, http_port: int) -> None:
    address = _address(settings, port)
    if settings.state_file:
        content = state_file_content(settings, manager, port, http_port)
        _write_state_file(settings.state_file, content)
    log.info("listening on %s", address)
    http = http_address(settings)
    if http is not None:
        where = f"[{http[0]}]:{http_port}" if ":" in http[0] else f"{http[0]}:{http_port}"
        log.info("Open Inference Protocol REST routes and /metrics on %s", where)
    if settings.insecure and not settings.tls:
        log.warning(
            "INSECURE: listening on %s without TLS (--insecure): anyone who can reach this port "
            "can run commands on this machine",
            address,
        )
    if settings.is_loopback() and not settings.token_file and not settings.tls:
        log.warning(
            "no --token-file: any local user can run commands as this user through %s", address
        )


def _address(settings: AgentSettings, port: int) -> str:
    host, _ = split_listen(settings.listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_state_file(path: Path, content: dict[str, Any]) -> None:
    """Write atomically (temp file, then rename) with mode 0600."""
    try:
        write_atomic(path, (json.dumps(content, indent=2) + "\n").encode(), 0o600)
    except OSError as exc:
        raise MleError(f"cannot write state file {path}: {exc.strerror or exc}") from None


def _remove_state_file(path: Path | None) -> None:
    """Remove the state file if it is still ours (another agent may have taken it over)."""
    if path is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()


def _install_signal_handlers(stop: asyncio.Event, manager: TaskManager) -> None:
    loop = asyncio.get_running_loop()
    hurry: set[asyncio.Task[None]] = set()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s received: shutting down", sig.name)
            stop.set()
        elif not hurry:
            log.warning("%s received again: stopping running tasks now", sig.name)
            hurry.add(loop.create_task(manager.drain(0)))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about benign connection events.
    logging.getLogger("grpc").setLevel(max(logging.WARNING, root.level))


def _make_csr(settings: AgentSettings, path: Path) -> int:
    from mle_agent.identity import make_csr

    print(make_csr(settings, path))  # noqa: T201 - the command's one line of output
    return 0


def _enroll(settings: AgentSettings, args: argparse.Namespace) -> AgentSettings:
    from mle_agent.enroll import enroll

    if args.enroll is None or not args.operator or not args.ca_fingerprint:
        raise UsageError(
            "--enroll TOKEN, --operator HOST:PORT and --ca-fingerprint go together, as "
            "mle agent enroll-token prints them"
        )
    if args.enroll == "-":
        token = _stdin_token()
    else:
        token = args.enroll
        print(f"{PROG}: warning: {_ARGV_WARNING}", file=sys.stderr, flush=True)  # noqa: T201
    enrolled = enroll(settings, token, args.operator, args.ca_fingerprint)
    print(enrolled.message, flush=True)  # noqa: T201 - what to start with next time
    return enrolled.settings


def _stdin_token() -> str:
    """One line from stdin (`--enroll -`): where no other local user can read the token."""
    if sys.stdin is None:
        return ""
    try:
        return sys.stdin.readline(_TOKEN_LINE).strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _fail(exc: MleError) -> int:
    print(f"{PROG}: error: {exc.message}", file=sys.stderr)  # noqa: T201 - the one error boundary
    return exc.exit_code

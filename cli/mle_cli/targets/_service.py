"""How an installed agent runs on its device, pure: the systemd unit or the POSIX sh supervisor,
and the shell commands that start, stop, inspect and remove either. Paths are quoted here.

Three kinds: `systemd-system` (a system unit, the login is root), `systemd-user` (`systemctl
--user`, lingering so it outlives the login) and `supervise` (no systemd: `supervise.sh` started
with setsid, restarting mle-agentd when it dies, its pid in `agent.pid`, output in `agent.log`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

__all__ = [
    "KINDS",
    "SUPERVISE",
    "SYSTEMD_SYSTEM",
    "SYSTEMD_USER",
    "UNIT",
    "Layout",
    "crash_command",
    "describe",
    "exec_start",
    "logs_command",
    "remove_command",
    "restart_command",
    "service_file",
    "stop_command",
]

UNIT = "mle-agent.service"  # of a layout without a target name; else mle-agent-<name>.service
SYSTEMD_SYSTEM, SYSTEMD_USER, SUPERVISE = "systemd-system", "systemd-user", "supervise"
KINDS = (SYSTEMD_SYSTEM, SYSTEMD_USER, SUPERVISE)
STOP_WAIT_TENTHS = 600  # a draining agent gets 60 s (its drain timeout is 30 s), then SIGKILL


@dataclass(frozen=True)
class Layout:
    """Where an agent's files live under its install directory (an absolute path), and the
    systemd unit of its target (one per target: two targets on one host keep theirs apart)."""

    root: str
    name: str = ""  # the target's name (an inventory NAME: valid in a systemd unit name)

    @property
    def unit(self) -> str:
        """The systemd unit's name."""
        return f"mle-agent-{self.name}.service" if self.name else UNIT

    def path(self, *parts: str) -> str:
        """A path under the install directory."""
        return "/".join([self.root.rstrip("/") or "", *parts])

    @property
    def releases(self) -> str:
        return self.path("releases")

    @property
    def current(self) -> str:
        """The symlink to the release in service."""
        return self.path("current")

    @property
    def data(self) -> str:
        """The agent's data dir: outbox, artifacts, models and its private key."""
        return self.path("data")

    @property
    def tls(self) -> str:
        return self.path("tls")

    @property
    def wheels(self) -> str:
        """Uploaded wheels, kept for the next release."""
        return self.path("wheels")

    @property
    def config(self) -> str:
        return self.path("agent.toml")

    @property
    def record(self) -> str:
        """What the install did (version, service kind): read by upgrade, uninstall and logs."""
        return self.path("install.json")

    @property
    def state_file(self) -> str:
        """The agent's own state file (pid, address, version), written once it listens."""
        return self.path("agent.state.json")

    @property
    def supervisor(self) -> str:
        return self.path("supervise.sh")

    @property
    def pid_file(self) -> str:
        return self.path("agent.pid")

    @property
    def log_file(self) -> str:
        return self.path("agent.log")

    @property
    def exit_file(self) -> str:
        """The last exit status of a supervised mle-agentd (written when it dies)."""
        return self.path("agent.exit")

    def release(self, version: str) -> str:
        return self.path("releases", version)

    def venv_python(self, version: str) -> str:
        return self.path("releases", version, "venv", "bin", "python")

    def agentd(self, version: str) -> str:
        return self.path("releases", version, "venv", "bin", "mle-agentd")

    @property
    def current_agentd(self) -> str:
        return self.path("current", "venv", "bin", "mle-agentd")


def describe(kind: str, layout: Layout) -> str:
    """The service as a progress line says it."""
    return {
        SYSTEMD_SYSTEM: f"systemd unit {layout.unit} (system)",
        SYSTEMD_USER: f"systemd unit {layout.unit} (systemctl --user)",
        SUPERVISE: "supervised background process (supervise.sh)",
    }[kind]


def service_file(kind: str, layout: Layout, name: str, home: str) -> tuple[str, str, int]:
    """The file that defines the service: (remote path, content, mode)."""
    if kind == SUPERVISE:
        return layout.supervisor, supervisor_script(layout), 0o755
    text = unit_text(layout, name, system=kind == SYSTEMD_SYSTEM)
    return unit_path(kind, layout, home), text, 0o644


def unit_path(kind: str, layout: Layout, home: str) -> str:
    """Where the unit file goes."""
    if kind == SYSTEMD_SYSTEM:
        return f"/etc/systemd/system/{layout.unit}"
    return f"{home.rstrip('/')}/.config/systemd/user/{layout.unit}"


def exec_start(layout: Layout) -> str:
    """The unit's ExecStart line, its paths quoted as systemd reads them (a home with a space)."""
    words = [layout.current_agentd, "--config", layout.config]
    return "ExecStart=" + " ".join(_systemd_word(w) for w in words)


def unit_text(layout: Layout, name: str, *, system: bool) -> str:
    """The systemd unit running the current release's mle-agentd with the install's config."""
    wanted_by = "multi-user.target" if system else "default.target"
    return f"""\
# Written by `mle agent install`; replaced by the next install or upgrade.
[Unit]
Description=mle agent {name}
Wants=network-online.target
After=network-online.target

[Service]
{exec_start(layout)}
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=60

[Install]
WantedBy={wanted_by}
"""


def supervisor_script(layout: Layout) -> str:
    """A POSIX sh supervisor: restart mle-agentd when it dies (waiting longer after each quick
    failure), pass SIGTERM on and wait for the agent to drain."""
    root = shlex.quote(layout.root)
    return f"""\
#!/bin/sh
# Written by `mle agent install`: runs mle-agentd and restarts it when it dies.
# SIGTERM stops the agent (it drains its tasks first), then this script.
dir={root}
echo $$ > "$dir/agent.pid"
child=
stop() {{
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
  rm -f "$dir/agent.pid"
  exit 0
}}
trap stop TERM INT HUP
delay=1
while :; do
  started=$(date +%s)
  "$dir/current/venv/bin/mle-agentd" --config "$dir/agent.toml" &
  child=$!
  wait "$child"
  status=$?
  echo "$status" > "$dir/agent.exit"
  echo "supervise.sh: mle-agentd exited with status $status; restarting in ${{delay}}s" >&2
  [ $(($(date +%s) - started)) -ge 60 ] && delay=1
  sleep "$delay" &
  child=$!
  wait "$child"
  [ "$delay" -lt 60 ] && delay=$((delay * 2))
done
"""


# Liveness that sees through zombies: a container's init may never reap the supervisor.
_ALIVE = """alive() { if [ -r /proc/$1/stat ]; then ! grep -q ') Z ' /proc/$1/stat; \
else kill -0 "$1" 2>/dev/null; fi; }"""


def stop_command(kind: str, layout: Layout) -> str:
    """Stop the agent (no error when it is not running)."""
    if kind != SUPERVISE:
        return f"{_systemctl(kind)} stop {shlex.quote(layout.unit)} 2>/dev/null; true"
    pid_file, supervisor = shlex.quote(layout.pid_file), shlex.quote(layout.supervisor)
    # Only a pid whose command line is our supervisor is signalled: a stale pid file may name a
    # process that reused the number. The whole session (setsid) is signalled: agent and sleep.
    return f"""{_ALIVE}
pid=$(cat {pid_file} 2>/dev/null)
if [ -n "$pid" ] && alive "$pid" && grep -qF {supervisor} /proc/$pid/cmdline 2>/dev/null; then
  kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid"
  i=0
  while alive "$pid"; do
    i=$((i + 1))
    if [ $i -gt {STOP_WAIT_TENTHS} ]; then kill -KILL -"$pid" 2>/dev/null; break; fi
    sleep 0.1
  done
fi
rm -f {pid_file}"""


def restart_command(kind: str, layout: Layout) -> str:
    """(Re)start the agent now and at boot; the last exit status is forgotten first."""
    exit_file = shlex.quote(layout.exit_file)
    if kind != SUPERVISE:
        ctl, unit = _systemctl(kind), shlex.quote(layout.unit)
        return (
            f"rm -f {exit_file} && {ctl} daemon-reload && {ctl} enable {unit} && "
            f"{ctl} reset-failed {unit} 2>/dev/null; {ctl} restart {unit}"
        )
    log, pid_file = shlex.quote(layout.log_file), shlex.quote(layout.pid_file)
    supervisor = shlex.quote(layout.supervisor)
    return f"""{stop_command(kind, layout)}
rm -f {exit_file}
cd / || exit 1
if command -v setsid >/dev/null 2>&1; then
  setsid sh {supervisor} >>{log} 2>&1 </dev/null &
else
  nohup sh {supervisor} >>{log} 2>&1 </dev/null &
fi
i=0
while [ ! -s {pid_file} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
test -s {pid_file}"""


def crash_command(kind: str, layout: Layout) -> str:
    """Print `exited N` when the agent died since the restart (a supervised one writes its
    status; systemd counts restarts), else nothing."""
    if kind == SUPERVISE:
        exit_file = shlex.quote(layout.exit_file)
        return f"if [ -s {exit_file} ]; then echo exited $(cat {exit_file}); fi"
    unit = shlex.quote(layout.unit)
    show = f"{_systemctl(kind)} show {unit} -p NRestarts -p ActiveState -p ExecMainStatus"
    return (
        f"{show} | awk -F= '/^NRestarts=/{{n=$2}} /^ActiveState=/{{a=$2}} "
        '/^ExecMainStatus=/{s=$2} END{if (n > 0 || a == "failed") print "exited " s}\''
    )


def remove_command(kind: str, layout: Layout, home: str) -> str:
    """Stop the service and remove its definition (the install directory is removed apart)."""
    if kind == SUPERVISE:
        return f"{stop_command(kind, layout)}\nrm -f {shlex.quote(layout.supervisor)}"
    ctl, path = _systemctl(kind), shlex.quote(unit_path(kind, layout, home))
    unit = shlex.quote(layout.unit)
    return (
        f"{ctl} disable --now {unit} 2>/dev/null; rm -f {path}; "
        f"{ctl} daemon-reload 2>/dev/null; {ctl} reset-failed {unit} 2>/dev/null; true"
    )


def logs_command(kind: str, layout: Layout, lines: int) -> str:
    """The agent's last `lines` log lines: its journal, or the tail of agent.log."""
    if kind == SUPERVISE:
        return f"tail -n {int(lines)} {shlex.quote(layout.log_file)}"
    scope = " --user" if kind == SYSTEMD_USER else ""
    unit = shlex.quote(layout.unit)
    return f"journalctl{scope} -u {unit} -n {int(lines)} --no-pager -o short-iso"


def _systemctl(kind: str) -> str:
    return "systemctl --user" if kind == SYSTEMD_USER else "systemctl"


_PLAIN = re.compile(r"[A-Za-z0-9_./:@+=,-]+")


def _systemd_word(word: str) -> str:
    """One word of a systemd command line: double-quoted with C escapes unless plain; `%`
    (specifiers) and `$` (variables) doubled so they stay literal."""
    if not _PLAIN.fullmatch(word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word.replace("%", "%%").replace("$", "$$")

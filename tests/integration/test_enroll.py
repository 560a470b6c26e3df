"""Enrollment without SSH, as a user does it: `mle agent enroll-token` serving on 127.0.0.1 and the
command it prints run as a real `mle-agentd --enroll` process; single use, expiry, name binding,
the device checking the operator before it sends the token, hostile input, no secret shown."""

from __future__ import annotations

import contextlib
import datetime
import json
import select
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mle_agent import enroll as device_side
from mle_cli.settings import Settings
from mle_cli.targets import enroll as operator_side
from mle_cli.targets.connection import connect
from mle_cli.targets.pki import certificate_fingerprint
from tests.agent_helpers import Daemon, leak_check, run, subprocess_env
from tests.conftest import Project
from tests.pki_helpers import issue_agent_tls, key_pem, tls_endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@dataclass
class Session:
    """A running `mle agent enroll-token` and the device command it printed."""

    process: subprocess.Popen[str]
    pipe: str  # `printf '%s\n' TOKEN`: what feeds the token to the device command's stdin
    argv: list[str]  # the device command, after the pipe

    def flag(self, name: str) -> str:
        """A flag's value in the printed command."""
        return self.argv[self.argv.index(name) + 1]

    @property
    def token(self) -> str:
        words = shlex.split(self.pipe)
        assert words[:2] == ["printf", "%s\\n"] and len(words) == 3, self.pipe
        return words[2]

    @property
    def token_id(self) -> str:
        return self.token.partition(".")[0]

    @property
    def secret(self) -> str:
        return self.token.partition(".")[2]

    @property
    def port(self) -> int:
        return int(self.flag("--operator").rpartition(":")[2])

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for it to end: exit code, all of stdout (the command first), stderr."""
        out, err = self.process.communicate(timeout=timeout)
        first = f"{self.pipe} | {shlex.join(self.argv)}\n"
        return self.process.returncode, first + out, err


def start_session(project: Project, name: str, *args: str) -> Session:
    """Spawn `mle agent enroll-token` on 127.0.0.1:0; wait for the command it prints."""
    proc = project.spawn("agent", "enroll-token", "--name", name, "--listen", "127.0.0.1:0", *args)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        raise AssertionError(f"no command printed: {proc.communicate()[1]}")
    pipe, bar, command = line.strip().partition(" | ")
    assert bar, line
    return Session(proc, pipe, shlex.split(command))


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """The command with one flag's value changed."""
    changed = list(argv)
    changed[changed.index(flag) + 1] = value
    return changed


def run_device(
    directory: Path, argv: list[str], pipe: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a device command that must end (a refused enrollment); with `pipe` (the printed
    `printf ... TOKEN`), through sh exactly as printed: `pipe | command`."""
    assert argv[0] == "mle-agentd"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "empty.toml").touch()
    command = [sys.executable, "-m", "mle_agent", "--config", str(directory / "empty.toml"),
               "--data-dir", str(directory / "data"), *argv[1:]]  # fmt: skip
    if pipe:
        command = ["sh", "-c", f"{pipe} | {shlex.join(command)}"]
    return subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.contextmanager
def device(directory: Path, argv: list[str], token: str = "") -> Iterator[tuple[Daemon, Path]]:
    """The device command run as the agent it becomes (on 127.0.0.1:0), `token` written to its
    stdin as printf does (nothing: stdin empty); its stdout's path."""
    assert argv[0] == "mle-agentd"
    directory.mkdir(parents=True, exist_ok=True)
    agentd = Daemon(directory, *argv[1:], "--listen", "127.0.0.1:0", "--http-listen", "off")
    stdout = directory / "agentd.out"
    with agentd.stderr_path.open("wb") as err, stdout.open("wb") as out:
        agentd.process = subprocess.Popen(
            agentd.argv, env=subprocess_env(), stdout=out, stderr=err, stdin=subprocess.PIPE
        )
        assert agentd.process.stdin is not None
        with agentd.process.stdin as stdin:  # closed: a reader sees the end after the line
            stdin.write(f"{token}\n".encode() if token else b"")
    try:
        yield agentd, stdout
    finally:
        agentd.stop()


def agent_name(project: Project, port: int, fingerprint: str, name: str) -> str:
    """The name the agent gives over mutual TLS as this project's operator."""
    settings = Settings(project_dir=project.root)
    endpoint = tls_endpoint(settings, name, f"127.0.0.1:{port}", fingerprint)

    async def info() -> str:
        conn = await connect(endpoint, rpc_timeout=10)
        try:
            return (await conn.info()).name
        finally:
            await conn.close()

    return str(run(info()))


def tokens(project: Project) -> dict[str, dict[str, Any]]:
    data = json.loads((project.root / ".mle/pki/tokens.json").read_text())
    return {record["id"]: record for record in data["tokens"]}


def assert_secret_hidden(secret: str, texts: list[str], *roots: Path) -> None:
    """The secret is in none of these outputs, nor in any file under the roots."""
    for text in texts:
        assert secret not in text
    for root in roots:
        for path in root.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def exchange(port: int, payload: bytes) -> tuple[dict[str, str], bytes]:
    """A raw TLS client: the operator's hello, then what it answers to `payload`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw) as tls,
        tls.makefile("rwb") as stream,
    ):
        hello = json.loads(stream.readline())
        if not payload:
            return hello, b""
        try:
            stream.write(payload)
            stream.flush()
            return hello, stream.readline()
        except OSError:  # it stopped reading a huge request and closed
            return hello, b""


def test_an_agent_enrolled_with_a_token_answers_over_mutual_tls(
    project: Project, tmp_path: Path
) -> None:
    session = start_session(project, "srv-01")
    ca = project.root / ".mle/pki/ca.crt"
    assert session.pipe == f"printf '%s\\n' {session.token}"  # a builtin: no process shows it
    assert session.argv == [
        "mle-agentd", "--name", "srv-01", "--enroll", "-",
        "--operator", f"127.0.0.1:{session.port}", "--ca-fingerprint",
        certificate_fingerprint(ca.read_bytes()),
    ]  # fmt: skip
    data = tmp_path / "srv-01" / "data"
    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, stdout):
        state = agentd.wait_ready()
        code, out, err = session.finish()
        cert = data / "agent.crt"
        fingerprint = certificate_fingerprint(cert.read_bytes())
        assert (code, out.splitlines()[1:]) == (
            0,
            [f"enrolled srv-01 from 127.0.0.1: certificate {fingerprint}"],
        )
        assert agent_name(project, state["port"], fingerprint, "srv-01") == "srv-01"
        device_out, device_err = stdout.read_text(), agentd.stderr()
    assert err.splitlines()[0].startswith(f"token {session.token_id} for srv-01, single use,")
    assert device_out == (
        f"enrolled srv-01 with the operator at 127.0.0.1:{session.port}: wrote {cert} "
        f"({fingerprint}) and {data / 'ca.crt'}; later starts need no token: mle-agentd --name "
        f"srv-01 --data-dir {data} --tls-cert {cert} --tls-ca {data / 'ca.crt'}\n"
    )
    assert (data / "ca.crt").read_bytes() == ca.read_bytes()
    assert stat.S_IMODE((data / "agent.key").stat().st_mode) == 0o600
    store = project.root / ".mle/pki/tokens.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    record = tokens(project)[session.token_id]
    assert (record["name"], record["used_by"], record["fingerprint"]) == (
        "srv-01", "127.0.0.1", fingerprint
    )  # fmt: skip
    assert out.count(session.secret) == 1  # the printed command, and nowhere else
    assert "warning" not in device_err
    assert_secret_hidden(session.secret, [out.split("\n", 1)[1], err, device_out, device_err],
                         project.root, tmp_path / "srv-01")  # fmt: skip

    # Started again with the same command (a service keeps its flags): no operator needed,
    # with the token piped in again or with nothing on stdin.
    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, stdout):
        agentd.wait_ready()
        assert stdout.read_text() == (
            f"srv-01 is already enrolled ({cert}, {fingerprint}); token {session.token_id} "
            "was not used\n"
        )
    with device(tmp_path / "srv-01", session.argv) as (agentd, stdout):
        agentd.wait_ready()
        assert stdout.read_text() == (
            f"srv-01 is already enrolled ({cert}, {fingerprint}); no token needed\n"
        )


def test_a_used_token_is_refused_and_the_endpoint_keeps_serving(
    project: Project, tmp_path: Path
) -> None:
    first = start_session(project, "srv-01")
    with device(tmp_path / "srv-01", first.argv, first.token) as (agentd, _):
        agentd.wait_ready()
        assert first.finish()[0] == 0
    second = start_session(project, "srv-02")
    reused = with_flag(first.argv, "--operator", f"127.0.0.1:{second.port}")
    done = run_device(tmp_path / "thief", reused, first.pipe)
    used_at = datetime.datetime.fromtimestamp(
        float(tokens(project)[first.token_id]["used_at"]),
        datetime.UTC,
    ).strftime("%Y-%m-%d %H:%M:%S UTC")
    refusal = f"token {first.token_id} was already used at {used_at} by 127.0.0.1"
    assert (done.returncode, done.stdout) == (6, "")
    assert done.stderr == (
        f"mle-agentd: error: the operator at 127.0.0.1:{second.port} refused the enrollment: "
        f"{refusal}\n"
    )
    assert not (tmp_path / "thief/data/agent.crt").exists()
    with device(tmp_path / "srv-02", second.argv, second.token) as (agentd, _):
        agentd.wait_ready()
        code, _, err = second.finish()
    assert code == 0
    assert f"refused an enrollment from 127.0.0.1: {refusal}\n" in err
    assert_secret_hidden(first.secret, [done.stderr, err], project.root)


def test_an_expired_token_is_refused(project: Project, tmp_path: Path) -> None:
    short = start_session(project, "srv-03", "--ttl", "1s")
    code, _, err = short.finish()  # it serves until the token expires
    expires = float(tokens(project)[short.token_id]["expires_at"])
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    assert code == 5
    assert err.splitlines()[-1] == (
        f"error: token {short.token_id} expired at {when} before srv-03 enrolled; make a new "
        "one with mle agent enroll-token"
    )
    other = start_session(project, "srv-04")
    late = with_flag(short.argv, "--operator", f"127.0.0.1:{other.port}")
    done = run_device(tmp_path / "srv-03", late, short.pipe)
    assert (done.returncode, done.stderr) == (
        6,
        f"mle-agentd: error: the operator at 127.0.0.1:{other.port} refused the enrollment: "
        f"token {short.token_id} expired at {when}\n",
    )
    other.process.send_signal(signal.SIGINT)  # Ctrl-C: the session stops, its token is revoked
    code, _, err = other.finish()
    assert code == 130
    assert "revoked_at" in tokens(project)[other.token_id]
    assert_secret_hidden(short.secret, [done.stderr, err], project.root)


def test_a_token_for_another_name_is_refused(project: Project, tmp_path: Path) -> None:
    session = start_session(project, "srv-01")
    done = run_device(
        tmp_path / "srv-02", with_flag(session.argv, "--name", "srv-02"), session.pipe
    )
    refusal = f"token {session.token_id} is for srv-01, not srv-02"
    assert (done.returncode, done.stderr) == (
        6,
        f"mle-agentd: error: the operator at 127.0.0.1:{session.port} refused the enrollment: "
        f"{refusal}\n",
    )
    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, _):
        agentd.wait_ready()  # the token survived the attempt
        code, _, err = session.finish()
    assert code == 0
    assert f"refused an enrollment from 127.0.0.1: {refusal}\n" in err


class FakeOperator:
    """A TLS endpoint speaking the operator's first line with a chosen certificate and CA, and
    recording every byte a device sends after it."""

    def __init__(self, cert_pem: bytes, key: bytes, ca_pem: bytes, directory: Path) -> None:
        (directory / "fake.pem").write_bytes(cert_pem + key)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(directory / "fake.pem")
        self.ca_pem = ca_pem
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, name="fake-operator")

    def _serve(self) -> None:
        self.listener.settimeout(60)
        raw, _ = self.listener.accept()
        raw.settimeout(60)
        with raw, self.context.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(json.dumps({"ca": self.ca_pem.decode()}).encode() + b"\n")
            with contextlib.suppress(OSError):
                while chunk := tls.recv(4096):
                    self.received += chunk

    def __enter__(self) -> FakeOperator:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)
        self.listener.close()


def _other_ca_endpoint() -> tuple[bytes, bytes, bytes]:
    """Another CA, and an enrollment endpoint certificate (as ours are made) it issued."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)

    def build(name: str, public: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
            builder = builder.add_extension(usage, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca = build("other CA", ca_key.public_key(), True).public_bytes(pem)
    leaf = build("mle enrollment other", key.public_key(), False).public_bytes(pem)
    return leaf, key_pem(key), ca


def test_the_device_checks_the_operator_before_sending_the_token(
    project: Project, tmp_path: Path
) -> None:
    session = start_session(project, "srv-01")
    wrong = with_flag(session.argv, "--ca-fingerprint", "sha256:" + "0" * 64)
    done = run_device(tmp_path / "wrong", wrong, session.pipe)
    presented = session.flag("--ca-fingerprint")
    assert (done.returncode, done.stderr) == (
        6,
        f"mle-agentd: error: refusing the operator at 127.0.0.1:{session.port} (the token was "
        f"not sent): its CA is {presented[:23]}…, not sha256:{'0' * 16}… (--ca-fingerprint)\n",
    )
    assert not (tmp_path / "wrong/data/agent.crt").exists()

    # An endpoint of another CA, and one holding an agent's certificate from this project's CA.
    leaf, key, other_ca = _other_ca_endpoint()
    agent = issue_agent_tls(Settings(project_dir=project.root), "mle-operator")
    project_ca = agent.ca.read_bytes()
    fakes = [
        (leaf, key, other_ca, "its CA is"),
        (agent.cert.read_bytes(), agent.key.read_bytes(), project_ca,
         "its certificate is not the project's enrollment endpoint's (an agent's?)"),
    ]  # fmt: skip
    for cert_pem, key_bytes, ca_pem, why in fakes:
        with FakeOperator(cert_pem, key_bytes, ca_pem, tmp_path) as fake:
            fooled = with_flag(session.argv, "--operator", f"127.0.0.1:{fake.port}")
            done = run_device(tmp_path / "fooled", fooled, session.pipe)
        assert done.returncode == 6
        assert done.stderr.startswith(
            f"mle-agentd: error: refusing the operator at 127.0.0.1:{fake.port} (the token was "
            f"not sent): {why}"
        ), done.stderr
        assert fake.received == b""

    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, _):
        agentd.wait_ready()  # none of it spent the token
        code, _, err = session.finish()
    assert code == 0
    assert "refused" not in err  # the operator never saw those attempts


def test_garbage_and_huge_requests_are_refused_and_the_endpoint_stays_up(
    project: Project, tmp_path: Path
) -> None:
    session = start_session(project, "srv-01")
    with socket.create_connection(("127.0.0.1", session.port), timeout=30) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not even TLS
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(4096)[:1] in (b"\x15", b"")  # an alert, or closed
    hello, _ = exchange(session.port, b"")
    assert certificate_fingerprint(hello["ca"].encode()) == session.flag("--ca-fingerprint")
    replies = {
        b"not json\n": "not an enrollment request (expected one JSON line)",
        b'{"token": 5, "name": "srv-01", "csr": ""}\n': (
            "an enrollment request needs token, name and csr (strings)"
        ),
        json.dumps({"token": session.token, "name": "srv 01\x1b[2J", "csr": "x"}).encode()
        + b"\n": "invalid agent name 'srv 01\\x1b[2J': a target name is 1 to 63 letters, digits, "
        "'.', '_' or '-', starting with a letter or digit",
        json.dumps({"token": session.token, "name": "srv-01", "csr": "junk"}).encode()
        + b"\n": "not a PEM certificate signing request",
    }
    for payload, error in replies.items():
        _, reply = exchange(session.port, payload)
        assert json.loads(reply) == {"error": error}
    _, reply = exchange(session.port, b"x" * (1024 * 1024))  # no newline, far past the limit
    assert reply in (b"", b'{"error": "request larger than 64 KiB"}\n')

    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, _):
        agentd.wait_ready()  # still serving, the token still good (bad CSR did not spend it)
        code, _, err = session.finish()
    assert code == 0
    assert "refused an enrollment from 127.0.0.1: not a PEM certificate signing request" in err
    assert "\x1b" not in err


def test_ten_bad_attempts_stop_the_session_and_revoke_its_token(
    project: Project, tmp_path: Path
) -> None:
    session = start_session(project, "srv-01")
    guess = {"token": f"{session.token_id}.{'a' * 24}", "name": "srv-01", "csr": "x"}
    for attempt in range(operator_side.MAX_BAD_ATTEMPTS):
        _, reply = exchange(session.port, json.dumps(guess).encode() + b"\n")
        assert json.loads(reply) == {
            "error": f"token {session.token_id} does not match (wrong secret)"
        }, attempt
    code, _, err = session.finish()
    assert code == 6
    assert err.splitlines()[-2:] == [
        f"error: stopped after 10 refused enrollment attempts; token {session.token_id} is revoked",
        "hint: make a new one with mle agent enroll-token",
    ]
    other = start_session(project, "srv-02")
    moved = with_flag(session.argv, "--operator", f"127.0.0.1:{other.port}")
    done = run_device(tmp_path / "srv-01", moved, session.pipe)
    revoked = float(tokens(project)[session.token_id]["revoked_at"])
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(revoked))
    assert (done.returncode, done.stderr) == (
        6,
        f"mle-agentd: error: the operator at 127.0.0.1:{other.port} refused the enrollment: "
        f"token {session.token_id} was revoked at {when} (its mle agent enroll-token stopped)\n",
    )
    other.process.send_signal(signal.SIGINT)
    other.finish()


def test_garbage_and_unknown_tokens_do_not_end_the_session(
    project: Project, tmp_path: Path
) -> None:
    session = start_session(project, "srv-01")
    other = start_session(project, "srv-02")  # a real token, of another session
    attempts = [
        b"not json\n",
        json.dumps({"token": "nope", "name": "srv-01", "csr": "x"}).encode() + b"\n",
        json.dumps({"token": f"zzzzzz.{'a' * 24}", "name": "srv-01", "csr": "x"}).encode() + b"\n",
        json.dumps({"token": f"{other.token_id}.{'a' * 24}", "name": "srv-02", "csr": "x"}).encode()
        + b"\n",
    ]
    for attempt in range(3 * operator_side.MAX_BAD_ATTEMPTS):
        _, reply = exchange(session.port, attempts[attempt % len(attempts)])
        assert "error" in json.loads(reply), attempt
    assert session.process.poll() is None  # still serving
    with device(tmp_path / "srv-01", session.argv, session.token) as (agentd, _):
        agentd.wait_ready()  # and its token still good
        code, _, err = session.finish()
    assert code == 0
    assert "refused an enrollment from 127.0.0.1: unknown token zzzzzz" in err
    assert f"token {other.token_id} does not match (wrong secret)" in err
    other.process.send_signal(signal.SIGINT)
    assert other.finish()[0] == 130  # the guesses at its token reached another endpoint


def test_bad_arguments_are_refused_in_one_line(project: Project, tmp_path: Path) -> None:
    for args, error in [
        (["--name", "srv 01"], "error: invalid agent name 'srv 01': a target name is 1 to 63 "
         "letters, digits, '.', '_' or '-', starting with a letter or digit"),
        (["--name", "srv-01", "--ttl", "2d"], "error: invalid ttl 172800s: between 1s and 24h"),
        (["--name", "srv-01", "--ttl", "soon"],
         "error: --ttl: invalid duration 'soon' (use e.g. 90s, 30m, 2h)"),
        (["--name", "srv-01", "--listen", "nowhere"],
         "error: invalid listen address 'nowhere': expected HOST:PORT"),
        (["--name", "srv-01", "--address", "$(reboot)"],
         "error: invalid address '$(reboot)': expected an IP or a host name"),
    ]:  # fmt: skip
        done = project.mle("agent", "enroll-token", *args)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", error + "\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = project.mle("agent", "enroll-token", "--name", "srv-01", "--listen",
                           f"127.0.0.1:{port}")  # fmt: skip
    assert (done.returncode, done.stderr) == (
        2,
        f"error: cannot listen on 127.0.0.1:{port}: address already in use\n"
        "hint: another mle agent enroll-token may be serving there; give --listen HOST:PORT\n",
    )
    assert "tokens.json" not in {p.name for p in (project.root / ".mle/pki").iterdir()}
    fingerprint = "sha256:" + "ab" * 32
    flags = ["--operator", "127.0.0.1:1", "--ca-fingerprint", fingerprint]
    long_label = "a" * 70  # over 63: the idna codec refuses it
    for argv, pipe, error in [
        (["mle-agentd", "--enroll", "abcdef.0123456789abcdef"], "",
         "--enroll TOKEN, --operator HOST:PORT and --ca-fingerprint go together, as mle agent "
         "enroll-token prints them"),
        (["mle-agentd", "--enroll", "-", *flags], "printf '%s\\n' s3cret-typo",
         "invalid --enroll token: expected <id>.<secret> from mle agent enroll-token"),
        (["mle-agentd", "--enroll", "-", *flags[:3], "md5:1234"],
         "printf '%s\\n' abcdef.0123456789abcdef",
         "invalid --ca-fingerprint 'md5:1234': expected sha256:<64 hex digits> as printed by "
         "mle agent enroll-token"),
        (["mle-agentd", "--enroll", "-", *flags], "",
         "no enrollment token: give it on stdin with --enroll - (printf '%s\\n' TOKEN | "
         "mle-agentd ... --enroll -), as mle agent enroll-token prints"),
        (["mle-agentd", "--enroll", "-", "--operator", f"{long_label}.example:1", *flags[2:]],
         "printf '%s\\n' abcdef.0123456789abcdef",
         f"invalid --operator '{long_label}.example:1': expected HOST:PORT with a valid host "
         "name or IP"),
    ]:  # fmt: skip
        done = run_device(tmp_path, argv, pipe)
        assert (done.returncode, done.stderr) == (2, f"mle-agentd: error: {error}\n"), argv
    # The token on the command line still works, with a warning: `ps` shows it to anyone.
    done = run_device(tmp_path, ["mle-agentd", "--name", "srv-01", "--enroll",
                                 "abcdef.0123456789abcdef", *flags])  # fmt: skip
    assert (done.returncode, done.stderr) == (
        5,
        "mle-agentd: warning: a token given as --enroll TOKEN is visible to other local users "
        "(ps, /proc); give --enroll - and the token on stdin: printf '%s\\n' TOKEN | mle-agentd "
        "... --enroll -\n"
        "mle-agentd: error: cannot reach the operator at 127.0.0.1:1: connection refused\n",
    )


def test_both_sides_speak_the_same_protocol() -> None:
    assert device_side.MAX_LINE == operator_side.MAX_LINE
    assert device_side.SERVER_CN_PREFIX == operator_side.SERVER_CN_PREFIX
    assert device_side.TOKEN == operator_side.TOKEN

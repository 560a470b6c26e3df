"""Enrolling an agent as a user does: `mle-agentd --make-csr` on the device, `mle agent sign` on the
operator machine, then the agent started with the printed flags answers the operator over mTLS."""

from __future__ import annotations

import shlex
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from mle_cli.settings import Settings
from mle_cli.targets.connection import connect
from mle_cli.targets.pki import certificate_fingerprint
from tests.agent_helpers import daemon, leak_check, run, run_daemon
from tests.conftest import Project
from tests.pki_helpers import tls_endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _make_csr(device: Path, *args: str) -> tuple[int, str, str]:
    empty = device / "empty.toml"
    empty.touch()
    done = run_daemon(device, "--config", str(empty), "--data-dir", str(device / "data"), *args)
    return done.returncode, done.stdout, done.stderr


def test_an_agent_enrolled_with_make_csr_and_sign_answers_over_mtls(
    project: Project, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    device.mkdir()
    code, out, err = _make_csr(device, "--name", "pi-01", "--make-csr", str(device / "pi-01.csr"))
    key = device / "data" / "agent.key"
    assert (code, err) == (0, "")
    assert out == (
        f"wrote the certificate request of pi-01 to {device / 'pi-01.csr'} (its key stays in "
        f"{key}); on the operator machine run: mle agent sign pi-01.csr --name pi-01 "
        "[--address IP]\n"
    )
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    inbox = project.root / "inbox"  # the request travels to the operator; the key does not
    inbox.mkdir()
    shutil.copy(device / "pi-01.csr", inbox)
    signed = project.mle("agent", "sign", "inbox/pi-01.csr", "--name", "pi-01",
                         "--address", "127.0.0.1", check=True)  # fmt: skip
    cert = inbox / "pi-01.crt"
    lines = signed.stdout.splitlines()
    fingerprint = certificate_fingerprint(cert.read_bytes())
    assert lines[0] == f"signed pi-01: wrote {cert} ({fingerprint}) and {inbox / 'ca.crt'}"
    assert lines[1] == "copy both to pi-01 and start it with:"
    argv = shlex.split(lines[2])
    assert argv[0] == "mle-agentd" and "--tls-key" not in argv  # the key stays in the data dir
    flags = argv[1:]

    with daemon(device, *flags, "--listen", "127.0.0.1:0", "--http-listen", "off",
                data_dir=device / "data") as agentd:  # fmt: skip
        state = agentd.wait_ready()
        settings = Settings(project_dir=project.root)
        endpoint = tls_endpoint(settings, "pi-01", f"127.0.0.1:{state['port']}", fingerprint)

        async def info() -> str:
            conn = await connect(endpoint, rpc_timeout=10)
            try:
                return (await conn.info()).name
            finally:
                await conn.close()

        assert run(info()) == "pi-01"
        logs = agentd.stderr()
    assert "PRIVATE KEY" not in out + err + signed.stdout + signed.stderr + logs
    agent_key = key.read_bytes()
    for path in project.root.rglob("*"):
        assert not path.is_file() or agent_key not in path.read_bytes(), path
    assert not list(project.root.rglob("agent.key"))


def test_make_csr_refuses_a_name_that_cannot_be_in_a_certificate(tmp_path: Path) -> None:
    code, out, err = _make_csr(tmp_path, "--name", "pi 01", "--make-csr", str(tmp_path / "x.csr"))
    assert (code, out) == (2, "")
    assert err == (
        "mle-agentd: error: invalid name 'pi 01': letters, digits and . _ - (up to 63, starting "
        "with a letter or digit); give --name\n"
    )
    assert not (tmp_path / "x.csr").exists() and not (tmp_path / "data" / "agent.key").exists()


def test_sign_refuses_a_bad_request_or_name_in_one_line(project: Project) -> None:
    (project.root / "bad.csr").write_text("not a request")
    done = project.mle("agent", "sign", "bad.csr", "--name", "pi-01")
    assert done.returncode == 2
    assert done.stderr == "error: not a PEM certificate signing request\n"
    done = project.mle("agent", "sign", "bad.csr", "--name", "pi/01")
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid agent name 'pi/01': a target name is")
    assert len(done.stderr.splitlines()) == 1
    done = project.mle("agent", "sign", "missing.csr", "--name", "pi-01")
    assert (done.returncode, done.stderr) == (
        2,
        "error: cannot read missing.csr: No such file or directory\n",
    )

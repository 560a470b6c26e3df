"""`mle init`: a project directory with its CA, made once; running it again changes nothing."""

from __future__ import annotations

import stat

import pytest

from mle_cli.targets.pki import certificate_fingerprint
from tests.conftest import Project

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def test_init_makes_the_project_and_its_ca_once(project: Project) -> None:
    assert not (project.root / ".mle").exists()
    done = project.mle("init", check=True)
    pki = project.root / ".mle" / "pki"
    fingerprint = certificate_fingerprint((pki / "ca.crt").read_bytes())
    assert done.stdout.splitlines() == [
        f"initialized {project.root / '.mle'}",
        f"created the project CA: {pki / 'ca.crt'} and {pki / 'ca.key'} (private, 0600)",
        f"CA fingerprint: {fingerprint}",
    ]
    assert done.stderr == ""
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" not in (done.stdout + done.stderr).encode()

    files = {p: p.read_bytes() for p in pki.iterdir()}
    again = project.mle("init", check=True)
    assert (
        again.stdout == f"already initialized: {project.root / '.mle'} (project CA {fingerprint})\n"
    )
    assert {p: p.read_bytes() for p in pki.iterdir()} == files


def test_init_gives_an_existing_project_its_ca(project: Project) -> None:
    (project.root / ".mle").mkdir()
    sub = project.root / "sub"
    sub.mkdir()
    done = project.mle("-C", str(sub), "init", check=True)  # --project names the directory
    assert done.stdout.splitlines()[0] == f"initialized {sub / '.mle'}"
    done = project.mle("init", check=True)
    pki = project.root / ".mle" / "pki"
    assert done.stdout.splitlines() == [
        f"found {project.root / '.mle'}",
        f"created the project CA: {pki / 'ca.crt'} and {pki / 'ca.key'} (private, 0600)",
        f"CA fingerprint: {certificate_fingerprint((pki / 'ca.crt').read_bytes())}",
    ]

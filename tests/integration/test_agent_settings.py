"""How mle-agentd builds its settings: defaults < TOML < MLE_AGENT_* env < flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mle_agent.daemon import build_parser, main
from mle_agent.settings import AgentSettings, build_settings, check_listen_security
from mle_proto.errors import UsageError


def _flags(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(list(argv)))


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'name = "from-toml"\nslots = 3\nlisten = "127.0.0.1:9000"\n'
        'drain_timeout = 7.5\n[labels]\nrole = "edge"\n'
    )
    env = {"MLE_AGENT_SLOTS": "5", "MLE_AGENT_LISTEN": "127.0.0.1:9001", "UNRELATED": "x"}
    settings = build_settings(_flags("--listen", "127.0.0.1:9002"), env, config)
    assert settings.name == "from-toml"  # only the file sets it
    assert settings.slots == 5  # env beats the file
    assert settings.listen == "127.0.0.1:9002"  # flags beat env
    assert settings.drain_timeout == 7.5
    assert dict(settings.labels) == {"role": "edge"}
    assert settings.kill_grace == AgentSettings().kill_grace  # default


def test_heartbeat_interval_comes_from_every_layer(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("heartbeat_interval = 2.5\n")
    assert AgentSettings().heartbeat_interval == 1.0
    assert build_settings(_flags(), {}, config).heartbeat_interval == 2.5
    env = {"MLE_AGENT_HEARTBEAT_INTERVAL": "0.25"}
    assert build_settings(_flags(), env, config).heartbeat_interval == 0.25
    flags = _flags("--heartbeat-interval", "0.05")
    assert build_settings(flags, env, config).heartbeat_interval == 0.05


def test_paths_and_derived_locations(tmp_path: Path) -> None:
    flags = _flags("--data-dir", str(tmp_path / "d"), "--labels", "a=1, b=two", "--insecure")
    settings = build_settings(flags, {}, _empty(tmp_path))
    assert settings.outbox_path == tmp_path / "d" / "agent.db"
    assert settings.artifacts_root == tmp_path / "d" / "artifacts"
    assert settings.work_root == tmp_path / "d" / "work"
    assert settings.task_root == tmp_path / "d" / "tasks"
    assert dict(settings.labels) == {"a": "1", "b": "two"}
    assert settings.insecure is True
    shared = build_settings(
        _flags("--artifacts-dir", str(tmp_path / "store")), {}, _empty(tmp_path)
    )
    assert shared.artifacts_root == tmp_path / "store"


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.toml"
    path.touch()
    return path


@pytest.mark.parametrize(
    ("toml", "env", "argv", "message"),
    [
        ("bogus = 1\n", {}, [], "unknown key 'bogus'"),
        ("slots = [\n", {}, [], "config file"),
        ("", {"MLE_AGENT_SLOTS": "many"}, [], "invalid slots"),
        ("", {"MLE_AGENT_INSECURE": "maybe"}, [], "invalid insecure"),
        ("", {}, ["--slots", "0"], "invalid slots: must be at least 1"),
        ("", {}, ["--labels", "novalue"], "label 'novalue' is not key=value"),
        ("", {}, ["--listen", "7443"], "invalid listen address '7443'"),
        ("", {}, ["--tls-cert", "c.pem"], "mutual TLS needs all three"),
        ("", {}, ["--heartbeat-interval", "0.01"], "invalid heartbeat_interval: must be between"),
        ("heartbeat_interval = 61\n", {}, [], "invalid heartbeat_interval"),
        ("", {"MLE_AGENT_HEARTBEAT_INTERVAL": "nan"}, [], "invalid heartbeat_interval"),
        ("", {}, ["--labels", "owner=Jürgen"], "label value 'Jürgen' is not valid"),
        ("", {}, ["--labels", "site=lab 2"], "label value 'lab 2' is not valid"),
        ("", {}, ["--name", "pi 01"], "invalid name 'pi 01'"),
        ("", {}, ["--name", "pi-*"], "invalid name 'pi-*'"),
        ("", {}, ["--name", "pi..01"], "invalid name 'pi..01'"),
    ],
)
def test_bad_settings_are_usage_errors(
    tmp_path: Path, toml: str, env: dict[str, str], argv: list[str], message: str
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    with pytest.raises(UsageError, match=re.escape(message)):
        build_settings(_flags(*argv), env, config)


def test_an_explicit_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        build_settings(_flags(), {}, tmp_path / "missing.toml")
    with pytest.raises(UsageError, match="does not exist"):
        build_settings(_flags(), {"MLE_AGENT_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.8.0.1:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("192.168.1.10:1", False),
        ("agent.example.org:1", False),
    ],
)
def test_loopback_detection(listen: str, loopback: bool) -> None:
    assert AgentSettings(listen=listen).is_loopback() is loopback


def test_a_missing_default_tls_key_is_one_line_naming_it_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "agent.toml"  # as `mle agent install` writes it: no tls_key
    config.write_text(
        f'name = "pi-01"\ndata_dir = "{data}"\nlisten = "0.0.0.0:0"\n'
        f'tls_cert = "{tmp_path}/agent.crt"\ntls_ca = "{tmp_path}/ca.crt"\n'
    )
    expected = (
        f"no TLS key: expected {data}/agent.key (made by mle-agentd --make-csr) or give --tls-key"
    )
    with pytest.raises(UsageError) as caught:
        check_listen_security(build_settings(_flags(), {}, config))
    assert caught.value.message == expected
    assert main(["--config", str(config)]) == UsageError.exit_code
    assert capsys.readouterr().err == f"mle-agentd: error: {expected}\n"
    # --make-csr is how the key comes to be: the missing key must not stop it.
    assert main(["--config", str(config), "--make-csr", str(tmp_path / "pi-01.csr")]) == 0
    assert (data / "agent.key").is_file()
    check_listen_security(build_settings(_flags(), {}, config))


def test_a_missing_explicit_tls_key_is_named(tmp_path: Path) -> None:
    argv = ["--tls-cert", "c.pem", "--tls-ca", "ca.pem", "--tls-key", str(tmp_path / "k.pem")]
    with pytest.raises(UsageError) as caught:
        check_listen_security(build_settings(_flags(*argv), {}, _empty(tmp_path)))
    assert caught.value.message == f"no TLS key: {tmp_path}/k.pem (--tls-key) does not exist"

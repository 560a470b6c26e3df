"""Operator settings: precedence, and every bad value refused in one line before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from mle_cli.settings import load_settings
from mle_proto.errors import UsageError


def test_env_beats_the_project_config_and_flags_beat_both(tmp_path: Path) -> None:
    (tmp_path / ".mle").mkdir()
    (tmp_path / ".mle" / "config.toml").write_text("rpc_timeout = 30\nagent_grace = 12\n")
    env = {"MLE_AGENT_GRACE": "7.5", "XDG_CONFIG_HOME": str(tmp_path / "none")}
    settings = load_settings(tmp_path, env, agent_start_timeout=3.0)
    assert (settings.rpc_timeout, settings.agent_grace) == (30.0, 7.5)
    assert settings.agent_start_timeout == 3.0
    # 0 where it means "not at all", inf where it means "never".
    quiet = {**env, "MLE_MDNS_BROWSE_SECONDS": "0", "MLE_HEARTBEAT_INTERVAL": "0"}
    assert (
        load_settings(tmp_path, quiet).mdns_browse_seconds,
        load_settings(tmp_path, quiet).heartbeat_interval,
    ) == (0, 0)
    never = {**env, "MLE_AGENT_GONE_AFTER": "inf", "MLE_AGENT_FORGET_AFTER": "inf"}
    assert load_settings(tmp_path, never).agent_forget_after == float("inf")
    assert (
        load_settings(tmp_path, {**env, "MLE_LOCAL_AGENT_SLOTS": "4096"}).local_agent_slots == 4096
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("rpc_timeout", "abc", "setting rpc_timeout: expected float, got 'abc'"),
        ("rpc_timeout", "0", "setting rpc_timeout: expected seconds from more than 0 to "
         "100000000, got '0'"),
        ("rpc_timeout", "1e12", "setting rpc_timeout: expected seconds from more than 0 to "
         "100000000, got '1e12'"),
        ("agent_grace", "-5", "setting agent_grace: expected seconds from more than 0 to "
         "100000000, got '-5'"),
        ("heartbeat_interval", "nan", "setting heartbeat_interval: expected seconds from 0 to "
         "100000000, got 'nan'"),
        ("agent_start_timeout", "inf", "setting agent_start_timeout: expected seconds from more "
         "than 0 to 100000000, got 'inf'"),
        ("mdns_browse_seconds", "-1", "setting mdns_browse_seconds: expected seconds from 0 to "
         "100000000, got '-1'"),
        ("agent_forget_after", "0", "setting agent_forget_after: expected seconds from more than "
         "0 to inf, got '0'"),
        ("local_agent_slots", "99999999999999999999", "setting local_agent_slots: expected 0 to "
         "4096, got '99999999999999999999'"),
        ("local_agent_slots", "4097", "setting local_agent_slots: expected 0 to 4096, got '4097'"),
        ("agent_metrics_keep", "-1", "setting agent_metrics_keep: expected 0 to 2147483647, "
         "got '-1'"),
        ("local_agent_slots", "1e400", "setting local_agent_slots: expected int, got '1e400'"),
    ],
)  # fmt: skip
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    env = {f"MLE_{name.upper()}": value, "XDG_CONFIG_HOME": str(tmp_path / "none")}
    with pytest.raises(UsageError) as caught:
        load_settings(tmp_path, env)
    assert str(caught.value) == message


def test_a_non_finite_number_in_a_config_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".mle").mkdir()
    (tmp_path / ".mle" / "config.toml").write_text("local_agent_slots = inf\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "none")}
    with pytest.raises(UsageError, match=r"^setting local_agent_slots: expected int, got inf$"):
        load_settings(tmp_path, env)

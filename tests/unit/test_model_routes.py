"""Route changes planned from the current route, deploy lines, and deployments in the ledger."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mle_cli.ledger import ArtifactRecord, DeploymentRecord, Ledger, deployments
from mle_cli.ledger._schema import SCHEMA_VERSION
from mle_cli.models.deploy import DeployOutcome, default_name
from mle_cli.models.routes import (
    RouteChange,
    RouteSpec,
    describe_route,
    parse_change,
    parse_delay,
    parse_percent,
    plan_route,
    route_from_pb,
    route_to_pb,
    traffic,
)
from mle_cli.models.views import deploy_line, human_size
from mle_proto.errors import NotFound, UsageError
from tests.conftest import REPO

ONE = RouteSpec(split=((1, 100.0),))
VERSIONS = (1, 2, 3, 4)


def test_a_canary_splits_between_the_primary_and_the_new_version() -> None:
    route = plan_route(ONE, RouteChange(version=2, canary=10.0), VERSIONS)
    assert route.split == ((1, 90.0), (2, 10.0))
    assert route.primary == 1
    assert describe_route(route) == "v1 90%, v2 10%"
    assert (traffic(route, 1), traffic(route, 2), traffic(route, 3)) == ("90%", "10%", "-")


def test_a_version_alone_takes_all_traffic_and_keeps_the_shadow() -> None:
    current = RouteSpec(split=((1, 90.0), (2, 10.0)), shadow=3)
    route = plan_route(current, RouteChange(version=2), VERSIONS)
    assert route == RouteSpec(split=((2, 100.0),), shadow=3)


def test_promoting_the_shadow_ends_its_shadowing() -> None:
    current = RouteSpec(split=((1, 100.0),), shadow=3)
    assert plan_route(current, RouteChange(version=3), VERSIONS).shadow == 0


def test_a_shadow_is_added_and_removed() -> None:
    route = plan_route(ONE, RouteChange(shadow=3), VERSIONS)
    assert route == RouteSpec(split=((1, 100.0),), shadow=3)
    assert describe_route(route) == "v1 100%; shadow v3"
    assert traffic(route, 3) == "shadow"
    assert plan_route(route, RouteChange(shadow=0), VERSIONS).shadow == 0


def test_fallback_and_consensus_and_back_to_split() -> None:
    fallback = plan_route(ONE, RouteChange(policy="fallback", deadline=0.02, secondary=2), VERSIONS)
    assert fallback == RouteSpec("fallback", ((1, 100.0),), secondary=2, deadline=0.02)
    assert describe_route(fallback) == "v1 100% within 20 ms, else v2"
    assert traffic(fallback, 2) == "fallback"
    assert traffic(fallback, 1) == "100% <=20ms"
    consensus = plan_route(fallback, RouteChange(policy="consensus", members=(1, 2, 3)), VERSIONS)
    assert consensus == RouteSpec("consensus", (), members=(1, 2, 3))
    assert describe_route(consensus) == "consensus of v1, v2, v3"
    assert consensus.primary == 1
    assert plan_route(consensus, RouteChange(policy="split"), VERSIONS) == ONE


def test_policy_split_resets_a_canary_and_a_shadow() -> None:
    current = RouteSpec(split=((1, 90.0), (2, 10.0)), shadow=3)
    assert plan_route(current, RouteChange(policy="split"), VERSIONS) == ONE


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (RouteChange(version=9), NotFound, r"no version 9 \(versions: 1, 2, 3, 4\)"),
        (RouteChange(shadow=7), NotFound, "no version 7"),
        (RouteChange(canary=10.0), UsageError, "--canary on a deployed model needs --version"),
        (RouteChange(version=1, canary=10.0), UsageError, "v1 is already the primary"),
        (RouteChange(shadow=1), UsageError, "v1 already serves traffic; shadow another"),
        (RouteChange(policy="fallback"), UsageError, "needs --secondary VERSION and --deadline"),
        (
            RouteChange(policy="fallback", secondary=1, deadline=0.1),
            UsageError,
            "v1 already serves traffic; the secondary must be another",
        ),
        (RouteChange(policy="consensus"), UsageError, "needs --members"),
        (RouteChange(deadline=0.1), UsageError, "--deadline and --secondary go with"),
        (RouteChange(members=(1, 2)), UsageError, "--members goes with --policy consensus"),
    ],
)
def test_a_change_that_cannot_apply_is_one_clear_error(
    change: RouteChange, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        plan_route(ONE, change, VERSIONS)


def test_flags_parse_into_a_change() -> None:
    change = parse_change(4, "10%", "v3", None, None, None, None)
    assert change == RouteChange(version=4, canary=10.0, shadow=3)
    assert parse_change(0, None, "off", None, None, None, None).shadow == 0
    fallback = parse_change(0, None, None, "fallback", "20ms", 2, None)
    assert fallback.deadline == pytest.approx(0.02)
    assert parse_change(0, None, None, "consensus", None, None, "1,2,3").members == (1, 2, 3)
    assert parse_change(0, None, None, None, None, None, None).empty


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_percent("150%"), "invalid percentage '150%'"),
        (lambda: parse_percent("ten"), "invalid percentage 'ten'"),
        (lambda: parse_delay("soon", "--deadline"), "invalid --deadline 'soon'"),
        (lambda: parse_change(0, None, "x", None, None, None, None), "invalid --shadow 'x'"),
        (lambda: parse_change(0, None, None, "best", None, None, None), "invalid --policy 'best'"),
        (lambda: parse_change(0, None, None, None, None, None, "1"), "invalid --members '1'"),
        (lambda: parse_change(0, None, None, None, None, None, "1,1"), "invalid --members"),
    ],
)
def test_bad_flags_are_usage_errors(call: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        call()  # type: ignore[operator]


def test_routes_round_trip_through_the_protocol() -> None:
    for route in (
        ONE,
        RouteSpec(split=((1, 90.0), (2, 10.0)), shadow=3),
        RouteSpec("fallback", ((1, 100.0),), secondary=2, deadline=0.02),
        RouteSpec("consensus", (), members=(1, 2, 3)),
    ):
        assert route_from_pb(route_to_pb(route)) == route


def test_the_default_name_is_the_file_name_up_to_its_first_dot() -> None:
    assert default_name(Path("/x/model.int8.onnx")) == "model"
    assert default_name(Path("Digits.tflite")) == "digits"


def test_deploy_lines() -> None:
    three = RouteSpec(split=((3, 100.0),))
    one = DeployOutcome("deploy", "local", "digits", 3, three, True, "onnxruntime", 1_234_567, 0.41)
    assert deploy_line(one) == "digits v3 serving on local (onnxruntime, 1.2 MB, loaded in 0.41 s)"
    canary = DeployOutcome(
        "deploy", "local", "digits", 2, RouteSpec(split=((1, 90.0), (2, 10.0))), True, "litert", 900
    )
    assert deploy_line(canary) == (
        "digits v2 serving 10% on local (litert, 900 B, loaded in 0.00 s); route: v1 90%, v2 10%"
    )
    again = DeployOutcome("deploy", "local", "digits", 3, three, False)
    assert deploy_line(again) == "digits v3 already deployed on local (same file); route: v3 100%"
    idle = DeployOutcome("deploy", "local", "digits", 3, ONE, True, "onnxruntime", 10)
    assert deploy_line(idle).startswith("digits v3 loaded on local, not routed (onnxruntime")
    back = DeployOutcome("rollback", "local", "digits", 1, ONE)
    assert deploy_line(back) == "digits on local rolled back: v1 100%"
    assert human_size(340_000) == "340.0 kB"


def test_a_version_2_ledger_gains_the_deployments_and_model_stats_tables(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path).close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE deployments; DROP TABLE model_stats; DROP INDEX artifacts_digest; "
        "DROP TABLE discovered_agents; DROP TABLE agent_metrics; PRAGMA user_version=2"
    )
    conn.close()
    Ledger(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    columns = {r[1] for r in conn.execute("PRAGMA table_info(deployments)")}
    assert {"target", "agent", "model", "version", "digest", "action", "route"} <= columns
    assert {"created", "source_run", "source_step", "operator", "uploaded"} <= columns
    stats = {r[1] for r in conn.execute("PRAGMA table_info(model_stats)")}
    assert {"time", "target", "model", "version", "requests", "errors", "p95_seconds"} <= stats
    conn.close()


def test_deployments_are_recorded_with_their_lineage(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    digest = "sha256:" + "ab" * 32
    assert deployments.artifact_source(ledger, digest) is None
    ledger.record_artifacts([ArtifactRecord("run1", "train", "model.onnx", digest, 10)])
    assert deployments.artifact_source(ledger, digest) == ("run1", "train")
    record = DeploymentRecord(
        "local", "agent-1", "digits", "deploy", "me@host", version=1, digest=digest,
        route=ONE.to_dict(), created=True, source_run="run1", source_step="train",
    )  # fmt: skip
    deployments.record_deployment(ledger, record)
    deployments.record_deployment(
        ledger, DeploymentRecord("local", "agent-1", "digits", "rollback", "me@host", version=1)
    )
    rows = deployments.deployments(ledger, model="digits")
    assert [r["action"] for r in rows] == ["deploy", "rollback"]
    assert rows[0]["route"]["split"] == [{"version": 1, "percent": 100.0}]
    assert rows[0]["created"] is True
    assert rows[0]["source_run"] == "run1"
    with pytest.raises(ValueError, match="unknown deployment action"):
        deployments.record_deployment(
            ledger, DeploymentRecord("local", "a", "digits", "explode", "me")
        )
    ledger.close()


def test_stats_snapshots_accumulate_in_the_model_stats_table(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    deployments.record_model_stats(ledger, "local", "digits", 2, {"requests": 5, "errors": 1})
    deployments.record_model_stats(
        ledger, "local", "digits", 2, {"requests": 7, "errors": 1, "p50_seconds": 0.002}
    )
    rows = ledger.conn.execute(
        "SELECT requests, errors, p50_seconds, time FROM model_stats "
        "WHERE target = 'local' AND model = 'digits' AND version = 2 ORDER BY time"
    ).fetchall()
    assert [r[:3] for r in rows] == [(5, 1, None), (7, 1, 0.002)]
    assert rows[0][3] <= rows[1][3]
    ledger.close()


@pytest.mark.parametrize("command", ["deploy", "models", "predict"])
def test_model_command_help_imports_neither_grpc_nor_numpy(command: str) -> None:
    code = (
        "import json, sys\n"
        f"sys.argv = ['mle', {command!r}, '--help']\n"
        "from mle_cli.app import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    loaded = {m.split(".")[0] for m in json.loads(out.strip().splitlines()[-1])}
    assert "Example: mle " + command in out
    assert loaded & {"grpc", "numpy", "onnxruntime", "sqlite_utils"} == set()

"""The --pick budget parser and the choice it drives: data-driven cases, no model run."""

from __future__ import annotations

import pytest

from mle_agent.tools.benchmark import Constraint, Variant, parse_budget, pick, report
from mle_proto.errors import InvalidInput

# (expression, [(field, limit in the field's unit), ...])
GOOD = [
    ("p95<=20ms", [("p95_ms", 20.0)]),
    ("p50<=1.5ms", [("p50_ms", 1.5)]),
    ("p99<=0.2s", [("p99_ms", 200.0)]),
    ("load<=2s", [("load_ms", 2000.0)]),
    ("rss<=100MB", [("peak_rss_mb", 100.0)]),
    ("rss<=100MiB", [("peak_rss_mb", 104.8576)]),
    ("size<=500kB", [("size_bytes", 500_000.0)]),
    ("size<=2MB", [("size_bytes", 2_000_000.0)]),
    ("P95 <= 20 MS", [("p95_ms", 20.0)]),
    (" p95<=20ms , rss<=150MB ", [("p95_ms", 20.0), ("peak_rss_mb", 150.0)]),
    ("p95<=.5ms,size<=1e3kB", [("p95_ms", 0.5), ("size_bytes", 1_000_000.0)]),
]

# (expression, the exact line the user sees)
BAD = [
    ("", "--pick: empty budget; write limits such as p95<=20ms,rss<=100MB"),
    ("p95", "--pick 'p95': 'p95' is not NAME<=NUMBER UNIT, e.g. p95<=20ms"),
    ("p95<=fast", "--pick 'p95<=fast': 'p95<=fast' is not NAME<=NUMBER UNIT, e.g. p95<=20ms"),
    (
        "p90<=20ms",
        "--pick 'p90<=20ms': unknown measure 'p90'; one of p50, p95, p99, load, rss, size",
    ),
    ("p95<20ms", "--pick 'p95<20ms': 'p95<20ms': a budget is an upper limit, write <="),
    ("p95>=20ms", "--pick 'p95>=20ms': 'p95>=20ms': a budget is an upper limit, write <="),
    ("p95<=20", "--pick 'p95<=20': 'p95<=20' has no unit; p95 takes ms or s"),
    ("p95<=20MB", "--pick 'p95<=20MB': 'p95<=20MB' has unit 'MB'; p95 takes ms or s"),
    ("rss<=1GB", "--pick 'rss<=1GB': 'rss<=1GB' has unit 'GB'; rss takes MB or MiB"),
    ("size<=5MiB", "--pick 'size<=5MiB': 'size<=5MiB' has unit 'MiB'; size takes kB or MB"),
    ("p95<=0ms", "--pick 'p95<=0ms': 'p95<=0ms': the limit must be above 0"),
    ("p95<=-3ms", "--pick 'p95<=-3ms': 'p95<=-3ms': the limit must be above 0"),
    ("p95<=20ms,", "--pick 'p95<=20ms,': an empty limit between commas"),
    ("p95<=20ms,p95<=5ms", "--pick 'p95<=20ms,p95<=5ms': p95 is limited twice"),
]


@pytest.mark.parametrize(("expr", "expected"), GOOD, ids=[c[0] for c in GOOD])
def test_budget_parses(expr: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_budget(expr)
    assert [c.field for c in parsed] == [field for field, _ in expected]
    assert [c.limit for c in parsed] == pytest.approx([limit for _, limit in expected])


@pytest.mark.parametrize(("expr", "message"), BAD, ids=[c[0] or "empty" for c in BAD])
def test_malformed_budget_is_one_line(expr: str, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_budget(expr)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def _variant(
    name: str, accuracy: float | None, p95: float, size_bytes: int = 10_000, rss: float = 80.0
) -> Variant:
    return Variant(
        name,
        "onnxruntime",
        size_bytes,
        load_ms=50.0,
        p50_ms=p95 / 2,
        p95_ms=p95,
        p99_ms=p95 * 1.2,
        throughput_rps=1000.0,
        peak_rss_mb=rss,
        accuracy=accuracy,
    )


VARIANTS = [
    _variant("fp32.onnx", 0.975, 30.0, size_bytes=40_000),
    _variant("int8.onnx", 0.970, 12.0, size_bytes=12_000),
    _variant("int8.tflite", 0.970, 8.0, size_bytes=9_000),
    _variant("tiny.onnx", 0.900, 2.0, size_bytes=3_000, rss=30.0),
    Variant("int8-fast.tflite", "litert", 9_000, error="the litert runtime is not installed"),
]

# (budget, the file picked or None)
PICKS = [
    ("p95<=50ms", "fp32.onnx"),  # everything fits: the most accurate
    ("p95<=20ms", "int8.tflite"),  # two equally accurate: the lower p95
    ("p95<=10ms", "int8.tflite"),
    ("p95<=5ms", "tiny.onnx"),
    ("rss<=50MB", "tiny.onnx"),
    ("p95<=20ms,size<=10kB", "int8.tflite"),
    ("p95<=1ms", None),  # nothing fits
    ("p50<=0.5ms", None),
]


@pytest.mark.parametrize(("expr", "expected"), PICKS, ids=[c[0] for c in PICKS])
def test_pick_is_the_most_accurate_within_budget(expr: str, expected: str | None) -> None:
    picked = pick(VARIANTS, parse_budget(expr))
    assert (picked.file if picked else None) == expected


def test_pick_skips_variants_that_were_not_measured() -> None:
    unmeasured = [Variant("a.tflite", "litert", 1, error="not installed")]
    assert pick(unmeasured, parse_budget("p95<=1s")) is None


def test_without_accuracy_the_fastest_within_budget_is_picked() -> None:
    blind = [_variant("a.onnx", None, 9.0), _variant("b.onnx", None, 4.0)]
    picked = pick(blind, (Constraint("p95", "p95_ms", 10.0),))
    assert picked is not None and picked.file == "b.onnx"


def test_report_flattens_the_pick() -> None:
    picked = pick(VARIANTS, parse_budget("p95<=20ms"))
    document = report(VARIANTS, "p95<=20ms", picked)
    assert document["picked"] == "int8.tflite"
    assert document["picked_p95_ms"] == 8.0
    assert document["picked_accuracy"] == 0.970
    assert [v["file"] for v in document["variants"]] == [v.file for v in VARIANTS]
    assert document["variants"][-1]["error"] == "the litert runtime is not installed"
    nothing = report(VARIANTS, "p95<=1ms", None)
    assert (nothing["picked"], nothing["picked_p95_ms"], nothing["picked_accuracy"]) == (
        None,
        None,
        None,
    )

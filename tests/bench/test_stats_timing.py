"""Benchmark statistics and interleaved timing (CPU, no models)."""
import pytest
import torch

from duodiff_fast.bench.stats import quantile, speedup, summarize
from duodiff_fast.bench.timing import time_interleaved


def test_summarize_keeps_every_repeat_and_flags_spread():
    s = summarize([1.0, 1.01, 0.99, 1.0, 1.02])
    assert s["median_s"] == 1.0 and s["repeats"] == 5 and s["times_s"] == [1.0, 1.01, 0.99, 1.0, 1.02]
    assert s["q1_s"] == pytest.approx(1.0) and s["q3_s"] == pytest.approx(1.01)
    assert s["iqr_pct"] == pytest.approx(1.0) and not s["unstable"]
    noisy = summarize([1.0, 2.0, 1.0, 3.0, 1.0, 2.5])
    assert noisy["unstable"] and noisy["iqr_pct"] > 10
    assert summarize([1.0, 1.0])["unstable"]  # two repeats: no spread can be judged
    assert not summarize([1.0, 1.3, 1.0, 1.0, 1.0], unstable_iqr_pct=50)["unstable"]
    with pytest.raises(ValueError):
        summarize([])


def test_quantile_interpolates():
    assert quantile([4, 1, 3, 2], 0.5) == pytest.approx(2.5)
    assert quantile([1, 2, 3, 4, 5], 0.25) == 2 and quantile([7], 0.9) == 7


def test_speedup_interval_brackets_the_ratio_and_needs_pairs():
    base = [2.0 + 0.01 * (i % 3) for i in range(12)]
    row = [1.0 + 0.005 * (i % 4) for i in range(12)]
    sp = speedup(base, row)
    assert sp["low"] <= sp["point"] <= sp["high"]
    assert sp["point"] == pytest.approx(2.0, rel=0.02) and sp["high"] - sp["low"] < 0.1
    assert "bootstrap" in sp["method"]
    assert speedup(base, row) == sp  # seeded: the same interval every time
    with pytest.raises(ValueError):
        speedup(base, row[:-1])


def test_rows_are_interleaved_warmed_up_apart_and_rotated():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    out = time_interleaved(fns, torch.device("cpu"), repeats=3, warmup=2, progress=False)
    assert calls[:6] == ["A", "A", "B", "B", "C", "C"]  # warm-up first, per row
    assert calls[6:] == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]  # rounds, order rotating
    for k in "ABC":
        assert len(out[k]["warmup_s"]) == 2 and len(out[k]["times_s"]) == 3 and out[k]["error"] is None
        assert len(out[k]["wall_s"]) == 3


def test_a_failing_row_is_recorded_with_its_error_and_the_others_go_on():
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] == 3:
            raise RuntimeError("out of luck")

    out = time_interleaved({"ok": lambda: None, "flaky": flaky, "dead": lambda: 1 / 0},
                           torch.device("cpu"), repeats=4, warmup=1, progress=False)
    assert out["dead"]["error"].startswith("ZeroDivisionError") and out["dead"]["failed_in"] == "warm-up"
    assert out["flaky"]["error"] == "RuntimeError: out of luck" and out["flaky"]["failed_in"] == "round 1"
    assert len(out["ok"]["times_s"]) == 4 and out["ok"]["error"] is None
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, torch.device("cpu"), repeats=0)
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, torch.device("cpu"), repeats=1, clock="sundial")


def test_machine_drift_cancels_in_the_paired_speedup_but_not_in_a_real_spread():
    # the machine slows down by up to 1.7x between rounds; both rows of a round see the same state
    drift = [1.0, 1.0, 1.6, 1.7, 1.1, 1.0, 1.5, 1.65, 1.05, 1.2, 1.0]
    base = [2.0 * d for d in drift]
    row = [1.0 * d * (1 + 0.01 * (i % 3)) for i, d in enumerate(drift)]
    assert summarize(row)["unstable"] and summarize(base)["unstable"]  # each row's own time: unstable
    sp = speedup(base, row)
    assert not sp["unstable"] and sp["spread_pct"] < 3
    assert sp["point"] == pytest.approx(2.0 / 1.01, rel=0.02) and sp["low"] <= sp["point"] <= sp["high"]
    assert len(sp["ratios"]) == len(base)
    # a row whose own runs scatter (not shared with the base) stays unstable
    scattered = [1.0, 1.6, 0.9, 1.4, 1.0, 0.8, 1.5, 1.0, 1.3, 0.9, 1.2]
    assert speedup([2.0] * 11, scattered)["unstable"]
    assert speedup([2.0, 2.0], [1.0, 1.0])["unstable"]  # fewer than 3 rounds: no spread can be judged

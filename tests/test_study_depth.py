"""The depth study on tiny random models: the depth curve, the power-analysis margin, the from-scratch gate."""

from __future__ import annotations

import numpy as np
import pytest

from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import compression as cp
from analysis_kit.studies import multilayer_exploration as depth

TINY = depth.Params(tiny=True, seeds=(0, 1), depths=(1, 2, 3), lr_full=(1e-3,), epochs=1, patience=1,
                    scratch_depth=2, latency_repeats=5, latency_seq_len=16, n_bootstrap=500, torch_threads=1)


@pytest.fixture(scope="module")
def result():
    return depth.run(TINY)


def test_the_depth_curve_has_every_depth_and_task_with_intervals(result):
    curve = result.tables["curve"]
    assert sorted(curve["depth"].unique()) == [1, 2, 3] and set(curve["task"]) == set(TINY.tasks)
    assert ((curve["ci_low"] <= curve["accuracy"]) & (curve["accuracy"] <= curve["ci_high"])).all()
    for task in TINY.tasks:
        for k in (1, 2, 3):
            assert f"depth/minilm/{task}/k{k}" in result.metrics
            assert f"depth_retention/minilm/{task}/k{k}" in result.metrics


def test_every_shallower_depth_is_tested_once_against_the_deepest(result):
    tests = result.tables["tests"]
    assert len(tests) == 2 and not tests["name"].duplicated().any()
    cmp = result.tables["comparisons"]
    assert set(cmp["verdict"]) <= {"equivalent", "worse", "undecided"}
    assert (cmp["ci90_low"] >= cmp["ci_low"] - 1e-9).all() and (cmp["ci90_high"] <= cmp["ci_high"] + 1e-9).all()
    margin = result.values["margin_points"]
    degenerate = (cmp["se_points"].fillna(0) == 0).all()  # tiny random models can all predict one class
    assert (np.isnan(margin) and degenerate) or margin > 0
    if np.isnan(margin):
        assert set(cmp["verdict"]) <= {"worse", "undecided"}


def test_margin_is_the_power_analysis_formula():
    p = depth.Params(alpha=0.05, power=0.8)
    assert depth._margin([1.0, 2.0, 3.0], p) == pytest.approx((1.6448536 + 1.2815516) * 2.0, rel=1e-6)
    assert np.isnan(depth._margin([0.0, 0.0], p))


def test_depth_arms_are_the_compression_chapters_first_k_arms():
    ap = TINY.arm_params()
    assert isinstance(ap, cp.Params)
    other = cp.Params(tiny=True, seeds=(0, 1), lr_full=(1e-3,), epochs=1, patience=1)
    spec = cp._arm_spec(ap, "minilm", "amazon", 0, (0, 1), "first_k", 1e-3, "/x/teacher")
    assert spec == cp._arm_spec(other, "minilm", "amazon", 0, (0, 1), "first_k", 1e-3, "/x/teacher")


def test_the_scratch_gate_reports_both_accuracies(result):
    gate = result.tables["scratch_gate"]
    assert set(gate["task"]) == set(TINY.tasks)
    assert gate["scratch_val_accuracy"].between(0, 1).all() and gate["bow_val_accuracy"].between(0, 1).all()
    assert (gate["passes"] == ((gate["scratch_val_accuracy"] > gate["bow_val_accuracy"]) & ~gate["failed"])).all()


def test_bad_parameters_fail_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="at least two distinct depths"):
        depth.Params(depths=(3,)).validate()
    with pytest.raises(LayerwiseError, match="power"):
        depth.Params(power=0.3).validate()
    with pytest.raises(LayerwiseError, match="at least 2 epochs"):
        depth.Params(epochs=1).validate()

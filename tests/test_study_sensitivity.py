"""The sensitivity study on tiny random models: agreement against chance, the mixed model, the consequence check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import sensitivity as sv

TINY = sv.Params(tiny=True, seeds=(0, 1), cal_sizes=(16, 24), cal_domains=("amazon", "tweets"), domain_n=16,
                 k_drop=1, n_permutations=1000, n_bootstrap=500, torch_threads=1)


@pytest.fixture(scope="module")
def result():
    return sv.run(TINY)


def test_agreement_families_have_enough_raters_and_their_chance_level(result):
    ag = result.tables["agreement"]
    assert set(ag["across"]) == {"seeds", "calibration sets", "methods"}
    cal = ag[ag["across"] == "calibration sets"]
    assert (cal["raters"] >= 3).all() and np.allclose(cal["chance"], 1 / cal["raters"])
    assert ((ag["w"] >= 0) & (ag["w"] <= 1)).all()


def test_tests_are_filed_once_and_the_permutation_floor_is_known(result):
    tests = result.tables["tests"]
    assert not tests["name"].duplicated().any()
    seeds = tests[tests["family"] == "seed_agreement"]
    assert np.allclose(seeds["min_p"], 1 / (TINY.n_permutations + 1))
    assert set(result.tables["families"]["family"]) == {"seed_agreement", "variance", "calibration_transfer"}
    assert result.tables["variance"]["share"].sum() == pytest.approx(1.0)


def test_every_calibration_set_is_compared_with_the_reference(result):
    conds = {c for c, _, _ in TINY.conditions("amazon")} | {c for c, _, _ in TINY.conditions("mr")}
    assert set(result.tables["transfer_summary"]["condition"]) == conds
    assert TINY.reference() == "own@32" and "own@32" not in conds


def test_kendall_w_permutation_test_detects_agreement_and_not_noise():
    rng = np.random.default_rng(0)
    same = np.tile(np.arange(6.0), (5, 1)) + rng.normal(0, 0.01, (5, 6))
    w, p, chance = sv._w_permutation(same, 2000, 0)
    assert w > 0.99 and p < 0.001 and chance == pytest.approx(0.2)
    _, p_noise, _ = sv._w_permutation(rng.normal(0, 1, (5, 6)), 2000, 0)
    assert p_noise > 0.01


def test_mixed_model_finds_a_method_interaction_that_is_there():
    rng = np.random.default_rng(1)
    rows = []
    for task in ("a", "b"):
        for seed in range(5):
            for method, profile in (("up", np.arange(6)), ("down", np.arange(6)[::-1])):
                for layer in range(6):
                    rows.append({"task": task, "seed": seed, "method": method, "layer": layer,
                                 "norm": profile[layer] / 5 + rng.normal(0, 0.05)})
    table, tests = sv._mixed_model(pd.DataFrame(rows))
    by = {t.name: t for t in tests}
    assert by["block x method changes the block profile (Wald)"].p_value < 1e-6
    assert by["block x task changes the block profile (Wald)"].p_value > 0.001
    assert table["share"].sum() == pytest.approx(1.0)


def test_bad_parameters_fail_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="cheap methods"):
        sv.Params(methods=("shap",)).validate()
    with pytest.raises(LayerwiseError, match="snippet domain"):
        sv.Params(cal_domains=("reddit",)).validate()
    with pytest.raises(LayerwiseError, match="n_permutations"):
        sv.Params(n_permutations=10).validate()

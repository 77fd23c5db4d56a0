"""The compression study on tiny random models: every strategy healed, recipes at equal budget, the headline,
declared tests, latency efficiency and the reload check (the smoke profile's settings)."""

from __future__ import annotations

import numpy as np
import pytest

from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import compression as cp

TINY = cp.Params(tiny=True, seeds=(0, 1), ratios=(1.5, 3.0), strategy_ratios=(1.5,), recipe_ratios=(1.5, 3.0),
                 methods=("ablation", "block_influence"), lr_full=(1e-3,), lr_partial=(1e-3,), lr_lora=(3e-3,),
                 epochs=1, patience=1, latency_repeats=5, latency_seq_len=16, n_bootstrap=500, torch_threads=1)


@pytest.fixture(scope="module")
def result():
    return cp.run(TINY)


def test_every_strategy_is_healed_and_shared_sets_are_healed_once(result):
    arms = result.tables["arms"]
    at = arms[(arms["ratio"] == 1.5) & (arms["family"] != "recipes")]
    want = {"importance:ablation", "importance:block_influence", "distributed", "angular", "drop_last", "greedy",
            "random"}
    assert set(at["strategy"]) == want
    assert (at["recipe"] == "finetune").all() and (at["steps"] > 0).all()
    # the same kept set on the same seed is one heal: identical predictions, identical budget
    for _, g in at.groupby(["task", "seed", "keep"]):
        assert g["test_accuracy"].nunique() == 1 and g["seconds"].nunique() == 1
    # outside the strategy ratios: drop_last and the best set before healing only
    far = arms[(arms["ratio"] == 3.0) & (arms["family"] != "recipes")]
    assert "drop_last" in set(far["strategy"]) and far.groupby(["task", "seed"])["keep"].nunique().max() <= 2


def test_recipes_share_one_budget_and_first_k_keeps_the_first_blocks(result):
    arms = result.tables["arms"]
    rec = arms[arms["family"] == "recipes"]
    assert set(rec["recipe"]) == set(TINY.recipes)
    for _, g in rec.groupby(["task", "seed", "ratio"]):
        assert g["examples"].nunique() == 1, "equal budget: every recipe sees the same examples"
    assert (rec.loc[rec["recipe"] == "first_k", "keep"] == rec.loc[rec["recipe"] == "first_k", "k"].map(
        lambda k: str(tuple(range(k))))).all()
    budget = result.tables["budget"]
    assert {"steps", "examples", "seconds", "trainable_parameters", "lr"} <= set(budget.columns)
    lora = budget[budget["recipe"] == "lora"]["trainable_parameters"].to_numpy()
    full = budget[budget["recipe"] == "finetune"]["trainable_parameters"].to_numpy()
    assert (lora < full).all()


def test_headline_metrics_have_intervals_and_the_tests_can_be_read(result):
    m = result.metrics
    for task in TINY.tasks:
        for r in ("1.5x", "3x"):
            rec = m[f"headline/minilm/{task}/retention_{r}"]
            assert rec["ci_low"] <= rec["mean"] <= rec["ci_high"] and rec["strategy"] and rec["recipe"]
        assert f"accuracy/bow/{task}" in m and f"accuracy/vader/{task}" in m
    tests = result.tables["tests"]
    assert set(tests["family"]) <= {"strategies", "recipes", "references"}
    assert not tests["name"].duplicated().any()
    assert tests["min_p"].notna().all()
    assert set(result.tables["families"]["family"]) == {"strategies", "recipes", "references"}


def test_latency_efficiency_is_measured_for_every_size_and_batch(result):
    m = result.metrics
    keys = [k for k in m if k.startswith("latency_efficiency/minilm/")]
    assert sorted(keys) == sorted(f"latency_efficiency/minilm/keep{k}/b{b}" for k in (1, 2) for b in (1, 64))
    for k in keys:
        assert m[k]["ci_low"] <= m[k]["mean"] <= m[k]["ci_high"]


def test_every_healed_model_was_scored_after_reloading_with_transformers_alone(result):
    arms = result.tables["arms"]
    assert arms["reload_max_abs_diff"].notna().all() and arms["reload_max_abs_diff"].max() < 1e-4
    assert arms["failed"].isin([True, False]).all()
    assert all(f"failed_heals/minilm/{t}" in result.metrics for t in TINY.tasks)
    assert "failed" in result.tables["lr_search"]
    assert result.values["max_reload_diff"] == arms["reload_max_abs_diff"].max()


def test_views_feed_the_notebook(result):
    for name in ("headline", "pareto", "strategy_view", "strategy_table", "recipe_view", "curve_view", "latency"):
        assert len(result.tables[name]), name
    assert np.isfinite(result.tables["strategy_view"]["retention"]).all()


def test_bad_parameters_fail_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="ratios"):
        cp.Params(ratios=(1.0,)).validate()
    with pytest.raises(LayerwiseError, match="at least 2 epochs"):
        cp.Params(epochs=1).validate()
    with pytest.raises(LayerwiseError, match="drop_last included"):
        cp.Params(strategies=("random",)).validate()
    with pytest.raises(LayerwiseError, match="must be among ratios"):
        cp.Params(strategy_ratios=(4.0,)).validate()
    with pytest.raises(LayerwiseError, match="base_recipe"):
        cp.Params(base_recipe="distill", recipes=("finetune",)).validate()

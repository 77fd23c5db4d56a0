"""The theoretical_validation study on tiny random models: names the checks read, tests that can reject,
the measures' definitions (regret, split-half reliability, Spearman on per-example rows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis_kit import stats
from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import theoretical_validation as tv

TINY = tv.Params(tiny=True, seeds=(0, 1), models=("minilm", "smollm2"), calib_n=32, expensive_n=4,
                 conductance_steps=4, shap_permutations=2, n_random=20, lm_calib_texts=8, lm_texts=16, lm_ks=(1, 2),
                 lm_expensive_n=2, lm_conductance_steps=4, split_halves=20, n_bootstrap=500, bench_repeats=1,
                 max_length=32, torch_threads=1, memory_sizes=(4, 8, 16))


@pytest.fixture(scope="module")
def result():
    return tv.run(TINY)


def test_every_metric_the_chapter_promises_is_there(result):
    m = result.metrics
    for task in TINY.tasks:
        for name in TINY.models:
            assert f"reliability/{name}/{task}" in m
            for method in (*TINY.methods, "drop_last", "random"):
                rec = m[f"spearman/{name}/{task}/{method}"]
                assert rec["ci_low"] <= rec["mean"] <= rec["ci_high"]
                assert f"regret/{name}/{task}/{method}" in m
    for method in TINY.methods:
        assert f"cost_ratio/minilm/{method}" in m
    assert "ablation_speedup/minilm" in m
    bench = result.tables["ablation_bench"].set_index("model")
    assert m["ablation_predicted/minilm"]["mean"] == pytest.approx(bench.loc["minilm", "predicted"])
    assert 1 < bench.loc["minilm", "predicted"] < 2 * 3 / (3 + 1) + 1e-9  # tiny: 3 blocks, at most 2L / (L + 1)
    assert 0 < bench.loc["minilm", "head_share"] < 1
    for n in TINY.memory_sizes:
        for mode in ("budget", "keep_all"):
            assert m[f"peak_memory/tiny_llama/{n}/{mode}"]["unit"] == "MiB"
    for metric in ("memory_slope/tiny_llama/budget", "memory_slope/tiny_llama/keep_all",
                   "held_slope/tiny_llama/keep_all"):
        assert m[metric]["ci_low"] <= m[metric]["mean"] <= m[metric]["ci_high"]
    assert m["held_max/tiny_llama/budget"]["unit"] == "MiB" and "held_slope/tiny_llama/budget" not in m


def test_memory_table_keeps_every_boundary_only_without_the_budget(result):
    """The tiny model's boundaries fit the budget, so both modes keep them (no recompute); the held bytes grow
    with the calibration set in both, and equal each other."""
    mem = result.tables["memory"]
    assert set(mem["mode"]) == {"budget", "keep_all"} and sorted(set(mem["texts"])) == [4, 8, 16]
    assert mem["boundaries_kept"].all() and (mem["recomputed_passes"] == 0).all()
    held = mem.pivot(index="texts", columns="mode", values="held_mib")
    assert (held["budget"] == held["keep_all"]).all() and held["budget"].is_monotonic_increasing
    slopes = result.tables["memory_slope"]
    assert list(slopes["mode"]) == ["budget", "keep_all", "keep_all"]
    assert result.metrics["held_max/tiny_llama/budget"]["mean"] == pytest.approx(held["budget"].max())


def test_families_are_declared_once_and_hold_tests_that_can_reject(result):
    tests = result.tables["tests"]
    assert set(tests["family"]) <= set(result.tables["families"]["family"])
    assert not tests["name"].duplicated().any()
    # the language model (one unit per task) is tested per task with the example-level bootstrap, whose
    # floor is 2 / (n_bootstrap + 1): below the Holm threshold of its family
    lm = tests[tests["family"] == "smollm2_tracks_damage"]
    assert lm["min_p"].to_numpy() == pytest.approx(2 / (TINY.n_bootstrap + 1))
    assert 2 / (tv.Params().n_bootstrap + 1) < 0.05 / len(lm)  # at the chapter's resamples, it can reject


def test_every_test_names_its_method_and_scope_and_wins_keep_tasks_apart(result):
    """Tests carry member and scope, so a model tested per task is never credited with a win it had on one
    task only: the key findings name such a method with its task."""
    tests = result.tables["tests"]
    assert set(tests["member"]) == {*TINY.methods, "drop_last"}
    assert set(tests[tests["family"].str.startswith("smollm2")]["scope"]) == set(TINY.tasks)
    assert set(tests[tests["family"].str.startswith("minilm")]["scope"]) <= {"pooled tasks", *TINY.tasks}
    won = stats.wins(tests, "smollm2_vs_random")
    assert set(won) == set(TINY.tasks)
    toy = pd.DataFrame([{"family": "f", "member": m, "scope": t, "p_holm": p, "effect_size": -1.0}
                        for m, t, p in (("a", "x", 0.01), ("a", "y", 0.01), ("b", "x", 0.01), ("b", "y", 0.5))])
    assert tv._beats(toy, "f", "random") == "1 method picks less damaging blocks than random (a) on every task; b only on x"
    pooled = toy.assign(scope="pooled tasks").iloc[[0, 2]]
    assert tv._beats(pooled, "f", "drop_last") == "2 methods pick less damaging blocks than drop_last (a, b)"


def test_random_regret_is_the_mean_of_its_draws_and_the_oracle_has_none(result):
    reg = result.tables["regret"]
    assert (reg["regret"] > -1e-9).all()  # nothing beats the best set measured on the same examples
    assert (result.tables["oracle"]["search"] == "exhaustive").all()  # tiny stacks: every k-set is searched


def test_ablation_prediction_counts_the_evaluations_caching_cannot_avoid():
    # no head: L² blocks naive against L + L(L - 1)/2 cached, i.e. 2L / (L + 1)
    assert tv.ablation_predicted(900.0, 0.0, 30) == pytest.approx(60 / 31)
    # a head worth 7 blocks (b = 1): naive 900 + 31·7, cached 465 + 31·7
    assert tv.ablation_predicted(900.0 + 31 * 7, 7.0, 30) == pytest.approx((900 + 217) / (465 + 217))
    with pytest.raises(LayerwiseError, match="head alone"):
        tv.ablation_predicted(10.0, 1.0, 30)
    # the head's share of a full pass of 30 blocks of b = 1: 7 / (30 + 7), not 7 / the naive run's mean pass
    assert tv.head_share(900.0 + 31 * 7, 7.0, 30) == pytest.approx(7 / 37)


def test_regret_weights_cancel_the_oracle_in_a_difference():
    unit = {"sets": [(0,), (1,), (2,)], "ks": [1],
            "oracle": pd.DataFrame({"k": [1], "row": [0]}),
            "choices": pd.DataFrame({"method": ["a", "random", "random"], "k": [1, 1, 1], "row": [2, 1, 2]})}
    assert tv._weights(unit, "a").tolist() == [-1.0, 0.0, 1.0]
    assert tv._weights(unit, "random").tolist() == [-1.0, 0.5, 0.5]
    assert tv._weights(unit, "a", "random").tolist() == [0.0, -0.5, 0.5]


def test_split_half_reliability_is_high_for_signal_and_low_for_noise():
    rng = np.random.default_rng(0)
    signal = np.arange(6, dtype=float)[:, None] + rng.normal(0, 1, (6, 2000))
    noise = rng.normal(0, 1, (6, 2000))
    units = np.ones(2000)
    assert tv._split_half(signal, units, 50, 0).mean() > 0.95
    assert tv._split_half(noise, units, 50, 0).mean() < 0.5  # no profile: halves do not agree


def test_spearman_statistic_on_rows_equals_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    d = rng.normal(0, 1, (50, 6)) + np.arange(6)
    s = rng.normal(0, 1, 6)
    rows = np.column_stack([d, np.ones(50), np.broadcast_to(s, (50, 6))])
    got = tv._spearman_statistic(6)(rows)
    assert got == pytest.approx(spearmanr(s, d.mean(0)).statistic)
    rec = stats.hierarchical_bootstrap([rows, rows[::-1]], tv._spearman_statistic(6), n_resamples=500)
    assert -1 <= rec["ci_low"] <= rec["ci_high"] <= 1


def test_bad_parameters_fail_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="choose one or more of minilm, smollm2"):
        tv.Params(models=("bert",)).validate()
    with pytest.raises(LayerwiseError, match="methods="):
        tv.Params(methods=("nope",)).validate()
    with pytest.raises(LayerwiseError, match="lm_ks"):
        tv.Params(lm_ks=(2, 4)).validate()
    with pytest.raises(LayerwiseError, match="n_random"):
        tv.Params(n_random=5).validate()

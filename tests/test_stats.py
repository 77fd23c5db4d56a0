"""analysis_kit.stats against independent references: scipy/statsmodels called directly or hand-worked cases."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from analysis_kit import stats as S
from analysis_kit.errors import LayerwiseError

A = np.array([0.81, 0.84, 0.79, 0.86, 0.83])
B = np.array([0.78, 0.80, 0.80, 0.82, 0.79])


# ----------------------------------------------------------------------------------------------- intervals


def test_bootstrap_ci_matches_scipy_bca():
    x = np.random.default_rng(1).normal(0.8, 0.05, size=40)
    est, low, high = S.bootstrap_ci(x, n_resamples=2000, seed=3)
    ref = sps.bootstrap((x,), np.mean, n_resamples=2000, method="BCa", rng=np.random.default_rng(3))
    assert est == pytest.approx(x.mean())
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert low < est < high


def test_bootstrap_ci_is_deterministic_and_seed_dependent():
    x = np.random.default_rng(2).normal(size=30)
    assert S.bootstrap_ci(x, seed=5, n_resamples=1000) == S.bootstrap_ci(x, seed=5, n_resamples=1000)
    assert S.bootstrap_ci(x, seed=5, n_resamples=1000) != S.bootstrap_ci(x, seed=6, n_resamples=1000)


def test_bootstrap_ci_degenerate_cases():
    assert S.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7, 0.7))
    est, low, high = S.bootstrap_ci([0.7])
    assert est == 0.7 and math.isnan(low) and math.isnan(high)
    # n == 2: percentile interval (BCa needs n >= 3); the resample means are 1, 1.5, 2
    est, low, high = S.bootstrap_ci([1.0, 2.0], n_resamples=2000)
    ref = sps.bootstrap((np.array([1.0, 2.0]),), np.mean, n_resamples=2000, method="percentile",
                        rng=np.random.default_rng(0))
    assert (low, high) == pytest.approx(tuple(ref.confidence_interval))


def test_bootstrap_ci_other_statistic():
    x = np.arange(21.0)
    est, low, high = S.bootstrap_ci(x, stat=np.median, n_resamples=1000)
    assert est == 10.0 and low < 10.0 < high


def test_paired_bootstrap_diff_matches_bootstrap_of_differences():
    est, low, high = S.paired_bootstrap_diff(A, B, n_resamples=3000, seed=4)
    ref = sps.bootstrap((A - B,), np.mean, n_resamples=3000, method="BCa", rng=np.random.default_rng(4))
    assert est == pytest.approx((A - B).mean())
    # mean(a*) - mean(b*) on the same resampled pairs is mean((a - b)*): same resamples, same interval
    assert (low, high) == pytest.approx(tuple(ref.confidence_interval))


def test_t_ci_by_hand():
    x = np.array([0.80, 0.82, 0.85])
    mean, low, high = S.t_ci(x)
    half = 4.302652729911275 * x.std(ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    assert (mean, low, high) == pytest.approx((x.mean(), x.mean() - half, x.mean() + half))
    assert S.t_ci([0.5, 0.5, 0.5]) == pytest.approx((0.5, 0.5, 0.5))


def test_summarize_auto_uses_t_for_few_seeds_and_bca_for_examples():
    rec = S.summarize([0.80, 0.82, 0.85], unit="accuracy")
    assert set(rec) == {"mean", "ci_low", "ci_high", "n", "unit", "method"}
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx(S.t_ci([0.80, 0.82, 0.85])[1:])
    assert rec["n"] == 3 and rec["unit"] == "accuracy"
    assert rec["method"] == "Student t 95% CI over 3 seeds (df=2)"
    # the t interval is wider than the bootstrap on 3 seeds (the reason for ci="auto")
    boot = S.summarize([0.80, 0.82, 0.85], ci="bootstrap")
    assert rec["ci_high"] - rec["ci_low"] > boot["ci_high"] - boot["ci_low"]
    assert boot["method"].startswith("BCa bootstrap 95% CI over 3 seeds (10000 resamples")

    x = np.random.default_rng(0).binomial(1, 0.8, size=200).astype(float)
    ex = S.summarize(x, over="examples", n_resamples=2000)
    assert ex["method"] == "BCa bootstrap 95% CI over 200 examples (2000 resamples)"
    assert (ex["ci_low"], ex["ci_high"]) == pytest.approx(S.bootstrap_ci(x, n_resamples=2000)[1:])
    many_seeds = S.summarize(np.linspace(0.7, 0.9, 12), over="seeds", n_resamples=1000)
    assert many_seeds["method"].startswith("BCa")


def test_summarize_small_and_degenerate_is_json_safe():
    one = S.summarize([0.9])
    assert one["ci_low"] is None and one["ci_high"] is None and "no interval" in one["method"]
    two = S.summarize([0.8, 0.9], ci="bootstrap")
    assert two["method"].startswith("percentile bootstrap") and "BCa needs n >= 3" in two["method"]
    same = S.summarize([0.5, 0.5, 0.5])
    assert same["ci_low"] == same["ci_high"] == pytest.approx(0.5) and "zero-width" in same["method"]
    json.dumps([one, two, same], allow_nan=False)


@pytest.mark.parametrize("bad, match", [
    ([0.1, float("nan"), 0.3], "NaN"),
    ([], "at least 1"),
    ([[1.0, 2.0], [3.0, 4.0]], "1-D"),
])
def test_bad_input_raises_layerwise_error(bad, match):
    with pytest.raises(LayerwiseError, match=match):
        S.summarize(bad)


def test_summarize_rejects_unknown_options():
    with pytest.raises(S.StatsError, match="over="):
        S.summarize([1.0, 2.0], over="runs")
    with pytest.raises(S.StatsError, match="ci="):
        S.summarize([1.0, 2.0], ci="wald")
    with pytest.raises(S.StatsError, match="method="):
        S.bootstrap_ci([1.0, 2.0, 3.0], method="studentized")


# --------------------------------------------------------------------------------------------------- tests


def test_paired_ttest_matches_scipy_and_dz_by_hand():
    res = S.paired_ttest(A, B, name="drop vs full")
    ref = sps.ttest_rel(A, B)
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    d = A - B
    assert res.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    # d_z = t / sqrt(n) for the paired t-test
    assert res.effect_size == pytest.approx(ref.statistic / math.sqrt(len(A)))
    assert res.name == "drop vs full" and res.n == 5 and res.effect_name == "Cohen's d_z"
    one_sided = S.paired_ttest(A, B, alternative="greater")
    assert one_sided.p_value == pytest.approx(sps.ttest_rel(A, B, alternative="greater").pvalue)


def test_cohens_dz_hand_worked():
    # differences 1, 2, 3: mean 2, sd 1 → d_z = 2
    assert S.cohens_dz([2, 4, 6], [1, 2, 3]) == pytest.approx(2.0)


def test_paired_tests_reject_constant_differences_and_length_mismatch():
    with pytest.raises(S.DegenerateDataError, match="differences equal"):
        S.paired_ttest([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])  # all differences 0.1 up to float rounding
    same = S.wilcoxon([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same.p_value, same.effect_size) == (1.0, 0.0) and "identical" in same.extras["note"]
    same_t = S.paired_ttest([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same_t.p_value, same_t.statistic) == (1.0, 0.0)
    with pytest.raises(LayerwiseError, match="differ in length"):
        S.paired_ttest([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(LayerwiseError, match="NaN"):
        S.wilcoxon([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])


def test_one_sample_ttest_matches_scipy():
    res = S.one_sample_ttest(A, popmean=0.8, alternative="greater")
    ref = sps.ttest_1samp(A, 0.8, alternative="greater")
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    assert res.effect_size == pytest.approx((A.mean() - 0.8) / A.std(ddof=1))


def test_wilcoxon_matches_scipy_and_rank_biserial_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    b = np.array([0.0, 3.0, 1.0, 5.0, 2.0, 4.5])  # differences 1, -1, 2, -1, 3, 1.5
    res = S.wilcoxon(a, b)
    ref = sps.wilcoxon(a, b)
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    # |d| ranks: 1,1,1 tie → 2 each; 1.5 → 4; 2 → 5; 3 → 6. R+ = 2+5+6+4 = 17, R- = 2+2 = 4, r = 13/21
    assert res.effect_size == pytest.approx(13 / 21)
    assert res.extras["n_nonzero"] == 6


def test_mcnemar_exact_by_binomial():
    # b = 1 (A right, B wrong), c = 6 (A wrong, B right), plus 10 both right and 3 both wrong
    a = np.array([1] * 10 + [1] * 1 + [0] * 6 + [0] * 3, dtype=bool)
    b = np.array([1] * 10 + [0] * 1 + [1] * 6 + [0] * 3, dtype=bool)
    res = S.mcnemar(a, b)
    p_by_hand = min(1.0, 2 * sum(math.comb(7, k) for k in range(0, 2)) / 2**7)  # 2 * P(X <= 1), X ~ Bin(7, 1/2)
    assert p_by_hand == pytest.approx(0.125)
    assert res.p_value == pytest.approx(p_by_hand)
    assert res.extras["b"] == 1 and res.extras["c"] == 6 and res.extras["exact"] is True
    assert res.effect_size == pytest.approx(1 / 6)
    assert res.n == 20


def test_mcnemar_chi2_with_continuity_when_many_discordant():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = rng.random(400) < 0.7
    res = S.mcnemar(a, b)
    nb, nc = int((a & ~b).sum()), int((~a & b).sum())
    assert nb + nc >= 25 and res.extras["exact"] is False
    chi2 = (abs(nb - nc) - 1) ** 2 / (nb + nc)
    assert res.statistic == pytest.approx(chi2)
    assert res.p_value == pytest.approx(sps.chi2.sf(chi2, 1))
    assert res.effect_size == pytest.approx(nb / nc)


def test_mcnemar_haldane_correction_and_validation():
    res = S.mcnemar([1, 1, 1, 0], [0, 1, 1, 0])  # b = 1, c = 0 → (1.5) / (0.5)
    assert res.effect_size == pytest.approx(3.0)
    with pytest.raises(LayerwiseError, match="0/1"):
        S.mcnemar([0, 1, 2], [0, 1, 1])
    with pytest.raises(LayerwiseError, match="same test examples"):
        S.mcnemar([0, 1, 1], [0, 1])


def test_tost_against_two_one_sided_scipy_tests():
    a = np.array([0.800, 0.812, 0.795, 0.808, 0.803, 0.799])
    b = np.array([0.802, 0.809, 0.797, 0.805, 0.806, 0.801])
    res = S.tost_paired(a, b, margin=0.01)
    d = a - b
    p_low = sps.ttest_1samp(d, -0.01, alternative="greater").pvalue
    p_up = sps.ttest_1samp(d, 0.01, alternative="less").pvalue
    assert res.p_value == pytest.approx(max(p_low, p_up))
    assert res.p_value < 0.05  # within ±0.01 for these numbers
    binding = sps.ttest_1samp(d, -0.01) if p_low >= p_up else sps.ttest_1samp(d, 0.01)
    assert res.statistic == pytest.approx(binding.statistic)
    far = S.tost_paired(a + 0.02, b, margin=0.01)
    assert far.p_value > 0.5
    with pytest.raises(LayerwiseError, match="margin"):
        S.tost_paired(a, b, margin=0)


def test_anova_matches_scipy():
    g = ([0.80, 0.82, 0.81], [0.85, 0.86, 0.84], [0.79, 0.80, 0.83])
    res = S.anova_oneway(*g)
    ref = sps.f_oneway(*g)
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    allv = np.concatenate(g)
    ss_between = sum(len(x) * (np.mean(x) - allv.mean()) ** 2 for x in g)
    assert res.effect_size == pytest.approx(ss_between / ((allv - allv.mean()) ** 2).sum())
    with pytest.raises(LayerwiseError, match="at least 2"):
        S.anova_oneway([1.0, 2.0])
    with pytest.raises(S.DegenerateDataError):
        S.anova_oneway([1.0, 1.0], [2.0, 2.0])


def test_holm_by_hand_and_family():
    # sorted: 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 → monotone max → 0.06; back in input order
    assert S.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert S.holm([]).size == 0
    with pytest.raises(LayerwiseError, match=r"\[0, 1\]"):
        S.holm([0.2, 1.5])
    tests = [S.paired_ttest(A, B, name="t"), S.wilcoxon(A, B, name="w")]
    fam = S.holm_family(tests)
    assert [t.p_holm for t in fam] == pytest.approx(list(S.holm([t.p_value for t in tests])))
    assert tests[0].p_holm is None  # originals untouched
    rec = fam[0].as_dict()
    assert {"name", "statistic", "p_value", "p_holm", "effect_size"} <= set(rec)
    assert rec["p_holm"] == pytest.approx(fam[0].p_holm) and rec["mean_diff"] == pytest.approx((A - B).mean())
    json.dumps([t.as_dict() for t in fam], allow_nan=False)


# ---------------------------------------------------------------------------------- rank agreement, P(A>B)


def test_kendall_and_spearman_ci():
    x = np.arange(10.0)
    y = np.array([0, 2, 1, 3, 5, 4, 6, 8, 7, 9.0])
    tau, low, high, p = S.kendall_ci(x, y, n_resamples=500)
    ref = sps.kendalltau(x, y)
    assert (tau, p) == pytest.approx((ref.statistic, ref.pvalue))
    assert low <= tau <= high <= 1.0 and low > 0
    rho, low, high, p = S.spearman_ci(x, y, n_resamples=500)
    ref = sps.spearmanr(x, y)
    assert (rho, p) == pytest.approx((ref.statistic, ref.pvalue))
    assert low <= rho <= high <= 1.0


@pytest.mark.parametrize("fn, ref", [(S.spearman_ci, sps.spearmanr), (S.kendall_ci, sps.kendalltau)])
def test_rank_ci_matches_a_loop_over_scipy(fn, ref):
    # 4 items: ~1.6% of resamples repeat one item only (correlation undefined); they must be dropped, not zeroed
    x, y = np.array([0.1, 0.4, 0.2, 0.9]), np.array([0.2, 0.3, 0.2, 0.7])  # a tie in y: tau-b, not tau-a
    _, low, high, _ = fn(x, y, n_resamples=1000, seed=7)
    idx = np.random.default_rng(7).integers(0, 4, size=(1000, 4))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = np.array([ref(x[i], y[i]).statistic for i in idx])
    assert (~np.isfinite(boot)).sum() > 5
    boot = boot[np.isfinite(boot)]
    assert (low, high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))


@pytest.mark.parametrize("fn", [S.kendall_ci, S.spearman_ci])
def test_rank_ci_drops_undefined_resamples(fn):
    # y is a monotone copy of x with ties: every resample with a defined correlation gives exactly 1; ~8% of
    # resamples draw only the tied items (undefined) and must not enter the interval as 0 or NaN
    x = np.array([1.0, 1.0, 1.0, 2.0, 3.0])
    assert fn(x, 10 * x, n_resamples=1000) == pytest.approx((1.0, 1.0, 1.0, fn(x, 10 * x)[3]))


def test_rank_correlation_guards():
    with pytest.raises(S.DegenerateDataError, match="constant"):
        S.kendall_ci([1, 1, 1, 1], [1, 2, 3, 4])
    with pytest.raises(LayerwiseError, match="at least 3"):
        S.spearman_ci([1, 2], [2, 1])


def test_kendalls_w_concordant_and_against_friedman():
    w = S.kendalls_w([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    assert w.effect_size == pytest.approx(1.0)
    assert w.statistic == pytest.approx(3 * 3 * 1.0)  # chi2 = m (n - 1) W
    reversed_ = S.kendalls_w([[1, 2, 3, 4], [4, 3, 2, 1]])
    assert reversed_.effect_size == pytest.approx(0.0)
    # with ties: W = Friedman chi2 / (m (n - 1)), raters are Friedman's blocks, items its treatments
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.3], [0.2, 0.4, 0.6, 0.8, 0.1], [0.3, 0.3, 0.7, 0.9, 0.2]])
    res = S.kendalls_w(scores)
    fr = sps.friedmanchisquare(*scores.T)
    assert res.statistic == pytest.approx(fr.statistic)
    assert res.p_value == pytest.approx(fr.pvalue)
    assert res.effect_size == pytest.approx(fr.statistic / (3 * 4))
    with pytest.raises(S.DegenerateDataError):
        S.kendalls_w([[1, 1, 1], [2, 2, 2]])


def test_prob_improvement_constructed():
    a = [0.90, 0.85, 0.80, 0.70]
    b = [0.80, 0.85, 0.85, 0.60]  # A wins seeds 0 and 3, ties seed 1, loses seed 2 → (1 + 0.5 + 0 + 1) / 4
    est, low, high = S.prob_improvement(a, b, n_resamples=2000)
    assert est == pytest.approx(0.625)
    assert 0.0 <= low <= est <= high <= 1.0
    # all-pairs (rliable) form = Mann-Whitney U / (n m)
    est_u, *_ = S.prob_improvement(a, b, paired=False, n_resamples=500)
    u = sps.mannwhitneyu(a, b).statistic
    assert est_u == pytest.approx(u / 16)
    brute = np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b])
    assert est_u == pytest.approx(brute)
    assert S.prob_improvement([2, 3, 4], [1, 2, 3]) == pytest.approx((1.0, 1.0, 1.0))


def test_prob_improvement_symmetry():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=8), rng.normal(size=8)
    assert S.prob_improvement(a, b)[0] + S.prob_improvement(b, a)[0] == pytest.approx(1.0)
    assert S.prob_improvement(a, b, paired=False)[0] + S.prob_improvement(b, a, paired=False)[0] == pytest.approx(1.0)


def test_summarize_clips_to_bounds():
    wide = S.summarize([0.2, 0.99], unit="fraction", over="seeds")
    assert wide["ci_high"] > 1
    clipped = S.summarize([0.2, 0.99], unit="fraction", over="seeds", bounds=(0, 1))
    assert clipped["ci_high"] == 1 and clipped["ci_low"] == 0 and "clipped" in clipped["method"]
    inside = S.summarize([0.5, 0.52, 0.51], over="seeds", bounds=(0, 1))
    assert "clipped" not in inside["method"]


def test_ratio_summary_is_a_geometric_mean_with_a_log_t_interval():
    ratios = np.array([2.0, 2.2, 1.9, 2.1, 2.05])
    rec = S.ratio_summary(ratios)
    logs = np.log(ratios)
    half = sps.t.ppf(0.975, len(ratios) - 1) * sps.sem(logs)
    assert rec["mean"] == pytest.approx(np.exp(logs.mean()))
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx((np.exp(logs.mean() - half), np.exp(logs.mean() + half)))
    assert rec["n"] == 5 and "log ratios" in rec["method"]
    single = S.ratio_summary([2.0])
    assert single["ci_low"] is None and "no interval" in single["method"]
    with pytest.raises(S.StatsError, match="positive"):
        S.ratio_summary([1.0, -1.0])


@pytest.mark.parametrize("low, high, target, better, expected", [
    (1.9, 2.1, 1.8, "higher", "met"),
    (1.7, 1.9, 1.8, "higher", "not decided"),
    (1.5, 1.7, 1.8, "higher", "missed"),
    (2.0, 2.5, 3.0, "lower", "met"),
    (2.8, 3.2, 3.0, "lower", "not decided"),
    (3.1, 3.5, 3.0, "lower", "missed"),
    (None, None, 1.0, "higher", "not decided"),
])
def test_verdict_comes_from_the_interval_not_the_point(low, high, target, better, expected):
    """Issue 13.10: a point at 1.85 with an interval 1.7-1.9 is not 'met' (the old rule flipped on noise)."""
    rec = {"mean": 1.85, "ci_low": low, "ci_high": high}
    assert S.verdict(rec, target, better) == expected


def test_interval_side_is_strict_at_zero():
    from analysis_kit.stats import interval_side

    assert interval_side(0.1, 2.0) == 1 and interval_side(-2.0, -0.1) == -1
    assert interval_side(0.0, 2.0) == 0 and interval_side(-2.0, 0.0) == 0 and interval_side(-1.0, 1.0) == 0


def test_slope_interval_matches_scipy_and_refuses_one_size():
    x, y = np.array([1.0, 2.0, 4.0, 8.0]), np.array([10.0, 12.5, 17.0, 27.0])
    rec = S.slope_interval(x, y)
    fit = sps.linregress(x, y)
    half = sps.t.ppf(0.975, 2) * fit.stderr
    assert rec["mean"] == pytest.approx(fit.slope) and rec["n"] == 4
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx((fit.slope - half, fit.slope + half))
    with pytest.raises(S.DegenerateDataError, match="two different sizes"):
        S.slope_interval([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(S.StatsError):
        S.slope_interval([1.0, 2.0], [1.0, 2.0])


def test_wins_lists_per_scope_the_members_that_reject_with_a_negative_effect():
    rows = [{"family": "f", "member": "a", "scope": "x", "p_holm": 0.01, "effect_size": -0.4},
            {"family": "f", "member": "b", "scope": "x", "p_holm": 0.01, "effect_size": 0.4},  # worse: no win
            {"family": "f", "member": "a", "scope": "y", "p_holm": 0.2, "effect_size": -0.4},  # not significant
            {"family": "g", "member": "c", "scope": "x", "p_holm": 0.001, "effect_size": -1.0}]
    assert S.wins(rows, "f") == {"x": ["a"], "y": []}
    assert S.wins(rows, "f", alpha=0.5) == {"x": ["a"], "y": ["a"]}
    with pytest.raises(S.StatsError, match="member/scope"):
        S.wins([{"family": "f", "name": "old", "p_holm": 0.01, "effect_size": -1}], "f")

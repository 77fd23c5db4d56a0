"""The hierarchical statistics engine of analysis_kit.stats: coverage on synthetic data, and references.

References are independent: sklearn's macro-F1, scipy's exact binomial test, statsmodels' Holm and the
Wilson interval, and simulated data sets whose true value is known (for coverage and error rates).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import f1_score

from analysis_kit import stats as S
from analysis_kit.errors import LayerwiseError


def _seeds(rng: np.random.Generator, n_seeds: int, sd: float, n: int = 400, mean: float = 0.85) -> list[np.ndarray]:
    """Correctness vectors of ``n_seeds`` trained models: true accuracy ~ N(mean, sd), n test examples each."""
    p = np.clip(rng.normal(mean, sd, n_seeds), 0, 1)
    return [rng.random(n) < pi for pi in p]


def _shared_errors(rng: np.random.Generator, diff: float, n_seeds: int = 5, n: int = 400):
    """Two classifiers that err on many of the same examples: B is A with some right answers lost."""
    a, b = [], []
    for _ in range(n_seeds):
        pa = float(np.clip(rng.normal(0.85, 0.02), 0, 1))
        x = rng.random(n) < pa
        a.append(x)
        b.append(x & (rng.random(n) < (pa - diff) / pa))
    return a, b


# ------------------------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(("n_seeds", "sd", "lo", "hi"), [
    (5, 0.02, 0.90, 0.98),   # the protocol's design: 5 seeds, seeds differ by about 2 points
    (10, 0.02, 0.90, 0.98),
    (5, 0.05, 0.90, 0.98),   # seeds differ a lot: the plain two-stage percentile interval covers ~86%
    (5, 0.0, 0.90, 0.99),    # test-set noise only: conservative by design (floor), ~97.5%, not ~99.5%
])
def test_hierarchical_coverage(n_seeds: int, sd: float, lo: float, hi: float):
    """95% intervals cover the population mean accuracy 0.85 near 95% of the time (500 data sets each)."""
    rng = np.random.default_rng(2024)
    hits = 0
    n_sets = 500
    for i in range(n_sets):
        rec = S.accuracy_ci(_seeds(rng, n_seeds, sd), n_resamples=1000, seed=i)
        assert rec["ci_low"] < rec["ci_high"]
        hits += rec["ci_low"] <= 0.85 <= rec["ci_high"]
    assert lo <= hits / n_sets <= hi


def test_record_shape_and_method_sentence():
    groups = _seeds(np.random.default_rng(0), 5, 0.02, n=442)
    rec = S.accuracy_ci(groups)
    assert set(rec) == {"mean", "ci_low", "ci_high", "n", "n_examples", "unit", "method"}
    assert rec["mean"] == pytest.approx(np.mean([g.mean() for g in groups]))
    assert (rec["n"], rec["n_examples"], rec["unit"]) == (5, 2210, "fraction")
    assert rec["method"].startswith("hierarchical bootstrap 95% CI of accuracy (seeds, then test examples within "
                                    "a seed; 5 seeds, 2,210 examples, 10000 resamples)")
    assert rec["ci_low"] < rec["mean"] < rec["ci_high"]
    json.dumps(rec, allow_nan=False)


def test_never_zero_width_when_rows_vary():
    """Seeds with exactly equal accuracy still get the test set's sampling error (about the pooled Wilson width)."""
    rng = np.random.default_rng(1)
    groups = [rng.permutation(np.arange(400) < 340) for _ in range(5)]  # every seed: 85.0% exactly
    rec = S.accuracy_ci(groups)
    low, high = S.proportion_ci(5 * 340, 5 * 400)
    assert rec["ci_low"] < 0.85 < rec["ci_high"]
    assert rec["ci_high"] - rec["ci_low"] == pytest.approx(high - low, rel=0.15)
    assert "test-set sampling error" in rec["method"]
    # rows that do not vary are the one case where the engine itself gives a zero-width interval, and the
    # record says so; accuracy_ci then widens it to the Wilson interval (see the test below)
    flat = S.hierarchical_bootstrap([np.ones(50)] * 5)
    assert flat["ci_low"] == flat["ci_high"] == 1.0 and "zero-width" in flat["method"]


def test_bounded_metric_stays_inside_bounds_without_clipping():
    rng = np.random.default_rng(3)
    groups = [rng.random(150) < p for p in (0.99, 1.0, 0.995, 0.98, 1.0)]
    groups[1][:] = True
    rec = S.accuracy_ci(groups)
    assert 0.0 <= rec["ci_low"] < rec["mean"] < rec["ci_high"] <= 1.0
    assert rec["ci_high"] - rec["mean"] < rec["mean"] - rec["ci_low"]  # skewed by the bound, as replicates are
    assert "clip" not in rec["method"]


def test_single_seed_is_the_example_level_bootstrap():
    x = np.random.default_rng(4).random(400) < 0.8
    rec = S.accuracy_ci([x])
    wilson = S.proportion_ci(int(x.sum()), x.size)
    assert rec["n"] == 1 and rec["method"].startswith("example-level bootstrap 95% CI of accuracy (single seed")
    assert (rec["ci_low"], rec["ci_high"]) == pytest.approx(wilson, abs=0.006)


def test_fewer_than_five_seeds_are_flagged():
    rec = S.accuracy_ci(_seeds(np.random.default_rng(5), 2, 0.02))
    assert "below the evidence protocol's minimum" in rec["method"]
    assert rec["ci_low"] < rec["mean"] < rec["ci_high"]


def test_deterministic_for_a_seed():
    groups = _seeds(np.random.default_rng(6), 5, 0.02)
    assert S.accuracy_ci(groups, seed=3, n_resamples=2000) == S.accuracy_ci(groups, seed=3, n_resamples=2000)
    assert S.accuracy_ci(groups, seed=3, n_resamples=2000) != S.accuracy_ci(groups, seed=4, n_resamples=2000)


def test_generic_statistic_agrees_with_fast_paths():
    """A plain callable takes the loop path; it must estimate the same interval as the vectorised np.mean."""
    rng = np.random.default_rng(7)
    groups = _seeds(rng, 5, 0.02)
    fast = S.hierarchical_bootstrap(groups, np.mean, n_resamples=2000)
    slow = S.hierarchical_bootstrap(groups, lambda rows: float(np.mean(rows)), n_resamples=2000)
    assert slow["mean"] == fast["mean"]
    assert (slow["ci_low"], slow["ci_high"]) == pytest.approx((fast["ci_low"], fast["ci_high"]), abs=0.004)
    scores = [rng.normal(0.5, 0.1, 300) for _ in range(5)]  # continuous values: index-matrix path
    cont = S.hierarchical_bootstrap(scores, what="mean score", unit="score", n_resamples=2000)
    loop = S.hierarchical_bootstrap(scores, lambda rows: float(rows.mean()), what="mean score", n_resamples=2000)
    assert (cont["ci_low"], cont["ci_high"]) == pytest.approx((loop["ci_low"], loop["ci_high"]), abs=0.004)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_macro_f1_matches_sklearn(n_classes: int):
    rng = np.random.default_rng(n_classes)
    labels = [rng.integers(0, n_classes, 300) for _ in range(4)]
    preds = [np.where(rng.random(300) < 0.6, y, rng.integers(0, n_classes, 300)) for y in labels]
    if n_classes == 5:  # class 4 absent from labels and predictions of seed 0; class 3 never predicted in seed 1
        labels[0][labels[0] == 4], preds[0][preds[0] == 4] = 0, 1
        preds[1][preds[1] == 3] = 2
    rec = S.macro_f1_ci(labels, preds, n_classes, n_resamples=500)
    ref = [f1_score(y, p, average="macro", zero_division=0) for y, p in zip(labels, preds, strict=True)]
    assert rec["mean"] == pytest.approx(np.mean(ref), abs=1e-12)
    assert rec["ci_low"] < rec["mean"] < rec["ci_high"] and "macro-F1" in rec["method"]


def test_retention_is_per_seed_ratio_on_the_same_rows():
    rng = np.random.default_rng(8)
    full = _seeds(rng, 5, 0.02)
    comp = [f & (rng.random(f.size) < 0.9) for f in full]
    rec = S.retention_ci(full, comp, n_resamples=2000)
    assert rec["mean"] == pytest.approx(np.mean([c.mean() / f.mean() for f, c in zip(full, comp, strict=True)]))
    assert rec["unit"] == "ratio" and rec["ci_low"] < rec["mean"] < rec["ci_high"] <= 1.0
    with pytest.raises(S.StatsError, match="failed training"):
        S.retention_ci([np.zeros(10, bool)], [np.zeros(10, bool)])


@pytest.mark.parametrize(("groups", "match"), [
    ([], "empty"),
    ([np.array([True, False]), np.array([], bool)], r"groups\[1\] is empty"),
    ([np.array([0.5, np.nan])], "NaN"),
    (np.array([0.5, 0.6]), "single number"),
    ([np.zeros((3, 2)), np.zeros(3)], "same columns"),
])
def test_bad_groups_raise(groups, match):
    with pytest.raises(S.StatsError, match=match) as info:
        S.hierarchical_bootstrap(groups)
    assert isinstance(info.value, LayerwiseError)


def test_wrapper_input_errors():
    with pytest.raises(S.StatsError, match="one correctness vector per seed"):
        S.accuracy_ci(np.array([True, False, True]))
    with pytest.raises(S.StatsError, match="outside"):
        S.macro_f1_ci([np.array([0, 3])], [np.array([0, 1])], 3)
    with pytest.raises(S.StatsError, match="same test examples"):
        S.paired_difference([np.ones(5, bool)], [np.ones(6, bool)], name="x")


def test_proportion_ci_is_wilson():
    low, high = S.proportion_ci(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.16113, abs=1e-4)  # Wilson, by hand
    with pytest.raises(S.StatsError):
        S.proportion_ci(5, 4)


# ------------------------------------------------------------------------------ two classifiers, paired


def test_paired_difference_detects_five_points():
    a, b = _shared_errors(np.random.default_rng(9), 0.05)
    res = S.paired_difference(a, b, name="A vs B")
    assert res["diff_points"] == pytest.approx(100 * np.mean([x.mean() - y.mean() for x, y in zip(a, b, strict=True)]))
    assert 3 < res["diff_points"] < 7 and res["ci_low"] > 0 and res["p_value"] < 0.05
    assert res["min_p"] <= res["p_value"] and res["prob_improvement"] > 0.5 and res["n"] == 5
    assert 0 < res["mde_points"] < res["diff_points"]
    t = res["test"]
    assert (t.effect_size, t.p_value, t.effect_name) == (res["diff_points"], res["p_value"],
                                                         "accuracy difference (points)")
    assert {"min_p", "prob_improvement", "ci_low", "ci_high", "mde_points"} <= t.extras.keys()
    json.dumps(t.as_dict(), allow_nan=False)


def test_paired_difference_rarely_rejects_under_the_null():
    """A and B drawn from the same distribution: at most ~5% of 100 data sets may reject at 0.05."""
    rng = np.random.default_rng(10)
    rejections = 0
    for i in range(100):
        p = np.clip(rng.normal(0.85, 0.02, 5), 0, 1)
        a = [rng.random(400) < pi for pi in p]
        b = [rng.random(400) < pi for pi in p]
        res = S.paired_difference(a, b, name="null", n_resamples=1000, seed=i)
        rejections += res["p_value"] < 0.05
        assert (res["ci_low"] <= 0 <= res["ci_high"]) or res["p_value"] < 0.1  # p and interval agree
    assert rejections <= 10


def test_paired_difference_single_seed_p_is_plain_bootstrap():
    a, b = _shared_errors(np.random.default_rng(11), 0.01, n_seeds=1)
    res = S.paired_difference(a, b, name="one seed", n_resamples=999)
    assert res["min_p"] == pytest.approx(2 / 1000)
    assert res["p_value"] == pytest.approx(res["min_p"]) or res["p_value"] > res["min_p"]


def test_paired_difference_identical_inputs_one_rule():
    a = _seeds(np.random.default_rng(12), 5, 0.02)
    res = S.paired_difference(a, [x.copy() for x in a], name="same")
    assert (res["diff_points"], res["ci_low"], res["ci_high"], res["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert "note" in res["test"].extras and res["test"].effect_size == 0.0
    json.dumps({k: v for k, v in res.items() if k != "test"}, allow_nan=False)
    json.dumps(res["test"].as_dict(), allow_nan=False)


def test_stratified_mcnemar_matches_binomtest_on_pooled_counts():
    rng = np.random.default_rng(13)
    a = [rng.random(n) < 0.8 for n in (200, 250, 300)]
    b = [np.where(rng.random(x.size) < 0.9, x, ~x) for x in a]
    res = S.stratified_mcnemar(a, b, "A vs B")
    bb = sum(int((x & ~y).sum()) for x, y in zip(a, b, strict=True))
    cc = sum(int((~x & y).sum()) for x, y in zip(a, b, strict=True))
    assert res.p_value == pytest.approx(sps.binomtest(bb, bb + cc, 0.5).pvalue)
    assert res.statistic == pytest.approx((bb - cc) ** 2 / (bb + cc))
    assert res.effect_size == pytest.approx(100 * (np.concatenate(a).mean() - np.concatenate(b).mean()))
    assert res.extras["discordant"] == bb + cc and res.extras["n_seeds"] == 3
    assert res.extras["min_p"] == pytest.approx(min(1.0, 2 * 0.5 ** (bb + cc)))
    none = S.stratified_mcnemar(a, a, "same")
    assert none.p_value == 1.0 and "note" in none.extras
    few = S.stratified_mcnemar([np.array([1, 1, 0, 1])], [np.array([0, 0, 0, 1])], "two discordant")
    assert few.extras["min_p"] == 0.5 and S.min_attainable_p(few) == 0.5


# ------------------------------------------------------------------------------------------ test families


def _t(name: str, p: float, **extras) -> S.TestResult:
    return S.TestResult(name, 1.0, p, 0.1, "effect", 5, extras=dict(extras))


def test_families_holm_within_each_family():
    fam = S.TestFamilies({"healing": "does healing recover accuracy?", "latency": "is the pruned model faster?"})
    ps = {"h1": 0.01, "h2": 0.04, "h3": 0.03, "l1": 0.04, "l2": 0.2}
    for name, p in ps.items():
        fam.add("healing" if name.startswith("h") else "latency", _t(name, p))
    out = {t.name: t for t in fam.results()}
    ref_h = S.holm([0.01, 0.04, 0.03])
    ref_l = S.holm([0.04, 0.2])
    assert [out[n].p_holm for n in ("h1", "h2", "h3")] == pytest.approx(ref_h)
    assert [out[n].p_holm for n in ("l1", "l2")] == pytest.approx(ref_l)
    assert out["l1"].p_holm == pytest.approx(0.08)  # not the 0.2 it would be in one family of five
    assert out["h1"].extras["family"] == "healing" and out["l2"].extras["family"] == "latency"
    table = fam.table()
    assert list(table.columns[:9]) == ["family", "name", "statistic", "p_value", "p_holm", "min_p", "effect_size",
                                       "effect_name", "n"]
    assert len(table) == 5
    declared = fam.declared()
    assert declared.to_dict("records") == [
        {"family": "healing", "question": "does healing recover accuracy?", "tests": 3},
        {"family": "latency", "question": "is the pruned model faster?", "tests": 2}]
    assert S.TestFamilies({"empty": "a family with no test filed yet?"}).declared()["tests"].tolist() == [0]


def test_holm_adjust_matches_statsmodels():
    rng = np.random.default_rng(14)
    for m in (1, 2, 7, 20):
        p = rng.random(m) ** 3
        p[: m // 3] = p[0]  # ties
        assert S._holm_adjust(p) == pytest.approx(S.holm(p), abs=1e-15)


def test_families_refuse_unknown_family_and_duplicate_names():
    fam = S.TestFamilies({"a": "question a", "b": "question b"})
    with pytest.raises(S.StatsError, match=r"declared: \['a', 'b'\]"):
        fam.add("c", _t("x", 0.5))
    fam.add("a", _t("x", 0.5))
    with pytest.raises(S.StatsError, match="already in family 'a'"):
        fam.add("a", _t("x", 0.4))
    with pytest.raises(S.StatsError, match="already in family 'a'"):
        fam.add("b", _t("x", 0.4))
    with pytest.raises(S.StatsError, match="p_value"):
        fam.add("b", _t("y", float("nan")))
    with pytest.raises(S.StatsError):
        S.TestFamilies({})


def test_can_reject_lists_tests_whose_floor_is_above_alpha():
    fam = S.TestFamilies({"f": "question"})
    fam.add("f", S.wilcoxon([0.8, 0.82, 0.85], [0.7, 0.75, 0.8], name="wilcoxon, 3 seeds"))  # floor 2/2**3
    fam.add("f", _t("engine test", 0.01, min_p=0.0002))
    fam.add("f", S.paired_ttest([0.8, 0.82, 0.85], [0.7, 0.75, 0.79], name="t-test"))  # no floor: None
    blocked = fam.can_reject(0.05)
    assert blocked["name"].tolist() == ["wilcoxon, 3 seeds"]
    assert blocked["min_p"].tolist() == [0.25]
    assert S.min_attainable_p(fam.results()[2]) is None


def test_accuracy_interval_has_width_even_when_every_example_is_right():
    """442 of 442 correct on each seed still leaves test-set sampling error: the Wilson floor shows it."""
    rec = S.accuracy_ci([np.ones(442, bool)] * 5, n_resamples=500)
    assert rec["mean"] == 1.0 and rec["ci_high"] == 1.0
    assert 0.99 < rec["ci_low"] < 1.0
    assert "Wilson" in rec["method"]


def test_of_means_fast_path_equals_the_plain_statistic_and_bootstrap_test_agrees_with_its_interval():
    rng = np.random.default_rng(0)
    groups = [np.column_stack([rng.normal(0.3, 1, 200), rng.integers(1, 5, 200)]) for _ in range(5)]
    ratio = S.OfMeans(lambda m: m[..., 0] / m[..., 1])
    assert ratio(groups[0]) == pytest.approx(groups[0][:, 0].sum() / groups[0][:, 1].sum())
    fast = S.hierarchical_bootstrap(groups, ratio, n_resamples=2000, seed=1)
    slow = S.hierarchical_bootstrap(groups, lambda r: float(r[:, 0].sum() / r[:, 1].sum()), n_resamples=2000,
                                        seed=1)
    assert fast["mean"] == pytest.approx(slow["mean"])
    assert fast["ci_low"] == pytest.approx(slow["ci_low"], abs=0.03)
    rec, test = S.bootstrap_test(groups, ratio, name="ratio = 0", n_resamples=2000)
    assert (test.p_value < 0.05) == (rec["ci_low"] > 0 or rec["ci_high"] < 0)
    assert 0 < test.extras["min_p"] <= test.p_value

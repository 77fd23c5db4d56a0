"""Intervals, paired tests, multiple-comparison correction and effect sizes for the book's results.

Every number the book reports comes with an interval and, where two settings are compared, a paired
test with an effect size. The heavy lifting is scipy / statsmodels; this module fixes the conventions
(which interval for how many seeds, which effect size goes with which test, how degenerate data is
handled) and returns records shaped like ``summary.json`` entries.

Conventions:

- Intervals are two-sided, 95% unless ``confidence`` says otherwise.
- ``summarize(..., ci="auto")`` uses a Student t interval for fewer than 10 seeds and a BCa bootstrap
  otherwise. With 3-5 seeds a bootstrap interval is far too narrow: resampling three values gives only
  ten distinct resamples, the interval can never leave [min, max] of the sample, and it ignores the
  extra uncertainty of estimating the spread from so few values (t_{0.975, 2} = 4.30, not 1.96).
  The t interval accounts for both. Over test examples (hundreds of values) BCa is the better choice.
- Inputs with NaN, mismatched lengths or too few values raise ``StatsError``. Data on which a statistic
  is undefined (e.g. zero variance of paired differences) raises ``DegenerateDataError`` so a notebook
  can catch exactly that case and say so, instead of printing p = 0 or p = nan.

The evidence protocol's engine (the end of this module) works on per-example rows, not per-seed numbers:

- ``hierarchical_bootstrap`` (and ``accuracy_ci``, ``macro_f1_ci``, ``retention_ci``): intervals that
  resample seeds, then test examples within a seed, so a finite test set's sampling error is always in
  the interval; percentile intervals, so bounded metrics stay inside their bounds without clipping.
- ``paired_difference`` and ``stratified_mcnemar``: two classifiers on the same test examples.
- ``TestFamilies``: test families declared once per chapter, Holm within each, and a list of the tests
  that cannot reject at their n (``min_attainable_p``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import ttost_paired

from .errors import LayerwiseError

Alternative = Literal["two-sided", "less", "greater"]
_ALTERNATIVES = ("two-sided", "less", "greater")
_METHODS = {"bca": "BCa", "percentile": "percentile", "basic": "basic"}
T_CI_BELOW = 10  # ci="auto": Student t interval over fewer seeds than this, BCa bootstrap otherwise.


class StatsError(LayerwiseError):
    """Bad input to a statistics function (NaN, wrong shape, mismatched lengths, too few values)."""


class DegenerateDataError(StatsError):
    """The statistic is undefined on this data (e.g. all paired differences equal)."""


# ----------------------------------------------------------------------------------------- input checks


def _vector(values: Any, name: str = "values", min_n: int = 1) -> np.ndarray:
    """Return ``values`` as a finite 1-D float array, or raise a ``StatsError`` saying what is wrong."""
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise StatsError(f"{name} must be numbers (one per seed or example); got {type(values).__name__}: {exc}") from exc
    if x.ndim == 0:
        x = x.reshape(1)
    if x.ndim != 1:
        raise StatsError(f"{name} must be 1-D (one value per seed or example); got shape {x.shape}. Flatten or "
                         "aggregate first.")
    if x.size < min_n:
        raise StatsError(f"{name} has {x.size} value(s); this needs at least {min_n}. Run more seeds or examples.")
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise StatsError(f"{name} contains {bad} NaN/inf value(s) out of {x.size}; drop or re-run the failed "
                         "seeds/examples before computing statistics.")
    return x


def _pair(a: Any, b: Any, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Two aligned vectors (same seed/example at the same position)."""
    x, y = _vector(a, "a", min_n), _vector(b, "b", min_n)
    if x.size != y.size:
        raise StatsError(f"paired inputs differ in length: a has {x.size} values, b has {y.size}. Pass one value "
                         "per seed (or example) for both, in the same order.")
    return x, y


def _alternative(alternative: str) -> str:
    if alternative not in _ALTERNATIVES:
        raise StatsError(f"alternative={alternative!r} is not one of {_ALTERNATIVES}.")
    return alternative


def _confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise StatsError(f"confidence={confidence!r} must be strictly between 0 and 1, e.g. 0.95.")
    return float(confidence)


def _all_equal(x: np.ndarray) -> bool:
    """True when all values are equal up to float rounding (e.g. 0.9 - 0.8 vs 0.3 - 0.2)."""
    return bool(np.allclose(x, x[0], rtol=1e-9, atol=1e-12))


def _jsonable(v: Any) -> Any:
    """Python scalars for JSON: numpy numbers → float/int, NaN → None."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return v


# ------------------------------------------------------------------------------------------- intervals


def _bootstrap(data: tuple[np.ndarray, ...], statistic: Callable, *, paired: bool, confidence: float,
               n_resamples: int, seed: int, method: str) -> tuple[float, float, float, str]:
    """scipy.stats.bootstrap with the book's fallbacks. Returns (estimate, low, high, method used).

    n == 1 → no interval (NaN); BCa with n < 3, or a BCa result that is NaN (degenerate bootstrap
    distribution, e.g. all values equal), falls back to the percentile interval.
    """
    confidence = _confidence(confidence)
    key = str(method).lower()
    if key not in _METHODS:
        raise StatsError(f"method={method!r} is not one of {sorted(_METHODS.values())}.")
    if n_resamples < 100:
        raise StatsError(f"n_resamples={n_resamples} is too few for a stable interval; use at least 1000.")
    estimate = float(statistic(*data))
    n = min(d.size for d in data)
    if n < 2:
        return estimate, math.nan, math.nan, "none"
    chosen = _METHODS[key]
    if chosen == "BCa" and n < 3:
        chosen = "percentile"

    def run(m: str) -> tuple[float, float]:
        with warnings.catch_warnings():
            # scipy warns (and returns NaN) when BCa is undefined; we detect the NaN and fall back below.
            warnings.simplefilter("ignore", sps.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            res = sps.bootstrap(data, statistic, n_resamples=n_resamples, paired=paired,
                                confidence_level=confidence, method=m, rng=np.random.default_rng(seed))
        return float(res.confidence_interval.low), float(res.confidence_interval.high)

    low, high = run(chosen)
    if chosen == "BCa" and not (np.isfinite(low) and np.isfinite(high)):
        chosen = "percentile"
        low, high = run(chosen)
    return estimate, low, high, chosen


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable = np.mean, confidence: float = 0.95,
                 n_resamples: int = 10_000, seed: int = 0, method: str = "BCa") -> tuple[float, float, float]:
    """Bootstrap confidence interval for ``stat(values)``: ``(estimate, low, high)``.

    Uses ``scipy.stats.bootstrap`` (BCa by default, seeded, so the same inputs give the same interval).
    Falls back to the percentile interval when BCa is degenerate (NaN) or n < 3; all-equal values give
    the zero-width interval ``(v, v, v)`` and a single value gives ``(v, nan, nan)``.
    ``stat`` should accept ``axis=`` (numpy reducers do) for speed; scipy loops otherwise.
    """
    x = _vector(values)
    if x.size > 1 and _all_equal(x):
        v = float(stat(x))
        return v, v, v
    est, low, high, _ = _bootstrap((x,), stat, paired=False, confidence=confidence, n_resamples=n_resamples,
                                   seed=seed, method=method)
    return est, low, high


def paired_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, stat: Callable = np.mean,
                          confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                          method: str = "BCa") -> tuple[float, float, float]:
    """Interval for ``stat(a) - stat(b)`` resampling *pairs* (seed i of A with seed i of B).

    Pairing removes the between-seed variation that A and B share (same split, same init), which is
    why paired intervals are much narrower than two independent ones. ``stat`` must accept ``axis=``.
    """
    x, y = _pair(a, b, min_n=1)

    def diff(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return stat(u, axis=axis) - stat(v, axis=axis)

    if x.size > 1 and _all_equal(x - y) and _all_equal(x):
        v = float(diff(x, y))
        return v, v, v
    est, low, high, _ = _bootstrap((x, y), diff, paired=True, confidence=confidence, n_resamples=n_resamples,
                                   seed=seed, method=method)
    return est, low, high


def t_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Student t interval for the mean: ``(mean, low, high)``; the right default for a handful of seeds.

    Single value → ``(v, nan, nan)``; all-equal values → ``(v, v, v)``.
    """
    x = _vector(values)
    confidence = _confidence(confidence)
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    if _all_equal(x):
        return mean, mean, mean
    low, high = sps.t.interval(confidence, df=x.size - 1, loc=mean, scale=sps.sem(x))
    return mean, float(low), float(high)


def summarize(values: Sequence[float] | np.ndarray, unit: str = "", over: Literal["seeds", "examples"] = "seeds",
              ci: Literal["auto", "bootstrap", "t"] = "auto", confidence: float = 0.95, n_resamples: int = 10_000,
              seed: int = 0, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """The ``summary.json`` metric record ``{mean, ci_low, ci_high, n, unit, method}`` for one metric.

    ``over`` says what the values are (one per seed, or one per test example) and appears in ``method``.
    ``ci="auto"`` picks a Student t interval when ``over == "seeds"`` and n < 10 (a bootstrap over so
    few seeds is too narrow, see the module docstring), a BCa bootstrap otherwise. ``method`` is a
    sentence a reader can check, e.g. "BCa bootstrap 95% CI over 500 examples (10000 resamples)".
    An undefined bound (a single value) is ``None`` so the record stays valid JSON. ``bounds`` clips the
    interval to the metric's possible range (e.g. ``(0, 1)`` for accuracy: a t interval over two seeds
    can otherwise pass 100%); clipping is stated in ``method``.
    """
    if over not in ("seeds", "examples"):
        raise StatsError(f"over={over!r} must be 'seeds' or 'examples' (what one value stands for).")
    if ci not in ("auto", "bootstrap", "t"):
        raise StatsError(f"ci={ci!r} must be 'auto', 'bootstrap' or 't'.")
    x = _vector(values)
    n = int(x.size)
    pct = f"{100 * _confidence(confidence):g}%"
    what = f"{n} {over if n != 1 else over[:-1]}"
    kind = ci if ci != "auto" else ("t" if over == "seeds" and n < T_CI_BELOW else "bootstrap")
    if n == 1:
        mean, low, high, method = float(x[0]), math.nan, math.nan, f"single {over[:-1]}: no interval"
    elif _all_equal(x):
        mean = low = high = float(x.mean())
        method = f"all {what} equal: zero-width interval"
    elif kind == "t":
        mean, low, high = t_ci(x, confidence)
        method = f"Student t {pct} CI over {what} (df={n - 1})"
    else:
        mean, low, high, used = _bootstrap((x,), np.mean, paired=False, confidence=confidence,
                                           n_resamples=n_resamples, seed=seed, method="BCa")
        why = "; BCa needs n >= 3" if used == "percentile" and n < 3 else "; BCa degenerate" if used != "BCa" else ""
        method = f"{used} bootstrap {pct} CI over {what} ({n_resamples} resamples{why})"
    if bounds is not None and not math.isnan(low) and (low < bounds[0] or high > bounds[1]):
        low, high = max(low, bounds[0]), min(high, bounds[1])
        method += f", clipped to [{bounds[0]:g}, {bounds[1]:g}]"
    return {"mean": float(mean), "ci_low": _jsonable(low), "ci_high": _jsonable(high), "n": n, "unit": unit,
            "method": method}


# ----------------------------------------------------------------------------------------------- tests


def ratio_summary(ratios: Sequence[float] | np.ndarray, unit: str = "x", over: str = "timing repeats",
                  confidence: float = 0.95) -> dict[str, Any]:
    """Metric record for a ratio measured several times in one run (a speed-up, a cost ratio).

    Ratios multiply, so the centre is the geometric mean and the interval a Student t interval on the log
    ratios, transformed back: it stays positive and treats 2x faster and 2x slower alike. Each repeat
    should time both sides back to back, so load on the machine slows both and cancels in the ratio.
    """
    x = _vector(ratios, "ratios")
    if np.any(x <= 0):
        raise StatsError(f"ratios must be positive, got {x[x <= 0][:3].tolist()}.")
    mean, low, high = t_ci(np.log(x), confidence)
    n = int(x.size)
    method = (f"geometric mean, Student t {100 * _confidence(confidence):g}% CI on log ratios over {n} {over}"
              if n > 1 else f"single {over.rstrip('s')}: no interval")
    return {"mean": math.exp(mean), "ci_low": _jsonable(math.exp(low)) if not math.isnan(low) else None,
            "ci_high": _jsonable(math.exp(high)) if not math.isnan(high) else None, "n": n, "unit": unit,
            "method": method}


def slope_interval(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                   confidence: float = 0.95) -> dict[str, Any]:
    """Least-squares slope of ``y`` on ``x`` with its Student t interval (n - 2 degrees of freedom), as a
    metric record: how fast a cost grows with a size (memory against calibration examples)."""
    xs, ys = _pair(x, y, min_n=3)
    if _all_equal(xs):
        raise DegenerateDataError("every x is the same; a slope needs at least two different sizes.")
    fit = sps.linregress(xs, ys)
    half = float(sps.t.ppf(0.5 + _confidence(confidence) / 2, xs.size - 2) * fit.stderr)
    return {"mean": float(fit.slope), "ci_low": float(fit.slope - half), "ci_high": float(fit.slope + half),
            "n": int(xs.size)}


def verdict(record: dict[str, Any], target: float, better: Literal["higher", "lower"] = "higher") -> str:
    """``"met"``, ``"missed"`` or ``"not decided"`` for a target, from a metric record's interval.

    A verdict read off a point estimate flips between two identical runs whenever the estimate sits near
    the target (timings above all); an interval only says "met" when all of it clears the target and
    "missed" when none of it does. A record without an interval is never decided.
    """
    if better not in ("higher", "lower"):
        raise StatsError(f"better={better!r} must be 'higher' or 'lower'.")
    low, high = record.get("ci_low"), record.get("ci_high")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "not decided"
    good_low, good_high = (low >= target, high < target) if better == "higher" else (high <= target, low > target)
    return "met" if good_low else "missed" if good_high else "not decided"


def interval_side(low: float, high: float) -> int:
    """Where an interval of a difference lies against zero: ``1`` all above, ``-1`` all below, ``0`` it
    includes zero (the two compared are not distinguishable). Strict at zero, unlike :func:`verdict`'s
    targets: an interval that touches zero does not separate the two."""
    return 1 if low > 0 else -1 if high < 0 else 0


@dataclasses.dataclass
class TestResult:
    """One hypothesis test, shaped like a ``summary.json`` test record (see ``as_dict``)."""

    __test__ = False  # not a pytest test class

    name: str
    statistic: float
    p_value: float
    effect_size: float
    effect_name: str
    n: int
    alternative: str = "two-sided"
    p_holm: float | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """``{name, statistic, p_value, p_holm, effect_size, effect_name, n, alternative, **extras}``, JSON-safe."""
        out = {"name": self.name, "statistic": self.statistic, "p_value": self.p_value, "p_holm": self.p_holm,
               "effect_size": self.effect_size, "effect_name": self.effect_name, "n": self.n,
               "alternative": self.alternative, **self.extras}
        return {k: _jsonable(v) for k, v in out.items()}


def _identical(name: str, n: int, alternative: str, effect_name: str) -> TestResult:
    """Two settings that gave exactly the same result on every pair: no evidence of a difference.

    The test statistic is undefined (0/0), but the data are as consistent with "no difference" as data
    can be, so the record says p = 1 and effect 0, and flags the case in ``extras["note"]``.
    """
    return TestResult(name, 0.0, 1.0, 0.0, effect_name, n, alternative,
                      extras={"note": "identical results on every pair; statistic undefined, p set to 1"})


def cohens_dz(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Cohen's d_z = mean(a - b) / sd(a - b) (ddof=1): the standardised paired difference."""
    x, y = _pair(a, b)
    d = x - y
    if _all_equal(d):
        raise DegenerateDataError(f"all {d.size} paired differences equal {d[0]:.6g}, so d_z = mean/sd is undefined "
                                  "(sd = 0). Report the raw difference instead, or add seeds.")
    return float(d.mean() / d.std(ddof=1))


def paired_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                 alternative: Alternative = "two-sided", name: str = "paired t-test") -> TestResult:
    """Paired t-test of mean(a - b) = 0 (``scipy.stats.ttest_rel``) with Cohen's d_z as effect size.

    Raises ``DegenerateDataError`` when all differences are equal: scipy would return t = inf, p = 0
    (or nan), which overstates three identical differences as certainty.
    """
    x, y = _pair(a, b)
    if np.allclose(x, y, rtol=0, atol=1e-12):
        return _identical(name, int(x.size), alternative, "Cohen's d_z")
    dz = cohens_dz(x, y)
    res = sps.ttest_rel(x, y, alternative=_alternative(alternative))
    return TestResult(name, float(res.statistic), float(res.pvalue), dz, "Cohen's d_z", int(x.size), alternative,
                      extras={"mean_diff": float((x - y).mean()), "df": int(x.size - 1)})


def one_sample_ttest(values: Sequence[float] | np.ndarray, popmean: float = 0.0,
                     alternative: Alternative = "two-sided", name: str = "one-sample t-test") -> TestResult:
    """t-test of mean(values) = popmean (``scipy.stats.ttest_1samp``); effect: Cohen's d = (mean - popmean) / sd."""
    x = _vector(values, min_n=2)
    if _all_equal(x):
        raise DegenerateDataError(f"all {x.size} values equal {x[0]:.6g}; a t-test needs spread. Report the value "
                                  "itself, or add seeds.")
    res = sps.ttest_1samp(x, popmean, alternative=_alternative(alternative))
    d = float((x.mean() - popmean) / x.std(ddof=1))
    return TestResult(name, float(res.statistic), float(res.pvalue), d, "Cohen's d", int(x.size), alternative,
                      extras={"popmean": float(popmean), "mean": float(x.mean()), "df": int(x.size - 1)})


def wilcoxon(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
             alternative: Alternative = "two-sided", name: str = "Wilcoxon signed-rank") -> TestResult:
    """Wilcoxon signed-rank test on a - b (``scipy.stats.wilcoxon``, zero differences dropped).

    Effect size: matched-pairs rank-biserial r = (R+ - R-) / (R+ + R-) over the non-zero differences
    (+1: every pair favours a). Note: with n non-zero pairs the smallest two-sided p is 2 / 2**n
    (0.25 for 3 seeds), so this test cannot reject with a handful of seeds.
    """
    x, y = _pair(a, b)
    d = x - y
    d[np.isclose(d, 0.0, rtol=0, atol=1e-12)] = 0.0  # float noise from subtraction is not a difference
    nz = d[d != 0]
    if nz.size == 0:
        return _identical(name, int(d.size), alternative, "matched-pairs rank-biserial r")
    res = sps.wilcoxon(d, alternative=_alternative(alternative))
    ranks = sps.rankdata(np.abs(nz))
    r_plus, r_minus = ranks[nz > 0].sum(), ranks[nz < 0].sum()
    r = float((r_plus - r_minus) / (r_plus + r_minus))
    return TestResult(name, float(res.statistic), float(res.pvalue), r, "matched-pairs rank-biserial r",
                      int(d.size), alternative, extras={"n_nonzero": int(nz.size)})


def _correct_vector(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise StatsError(f"{name} must be a non-empty 1-D array of per-example correctness; got shape {arr.shape}.")
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise StatsError(f"{name} must be booleans or 0/1 (was each test example answered correctly?); "
                             f"got values like {np.unique(arr)[:5].tolist()}. Pass preds == labels.")
        arr = arr.astype(bool)
    return arr


def mcnemar(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray,
            name: str = "McNemar") -> TestResult:
    """McNemar test for two classifiers on the same test examples (statsmodels).

    Only discordant examples count: b = A right & B wrong, c = A wrong & B right. Exact binomial test
    when b + c < 25, else chi-squared with continuity correction. Effect size: odds ratio b / c, with
    0.5 added to both when either is zero (Haldane-Anscombe) so it stays finite. > 1 favours A.
    """
    x, y = _correct_vector(correct_a, "correct_a"), _correct_vector(correct_b, "correct_b")
    if x.size != y.size:
        raise StatsError(f"correct_a has {x.size} examples, correct_b has {y.size}: McNemar needs both classifiers "
                         "scored on the same test examples in the same order.")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    table = [[int((x & y).sum()), b], [c, int((~x & ~y).sum())]]
    exact = b + c < 25
    res = _sm_mcnemar(table, exact=exact, correction=True)
    odds = (b + 0.5) / (c + 0.5) if b == 0 or c == 0 else b / c
    return TestResult(name, float(res.statistic), float(res.pvalue), float(odds), "odds ratio b/c", int(x.size),
                      extras={"b": b, "c": c, "exact": exact, "accuracy_a": float(x.mean()),
                              "accuracy_b": float(y.mean())})


def tost_paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, margin: float,
                name: str = "TOST paired equivalence") -> TestResult:
    """Equivalence test: is |mean(a - b)| < margin? Two one-sided paired t-tests, p = max of the two.

    A small p supports *equivalence* within ±margin (e.g. "the healed model is within 1 point of the
    full model"), which a non-significant ordinary t-test cannot show. statsmodels ``ttost_paired``.
    """
    if not (np.isfinite(margin) and margin > 0):
        raise StatsError(f"margin={margin!r} must be a positive number in the metric's units (e.g. 0.01 accuracy).")
    x, y = _pair(a, b)
    dz = cohens_dz(x, y)
    p, lower, upper = ttost_paired(x, y, -float(margin), float(margin))
    t_bind = lower[0] if lower[1] >= upper[1] else upper[0]
    return TestResult(name, float(t_bind), float(p), dz, "Cohen's d_z", int(x.size), "equivalence",
                      extras={"margin": float(margin), "mean_diff": float((x - y).mean()), "p_lower": float(lower[1]),
                              "p_upper": float(upper[1])})


def _groups(groups: tuple[Any, ...], min_size: int) -> list[np.ndarray]:
    if len(groups) < 2:
        raise StatsError(f"got {len(groups)} group(s); comparing groups needs at least 2 (pass each as an argument).")
    return [_vector(g, f"group {i}", min_size) for i, g in enumerate(groups)]


def anova_oneway(*groups: Sequence[float] | np.ndarray, name: str = "one-way ANOVA") -> TestResult:
    """One-way ANOVA across independent groups (``scipy.stats.f_oneway``); effect: eta² = SS_between / SS_total."""
    gs = _groups(groups, 2)
    allv = np.concatenate(gs)
    ss_within = float(sum(((g - g.mean()) ** 2).sum() for g in gs))
    ss_total = float(((allv - allv.mean()) ** 2).sum())
    if ss_within <= 1e-12 * max(ss_total, 1e-300):
        raise DegenerateDataError("every group has zero spread, so F is undefined; compare the group values directly.")
    res = sps.f_oneway(*gs)
    return TestResult(name, float(res.statistic), float(res.pvalue), float(1 - ss_within / ss_total), "eta squared",
                      int(allv.size), extras={"groups": len(gs), "df_between": len(gs) - 1,
                                              "df_within": int(allv.size - len(gs))})


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (``statsmodels.stats.multitest.multipletests(method="holm")``), same order."""
    p = np.asarray(p_values, dtype=float).reshape(-1)
    if p.size == 0:
        return p
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise StatsError(f"p-values must be finite numbers in [0, 1]; got {p.tolist()}. Drop tests that could not run.")
    return multipletests(p, method="holm")[1]


def holm_family(tests: Sequence[TestResult]) -> list[TestResult]:
    """Copies of ``tests`` with ``p_holm`` set, treating them as one family (one research question)."""
    adjusted = holm([t.p_value for t in tests])
    return [dataclasses.replace(t, p_holm=float(p), extras=dict(t.extras)) for t, p in zip(tests, adjusted, strict=True)]


# ------------------------------------------------------------------------------- rank agreement, P(A>B)


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau-b of each row pair of x, y (resamples × items), vectorised; NaN where a row is constant.

    tau_b = sum sign(dx) sign(dy) / sqrt(sum sign(dx)^2 * sum sign(dy)^2) over item pairs, the same value
    as ``scipy.stats.kendalltau`` (checked in the tests) without a Python loop per resample.
    """
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    return (sx * sy).sum((1, 2)) / np.sqrt((sx * sx).sum((1, 2)) * (sy * sy).sum((1, 2)))


def _corr_ci(x: Any, y: Any, which: str, n_resamples: int, seed: int,
             confidence: float) -> tuple[float, float, float, float]:
    """Rank correlation with a percentile bootstrap interval over paired items.

    Resamples in which x or y is constant (correlation undefined) are dropped; with very few items that
    can be many, so at least half must remain or ``DegenerateDataError`` is raised.
    """
    u, v = _pair(x, y, min_n=3)
    confidence = _confidence(confidence)
    for arr, nm in ((u, "x"), (v, "y")):
        if _all_equal(arr):
            raise DegenerateDataError(f"{nm} is constant, so a rank correlation is undefined; check the scores.")
    if which == "kendall":
        res = sps.kendalltau(u, v)
    else:
        res = sps.spearmanr(u, v)
    idx = np.random.default_rng(seed).integers(0, u.size, size=(n_resamples, u.size))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant resamples → nan, dropped below
        if which == "kendall":
            boot = np.concatenate([_kendall_tau_b(u[chunk], v[chunk])
                                   for chunk in np.array_split(idx, max(1, idx.size * u.size // 4_000_000 + 1))])
        else:  # Spearman = Pearson on ranks, vectorised over resamples
            ru, rv = sps.rankdata(u[idx], axis=1), sps.rankdata(v[idx], axis=1)
            ru, rv = ru - ru.mean(1, keepdims=True), rv - rv.mean(1, keepdims=True)
            boot = (ru * rv).sum(1) / np.sqrt((ru**2).sum(1) * (rv**2).sum(1))
    boot = boot[np.isfinite(boot)]
    if boot.size < n_resamples / 2:
        raise DegenerateDataError(f"only {boot.size} of {n_resamples} bootstrap resamples had a defined correlation "
                                  f"({u.size} items are too few or too tied); report the point estimate without CI.")
    alpha = 1 - confidence
    low, high = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(res.statistic), float(low), float(high), float(res.pvalue)


def kendall_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, n_resamples: int = 2000,
               seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Kendall tau-b between two score vectors over the same items: ``(tau, low, high, p)``.

    The interval is a percentile bootstrap over items (e.g. layers); p is scipy's test of tau = 0.
    """
    return _corr_ci(x, y, "kendall", n_resamples, seed, confidence)


def spearman_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, n_resamples: int = 2000,
                seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Spearman rho between two score vectors over the same items: ``(rho, low, high, p)`` (see ``kendall_ci``)."""
    return _corr_ci(x, y, "spearman", n_resamples, seed, confidence)


def kendalls_w(rank_matrix: np.ndarray | pd.DataFrame, name: str = "Kendall's W") -> TestResult:
    """Agreement of m raters (rows, e.g. importance methods or seeds) on n items (columns, e.g. layers).

    Each row is ranked (average ranks for ties, so raw scores work too; higher score = higher rank),
    W = 12 S / (m² (n³ - n) - m Σ T) with the tie correction T = Σ (t³ - t); W = 1 is perfect agreement,
    0 none. The p-value is the chi-squared approximation chi2 = m (n - 1) W on n - 1 df (Friedman's test).
    Returns a TestResult with statistic = chi2 and effect_size = W.
    """
    r = np.asarray(rank_matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise StatsError(f"rank_matrix must be 2-D with >= 2 raters (rows) and >= 2 items (columns); got {r.shape}.")
    if not np.isfinite(r).all():
        raise StatsError("rank_matrix contains NaN/inf; every rater must score every item.")
    m, n = r.shape
    ranks = sps.rankdata(r, axis=1)
    ties = sum(float((cnt**3 - cnt).sum()) for cnt in (np.unique(row, return_counts=True)[1] for row in ranks))
    denom = m**2 * (n**3 - n) - m * ties
    if denom <= 0:
        raise DegenerateDataError("every rater gives all items the same score; agreement is undefined.")
    s = float(((ranks.sum(0) - m * (n + 1) / 2) ** 2).sum())
    w = 12 * s / denom
    chi2 = m * (n - 1) * w
    return TestResult(name, chi2, float(sps.chi2.sf(chi2, n - 1)), w, "Kendall's W", n,
                      extras={"raters": m, "df": n - 1})


def _pi_pairs(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X > Y) + 0.5 P(X = Y) over all (x, y) pairs, vectorised over leading axes (for scipy.bootstrap)."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    gt = (x[..., :, None] > y[..., None, :]).mean((-1, -2))
    eq = (x[..., :, None] == y[..., None, :]).mean((-1, -2))
    return gt + 0.5 * eq


def prob_improvement(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, paired: bool = True,
                     confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Probability that A beats B, P(A > B) + 0.5 P(A = B), with a bootstrap CI: ``(estimate, low, high)``.

    ``paired=True`` (our seeds are paired: same split and init): the share of seeds on which A beats B,
    ties counting half. ``paired=False``: over all (a_i, b_j) pairs, the Mann-Whitney form used by
    rliable (Agarwal et al., 2021) for independent runs. 0.5 = no difference. Higher is better for A,
    so pass metrics where larger is better (negate losses). With few seeds the interval is coarse:
    3 paired seeds can only give 0, 1/6, ..., 1.
    """
    if paired:
        x, y = _pair(a, b, min_n=1)
        d = x - y
        d[np.isclose(d, 0.0, rtol=0, atol=1e-12)] = 0.0
        return bootstrap_ci(np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0)), np.mean, confidence, n_resamples, seed)
    x, y = _vector(a, "a"), _vector(b, "b")
    est, low, high, _ = _bootstrap((x, y), _pi_pairs, paired=False, confidence=confidence, n_resamples=n_resamples,
                                   seed=seed, method="BCa")
    return est, low, high


# ---------------------------------------------------- hierarchical bootstrap: seeds, then test examples

MIN_SEEDS = 5  # the evidence protocol's minimum number of seeds behind a reported interval
_CELL_LIMIT = 64  # 1-D np.mean input with at most this many distinct values: resample by multinomial counts
_CHUNK = 4_000_000  # index matrices are drawn in chunks of about this many elements (bounds memory)


class _CellStatistic:
    """A statistic of rows that take few distinct values ("cells"), computed from the cell counts.

    Resampling n rows with replacement is the same, in distribution, as drawing the cell counts from a
    multinomial with the observed cell frequencies. A statistic that needs only the counts (accuracy,
    a retention ratio, a confusion matrix and so macro-F1) therefore gets thousands of resamples from
    one ``multinomial`` call instead of a Python loop over resamples. A subclass declares ``n_cells``,
    ``encode`` (rows -> one cell code per row, validating the rows) and ``from_counts`` (counts of shape
    ``(..., n_cells)`` -> values of shape ``(...)``); calling the object on rows gives the plain statistic.
    """

    n_cells: int = 0

    def encode(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def from_counts(self, counts: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, rows: np.ndarray) -> float:
        counts = np.bincount(self.encode(np.asarray(rows)), minlength=self.n_cells)
        return float(self.from_counts(counts))


class _BinaryPairStatistic(_CellStatistic):
    """A statistic of rows ``(x, y)`` of 0/1 values, from the counts of the four cells ``2 x + y``
    (0: both 0, 1: only y, 2: only x, 3: both); ``rows_are`` names the columns for the error message."""

    n_cells = 4
    rows_are = "paired rows (x, y)"

    def encode(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[1] != 2:
            raise StatsError(f"{self.rows_are} must have two columns; got shape {r.shape}.")
        if not np.isin(r, (0, 1)).all():
            raise StatsError(f"{self.rows_are} must be booleans or 0/1 (was each example answered correctly?).")
        return 2 * r[:, 0].astype(np.int64) + r[:, 1].astype(np.int64)


class _AccuracyDifference(_BinaryPairStatistic):
    """mean(a) - mean(b) on the same rows; rows are ``(correct_a, correct_b)``."""

    rows_are = "paired rows (correct_a, correct_b)"

    def from_counts(self, counts: np.ndarray) -> np.ndarray:
        c = np.asarray(counts, dtype=float)
        return (c[..., 2] - c[..., 1]) / c.sum(-1)


class _Retention(_BinaryPairStatistic):
    """mean(correct_comp) / mean(correct_full) on the same rows; rows are ``(correct_full, correct_comp)``."""

    rows_are = "retention rows (correct_full, correct_comp)"

    def from_counts(self, counts: np.ndarray) -> np.ndarray:
        c = np.asarray(counts, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):  # full accuracy 0 -> inf/nan, caught by the engine
            return (c[..., 1] + c[..., 3]) / (c[..., 2] + c[..., 3])


class _MacroF1(_CellStatistic):
    """Macro-averaged F1 from the confusion matrix; rows are ``(label, prediction)``, integers in [0, K).

    Same value as ``sklearn.metrics.f1_score(labels, preds, average="macro", zero_division=0)``: the
    average runs over the classes that occur among the labels or the predictions (sklearn's default
    label set), and a class never predicted has F1 = 0.
    """

    def __init__(self, n_classes: int) -> None:
        self.n_classes = int(n_classes)
        self.n_cells = self.n_classes**2

    def encode(self, rows: np.ndarray) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 2 or r.shape[1] != 2:
            raise StatsError(f"macro-F1 rows must be (label, prediction) pairs; got shape {r.shape}.")
        return r[:, 0].astype(np.int64) * self.n_classes + r[:, 1].astype(np.int64)

    def from_counts(self, counts: np.ndarray) -> np.ndarray:
        c = np.asarray(counts, dtype=float)
        k = self.n_classes
        cm = c.reshape(*c.shape[:-1], k, k)  # [..., label, prediction]
        tp = np.diagonal(cm, axis1=-2, axis2=-1)
        denom = cm.sum(-1) + cm.sum(-2)  # 2 tp + fp + fn
        present = denom > 0
        f1 = np.divide(2 * tp, denom, out=np.zeros(tp.shape), where=present)
        return f1.sum(-1) / np.maximum(present.sum(-1), 1)


class OfMeans:
    """A statistic that depends on a seed's rows only through their column means: ``fn(means) -> value``.

    ``fn`` maps column means of shape ``(..., k)`` to values of shape ``(...)`` (vectorised over leading
    axes). Resampling rows with replacement then needs one count matrix per chunk of resamples: the
    replicates' column means are ``counts @ rows / n``, so a Spearman correlation between per-block
    damage (the means of per-example loss increases) and a method's scores, or a ratio of two sums, gets
    thousands of resamples without a Python loop. Constant columns (e.g. a method's block scores, the same
    for every example of a seed) pass through unchanged, which is how a per-seed input enters ``fn``.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn = fn

    def __call__(self, rows: np.ndarray) -> float:
        rows = np.asarray(rows, dtype=float)
        return float(np.asarray(self.fn(rows.reshape(rows.shape[0], -1).mean(0)[None, :]))[0])

    def replicates(self, rows: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
        """``m`` bootstrap replicates of the statistic on ``rows`` (examples resampled with replacement)."""
        x = np.asarray(rows, dtype=float).reshape(rows.shape[0], -1)
        n = x.shape[0]
        step = max(1, _CHUNK // max(n, 1))
        out = []
        for i in range(0, m, step):
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(step, m - i))
            out.append(np.asarray(self.fn(counts @ x / n), dtype=float))
        return np.concatenate(out)


def _check_groups(groups: Any, name: str) -> list[np.ndarray]:
    """One array of rows per seed, validated: numeric, (n,) or (n, k) with k equal across seeds, no NaN."""
    if isinstance(groups, (str, bytes)) or not hasattr(groups, "__iter__"):
        raise StatsError(f"{name} must be a sequence with one array of test-example rows per seed; got "
                         f"{type(groups).__name__}.")
    seq = list(groups)
    if not seq:
        raise StatsError(f"{name} is empty: pass one array of test-example rows per seed (at least one seed).")
    out = []
    for i, g in enumerate(seq):
        arr = np.asarray(g)
        if arr.ndim == 0:
            raise StatsError(f"{name}[{i}] is a single number; each entry must be one seed's array of test-example "
                             "rows. For a single seed pass [values], not values.")
        if arr.ndim > 2:
            raise StatsError(f"{name}[{i}] has shape {arr.shape}; one seed's rows must be (n,) or (n, k).")
        if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
            raise StatsError(f"{name}[{i}] must hold numbers or booleans; got dtype {arr.dtype}.")
        if arr.shape[0] == 0:
            raise StatsError(f"{name}[{i}] is empty (seed {i} has no test examples); drop that seed or re-run its "
                             "evaluation.")
        if np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise StatsError(f"{name}[{i}] contains {bad} NaN/inf value(s); drop or re-score those examples before "
                             "computing an interval.")
        out.append(arr)
    trailing = {a.shape[1:] for a in out}
    if len(trailing) > 1:
        raise StatsError(f"every seed's rows need the same columns; {name} mixes row shapes {sorted(trailing)}.")
    return out


def _within_replicates(rows: np.ndarray, statistic: Callable[[np.ndarray], float], m: int,
                       rng: np.random.Generator) -> np.ndarray:
    """``m`` example-level bootstrap replicates of ``statistic`` on one seed's ``rows``.

    Fast paths: a ``_CellStatistic`` and ``np.mean`` on few distinct values draw multinomial cell counts;
    ``np.mean`` on many distinct values averages index matrices; any other statistic loops over the
    resamples (fine for thousands: one call per seed and resample).
    """
    n = rows.shape[0]
    if m == 0:
        return np.empty(0)
    step = max(1, _CHUNK // max(n, 1))
    if isinstance(statistic, OfMeans):
        return statistic.replicates(rows, m, rng)
    if isinstance(statistic, _CellStatistic):
        freq = np.bincount(statistic.encode(rows), minlength=statistic.n_cells) / n
        return np.asarray(statistic.from_counts(rng.multinomial(n, freq, size=m)), dtype=float)
    if statistic is np.mean and rows.ndim == 1:
        values, codes = np.unique(rows, return_inverse=True)
        if values.size <= _CELL_LIMIT:
            return rng.multinomial(n, np.bincount(codes) / n, size=m) @ values.astype(float) / n
        x = rows.astype(float)
        return np.concatenate([x[rng.integers(0, n, size=(min(step, m - i), n))].mean(1) for i in range(0, m, step)])
    out = np.empty(m)
    for i in range(0, m, step):
        for j, idx in enumerate(rng.integers(0, n, size=(min(step, m - i), n))):
            out[i + j] = float(statistic(rows[idx]))
    return out


@dataclasses.dataclass(frozen=True)
class _Resampled:
    """What the two-stage bootstrap produced; every interval and p-value below is read off this."""

    per_seed: np.ndarray  # the statistic on each seed's rows
    replicates: np.ndarray  # two-stage bootstrap replicates of the mean over seeds
    within_var: float  # mean over seeds of the example-level bootstrap variance of a seed's statistic
    n_examples: int
    n_resamples: int

    @property
    def n_seeds(self) -> int:
        return int(self.per_seed.size)


def _resample(groups: list[np.ndarray], statistic: Callable[[np.ndarray], float], n_resamples: int,
              seed: int) -> _Resampled:
    """Two-stage bootstrap: draw seeds with replacement, then each drawn seed's rows with replacement.

    Every draw of a seed gets its own fresh resample of that seed's rows (a seed drawn twice in one
    replicate counts twice with different rows), which is the textbook two-stage scheme (Davison &
    Hinkley 1997, sec. 3.8, strategy 1). The statistic is evaluated ``n_resamples x n_seeds`` times.
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 100:
        raise StatsError(f"n_resamples={n_resamples!r} is too few for a stable interval; use at least 1000 "
                         "(10000 for reported results).")
    per_seed = np.empty(len(groups))
    for i, rows in enumerate(groups):
        value = np.asarray(statistic(rows), dtype=float)
        if value.ndim != 0:
            raise StatsError(f"statistic must return one number per seed; it returned shape {value.shape}.")
        if not np.isfinite(value):
            raise StatsError(f"statistic is {float(value)} on seed {i}'s rows; it must be finite on every seed "
                             "(e.g. a retention needs full-model accuracy > 0).")
        per_seed[i] = value
    rng = np.random.default_rng(seed)
    n_seeds = len(groups)
    drawn = rng.integers(0, n_seeds, size=(int(n_resamples), n_seeds))
    values = np.empty(drawn.shape)
    within = np.full(n_seeds, np.nan)
    for s, rows in enumerate(groups):
        mask = drawn == s
        reps = _within_replicates(rows, statistic, int(mask.sum()), rng)
        values[mask] = reps
        if reps.size > 1:
            within[s] = reps.var(ddof=1)
    replicates = values.mean(1)
    bad = int((~np.isfinite(replicates)).sum())
    if bad:
        raise DegenerateDataError(f"the statistic is undefined on {bad} of {n_resamples} resamples (e.g. a ratio "
                                  "whose denominator can resample to 0); use a statistic defined on every "
                                  "resample, or more test examples.")
    return _Resampled(per_seed, replicates, float(np.nanmean(within)) if np.isfinite(within).any() else 0.0,
                      int(sum(g.shape[0] for g in groups)), int(n_resamples))


def _half_width(res: _Resampled, alpha: float) -> tuple[float, str]:
    """The interval's half-width at level 1 - alpha in normal-equivalent units, and which part set it.

    Two seeds or more: the larger of (a) a Student t half-width on the spread of the per-seed values,
    t_{1-alpha/2, S-1} sd(per-seed) / sqrt(S), which estimates the seed-to-seed variance *including* each
    seed's test-set noise with S - 1 degrees of freedom, and (b) the test-set sampling error of the S
    fixed models alone, z_{1-alpha/2} sqrt(mean within-seed bootstrap variance / S), the floor the
    evidence protocol asks for (it keeps the interval from collapsing when the seeds happen to agree).
    One seed: (b) alone.
    """
    s_count = res.n_seeds
    z = float(sps.norm.ppf(1 - alpha / 2))
    example = z * math.sqrt(res.within_var / s_count)
    if s_count == 1:
        return example, "examples"
    seeds = float(sps.t.ppf(1 - alpha / 2, s_count - 1)) * float(res.per_seed.std(ddof=1)) / math.sqrt(s_count)
    return (seeds, "seeds") if seeds >= example else (example, "examples")


@dataclasses.dataclass(frozen=True)
class _Interval:
    low: float
    high: float
    level: float  # coverage of the percentile interval of the replicates actually used, e.g. 0.996
    driver: str  # "seeds", "examples" (the test-set floor) or "none" (replicates do not vary)
    capped: bool  # the level needed lies beyond the resolution of n_resamples


def _interval(res: _Resampled, confidence: float) -> _Interval:
    """Percentile interval of the two-stage replicates at a calibrated level (see ``hierarchical_bootstrap``)."""
    alpha = 1 - confidence
    se_boot = float(res.replicates.std(ddof=1))
    if se_boot <= 1e-15 * max(1.0, abs(float(res.replicates.mean()))):
        v = float(res.per_seed.mean())
        return _Interval(v, v, confidence, "none", False)
    if res.n_seeds == 1:
        q, driver = alpha / 2, "examples"  # the plain example-level percentile interval
    else:
        h, driver = _half_width(res, alpha)
        q = float(sps.norm.cdf(-h / se_boot))
    capped = q < 0.5 / res.n_resamples
    low, high = np.quantile(res.replicates, [q, 1 - q])
    return _Interval(float(low), float(high), 1 - 2 * q, driver, bool(capped))


def _bootstrap_p(res: _Resampled, null: float = 0.0) -> tuple[float, float]:
    """Two-sided p of ``mean = null`` by inverting the calibrated interval, and the smallest p attainable.

    P = (#{replicates on the far side of null} + 1) / (n_resamples + 1), the smaller tail with the +1
    correction. One seed: p = 2 P (the plain percentile-bootstrap p). Two seeds or more: p is the level
    1 - confidence at which the calibrated interval of ``_interval`` has its end exactly at ``null``, so
    the interval excludes ``null`` when p < 1 - confidence (one rule for both; the +1 correction makes p
    a little conservative at the boundary). The smallest attainable p is the same formula with no
    replicate beyond ``null``. With a t reference on few seeds it is well above 2 / (n_resamples + 1):
    a t with 4 df needs |t| = 8.6 for p = 0.001, far beyond what 10000 resamples can resolve, so 5 seeds
    and 10000 resamples give a floor of about 0.007-0.03 (lower when test-set noise dominates).
    """
    b = res.n_resamples

    def p_of(tail: float) -> float:
        if res.n_seeds == 1:
            return min(1.0, 2 * tail)
        se_boot = float(res.replicates.std(ddof=1))
        dist = -float(sps.norm.ppf(tail)) * se_boot  # normal-equivalent distance of null from the centre
        if dist <= 0:
            return 1.0
        sd = float(res.per_seed.std(ddof=1))
        p_seeds = 2 * float(sps.t.sf(dist * math.sqrt(res.n_seeds) / sd, res.n_seeds - 1)) if sd > 0 else 0.0
        se_ex = math.sqrt(res.within_var / res.n_seeds)
        p_examples = 2 * float(sps.norm.sf(dist / se_ex)) if se_ex > 0 else 0.0
        return min(1.0, max(p_seeds, p_examples))

    below = int((res.replicates <= null).sum())
    above = int((res.replicates >= null).sum())
    tail = (min(below, above) + 1) / (b + 1)
    return p_of(tail), p_of(1 / (b + 1))


def _interval_method(res: _Resampled, iv: _Interval, confidence: float, what: str) -> str:
    """The ``method`` sentence of a metric record: what was resampled, how much, and which level was used."""
    pct = f"{100 * confidence:g}%"
    n_ex = f"{res.n_examples:,} examples"
    if res.n_seeds == 1:
        text = (f"example-level bootstrap {pct} CI of {what} (single seed: test examples only, between-seed "
                f"variation not included; {n_ex}, {res.n_resamples} resamples)")
    else:
        text = (f"hierarchical bootstrap {pct} CI of {what} (seeds, then test examples within a seed; "
                f"{res.n_seeds} seeds, {n_ex}, {res.n_resamples} resamples)")
        level = "the replicates' extremes" if iv.capped else f"level {100 * iv.level:.2f}%"
        if iv.driver == "seeds":
            text += (f"; percentile interval at {level}, calibrated to the width of a Student t interval on the "
                     f"spread of the {res.n_seeds} per-seed values (df {res.n_seeds - 1})")
        elif iv.driver == "examples":
            text += (f"; percentile interval at {level}, calibrated to the test-set sampling error (the seeds "
                     "agree more closely than test-set noise alone would make them)")
        if res.n_seeds < MIN_SEEDS:
            text += f"; fewer than {MIN_SEEDS} seeds, below the evidence protocol's minimum"
    if iv.driver == "none":
        text += "; no resample differs: zero-width interval"
    if iv.capped:
        text += (f"; the calibrated level ({100 * iv.level:.4f}%) is beyond the resolution of {res.n_resamples} "
                 "resamples, so the interval may be too narrow")
    return text


def hierarchical_bootstrap(groups: Sequence[Any], statistic: Callable[[np.ndarray], float] = np.mean, *,
                           n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                           unit: str = "fraction", what: str = "accuracy") -> dict[str, Any]:
    """The ``summary.json`` metric record of a per-seed statistic, with a seeds x test-examples interval.

    ``groups`` holds one array per training seed whose rows are that seed's test examples: a boolean
    "correct" vector, ``(label, prediction)`` columns, ``(correct_full, correct_compressed)`` columns.
    ``statistic(rows) -> float`` is applied to one seed's rows. The point estimate is the mean over
    seeds of ``statistic(group)``; the record is ``{mean, ci_low, ci_high, n (seeds), n_examples, unit,
    method}``.

    The interval resamples seeds with replacement, then each drawn seed's rows with replacement,
    evaluates the statistic per drawn seed and averages (one replicate), so a finite test set's sampling
    error is always in it; it is a *percentile* interval of those replicates, so a bounded metric stays
    inside its bounds without clipping. Its level is calibrated, because the plain 95% percentile
    interval of the two-stage bootstrap has the wrong width with few seeds: resampling 5 seeds shrinks
    the seed-to-seed variance by (S-1)/S and uses normal instead of t_{S-1} quantiles (too narrow when
    seeds differ a lot: 88% coverage at 5 seeds with a between-seed sd of 5 points), while the second
    stage counts test-set noise twice, since each seed's statistic already contains it (too wide when
    seeds agree: 98-99% coverage). The calibration takes the percentile level at which the interval has
    the width of the classical interval for a mean of S seeds, t_{1-a/2, S-1} sd(per-seed) / sqrt(S) (the
    per-seed spread already includes the test-set noise, and has S - 1 df), but never less than the
    test-set sampling error of the S fixed models, z_{1-a/2} sqrt(mean within-seed bootstrap variance /
    S), so the interval cannot collapse to zero width when the rows vary (evidence protocol, rule 5).
    With an approximately normal bootstrap distribution, level = 1 - 2 Phi(-half-width / bootstrap sd);
    the shape (skew, bounds) stays the bootstrap's. ``method`` states the level used.

    Measured coverage of the 95% interval (accuracy, 400 test examples per seed, per-seed true accuracy
    ~ N(0.85, sd), target 0.85, 2000 simulated data sets, 1000 resamples), calibrated vs plain
    percentile: sd = 0.02: 95.8% vs 95.0% (5 seeds), 94.7% vs 96.5% (10 seeds); sd = 0 (test-set noise
    only): 98.0% vs 98.4% (5 seeds), 97.0% vs 99.0% (10 seeds), conservative because of the floor (the
    union of two valid intervals); sd = 0.05: 93.2% vs 88.2% (5 seeds).
    ``tests/test_stats_engine.py::test_hierarchical_coverage`` keeps this.

    One seed is the example-level bootstrap (plain percentile interval; ``method`` says so). With 2-4
    seeds the same rule gives a very wide interval (t with 1-3 df) that the replicates may not reach:
    ``method`` then says the level was capped and that the protocol asks for 5 seeds. Fast for
    ``np.mean`` on 1-D rows and for the module's count-based statistics (``accuracy_ci``,
    ``macro_f1_ci``, ``retention_ci``); any other statistic is called ``n_resamples x seeds`` times.
    Deterministic for a given ``seed``.
    """
    confidence = _confidence(confidence)
    rows = _check_groups(groups, "groups")
    res = _resample(rows, statistic, n_resamples, seed)
    iv = _interval(res, confidence)
    return {"mean": float(res.per_seed.mean()), "ci_low": iv.low, "ci_high": iv.high, "n": res.n_seeds,
            "n_examples": res.n_examples, "unit": unit, "method": _interval_method(res, iv, confidence, what)}


def bootstrap_test(groups: Sequence[Any], statistic: Callable[[np.ndarray], float] = np.mean, *, name: str,
                   null: float = 0.0, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0,
                   unit: str = "", what: str = "the statistic", effect_name: str = "mean over seeds"
                   ) -> tuple[dict[str, Any], TestResult]:
    """``hierarchical_bootstrap``'s record of a per-seed statistic and the test of ``mean = null`` read off the
    same replicates (the p-value inverts the calibrated interval, see ``_bootstrap_p``), with its minimum
    attainable p in ``extras["min_p"]``: one engine for the interval and the test, so the two always agree
    (p < 1 - confidence exactly when the interval excludes ``null``)."""
    confidence = _confidence(confidence)
    rows = _check_groups(groups, "groups")
    res = _resample(rows, statistic, n_resamples, seed)
    iv = _interval(res, confidence)
    record = {"mean": float(res.per_seed.mean()), "ci_low": iv.low, "ci_high": iv.high, "n": res.n_seeds,
              "n_examples": res.n_examples, "unit": unit, "method": _interval_method(res, iv, confidence, what)}
    p, min_p = _bootstrap_p(res, null)  # replicates that never vary: p = 1 (no resampling evidence either way)
    se = (iv.high - iv.low) / (2 * float(sps.norm.ppf(1 - (1 - confidence) / 2)))
    effect = record["mean"] - null
    test = TestResult(name, effect / se if se > 0 else 0.0, p, effect, effect_name, res.n_seeds,
                      extras={"min_p": min_p, "ci_low": iv.low, "ci_high": iv.high, "n_examples": res.n_examples,
                              "null": null})
    return record, test


def _correct_by_seed(values: Any, name: str) -> list[np.ndarray]:
    """One boolean correctness vector per seed (validated by ``_correct_vector``)."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype != object:
        raise StatsError(f"{name} must hold one correctness vector per seed; got one 1-D array. For a single seed "
                         f"pass [{name.removesuffix('_by_seed')}].")
    seq = list(values) if hasattr(values, "__iter__") and not isinstance(values, (str, bytes)) else None
    if not seq:
        raise StatsError(f"{name} must be a non-empty sequence with one correctness vector per seed.")
    return [_correct_vector(v, f"{name}[{i}]") for i, v in enumerate(seq)]


def _paired_rows(a_by_seed: Any, b_by_seed: Any, names: tuple[str, str]) -> list[np.ndarray]:
    """Per seed, an (n, 2) 0/1 array of two correctness vectors on the same examples in the same order."""
    a, b = _correct_by_seed(a_by_seed, names[0]), _correct_by_seed(b_by_seed, names[1])
    if len(a) != len(b):
        raise StatsError(f"{names[0]} has {len(a)} seeds, {names[1]} has {len(b)}; pass the same seeds, in the "
                         "same order, for both.")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.size != y.size:
            raise StatsError(f"seed {i}: {names[0]} has {x.size} examples, {names[1]} has {y.size}; both must be "
                             "scored on the same test examples in the same order.")
    return [np.column_stack([x, y]).astype(np.int8) for x, y in zip(a, b, strict=True)]


def accuracy_ci(correct_by_seed: Sequence[Any], **kw: Any) -> dict[str, Any]:
    """Accuracy record from per-seed correctness vectors (``preds == labels``), via ``hierarchical_bootstrap``.

    Keyword arguments go to ``hierarchical_bootstrap`` (``n_resamples``, ``confidence``, ``seed``, ``unit``,
    ``what``); defaults: unit "fraction", what "accuracy".
    """
    groups = _correct_by_seed(correct_by_seed, "correct_by_seed")
    kw.setdefault("what", "accuracy")
    rec = hierarchical_bootstrap(groups, np.mean, **kw)
    return _with_wilson_floor(rec, groups, kw.get("confidence", 0.95))


def _with_wilson_floor(rec: dict[str, Any], groups: list[np.ndarray], confidence: float) -> dict[str, Any]:
    """Widen an accuracy interval to contain the Wilson interval of the pooled proportion.

    When every test example of every seed is right (or wrong), no resample can vary, yet a finite test set
    still has sampling error: 442 of 442 correct is compatible with a true accuracy of 99.2 %. The Wilson
    interval of all seeds' examples pooled is the narrowest honest statement of that error, so the
    interval is never narrower than it (it only matters when the bootstrap interval degenerates).
    """
    k = int(sum(int(np.sum(g)) for g in groups))
    n = int(sum(g.size for g in groups))
    low, high = proportion_ci(k, n, confidence)
    if rec["ci_low"] is None or low < rec["ci_low"] or high > rec["ci_high"]:
        rec = {**rec, "ci_low": min(low, rec["ci_low"] if rec["ci_low"] is not None else low),
               "ci_high": max(high, rec["ci_high"] if rec["ci_high"] is not None else high),
               "method": rec["method"] + f"; widened to contain the Wilson interval of the pooled {k}/{n}"}
    return rec


def macro_f1_ci(labels_by_seed: Sequence[Any], preds_by_seed: Sequence[Any], n_classes: int,
                **kw: Any) -> dict[str, Any]:
    """Macro-F1 record from per-seed labels and predictions (integers in [0, n_classes)).

    Macro-F1 as ``sklearn.metrics.f1_score(average="macro", zero_division=0)`` computes it (classes absent
    from both labels and predictions are left out of the average), from the confusion counts, so the
    bootstrap is vectorised. Keyword arguments go to ``hierarchical_bootstrap``.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise StatsError(f"n_classes={n_classes!r} must be an integer >= 2 (the number of label values).")
    labels, preds = list(labels_by_seed), list(preds_by_seed)
    if not labels or len(labels) != len(preds):
        raise StatsError(f"labels_by_seed has {len(labels)} seeds and preds_by_seed {len(preds)}; pass one array "
                         "of each per seed (at least one), in the same order.")
    groups = []
    for i, (lab, pred) in enumerate(zip(labels, preds, strict=True)):
        arrays = []
        for nm, v in ((f"labels_by_seed[{i}]", lab), (f"preds_by_seed[{i}]", pred)):
            arr = np.asarray(v)
            if arr.ndim != 1 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise StatsError(f"{nm} must be a non-empty 1-D integer array of class indices; got shape "
                                 f"{arr.shape}, dtype {arr.dtype}.")
            if arr.min() < 0 or arr.max() >= n_classes:
                raise StatsError(f"{nm} has class indices outside [0, {n_classes}); check n_classes or the label "
                                 "encoding.")
            arrays.append(arr.astype(np.int64))
        if arrays[0].size != arrays[1].size:
            raise StatsError(f"seed {i}: {arrays[0].size} labels but {arrays[1].size} predictions.")
        groups.append(np.column_stack(arrays))
    kw.setdefault("what", "macro-F1")
    return hierarchical_bootstrap(groups, _MacroF1(int(n_classes)), **kw)


def retention_ci(correct_full_by_seed: Sequence[Any], correct_comp_by_seed: Sequence[Any],
                 **kw: Any) -> dict[str, Any]:
    """Retention record: per seed, accuracy of the compressed model / accuracy of the full model.

    Both accuracies are computed on the same resampled test examples, so the ratio's interval keeps
    their correlation (the two models err on many of the same examples). Default unit "ratio".
    Keyword arguments go to ``hierarchical_bootstrap``.
    """
    groups = _paired_rows(correct_full_by_seed, correct_comp_by_seed,
                          ("correct_full_by_seed", "correct_comp_by_seed"))
    for i, g in enumerate(groups):
        if not g[:, 0].any():
            raise StatsError(f"seed {i}: the full model got no test example right, so retention is undefined; this "
                             "is a failed training (leave the seed out and report it).")
    kw.setdefault("unit", "ratio")
    kw.setdefault("what", "retention")
    return hierarchical_bootstrap(groups, _Retention(), **kw)


def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n on one fixed test set: ``(low, high)``.

    Wilson (not the normal "Wald" interval) because it stays inside [0, 1] and keeps near-nominal
    coverage for accuracies near 0 or 1 and small n; statsmodels ``proportion_confint(method="wilson")``.
    Only the test-set sampling error: for several seeds use ``accuracy_ci``.
    """
    for nm, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise StatsError(f"{nm}={v!r} must be an integer count.")
    if n < 1 or not 0 <= k <= n:
        raise StatsError(f"need 0 <= k <= n and n >= 1; got k={k}, n={n}.")
    low, high = proportion_confint(int(k), int(n), alpha=1 - _confidence(confidence), method="wilson")
    return float(low), float(high)


# ------------------------------------------------------------- two classifiers on the same test examples

_ACC_DIFF = "accuracy difference (points)"


def stratified_mcnemar(correct_a_by_seed: Sequence[Any], correct_b_by_seed: Sequence[Any],
                       name: str) -> TestResult:
    """Exact McNemar test of A vs B on the discordant examples pooled over seeds.

    b = examples A gets right and B wrong, c = the reverse, each summed over seeds; under "no
    difference" b ~ Binomial(b + c, 1/2), and p is the exact two-sided binomial p. This is the
    Cochran-Mantel-Haenszel test with each matched pair (example, seed) as its own stratum: the CMH
    statistic then reduces to McNemar's (b - c)^2 / (b + c), reported as ``statistic``. It is
    conditional on the trained models (seed-to-seed variation is not in it); ``paired_difference``
    generalises over seeds. Effect: pooled accuracy difference A - B in percentage points.
    ``extras``: b, c, discordant (b + c), min_p (2 * 0.5**(b + c), capped at 1: with few discordant
    examples even b = all cannot reject), n_seeds, pooled accuracies. No discordant example: p = 1 and a
    note (the one rule for degenerate paired differences).
    """
    rows = _paired_rows(correct_a_by_seed, correct_b_by_seed, ("correct_a_by_seed", "correct_b_by_seed"))
    allrows = np.concatenate(rows)
    a_right, b_right = allrows[:, 0] == 1, allrows[:, 1] == 1
    b, c = int((a_right & ~b_right).sum()), int((~a_right & b_right).sum())
    n_ex = int(allrows.shape[0])
    extras: dict[str, Any] = {"b": b, "c": c, "discordant": b + c, "min_p": min(1.0, 2 * 0.5 ** (b + c)),
                              "n_seeds": len(rows), "accuracy_a": float(allrows[:, 0].mean()),
                              "accuracy_b": float(allrows[:, 1].mean())}
    if b + c == 0:
        extras["note"] = "no discordant example (A and B right on the same examples): statistic undefined, p set to 1"
        return TestResult(name, 0.0, 1.0, 0.0, _ACC_DIFF, n_ex, extras=extras)
    p = float(sps.binomtest(b, b + c, 0.5).pvalue)
    return TestResult(name, float((b - c) ** 2 / (b + c)), min(1.0, p), 100.0 * (b - c) / n_ex, _ACC_DIFF, n_ex,
                      extras=extras)


#: The power at which :func:`paired_difference` states its minimum detectable effect (``mde_points``).
MDE_POWER = 0.8


def paired_difference(correct_a_by_seed: Sequence[Any], correct_b_by_seed: Sequence[Any], *, name: str,
                      n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Accuracy difference A - B with a hierarchical paired bootstrap interval, a p-value and the MDE.

    Both classifiers are scored on the same test examples per seed (seed i of A with seed i of B); each
    replicate resamples seeds, then examples, and uses the *same* draws for A and B, so their shared
    variation cancels. Returns ``{diff_points, ci_low, ci_high, p_value, min_p, prob_improvement,
    mde_points, se_points, n, n_examples, method, test}`` (all in percentage points):

    - ``diff_points``: mean over seeds of acc_a - acc_b, x 100; ``ci_low``/``ci_high``: the calibrated
      percentile interval of ``hierarchical_bootstrap``.
    - ``p_value``: two-sided, P = (#{replicates on the far side of 0} + 1) / (n_resamples + 1) for the
      smaller tail. With one seed p = 2 P; with more it is read through the same calibration as the
      interval, so p < 1 - confidence when the interval excludes 0 (see ``_bootstrap_p``).
      ``min_p``: the smallest p this procedure can give at this n (one seed: 2 / (n_resamples + 1);
      5 seeds, 10000 resamples: about 0.007-0.03, because the t reference with 4 df has heavy tails).
    - ``prob_improvement``: P(a seed of A beats a seed of B in accuracy), ties counting 1/2, over all
      (seed of A, seed of B) pairs (rliable's probability of improvement).
    - ``se_points``: the normal-equivalent standard error of the interval, width / (2 z_{1-a/2});
      ``mde_points`` = (z_0.975 + z_0.8) x se_points, the difference this design detects with 80% power
      at alpha = 0.05.
    - ``test``: a ``TestResult`` (statistic = diff_points / se_points, effect = diff_points) for
      ``TestFamilies``; its extras carry min_p, prob_improvement, ci_low, ci_high, mde_points.

    When A and B are right on exactly the same examples in every seed the difference is 0 in every
    resample: diff 0, interval [0, 0], p = 1, statistic 0, min_p = 1, MDE undefined (None), with a note.
    This is the one rule for degenerate differences: never an exception, never a standardised effect.
    """
    confidence = _confidence(confidence)
    rows = _paired_rows(correct_a_by_seed, correct_b_by_seed, ("correct_a_by_seed", "correct_b_by_seed"))
    acc_a = np.array([g[:, 0].mean() for g in rows])
    acc_b = np.array([g[:, 1].mean() for g in rows])
    pi = float(_pi_pairs(acc_a, acc_b))
    n_seeds, n_ex = len(rows), int(sum(g.shape[0] for g in rows))
    if not any((g[:, 0] != g[:, 1]).any() for g in rows):
        note = "A and B are right on exactly the same examples in every seed: difference 0 in every resample, p = 1"
        test = TestResult(name, 0.0, 1.0, 0.0, _ACC_DIFF, n_seeds,
                          extras={"min_p": 1.0, "prob_improvement": pi, "ci_low": 0.0, "ci_high": 0.0,
                                  "mde_points": None, "n_examples": n_ex, "note": note})
        return {"diff_points": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0, "min_p": 1.0,
                "prob_improvement": pi, "mde_points": None, "se_points": 0.0, "n": n_seeds, "n_examples": n_ex,
                "method": note, "test": test}
    res = _resample(rows, _AccuracyDifference(), n_resamples, seed)
    iv = _interval(res, confidence)
    p, min_p = _bootstrap_p(res)
    diff = 100.0 * float(res.per_seed.mean())
    low, high = 100.0 * iv.low, 100.0 * iv.high
    se = (high - low) / (2 * float(sps.norm.ppf(1 - (1 - confidence) / 2)))
    mde = (float(sps.norm.ppf(0.975)) + float(sps.norm.ppf(MDE_POWER))) * se
    method = _interval_method(res, iv, confidence, "the paired accuracy difference A - B, in points")
    test = TestResult(name, diff / se if se > 0 else 0.0, p, diff, _ACC_DIFF, n_seeds,
                      extras={"min_p": min_p, "prob_improvement": pi, "ci_low": low, "ci_high": high,
                              "mde_points": mde, "n_examples": n_ex})
    return {"diff_points": diff, "ci_low": low, "ci_high": high, "p_value": p, "min_p": min_p,
            "prob_improvement": pi, "mde_points": mde, "se_points": se, "n": n_seeds, "n_examples": n_ex,
            "method": method, "test": test}


# -------------------------------------------------------------------------------- declared test families


def min_attainable_p(test: TestResult) -> float | None:
    """The smallest p-value ``test`` could have reached at its n, or None when there is no such floor.

    ``extras["min_p"]`` when the test recorded it (every test of the hierarchical engine does); for this
    module's older discrete tests it is derived: Wilcoxon signed-rank, 2 / 2**n two-sided (1 / 2**n
    one-sided) over the n non-zero differences of the exact null distribution; McNemar, 2 * 0.5**(b + c)
    exact, or the chi-squared p of b + c discordant pairs all on one side. t-tests, ANOVA and the like
    have a continuous statistic with no floor: None.
    """
    if test.extras.get("min_p") is not None:
        return float(test.extras["min_p"])
    ex = test.extras
    if test.effect_name == "matched-pairs rank-biserial r" and "n_nonzero" in ex:
        n = int(ex["n_nonzero"])
        return min(1.0, (2.0 if test.alternative == "two-sided" else 1.0) * 0.5**n)
    if test.effect_name == "odds ratio b/c" and {"b", "c"} <= ex.keys():
        n = int(ex["b"]) + int(ex["c"])
        if n == 0:
            return 1.0
        if ex.get("exact", True):
            return min(1.0, 2 * 0.5**n)
        return float(sps.chi2.sf((n - 1) ** 2 / n, 1))
    return None


def _holm_adjust(p_values: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values, same order: max over j <= i of min(1, (m - j) p_(j)) for sorted p.

    The same numbers as ``holm`` (statsmodels), without its ``gc.collect()`` per call (~0.1-0.3 s each),
    which ``TestFamilies`` would pay once per family on every ``results()``/``table()``.
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (p.size - np.arange(p.size)) * p[order])
    out = np.empty(p.size)
    out[order] = np.maximum.accumulate(stepped)
    return out


class TestFamilies:
    """A chapter's test families, declared once before its results, with Holm within each family.

    ``fam = TestFamilies({"healing": "does healing recover accuracy at each keep ratio?", ...})`` maps
    each family's name to the question it asks. ``fam.add(family, test)`` files a test (``TestResult``)
    under a declared family; an unknown family, a test name used before (in any family: no test sits in
    two families) or a p-value outside [0, 1] raises ``StatsError``. ``results()`` returns copies with
    ``p_holm`` from Holm within each family and ``extras["family"]``; ``table()`` is one row per test;
    ``can_reject(alpha)`` lists the tests that *cannot* reject at level alpha whatever the data (their
    minimum attainable p exceeds alpha): add seeds or examples, or drop them from the claims.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, families: Mapping[str, str]) -> None:
        if not isinstance(families, Mapping) or not families:
            raise StatsError("declare the families as a non-empty dict {name: the question this family asks}.")
        for k, v in families.items():
            if not isinstance(k, str) or not k.strip() or not isinstance(v, str) or not v.strip():
                raise StatsError(f"family {k!r}: names and questions must be non-empty strings, e.g. "
                                 "{'healing': 'does healing recover accuracy?'}.")
        self.families: dict[str, str] = dict(families)
        self._tests: list[tuple[str, TestResult]] = []
        self._family_of: dict[str, str] = {}

    def add(self, family: str, test: TestResult) -> TestResult:
        """File ``test`` under ``family`` (declared in the constructor); returns the test unchanged."""
        if family not in self.families:
            raise StatsError(f"unknown test family {family!r}; declared: {sorted(self.families)}. Declare every "
                             "family once, up front, in TestFamilies({...}).")
        if not isinstance(test, TestResult):
            raise StatsError(f"expected a TestResult, got {type(test).__name__}.")
        if test.name in self._family_of:
            raise StatsError(f"test {test.name!r} is already in family {self._family_of[test.name]!r}; each test "
                             "has one name and sits in one family (rename it if it is a different test).")
        p = test.p_value
        if not (isinstance(p, (int, float, np.floating)) and math.isfinite(p) and 0 <= p <= 1):
            raise StatsError(f"test {test.name!r} has p_value={p!r}; it must be in [0, 1]. Leave out tests that "
                             "could not run and report why.")
        self._family_of[test.name] = family
        self._tests.append((family, test))
        return test

    def results(self) -> list[TestResult]:
        """Copies of the tests in the order added, with ``p_holm`` (Holm within each family), ``extras["family"]``."""
        adjusted: dict[str, float] = {}
        for fam in self.families:
            members = [t for f, t in self._tests if f == fam]
            if members:
                adjusted.update(zip([t.name for t in members], _holm_adjust([t.p_value for t in members]),
                                    strict=True))
        return [dataclasses.replace(t, p_holm=float(adjusted[t.name]), extras={**t.extras, "family": f})
                for f, t in self._tests]

    def table(self) -> pd.DataFrame:
        """One row per test: family, name, statistic, p_value, p_holm, min_p, effect_size, effect_name, n, extras."""
        cols = ["family", "name", "statistic", "p_value", "p_holm", "min_p", "effect_size", "effect_name", "n"]
        rows = []
        for t in self.results():
            row = {"family": t.extras["family"], "name": t.name, "statistic": t.statistic, "p_value": t.p_value,
                   "p_holm": t.p_holm, "min_p": min_attainable_p(t), "effect_size": t.effect_size,
                   "effect_name": t.effect_name, "n": t.n}
            row.update({k: v for k, v in t.extras.items() if k not in row})
            rows.append(row)
        return pd.DataFrame(rows, columns=cols) if not rows else pd.DataFrame(rows)

    def declared(self) -> pd.DataFrame:
        """One row per declared family, in declaration order: ``family``, ``question`` and ``tests`` (how many
        were filed), so a chapter can show its families before its results."""
        counts = pd.Series([f for f, _ in self._tests], dtype=object).value_counts()
        return pd.DataFrame([{"family": k, "question": v, "tests": int(counts.get(k, 0))}
                             for k, v in self.families.items()])

    def can_reject(self, alpha: float = 0.05) -> pd.DataFrame:
        """The tests that cannot reject at ``alpha`` at their n: minimum attainable p > alpha (table rows).

        Such a test's verdict is decided by its design, not its data; a table with no rows means every test
        could reject. Tests without a known floor (``min_p`` None) are assumed able to.
        """
        if not 0 < alpha < 1:
            raise StatsError(f"alpha={alpha!r} must be strictly between 0 and 1, e.g. 0.05.")
        table = self.table()
        if table.empty:
            return table
        floor = pd.to_numeric(table["min_p"], errors="coerce")
        return table[floor > alpha].reset_index(drop=True)


def wins(tests: pd.DataFrame | Iterable[dict[str, Any]], family: str, alpha: float = 0.05) -> dict[str, list[str]]:
    """Per scope, the members of ``family`` whose test rejects after Holm with a negative effect (A below its
    reference: less damage, less regret), in the order filed.

    ``tests``: ``TestFamilies.table()`` or its records (a chapter's published ``summary.json`` tests); each
    test of ``family`` carries ``member`` (what was tested, e.g. an importance method) and ``scope`` (what it
    was tested on: ``"pooled tasks"`` or one task) in its extras. Every scope tested appears, with an empty
    list where nothing won, so "won on amazon, not on mr" is never merged into "won".
    """
    records = tests.to_dict("records") if isinstance(tests, pd.DataFrame) else list(tests)
    out: dict[str, list[str]] = {}
    for t in records:
        if t.get("family") != family:
            continue
        if "member" not in t or "scope" not in t:
            raise StatsError(f"test {t.get('name')!r} of family {family!r} has no member/scope; file it with "
                             "extras member=... and scope=... (re-run the chapter that wrote it).")
        won = out.setdefault(str(t["scope"]), [])
        p = t.get("p_holm")
        if p is not None and p < alpha and t["effect_size"] < 0:
            won.append(str(t["member"]))
    return out



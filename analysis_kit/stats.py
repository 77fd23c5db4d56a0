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
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as _sm_mcnemar
from statsmodels.stats.multitest import multipletests
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

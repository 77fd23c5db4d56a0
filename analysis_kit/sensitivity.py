"""How much do the choices behind a layer-importance ranking change it, and does that matter for pruning?

A ranking of blocks is a product of many choices: the importance method, the model's seed, width, heads
and depth, the training data, and the calibration set the scores are computed on. This module measures
how stable rankings are across the levels of such a factor and what instability costs:

- ``normalise`` / ``coarsen`` put rankings on a common scale (ranks in [0, 1]; relative-depth bins so
  models of different depth can be compared);
- ``agreement`` gives Kendall's W, the mean pairwise Kendall tau and top-k / drop-set Jaccard overlap
  across the levels of one factor, averaged over replicate blocks, with a hierarchical percentile
  bootstrap (blocks, then layers) for the interval;
- ``variance_decomposition`` splits the variance of normalised importance into a stable layer profile,
  layer x factor interactions and a residual (statsmodels OLS ANOVA), with a cluster bootstrap interval
  for each share;
- ``drop_set`` / ``pruning_transfer`` / ``compare_to_reference`` ask whether a pruning choice made under
  one condition keeps its quality under another (retention = pruned / full accuracy);
- ``gaps`` gives train-test and cross-domain accuracy gaps per model;
- ``ofat_grid``, ``sample_batches``, ``check_params`` and ``cached_scores`` are the chapter's plumbing
  (the one-factor-at-a-time training grid, calibration batches, early parameter checks, and importance
  scores memoised on disk).

Input tables are tidy: one row per (ranking, layer) with a ``score`` where higher = more important, as
produced by ``importance.compute``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import stats
from .errors import LayerwiseError

#: Agreement statistics computed by :func:`agreement`, in output order.
AGREEMENT_STATS = ("kendall_w", "tau", "jaccard_top", "jaccard_drop")


class SensitivityError(LayerwiseError):
    """Input that the sensitivity analysis cannot use (missing columns, incomplete or unbalanced designs)."""


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise SensitivityError(f"{what} needs a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SensitivityError(f"{what}: column(s) {missing} missing (have {list(df.columns)}); pass a tidy table "
                               "with one row per (ranking, layer), as importance.compute returns.")
    if df.empty:
        raise SensitivityError(f"{what}: the table is empty; check the filter that produced it.")


def _groups(df: pd.DataFrame, by: Sequence[str]):
    """(key dict, sub-frame) pairs; a single group when ``by`` is empty."""
    if not by:
        yield {}, df
        return
    for key, g in df.groupby(list(by), sort=False):
        yield dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), g


def n_select(n_layers: int, frac: float) -> int:
    """How many blocks a fraction ``frac`` of ``n_layers`` is (rounded, at least 1, at most n - 1)."""
    if not 0 < frac < 1:
        raise SensitivityError(f"fraction {frac!r} must be strictly between 0 and 1 (e.g. 1/3 of the blocks).")
    if n_layers < 2:
        raise SensitivityError(f"{n_layers} layer(s): selecting a subset needs at least 2.")
    return int(min(n_layers - 1, max(1, round(frac * n_layers))))


# ------------------------------------------------------------------------------------ common scales


def normalise(df: pd.DataFrame, within: Sequence[str], value: str = "score", how: str = "rank",
              out: str = "norm") -> pd.DataFrame:
    """Add column ``out``: ``value`` normalised within each ranking (rows sharing ``within``).

    ``how="rank"``: average rank scaled to [0, 1] (1 = most important), so methods with different scales
    (Fisher is heavy-tailed, ablation can be negative) become comparable; ``how="z"``: z-score (0 when
    the ranking is constant). Either way each ranking has the same mean, so factor main effects vanish
    and only the *profile over layers* can differ between conditions.
    """
    _require(df, [*within, value], "normalise")
    if how not in ("rank", "z"):
        raise SensitivityError(f"how={how!r}: choose 'rank' or 'z'.")
    g = df.groupby(list(within), sort=False)[value]
    if how == "rank":
        size = g.transform("size").to_numpy(dtype=float)
        if (size < 2).any():
            raise SensitivityError("a ranking has a single layer; normalising needs at least 2 layers per ranking.")
        normed = (g.rank(method="average").to_numpy(dtype=float) - 1) / (size - 1)
    else:
        sd = g.transform("std", ddof=0).to_numpy(dtype=float)
        centred = df[value].to_numpy(dtype=float) - g.transform("mean").to_numpy(dtype=float)
        normed = np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)
    return df.assign(**{out: normed})


def coarsen(df: pd.DataFrame, n_bins: int, within: Sequence[str], layer: str = "layer",
            value: str = "score") -> pd.DataFrame:
    """Average ``value`` over relative-depth bins so that models of different depth share items.

    Layer ``i`` of an ``L``-block model falls in bin ``floor(i * n_bins / L)``; the result has one row per
    (ranking, bin) with the bin number in ``layer``. With ``L == n_bins`` nothing changes.
    """
    _require(df, [*within, layer, value], "coarsen")
    depth = df.groupby(list(within), sort=False)[layer].transform("max").to_numpy() + 1
    if (depth < n_bins).any() or n_bins < 2:
        raise SensitivityError(f"n_bins={n_bins} must be >= 2 and at most the smallest depth ({int(depth.min())}).")
    binned = df.assign(**{layer: (df[layer].to_numpy() * n_bins) // depth})
    return binned.groupby([*within, layer], sort=False, as_index=False)[value].mean()


# --------------------------------------------------------------------------- vectorised agreement maths


def _tie_sum(x: np.ndarray) -> np.ndarray:
    """Sum over tie groups of t^3 - t along the last axis (= sum over items of (group size)^2 - 1)."""
    counts = (x[..., :, None] == x[..., None, :]).sum(-1)
    return (counts**2 - 1).sum(-1)


def kendall_w(x: np.ndarray) -> np.ndarray:
    """Kendall's W of ``x[..., raters, items]`` (tie-corrected, raw scores ranked per rater); NaN if undefined.

    Same formula as ``stats.kendalls_w``, vectorised over leading axes (bootstrap resamples).
    """
    x = np.asarray(x, dtype=float)
    m, n = x.shape[-2:]
    ranks = sps.rankdata(x, axis=-1)
    s = ((ranks.sum(-2) - m * (n + 1) / 2) ** 2).sum(-1)
    denom = m**2 * (n**3 - n) - m * _tie_sum(ranks).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 12 * s / np.where(denom > 0, denom, 1), np.nan)


def mean_tau(x: np.ndarray) -> np.ndarray:
    """Mean Kendall tau-b over all pairs of raters of ``x[..., raters, items]``; NaN where a rater is constant."""
    x = np.asarray(x, dtype=float)
    sign = np.sign(x[..., :, None] - x[..., None, :])  # (..., m, n, n)
    taus = []
    for i, j in combinations(range(x.shape[-2]), 2):
        a, b = sign[..., i, :, :], sign[..., j, :, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            taus.append((a * b).sum((-1, -2)) / np.sqrt((a * a).sum((-1, -2)) * (b * b).sum((-1, -2))))
    return np.mean(taus, axis=0)


def _top_mask(x: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Boolean mask of the ``k`` largest (or smallest) items per row; ties go to the lower item index."""
    order = np.argsort(-x if largest else x, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def mean_jaccard(x: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Mean Jaccard overlap, over rater pairs, of each rater's ``k`` most (``largest``) or least important items."""
    x = np.asarray(x, dtype=float)
    if not 1 <= k < x.shape[-1]:
        raise SensitivityError(f"k={k} must be between 1 and the number of items minus 1 ({x.shape[-1] - 1}).")
    mask = _top_mask(x, k, largest)
    pairs = [(mask[..., i, :] & mask[..., j, :]).sum(-1) / (mask[..., i, :] | mask[..., j, :]).sum(-1)
             for i, j in combinations(range(x.shape[-2]), 2)]
    return np.mean(pairs, axis=0)


def jaccard(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """|A ∩ B| / |A ∪ B| of two selections (1.0 for two empty selections)."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def _stat_fns(k: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {"kendall_w": kendall_w, "tau": mean_tau, "jaccard_top": lambda x: mean_jaccard(x, k, True),
            "jaccard_drop": lambda x: mean_jaccard(x, k, False)}


# ------------------------------------------------------------------------------------------ agreement


def _block_array(g: pd.DataFrame, factor: str, block: Sequence[str], layer: str, value: str) -> np.ndarray:
    """Array (blocks, levels, layers) of one group; every block must hold every (level, layer) once."""
    dup = g.duplicated([*block, factor, layer])
    if dup.any():
        raise SensitivityError(f"agreement over {factor!r}: {int(dup.sum())} duplicate (block, level, layer) rows; "
                               f"add the column that tells them apart to block= or by= (block={list(block)}).")
    levels, layers_ = pd.unique(g[factor]), np.sort(pd.unique(g[layer]))
    mats = []
    for _, b in _groups(g, block):
        mat = b.pivot(index=factor, columns=layer, values=value).reindex(index=levels, columns=layers_)
        if mat.isna().any().any():
            raise SensitivityError(f"agreement over {factor!r}: a block lacks some (level, layer) scores; every "
                                   f"block needs all levels {list(levels)} x layers {list(layers_)}.")
        mats.append(mat.to_numpy(dtype=float))
    return np.stack(mats)


def agreement(df: pd.DataFrame, factor: str, block: Sequence[str] = (), by: Sequence[str] = (),
              k_frac: float = 1 / 3, layer: str = "layer", value: str = "score", n_boot: int = 1000,
              seed: int = 0, confidence: float = 0.95, detail: bool = False,
              ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Agreement of the rankings made at the different levels of ``factor``, per group of ``by``.

    Within a group the rows are split into replicate *blocks* (e.g. one per seed when the factor is the
    calibration domain); in each block the levels of ``factor`` are the raters and the layers the items.
    Per block: Kendall's W, the mean pairwise Kendall tau-b, and the mean pairwise Jaccard overlap of the
    ``k`` most important (``jaccard_top``) and the ``k`` least important layers (``jaccard_drop``, the set
    a pruning recipe would remove), ``k = n_select(layers, k_frac)``. The estimate is the mean over blocks;
    the interval is a percentile bootstrap that resamples blocks (when there are several) and layers.
    Tau and W near 1 mean the factor barely moves the ranking.

    Returns one row per group and statistic: ``by..., factor, stat, estimate, ci_low, ci_high, n_blocks,
    n_levels, n_layers, k, ci_method``; with ``detail`` also the per-block values (``by..., factor, stat,
    block, value``) for charts that show every replicate.
    """
    _require(df, [factor, layer, value, *block, *by], "agreement")
    if n_boot < 200:
        raise SensitivityError(f"n_boot={n_boot} is too few resamples for a percentile interval; use at least 200.")
    rows, per_block = [], []
    for key, g in _groups(df, by):
        arr = _block_array(g, factor, block, layer, value)
        names = [" · ".join(map(str, k.values())) or "all" for k, _ in _groups(g, block)]
        nb, m, n = arr.shape
        if m < 2:
            raise SensitivityError(f"factor {factor!r} has a single level in group {key}; agreement needs >= 2.")
        k = n_select(n, k_frac)
        rng = np.random.default_rng(seed)
        bi = rng.integers(0, nb, size=(n_boot, nb)) if nb > 1 else np.zeros((n_boot, 1), dtype=int)
        li = rng.integers(0, n, size=(n_boot, n))
        boot = np.take_along_axis(arr[bi], li[:, None, None, :], axis=-1)  # (resamples, blocks, levels, layers)
        how = f"percentile bootstrap {100 * confidence:g}% CI, {n_boot} resamples of " + \
              (f"{nb} blocks and {n} layers" if nb > 1 else f"{n} layers (one block)")
        alpha = 1 - confidence
        for name, fn in _stat_fns(k).items():
            point = fn(arr)
            est = float(np.nanmean(point)) if np.isfinite(point).any() else np.nan  # NaN: every block constant
            per_block += [{**key, "factor": factor, "stat": name, "block": b, "value": float(v)}
                          for b, v in zip(names, point, strict=True)]
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # resamples with a constant row: NaN, dropped
                vals = np.nanmean(fn(boot), axis=1)
            vals = vals[np.isfinite(vals)]
            lo, hi = (np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
                      if vals.size >= n_boot / 2 else (np.nan, np.nan))
            rows.append({**key, "factor": factor, "stat": name, "estimate": est, "ci_low": float(lo),
                         "ci_high": float(hi), "n_blocks": nb, "n_levels": m, "n_layers": n, "k": k,
                         "ci_method": how if np.isfinite(lo) else "undefined in most resamples: no interval"})
    return (pd.DataFrame(rows), pd.DataFrame(per_block)) if detail else pd.DataFrame(rows)


def agreement_record(row: pd.Series | dict[str, Any], unit: str = "") -> dict[str, Any]:
    """A ``summary.json`` metric record ``{mean, ci_low, ci_high, n, unit, method}`` from an agreement row."""
    lo, hi = row["ci_low"], row["ci_high"]
    return {"mean": float(row["estimate"]), "ci_low": None if not np.isfinite(lo) else float(lo),
            "ci_high": None if not np.isfinite(hi) else float(hi), "n": int(row["n_blocks"]), "unit": unit,
            "method": str(row["ci_method"])}


# ------------------------------------------------------------------------------- variance decomposition


def _check_balanced(df: pd.DataFrame, layer: str, factors: Sequence[str]) -> None:
    cells = df.groupby([layer, *factors], sort=False).size()
    full = int(np.prod([df[c].nunique() for c in (layer, *factors)]))
    if len(cells) != full or cells.nunique() != 1:
        raise SensitivityError(f"the design over {[layer, *factors]} is not a balanced full factorial ({len(cells)} of "
                               f"{full} cells present, counts {sorted(cells.unique())[:5]}); restrict the table to a "
                               "crossed subset (e.g. one factor at a time with seeds) before decomposing.")


def _eta_fast(y: np.ndarray, codes: dict[str, np.ndarray], layer_codes: np.ndarray) -> dict[str, float]:
    """Shares of the total sum of squares for a balanced design, from cell means (no model fit)."""
    total = float(((y - y.mean()) ** 2).sum())

    def ss_between(groups: np.ndarray) -> float:
        _, inv, cnt = np.unique(groups, return_inverse=True, return_counts=True)
        means = np.bincount(inv, weights=y) / cnt
        return float((cnt * (means - y.mean()) ** 2).sum())

    ss_layer = ss_between(layer_codes)
    out = {"layer": ss_layer / total}
    for name, c in codes.items():
        # with the layer fitted first, the "layer x f" term carries SS(layer, f cells) - SS(layer)
        out[name] = (ss_between(layer_codes * (c.max() + 1) + c) - ss_layer) / total
    out["residual"] = 1 - sum(out.values())
    return out


def variance_decomposition(df: pd.DataFrame, factors: Sequence[str], by: Sequence[str] = (), value: str = "norm",
                           layer: str = "layer", cluster: str = "seed", n_boot: int = 300, seed: int = 0,
                           confidence: float = 0.95) -> pd.DataFrame:
    """Share of the variance of normalised importance explained by the layer and each layer x factor term.

    Per group of ``by``, fits ``value ~ C(layer) + sum_f C(layer):C(f)`` by OLS (statsmodels, sequential
    type-I sums of squares, equal to type II on the balanced full factorial this requires). ``eta_sq`` of
    a term is its sum of squares over the total: ``layer`` is the part of importance that is the same
    under every choice, ``layer x f`` how much the profile moves with ``f``, ``residual`` the
    higher-order interactions. Normalise first (:func:`normalise`) so rankings share a mean. The F test
    of each interaction asks whether the factor changes the profile at all. Intervals: percentile
    bootstrap resampling whole ``cluster`` units (e.g. seeds) with replacement, relabelled as distinct.

    Returns one row per group and term: ``by..., term, eta_sq, ci_low, ci_high, df, F, p_value,
    n_clusters, ci_method``.
    """
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    _require(df, [value, layer, cluster, *factors, *by], "variance_decomposition")
    if not factors:
        raise SensitivityError("pass at least one factor to decompose over (e.g. ['seed', 'method']).")
    rows = []
    for key, g in _groups(df, by):
        g = g.reset_index(drop=True)
        _check_balanced(g, layer, factors)
        safe = {f: f"f{i}" for i, f in enumerate(factors)}
        data = pd.DataFrame({"y": g[value].to_numpy(dtype=float), "layer": g[layer].astype(str).to_numpy(),
                             **{safe[f]: g[f].astype(str).to_numpy() for f in factors}})
        formula = "y ~ C(layer)" + "".join(f" + C(layer):C({safe[f]})" for f in factors)
        table = anova_lm(ols(formula, data=data).fit(), typ=1)
        total = float(table["sum_sq"].sum())
        names = {"C(layer)": "layer", "Residual": "residual",
                 **{f"C(layer):C({safe[f]})": f"layer × {f}" for f in factors}}

        # cluster bootstrap on the fast cell-mean formula (checked equal to the OLS table in the tests)
        y = data["y"].to_numpy()
        lay = pd.factorize(data["layer"])[0]
        codes = {f: pd.factorize(data[safe[f]])[0] for f in factors}
        clus = g[cluster].to_numpy()
        uniq = pd.unique(clus)
        members = [np.flatnonzero(clus == c) for c in uniq]
        rng = np.random.default_rng(seed)
        boot = []
        for _ in range(n_boot):
            pick = rng.integers(0, len(uniq), size=len(uniq))
            idx = np.concatenate([members[p] for p in pick])
            # a resampled cluster is a new unit: relabel the cluster factor so copies stay distinct
            cc = {f: (np.repeat(np.arange(len(pick)), [len(members[p]) for p in pick]) if f == cluster else c[idx])
                  for f, c in codes.items()}
            boot.append(_eta_fast(y[idx], {f"layer × {f}": v for f, v in cc.items()}, lay[idx]))
        boot_df = pd.DataFrame(boot)
        alpha = 100 * (1 - confidence) / 2
        how = f"percentile bootstrap {100 * confidence:g}% CI, {n_boot} resamples of {len(uniq)} {cluster} clusters"
        for term, r in table.iterrows():
            name = names[term]
            lo, hi = np.nanpercentile(boot_df[name], [alpha, 100 - alpha]) if name in boot_df else (np.nan, np.nan)
            rows.append({**key, "term": name, "eta_sq": float(r["sum_sq"]) / total, "ci_low": float(lo),
                         "ci_high": float(hi), "df": float(r["df"]),
                         "F": None if pd.isna(r.get("F")) else float(r["F"]),
                         "p_value": None if pd.isna(r.get("PR(>F)")) else float(r["PR(>F)"]),
                         "n_clusters": len(uniq), "ci_method": how})
    return pd.DataFrame(rows)


def anova_tests(table: pd.DataFrame, by: Sequence[str] = ()) -> list[stats.TestResult]:
    """F tests of the ``layer × factor`` terms of :func:`variance_decomposition` as TestResults (effect: eta²)."""
    _require(table, ["term", "F", "p_value", "eta_sq", "df"], "anova_tests")
    out = []
    for _, r in table[table["term"].str.startswith("layer ×")].iterrows():
        where = ", ".join(f"{c}={r[c]}" for c in by)
        out.append(stats.TestResult(f"ANOVA F: {r['term']}" + (f" ({where})" if where else ""), float(r["F"]),
                                    float(r["p_value"]), float(r["eta_sq"]), "eta squared", int(r["n_clusters"]),
                                    extras={"df": float(r["df"])}))
    return out


# ------------------------------------------------------------------------------------- consequences


def drop_set(scores: pd.Series | dict[int, float], n_drop: int) -> tuple[int, ...]:
    """The ``n_drop`` least important layers (lowest scores; on ties the lower layer index goes first), sorted."""
    s = pd.Series(scores, dtype=float)
    if s.isna().any():
        raise SensitivityError("scores contain NaN; every layer needs a score before choosing what to drop.")
    if not 1 <= n_drop < len(s):
        raise SensitivityError(f"n_drop={n_drop} must be between 1 and {len(s) - 1} (the model has {len(s)} layers).")
    from .strategies import top_k  # the one top-k rule every module shares

    return top_k(s, n_drop, largest=False)


def pruning_transfer(df: pd.DataFrame, evaluate: Callable[[tuple, frozenset[int]], dict[str, float]],
                     model: Sequence[str] = ("arch", "seed"), condition: Sequence[str] = ("method", "condition"),
                     drop_frac: float = 1 / 3, layer: str = "layer", value: str = "score",
                     metric: str = "accuracy") -> pd.DataFrame:
    """Quality of the pruning choice made from each ranking, evaluated on one fixed target.

    For every ranking (``model`` + ``condition`` columns) drop the ``n_select(L, drop_frac)`` least
    important layers and call ``evaluate(model_key, drop)`` (e.g. accuracy on the Amazon test set with
    those blocks skipped). The unpruned model (``drop = ∅``) is evaluated once per model key, and each
    distinct drop set only once (many conditions pick the same layers). ``retention`` = pruned ``metric``
    / full ``metric``. Returns one row per ranking: model and condition columns, ``drop``, ``n_drop``,
    ``metric``, ``full``, ``retention``.
    """
    _require(df, [*model, *condition, layer, value], "pruning_transfer")
    memo: dict[tuple, dict[str, float]] = {}

    def run(mkey: tuple, drop: frozenset[int]) -> float:
        if (mkey, drop) not in memo:
            res = evaluate(mkey, drop)
            if metric not in res:
                raise SensitivityError(f"evaluate() returned {sorted(res)}; it must return {metric!r}.")
            memo[(mkey, drop)] = res
        return float(memo[(mkey, drop)][metric])

    rows = []
    for key, g in _groups(df, [*model, *condition]):
        scores = g.set_index(layer)[value]
        if scores.index.duplicated().any():
            raise SensitivityError(f"ranking {key} has duplicate layers; add the column that tells them apart to "
                                   "model= or condition=.")
        drop = drop_set(scores, n_select(len(scores), drop_frac))
        mkey = tuple(key[c] for c in model)
        full, pruned = run(mkey, frozenset()), run(mkey, frozenset(drop))
        rows.append({**key, "drop": ",".join(map(str, drop)), "n_drop": len(drop), metric: pruned, "full": full,
                     "retention": pruned / full if full else np.nan})
    return pd.DataFrame(rows)


def compare_to_reference(df: pd.DataFrame, value: str, factor: str, reference: Any, pair_on: Sequence[str],
                         by: Sequence[str] = (), name: str = "") -> tuple[pd.DataFrame, list[stats.TestResult]]:
    """Each level of ``factor`` against ``reference``, paired over ``pair_on`` (e.g. seed), per group of ``by``.

    Values of one pairing unit are first averaged over any remaining rows (e.g. over importance methods),
    so that the test has one pair per unit. Returns a table (``by..., factor, level, mean_diff, ci_low,
    ci_high, n``: t interval of the paired difference level - reference) and paired t-tests (not yet
    Holm-corrected; pass the family to ``stats.holm_family``).
    """
    _require(df, [value, factor, *pair_on, *by], "compare_to_reference")
    rows, tests = [], []
    for key, g in _groups(df, by):
        wide = g.groupby([*pair_on, factor], sort=False)[value].mean().unstack(factor)
        if reference not in wide.columns:
            raise SensitivityError(f"reference level {reference!r} of {factor!r} missing in group {key}.")
        for level in [c for c in wide.columns if c != reference]:
            pair = wide[[level, reference]].dropna()
            diff = pair[level] - pair[reference]
            rec = stats.summarize(diff.to_numpy(), over="seeds")
            where = ", ".join(f"{c}={v}" for c, v in key.items())
            label = f"{name or value}: {factor}={level} vs {reference}" + (f" ({where})" if where else "")
            tests.append(stats.paired_ttest(pair[level].to_numpy(), pair[reference].to_numpy(), name=label))
            rows.append({**key, "factor": factor, "level": level, "reference": reference, "mean_diff": rec["mean"],
                         "ci_low": rec["ci_low"], "ci_high": rec["ci_high"], "n": rec["n"]})
    return pd.DataFrame(rows), tests


def gaps(acc: pd.DataFrame, model: Sequence[str] = ("arch", "seed"), split: str = "split",
         value: str = "accuracy", reference: str = "amazon_test", train: str = "amazon_train") -> pd.DataFrame:
    """Generalisation gaps per model: ``train - reference`` (train-test gap) and ``reference - other`` for
    every other split (cross-domain gap). Positive = the model is worse away from its training data."""
    _require(acc, [*model, split, value], "gaps")
    rows = []
    for key, g in _groups(acc, model):
        by_split = g.set_index(split)[value]
        if reference not in by_split:
            raise SensitivityError(f"model {key} has no {reference!r} accuracy; evaluate on the test split first.")
        ref = float(by_split[reference])
        for s, v in by_split.items():
            if s == reference:
                continue
            if s == train:
                rows.append({**key, "kind": "train-test", "versus": s, "gap": float(v) - ref})
            else:
                rows.append({**key, "kind": "cross-domain", "versus": s, "gap": ref - float(v)})
    return pd.DataFrame(rows)


def ofat_grid(centre: dict[str, Any], levels: dict[str, Sequence[Any]]) -> pd.DataFrame:
    """A one-factor-at-a-time design: the centre configuration plus every other level of each factor.

    ``levels[f]`` lists the levels of factor ``f``; the centre's own value must be among them. Returns one
    row per configuration with a ``varied`` column (``"centre"`` or the factor that differs) — the table
    a training loop walks, and what :func:`agreement` compares (centre vs each variant).
    """
    rows = [{**centre, "varied": "centre"}]
    for f, vals in levels.items():
        if f not in centre:
            raise SensitivityError(f"factor {f!r} has no centre value; add it to centre= (have {sorted(centre)}).")
        if centre[f] not in vals:
            raise SensitivityError(f"centre value {centre[f]!r} of {f!r} is not among its levels {list(vals)}.")
        rows += [{**centre, f: v, "varied": f} for v in vals if v != centre[f]]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- notebook glue


def sample_batches(tokenizer: Any, df: pd.DataFrame, n: int, seed: int, batch_size: int = 32,
                   max_length: int = 128) -> list[dict[str, Any]]:
    """Token batches of a seeded, label-stratified sample of ``n`` rows of ``df`` (``n = 0``: all rows).

    Used for calibration sets (importance) and evaluation sets (pruned accuracy); batches are length-
    bucketed, so their order is not the frame's order (neither use needs it).
    """
    from . import data

    _require(df, ["text", "label"], "sample_batches")
    if n < 0:
        raise SensitivityError(f"n={n} must be >= 0 (0 = every row).")
    part = data.subsample(df, n, seed) if n else df
    return data.make_loader(tokenizer, part["text"].tolist(), part["label"].to_numpy(), batch_size=batch_size,
                            shuffle=False, seed=seed, max_length=max_length, bucket=True)


def check_params(seeds: Sequence[int], methods: Sequence[str], cal_domains: Sequence[str], cal_sizes: Sequence[int],
                 levels: dict[str, Sequence[Any]], available_methods: Sequence[str] | None = None) -> None:
    """Fail before any training if the chapter's grid cannot give an answer (too few levels, repeats)."""
    lists = {"seeds": seeds, "methods": methods, "cal_domains": cal_domains, "cal_sizes": cal_sizes, **levels}
    for name, vals in lists.items():
        if len(set(vals)) != len(vals):
            raise SensitivityError(f"{name}={list(vals)} repeats a value; list each level once.")
    for name in ("seeds", "cal_domains", "cal_sizes", *levels):
        if len(lists[name]) < 2:
            raise SensitivityError(f"{name}={list(lists[name])}: stability across a factor needs at least 2 levels.")
    if not methods:
        raise SensitivityError("methods is empty; pass at least one importance method.")
    if available_methods is not None and (unknown := sorted(set(methods) - set(available_methods))):
        raise SensitivityError(f"unknown importance method(s) {unknown}; choose from {list(available_methods)}.")
    if cal_domains[0] != "amazon":
        raise SensitivityError(f"cal_domains={list(cal_domains)} must start with 'amazon' (the training domain, the "
                               "reference for transfer).")


def cached_scores(model_folder: str | Path, calibration: dict[str, Any], methods: Sequence[str], seed: int,
                  options: dict[str, dict[str, Any]], compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """``compute()`` (an importance table) memoised on disk under everything that determines it.

    The key holds the trained model's content-addressed cache folder name, the calibration set's
    description, the methods, seed and options, and a hash of ``importance.py`` (so changed importance
    code recomputes). A re-run of the chapter then skips the importance passes it has already done.
    """
    import hashlib

    from . import importance
    from .cache import cached_json

    code = hashlib.sha256(Path(importance.__file__).read_bytes()).hexdigest()
    spec = {"kind": "importance_scores", "model": Path(model_folder).name, "calibration": calibration,
            "methods": list(methods), "seed": seed, "options": options, "importance_code": code}
    return pd.DataFrame(cached_json("importance", spec, lambda: compute().to_dict(orient="records")))
